"""
What a user hands data/prepare.py and data/benchmarks.py (UTF-8 text, JSONL), read with mistakes
reported as common.UserError: one `error:` line naming the file and the byte offset or line. A module,
not a script.
"""
import codecs
import contextlib
import gzip
import io
import json
import zlib

from common import UserError


@contextlib.contextmanager
def open_text(path):
    """A UTF-8 file, gzip'd or not -> (the file's bytes, a text stream of it: a BOM dropped, every \\r\\n
    and \\r read as \\n). Invalid UTF-8 met while reading is an error naming the byte offset."""
    with open(path, "rb") as raw, io.TextIOWrapper(gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw,
                                                   encoding="utf-8-sig", newline=None) as f:
        try:
            yield raw, f
        except UnicodeDecodeError:  # a second pass finds the offset: the stream does not know it
            raise UserError(f"{path}: invalid UTF-8 at byte offset {invalid_utf8_offset(path)}") from None
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # a truncated or corrupt .gz
            raise UserError(f"{path}: {e}") from None


def invalid_utf8_offset(path):
    """Byte offset (in the uncompressed text) of the first invalid UTF-8 in a file, gzip'd or not."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        while True:
            block = f.read(1 << 20)
            held = decoder.getstate()[0]  # the start of a character cut by the last block
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                return offset - len(held) + e.start
            if not block:
                return None
            offset += len(block)


def json_lines(lines, path):
    """(line number, value) of every non-blank line of a JSONL stream of lines; bad JSON is an error
    naming the line. Lines end at "\\n" only: U+2028 and friends may sit inside JSON strings."""
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
