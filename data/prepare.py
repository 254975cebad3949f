"""
Prepare token datasets: text -> train.bin, val.bin (token ids, <|endoftext|> after every document)
and meta.json, the files data/loader.py reads. Validation is the last ~val_fraction of every
document, cut at a paragraph break: no validation text is ever trained on. See data/README.md.

    python data/prepare.py                      # the bundled corpus -> data/austen_bytes/, data/austen_gpt2/
    python data/prepare.py --tokenizer=bytes    # only data/austen_bytes/
    python data/prepare.py --input notes/ more.jsonl.gz --name=mine   # your text -> data/mine/ (GPT-2)
    python data/prepare.py --tokenizer=ckpt/tokenizer.json            # a HuggingFace tokenizer -> data/austen_ckpt/
"""
import argparse
import collections
import gzip
import itertools
import json
import math
import os
import re
import shutil
import sys
import time

import numpy as np
from tqdm import tqdm

# make `from data.tokenizer import ...` work when run as a script from any working directory
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import ArgumentParser, UserError, run_main  # noqa: E402
from data import encode  # noqa: E402
from data.tokenizer import NAMES, get_tokenizer  # noqa: E402
from data.userinput import json_lines, open_text  # noqa: E402

DATA_DIR = os.path.join(ROOT, "data")
DEFAULT_CORPUS = os.path.join(DATA_DIR, "austen_moby.txt.gz")
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
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

def read_books(path=DEFAULT_CORPUS):
    """The bundled corpus -> [(book name, text)], cut at the books' title lines, its hard-wrapped lines
    joined: one line per paragraph, paragraphs separated by a blank line."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = [line.strip() for line in f.read().splitlines()]
    titles = [title for title, _ in BOOKS]
    starts = [i for i, line in enumerate(lines) if line in titles]
    if [lines[i] for i in starts] != titles:
        raise UserError(f"{path}: expected the title lines {titles}, each once, in that order")
    books = []
    for (_, name), a, b in zip(BOOKS, starts, starts[1:] + [len(lines)]):
        paragraphs = (" ".join(run) for nonblank, run in itertools.groupby(lines[a:b], key=bool) if nonblank)
        books.append((name, "\n\n".join(p for p in paragraphs if not p.startswith(BOILERPLATE))))
    return books


def json_texts(lines, path):
    """The "text" of every row of a JSONL stream, each a document."""
    for lineno, row in json_lines(lines, path):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise UserError(f'{path}, line {lineno}: expected an object with a string "text" field')
        yield row["text"].replace("\r\n", "\n")


def piece_end(text, limit):
    """(end of a piece of a long text, start of the rest): at the last paragraph break (else line
    break, else space) in text[limit // 2:limit]."""
    for pattern in (PARAGRAPH_BREAK, LINE_BREAK, WHITESPACE):
        for start in (max(limit - 2**16, limit // 2), limit // 2):  # most text breaks often: look near the end first
            last = None
            for last in pattern.finditer(text, start, limit):
                pass
            if last:
                return last.start(), pattern.match(text, last.start()).end()  # the whole break
    return limit, limit


def cut_long(blocks, limit):
    """The text blocks of one document -> the document in pieces of at most `limit` characters (see
    piece_end), holding at most ~limit characters at a time."""
    text = ""
    for block in blocks:
        text += block
        while len(text) > limit:
            end, start = piece_end(text, limit)
            piece, text = text[:end], text[start:]  # not text and piece at once
            yield piece
    yield text


def read_file(path, limit=None):
    """A .txt file (a document) or .jsonl file (a document per line), gzip'd or not, streamed -> (piece,
    first piece of its document?, bytes read since the last piece), pieces of <= limit characters."""
    limit, done = limit or DOC_CHARS, 0
    with open_text(path) as (raw, f):
        if path.endswith((".txt", ".txt.gz")):
            docs = [iter(lambda: f.read(READ_CHARS), "")]
        else:
            docs = ([text] for text in json_texts(f, path))
        for blocks in docs:
            for i, piece in enumerate(cut_long(blocks, limit)):
                read, done = raw.tell() - done, raw.tell()
                yield piece, i == 0, read


def read_inputs(paths):
    """Command-line paths (files, or folders searched recursively) -> (total bytes, a stream of (source
    path, *read_file's tuple)). Every path is checked before any file is read."""
    files = []  # (source path, file)
    for path in paths:
        if os.path.isdir(path):
            for folder, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # skip .git and friends
                files += [(path, os.path.join(folder, f)) for f in sorted(names) if f.endswith(EXTENSIONS)]
        elif not os.path.exists(path):
            raise UserError(f"path not found: {path}")
        elif not path.endswith(EXTENSIONS):
            raise UserError(f"{path}: unknown file type (expected .txt, .jsonl, either gzip'd, or a folder of them)")
        else:
            files.append((path, path))

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
    """(end of train, start of val) of one document: the break nearest the point val_fraction from its
    end, looked for in its last 2 * val_fraction; (len, len) when there is none."""
    target = len(text) * (1 - val_fraction)
    start = max(1, int(len(text) * (1 - 2 * val_fraction)))
    for pattern in breaks:
        cuts = [m for m in pattern.finditer(text, start) if m.end() < len(text)]
        if cuts:
            m = min(cuts, key=lambda m: abs(m.start() - target))
            return m.start(), m.end()
    return len(text), len(text)


def split_lone(text, val_fraction):
    """A lone document no break could cut: (train, val) cut at a space, else anywhere."""
    end, start = split_point(text, val_fraction, breaks=(WHITESPACE,))
    if start == len(text):  # no space either
        end = start = min(max(1, round(len(text) * (1 - val_fraction))), len(text) - 1)
    train, val = text[:end], text[start:]
    if not train.strip() or not val.strip():
        raise UserError("corpus too small to hold out a validation part")
    return train, val


def last_documents(ids, eot, n_docs, total_chars, val_fraction, decode):
    """When no document could be cut: the tokens of each whole document (last first) at the end of ids
    that go to validation, to hold val_fraction of the characters and leave one in train. Reads ids
    backwards a block and a document at a time, so memory stays bounded."""
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

def token_dtype(n_vocab):
    """The dtype of the token files: uint16 holds ids up to 65,535 (GPT-2's), uint32 the rest (OLMo 2's)."""
    return np.dtype(np.uint16 if n_vocab <= 2**16 else np.uint32)


def dataset_name(tokenizer):
    """The bundled corpus's dataset folder: austen_gpt2, austen_bytes; austen_<folder> for a
    tokenizer.json (ckpt/tokenizer.json -> austen_ckpt)."""
    folder = os.path.basename(os.path.dirname(os.path.abspath(tokenizer)))
    return "austen_" + (tokenizer if tokenizer in NAMES else folder)


def write_dataset(out_dir, tok, docs, info, val_fraction, workers, total_bytes):
    """Split every document of docs (source, text, first piece of a document?, bytes read), tokenize
    the parts on `workers` processes (data/encode.py: the output is the same for any number), and
    write train.bin, val.bin, meta.json as *.tmp files renamed into place at the end, so a failed run
    leaves an existing dataset as it was. Returns meta."""
    dtype = token_dtype(tok.n_vocab)
    new_dir = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tmp = {n: os.path.join(out_dir, n + ".tmp") for n in ("train.bin", "val.bin", "meta.json")}
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
                    yield from (((source, split), chunk, last) for chunk, last in encode.token_chunks(text, a, b))

    try:
        with encode.make_pool(tok, dtype, workers) as pool, \
                open(tmp["train.bin"], "wb") as ftrain, open(tmp["val.bin"], "wb") as fval, \
                tqdm(total=total_bytes, unit="B", unit_scale=True, desc=os.path.basename(out_dir)) as bar:
            files = {"train": ftrain, "val": fval}
            try:
                for (source, split), ids in encode.encode_stream(split_all(bar), tok, dtype, pool, workers):
                    files[split].write(ids.tobytes())
                    counts[source][f"{split}_tokens"] += len(ids)
            except BaseException:
                bar.leave = False  # bad input found on the way: the error line alone stays on screen
                raise
        sources = list(counts.values())
        if lone is not None and not sources[0]["val_tokens"]:  # a lone document no break could cut
            for split, part in zip(("train", "val"), split_lone(lone, val_fraction)):
                ids = np.concatenate(encode.encode_task(tok, dtype, encode.token_chunks(part)))
                ids.tofile(tmp[f"{split}.bin"])
                sources[0][f"{split}_tokens"] = len(ids)
        elif not any(c["val_tokens"] for c in sources):  # no document could be cut: move the last ones
            ids = np.memmap(tmp["train.bin"], dtype=dtype, mode="r")
            moved = last_documents(ids, tok.eot, pieces.total(), total_chars, val_fraction, tok.decode)
            keep = (len(ids) - sum(moved)) * dtype.itemsize  # bytes of train.bin that stay
            del ids
            with open(tmp["train.bin"], "r+b") as ftrain, open(tmp["val.bin"], "wb") as fval:
                ftrain.seek(keep)
                shutil.copyfileobj(ftrain, fval)
                ftrain.truncate(keep)
            owners = (c for c in reversed(sources) for _ in range(pieces[c["source"]]))  # of each piece, last first
            for n, c in zip(moved, owners):
                c["train_tokens"], c["val_tokens"] = c["train_tokens"] - n, c["val_tokens"] + n
        meta = {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "n_vocab": tok.n_vocab, "eot": tok.eot,
                "mask": tok.mask, "pad": tok.pad, "dtype": dtype.name,
                "train_tokens": sum(c["train_tokens"] for c in sources),
                "val_tokens": sum(c["val_tokens"] for c in sources), **info, "sources": sources}
        with open(tmp["meta.json"], "w") as f:
            json.dump(meta, f, indent=2)
        for n in tmp:  # meta.json last: a dataset with meta.json is complete
            os.replace(tmp[n], os.path.join(out_dir, n))
    finally:
        for p in filter(os.path.exists, tmp.values()):
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
    p.add_argument("--name", help="dataset name for --input (required with it; the bundled corpus: austen_<tokenizer>)")
    p.add_argument("--tokenizer", help=f"{', '.join(NAMES)}, all (both; the bundled corpus only) or the path of a "
                   "HuggingFace tokenizer.json; default: all for the bundled corpus, gpt2 for --input")
    p.add_argument("--val_fraction", type=float, default=0.05,
                   help="share of every document held out for validation (default 0.05)")
    p.add_argument("--out_dir", default=DATA_DIR, help="folder that receives the dataset folder(s) (default: data/)")
    p.add_argument("--workers", type=int, default=CPUS, help=f"tokenizing processes (default: every "
                   f"core, here {CPUS}); the output is the same for any number")
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
    """Write the dataset(s) argv asks for; bad input raises UserError (one `error:` line from run_main)."""
    args = parse_args(argv)
    try:
        if args.input is None:  # the bundled corpus, both tokenizers by default
            books = [(name, text, True, len(text.encode())) for name, text in read_books()]
            total = sum(b[3] for b in books)
            corpus = ("Jane Austen's six novels + Moby-Dick (data/austen_moby.txt.gz), "
                      "paragraphs unwrapped to one line each")
            split = SPLIT_RULE.format(pct=100 * args.val_fraction, unit="book", fallback="")
            jobs = [(dataset_name(name), name, iter(books))
                    for name in (NAMES if args.tokenizer in (None, "all") else (args.tokenizer,))]
        else:
            total, docs = read_inputs(args.input)
            corpus = "user text: " + ", ".join(args.input)
            split = SPLIT_RULE.format(pct=100 * args.val_fraction, unit="document",
                                      fallback=USER_FALLBACK.format(doc_chars=DOC_CHARS))
            jobs = [(args.name, args.tokenizer or "gpt2", docs)]
        info = {"corpus": corpus, "val_fraction": args.val_fraction, "split": split}
        workers = max(1, min(args.workers, math.ceil(total / encode.TASK_CHARS)))  # a small input: no pool
        toks = [get_tokenizer(tokenizer) for _, tokenizer, _ in jobs]  # a bad one fails before any work
        for (name, _, docs), tok in zip(jobs, toks):
            write_dataset(os.path.join(args.out_dir, name), tok, docs, info, args.val_fraction, workers, total)
    except OSError as e:  # an unreadable input, an out_dir we cannot write to
        raise UserError(str(e)) from None


if __name__ == "__main__":
    run_main(main)
