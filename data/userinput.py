"""
What a user hands the data/ scripts (prepare.py, benchmarks.py) - a command line, UTF-8 text, JSONL -
read with mistakes reported as common.UserError: one `error:` line naming the option, or the file and
the byte offset or line. A module, not a script:
    from data.userinput import ArgumentParser, decode_utf8, json_lines
"""
import argparse
import codecs
import gzip
import json

from common import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one `error:` line (via common.run_main), not the usage text."""

    def error(self, message):
        raise UserError(message)


def decode_utf8(data, path):
    """bytes -> str (a BOM dropped, every \\r\\n and \\r read as \\n); invalid UTF-8 is an error
    naming the file and the byte offset of the first bad byte."""
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: invalid UTF-8 at byte offset {skip + e.start}") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def invalid_utf8_offset(path):
    """Byte offset (in the uncompressed text) of the first invalid UTF-8 in a file, gzip'd or not,
    read in blocks: for a reader that streams text and so does not know where it failed."""
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
    """(line number, value) of every non-blank line of a JSONL text (or stream of lines); bad JSON is
    an error naming the line. Lines end at "\\n" only: U+2028 and friends may sit inside JSON strings."""
    for lineno, line in enumerate(lines.split("\n") if isinstance(lines, str) else lines, 1):
        if line.strip():
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
