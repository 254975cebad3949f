"""
Prepare token datasets: text -> the flat token files that data/loader.py memory-maps.

The bundled corpus (public domain): Jane Austen's six novels and Moby-Dick, data/austen_moby.txt.gz
    python data/prepare.py                      # writes data/austen_bytes/ and data/austen_gpt2/
    python data/prepare.py --tokenizer=bytes    # only data/austen_bytes/
Your own text: .txt files, .jsonl files (a JSON object with a string "text" per line), gzip'd or not
(.txt.gz, .jsonl.gz), or folders of them (searched recursively, in sorted order):
    python data/prepare.py --input notes/ more.jsonl.gz --name=mine   # writes data/mine/ (GPT-2 tokens)

A dataset folder holds train.bin and val.bin (np.uint16 token ids, np.uint32 past 65,536 ids;
<|endoftext|> after every document) and meta.json (tokenizer, dtype, special ids, token counts per
source, the split rule). Validation is the last ~val_fraction of every document (every book), cut at a
paragraph break, so no validation text is ever trained on; a document over DOC_CHARS characters is
first cut into pieces, each split like a document. Text is streamed (memory holds a piece, or one
.jsonl line, whatever the corpus size) and tokenized on --workers processes (data/encode.py), the
output the same for any number. Files are written as *.tmp and renamed into place at the end: a failed
run leaves an existing dataset as it was. Works from any working directory; needs no network.
"""
import argparse
import collections
import gzip
import io
import json
import os
import re
import sys
import time
import zlib

import numpy as np
from tqdm import tqdm

# make `from data.tokenizer import ...` work when run as a script from any working directory
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from common import UserError, run_main  # noqa: E402
from data.encode import cpu_count, encode_stream, encode_text, make_pool, token_chunks, useful_workers  # noqa: E402
from data.tokenizer import NAMES, get_tokenizer  # noqa: E402
from data.userinput import ArgumentParser, invalid_utf8_offset, json_lines  # noqa: E402

DATA_DIR = os.path.join(ROOT, "data")
DEFAULT_CORPUS = os.path.join(DATA_DIR, "austen_moby.txt.gz")
# (title line exactly as it stands in the corpus file, book name); the books appear in this order
BOOKS = [("EMMA", "Emma"), ("MANSFIELD PARK", "Mansfield Park"), ("NORTHANGER ABBEY", "Northanger Abbey"),
         ("Persuasion", "Persuasion"), ("PRIDE AND PREJUDICE", "Pride and Prejudice"),
         ("SENSE AND SENSIBILITY", "Sense and Sensibility"), ("MOBY DICK; OR THE WHALE", "Moby-Dick")]
EXTENSIONS = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")
# where a document may be cut, best first (each eats the whitespace around it)
PARAGRAPH_BREAK = re.compile(r"\s*\n[ \t]*\n\s*")
LINE_BREAK = re.compile(r"\s*\n\s*")
WHITESPACE = re.compile(r"\s+")
# transcriber lines left over from Project Gutenberg, dropped as whole paragraphs
BOILERPLATE = ("Produced by ", "End of Project Gutenberg")
DOC_CHARS = 4_000_000   # longer documents are cut in pieces (a piece takes up to 4 bytes per character)
READ_CHARS = 1_000_000  # a .txt file is read this much at a time
SPLIT_RULE = ("validation = the last ~{pct:g}% of every {unit}, cut at the paragraph break nearest "
              "that point (else a line break); {fallback}"
              "<|endoftext|> follows every {unit} in each split")
USER_FALLBACK = ("documents longer than {doc_chars:,} characters are first cut at paragraph breaks (else "
                 "line breaks, else spaces) into pieces of at most that length, each split as a document; "
                 "documents with no break near their end go whole to train; if no document can be cut, "
                 "the last whole documents are validation (a lone document is cut at a space); ")


# ----------------------------------------------------------------------------- text -> documents

def unwrap(lines):
    """Hard-wrapped lines -> one line per paragraph; paragraphs joined by a blank line."""
    paragraphs, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    return "\n\n".join(p for p in paragraphs if not p.startswith(BOILERPLATE))


def read_books(path=DEFAULT_CORPUS):
    """The bundled corpus -> [(book name, unwrapped text)], cut at the books' title lines."""
    if not os.path.isfile(path):
        raise UserError(f"corpus not found: {path}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    starts = []
    for title, _ in BOOKS:
        hits = [i for i, line in enumerate(lines) if line.strip() == title]
        if len(hits) != 1:
            raise UserError(f"{path}: expected one title line {title!r}, found {len(hits)}")
        starts.append(hits[0])
    if starts != sorted(starts):
        raise UserError(f"{path}: books are not in the expected order")
    ends = starts[1:] + [len(lines)]
    return [(name, unwrap(lines[a:b])) for (_, name), a, b in zip(BOOKS, starts, ends)]


def json_texts(lines, path):
    """The "text" of every row of a JSONL stream; a row without one is an error naming its line."""
    for lineno, row in json_lines(lines, path):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise UserError(f'{path}, line {lineno}: expected an object with a string "text" field')
        yield row["text"].replace("\r\n", "\n")


def piece_end(text, limit):
    """Where to end a piece of a long text: the last paragraph break (else line break, else
    space) in text[limit // 2:limit]. Returns (end of the piece, start of the rest)."""
    for pattern in (PARAGRAPH_BREAK, LINE_BREAK, WHITESPACE):
        for start in (max(limit - 2**16, limit // 2), limit // 2):  # most text breaks often: look near the end first
            last = None
            for last in pattern.finditer(text, start, limit):
                pass
            if last:
                return last.start(), pattern.match(text, last.start()).end()  # the whole break
    return limit, limit


def cut_long(blocks, limit):
    """The text blocks of one document -> the document, whole if it has at most `limit` characters,
    else in pieces of at most `limit` (see piece_end), holding at most ~limit characters at a time."""
    parts, n = [], 0
    for block in blocks:
        parts.append(block)
        n += len(block)
        if n > limit:
            text = "".join(parts)
            parts.clear()
            while len(text) > limit:
                end, start = piece_end(text, limit)
                piece, text = text[:end], text[start:]  # not text and piece at once
                yield piece
            parts, n = [text], len(text)
    yield "".join(parts)


def read_file(path, limit=None):
    """One .txt file (one document) or .jsonl file (a document per line), gzip'd or not, streamed ->
    (piece, first piece of its document?, bytes of the file read since the last piece) for every
    document in pieces of at most `limit` characters (default DOC_CHARS). Decoded as UTF-8 (a BOM
    dropped), every \\r\\n and \\r read as \\n."""
    limit = limit or DOC_CHARS
    with open(path, "rb") as raw, io.TextIOWrapper(gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw,
                                                   encoding="utf-8-sig", newline=None) as f:
        done = 0
        try:
            if path.endswith((".txt", ".txt.gz")):
                docs = [iter(lambda: f.read(READ_CHARS), "")]
            else:
                docs = ([text] for text in json_texts(f, path))
            for blocks in docs:
                for i, piece in enumerate(cut_long(blocks, limit)):
                    read, done = raw.tell() - done, raw.tell()
                    yield piece, i == 0, read
        except UnicodeDecodeError:  # a second pass finds the offset: the stream does not know it
            raise UserError(f"{path}: invalid UTF-8 at byte offset {invalid_utf8_offset(path)}") from None
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # a truncated or corrupt .gz
            raise UserError(f"{path}: {e}") from None


def list_files(path):
    """A path given on the command line -> the text files it stands for."""
    if os.path.isdir(path):
        found = []
        for folder, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # skip .git and friends
            found += [os.path.join(folder, f) for f in sorted(files) if f.endswith(EXTENSIONS)]
        return found
    if not os.path.exists(path):
        raise UserError(f"path not found: {path}")
    if not path.endswith(EXTENSIONS):
        raise UserError(f"{path}: unknown file type (expected .txt, .jsonl, either gzip'd, or a folder of them)")
    return [path]


def read_inputs(paths):
    """Command-line paths -> (total bytes, a stream of (source path, piece, first piece of its
    document?, bytes read)). Every path is checked before any file is read."""
    files = [(path, f) for path in paths for f in list_files(path)]

    def stream():
        found = False
        for source, f in files:
            for piece, first, read in read_file(f):
                found = found or bool(piece.strip())
                yield source, piece, first, read
        if not found:
            raise UserError(f"no text found in {', '.join(paths)} (empty corpus)")
    return sum(os.path.getsize(f) for _, f in files), stream()


# ----------------------------------------------------------------------------- the train/val split

def split_point(text, val_fraction, breaks=(PARAGRAPH_BREAK, LINE_BREAK)):
    """Where to cut one document into train and val, val being about its last val_fraction: at the
    paragraph break nearest that point, else the nearest line break, looked for only in the last
    2*val_fraction of the text. Returns (end of train, start of val); (len, len) when there is no
    break (document too short)."""
    target = len(text) * (1 - val_fraction)
    start = max(1, int(len(text) * (1 - 2 * val_fraction)))
    for pattern in breaks:
        cuts = [m for m in pattern.finditer(text, start) if m.end() < len(text)]
        if cuts:
            m = min(cuts, key=lambda m: abs(m.start() - target))
            return m.start(), m.end()
    return len(text), len(text)


def split_text(text, val_fraction, breaks=(PARAGRAPH_BREAK, LINE_BREAK)):
    """One document -> (train, val) cut at split_point; (text, "") when it cannot be cut."""
    end, start = split_point(text, val_fraction, breaks)
    return text[:end], text[start:]


def split_lone(text, val_fraction):
    """A lone document no break could cut: (train, val) cut at a space, else anywhere."""
    train, val = split_text(text, val_fraction, breaks=(WHITESPACE,))
    if not val:
        cut = min(max(1, round(len(text) * (1 - val_fraction))), len(text) - 1)
        train, val = text[:cut], text[cut:]
    if not train.strip() or not val.strip():
        raise UserError("corpus too small to hold out a validation part")
    return train, val


def last_documents(ids, eot, n_docs, total_chars, val_fraction, decode):
    """When no document could be cut: how many tokens (a count per document, last first) of whole
    documents at the end of ids (train, <|endoftext|> after each) go to validation: enough to hold
    val_fraction of the characters, leaving at least one document in train. Reads ids backwards a
    block and a document at a time, decoding to count characters, so memory stays bounded."""
    end, held, moved = len(ids), 0, []
    while len(moved) < n_docs - 1 and (held == 0 or held < val_fraction * total_chars):
        start, hi = 0, end - 1  # ids[end - 1] is the document's <|endoftext|>; find the one before
        while hi > 0:
            lo = max(0, hi - 2**20)
            hits = np.flatnonzero(ids[lo:hi] == eot)
            if len(hits):
                start = lo + int(hits[-1]) + 1
                break
            hi = lo
        held += len(decode(ids[start:end]))
        moved.append(end - start)
        end = start
    return moved


# ----------------------------------------------------------------------------- documents -> token files

def write_dataset(out_dir, tok, docs, info, val_fraction, workers, total_bytes):
    """Split every document of docs, a stream of (source, text, first piece of a document?, bytes
    read) over total_bytes, tokenize on `workers` processes, append <|endoftext|> after every
    non-empty part, and write train.bin, val.bin, meta.json as *.tmp files renamed into place at the
    end (meta.json last). If no document could be cut, whole documents at the end (a lone one: cut
    at a space) are validation. Returns meta."""
    dtype = np.dtype(np.uint16 if tok.n_vocab <= 2**16 else np.uint32)
    new_dir = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    names = ("train.bin", "val.bin", "meta.json")
    final = {n: os.path.join(out_dir, n) for n in names}
    tmp = {n: p + ".tmp" for n, p in final.items()}
    counts, pieces = {}, collections.Counter()  # source -> token counts; source -> pieces of text
    total_chars, lone, t0 = 0, None, time.time()  # lone: the text of the only piece while there is one

    def split_all(bar):  # -> ((source, split), text, append <|endoftext|>?) in file order
        nonlocal total_chars, lone
        for source, text, first, read in docs:
            bar.update(read)
            if not text.strip():
                continue
            c = counts.setdefault(source, {"source": source, "documents": 0, "train_tokens": 0, "val_tokens": 0})
            c["documents"] += first
            pieces[source] += 1
            total_chars += len(text)
            lone = text if pieces.total() == 1 else None
            end, start = split_point(text, val_fraction)  # slices of text, not copies of its parts
            for split, (a, b) in (("train", (0, end)), ("val", (start, len(text)))):
                if b > a:
                    yield from (((source, split), chunk, last) for chunk, last in token_chunks(text, a, b))

    try:
        with make_pool(tok, dtype, workers) as pool, \
                open(tmp["train.bin"], "wb") as ftrain, open(tmp["val.bin"], "wb") as fval, \
                tqdm(total=total_bytes, unit="B", unit_scale=True, desc=os.path.basename(out_dir)) as bar:
            files = {"train": ftrain, "val": fval}
            try:
                for (source, split), ids in encode_stream(split_all(bar), tok, dtype, pool, workers):
                    files[split].write(ids.tobytes())
                    counts[source][f"{split}_tokens"] += len(ids)
            except BaseException:
                bar.leave = False  # bad input found on the way: the error line alone stays on screen
                raise
        sources = list(counts.values())
        if lone is not None and not sources[0]["val_tokens"]:  # a lone document no break could cut
            for split, part in zip(("train", "val"), split_lone(lone, val_fraction)):
                ids = encode_text(part, tok, dtype)
                ids.tofile(tmp[f"{split}.bin"])
                sources[0][f"{split}_tokens"] = len(ids)
        elif not any(c["val_tokens"] for c in sources):  # no document could be cut: move the last ones
            ids = np.memmap(tmp["train.bin"], dtype=dtype, mode="r")
            moved = last_documents(ids, tok.eot, pieces.total(), total_chars, val_fraction, tok.decode)
            keep = len(ids) - sum(moved)
            with open(tmp["val.bin"], "wb") as f:
                for i in range(keep, len(ids), 2**24):
                    f.write(ids[i:i + 2**24].tobytes())
            del ids
            os.truncate(tmp["train.bin"], keep * dtype.itemsize)
            owners = (c for c in reversed(sources) for _ in range(pieces[c["source"]]))  # of each piece, last first
            for n, c in zip(moved, owners):
                c["train_tokens"], c["val_tokens"] = c["train_tokens"] - n, c["val_tokens"] + n
        meta = {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "n_vocab": tok.n_vocab, "eot": tok.eot,
                "mask": tok.mask, "pad": tok.pad, "dtype": dtype.name,
                "train_tokens": sum(c["train_tokens"] for c in sources),
                "val_tokens": sum(c["val_tokens"] for c in sources), **info, "sources": sources}
        with open(tmp["meta.json"], "w") as f:
            json.dump(meta, f, indent=2)
        for n in names:  # meta.json last: a dataset with meta.json is complete
            os.replace(tmp[n], final[n])
    finally:
        for p in tmp.values():
            if os.path.exists(p):
                os.remove(p)
        if new_dir and not os.listdir(out_dir):  # a failed first run leaves no empty folder either
            os.rmdir(out_dir)
    dt = max(time.time() - t0, 1e-6)
    print(f"{out_dir}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens ({tok.name})")
    print(f"{out_dir}: {total_bytes / 1e6:.1f} MB in {dt:.1f} s, {total_bytes / 1e6 / dt:.1f} MB/s "
          f"({workers} worker{'s' * (workers > 1)}, {dtype.name})")
    return meta


# ----------------------------------------------------------------------------- command line

def parse_args(argv):
    p = ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="Output: OUT_DIR/NAME/{train.bin,val.bin,meta.json}. "
                              "Bad input prints one `error:` line and exits with status 2.")
    p.add_argument("--input", nargs="+", metavar="PATH", help="your own text: .txt files, .jsonl files (string "
                   "field \"text\" per line), either gzip'd, or folders of them; default: the bundled corpus")
    p.add_argument("--name", help="dataset name for --input (required with it); the bundled corpus "
                                  "is always written as austen_<tokenizer>")
    p.add_argument("--tokenizer", choices=NAMES + ("all",),
                   help="default: 'all' (both) for the bundled corpus, 'gpt2' for --input")
    p.add_argument("--val_fraction", type=float, default=0.05,
                   help="share of every document held out for validation (default 0.05)")
    p.add_argument("--out_dir", default=DATA_DIR,
                   help="folder that receives the dataset folder(s) (default: data/ in this repo)")
    p.add_argument("--workers", type=int, default=cpu_count(), help=f"tokenizing processes (default: every "
                   f"core, here {cpu_count()}); the output is the same for any number")
    args = p.parse_args(argv)
    if not 0 < args.val_fraction < 0.5:
        p.error(f"--val_fraction must be in (0, 0.5), got {args.val_fraction}")
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    if args.input is None and args.name is not None:
        p.error("--name goes with --input (the bundled corpus is written as austen_<tokenizer>)")
    if args.input is not None:
        if not args.name or os.sep in args.name or args.name in (".", ".."):
            p.error("--input needs --name=NAME, a plain folder name")
        if args.tokenizer == "all":
            p.error("--tokenizer=all is for the bundled corpus; pick bytes or gpt2 with --input")
    return args


def main(argv=None):
    """Write the dataset(s) argv asks for. Bad input raises UserError (run_main prints it as one
    `error:` line, exit status 2); a failed run leaves no partial files and any old dataset intact."""
    args = parse_args(argv)
    pct = 100 * args.val_fraction
    try:
        if args.input is None:  # the bundled corpus, both tokenizers by default
            books = [(name, text, True, len(text.encode())) for name, text in read_books()]
            total = sum(b[3] for b in books)
            info = {"corpus": "Jane Austen's six novels + Moby-Dick (data/austen_moby.txt.gz), "
                              "paragraphs unwrapped to one line each",
                    "val_fraction": args.val_fraction,
                    "split": SPLIT_RULE.format(pct=pct, unit="book", fallback="")}
            jobs = [(f"austen_{name}", name, iter(books))
                    for name in (NAMES if args.tokenizer in (None, "all") else (args.tokenizer,))]
        else:
            total, docs = read_inputs(args.input)
            info = {"corpus": "user text: " + ", ".join(args.input),
                    "val_fraction": args.val_fraction,
                    "split": SPLIT_RULE.format(pct=pct, unit="document",
                                               fallback=USER_FALLBACK.format(doc_chars=DOC_CHARS))}
            jobs = [(args.name, args.tokenizer or "gpt2", docs)]
        workers = useful_workers(args.workers, total)  # a small input: no pool
        for name, tokenizer, docs in jobs:
            write_dataset(os.path.join(args.out_dir, name), get_tokenizer(tokenizer), docs, info,
                          args.val_fraction, workers, total)
    except OSError as e:  # an unreadable input, an out_dir we cannot write to
        raise UserError(str(e)) from None


if __name__ == "__main__":
    run_main(main)
