"""
Prepare token datasets: text -> flat np.uint16 token files that data/loader.py memory-maps.

The bundled corpus (public domain): Jane Austen's six novels and Moby-Dick, data/austen_moby.txt.gz
    python data/prepare.py                      # writes data/austen_bytes/ and data/austen_gpt2/
    python data/prepare.py --tokenizer=bytes    # only data/austen_bytes/
Your own text: .txt files, .jsonl files (a JSON object with a string "text" per line), or folders
of them (searched recursively, in sorted order):
    python data/prepare.py --input notes/ more.jsonl --name=mine   # writes data/mine/ (GPT-2 tokens)

Every dataset folder holds train.bin and val.bin (token ids, <|endoftext|> after every document)
and meta.json (tokenizer, special ids, token counts per source, the split rule).
The split: the last ~val_fraction of every document (every book) is validation, cut at a paragraph
boundary; no random windows, so no validation text is ever seen in training.
Works from any working directory; needs no network.
"""

import argparse
import codecs
import gzip
import json
import os
import re
import sys

import numpy as np
from tqdm import tqdm

# make `from data.tokenizer import ...` work when run as a script from any working directory
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from common import UserError, run_main  # noqa: E402
from data.tokenizer import NAMES, get_tokenizer  # noqa: E402

DATA_DIR = os.path.join(ROOT, "data")
DEFAULT_CORPUS = os.path.join(DATA_DIR, "austen_moby.txt.gz")
# (title line exactly as it stands in the corpus file, book name); the books appear in this order
BOOKS = [
    ("EMMA", "Emma"),
    ("MANSFIELD PARK", "Mansfield Park"),
    ("NORTHANGER ABBEY", "Northanger Abbey"),
    ("Persuasion", "Persuasion"),
    ("PRIDE AND PREJUDICE", "Pride and Prejudice"),
    ("SENSE AND SENSIBILITY", "Sense and Sensibility"),
    ("MOBY DICK; OR THE WHALE", "Moby-Dick"),
]
# where a document may be cut, best first (each eats the whitespace around it)
PARAGRAPH_BREAK = re.compile(r"\s*\n[ \t]*\n\s*")
LINE_BREAK = re.compile(r"\s*\n\s*")
WHITESPACE = re.compile(r"\s+")
# transcriber lines left over from Project Gutenberg, dropped as whole paragraphs
BOILERPLATE = ("Produced by ", "End of Project Gutenberg")
SPLIT_RULE = ("validation = the last ~{pct:g}% of every {unit}, cut at the paragraph break nearest "
              "that point (else a line break); {fallback}"
              "<|endoftext|> follows every {unit} in each split")


# -----------------------------------------------------------------------------
# text -> documents

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


def decode_utf8(data, path):
    """bytes -> str, naming the file and byte offset of the first invalid byte."""
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: invalid UTF-8 at byte offset {skip + e.start}") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def json_lines(text, path):
    """(line number, value) of every non-blank line of a JSONL text; bad JSON is an error naming the line.
    Lines end at "\n" only: U+2028 and friends may sit inside JSON strings."""
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None


def read_file(path):
    """One .txt file (one document) or .jsonl file (one document per line) -> [text]."""
    with open(path, "rb") as f:
        text = decode_utf8(f.read(), path)
    if path.endswith(".txt"):
        return [text]
    docs = []
    for lineno, row in json_lines(text, path):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise UserError(f'{path}, line {lineno}: expected an object with a string "text" field')
        docs.append(row["text"].replace("\r\n", "\n"))
    return docs


def list_files(path):
    """A path given on the command line -> the .txt/.jsonl files it stands for."""
    if os.path.isdir(path):
        found = []
        for folder, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # skip .git and friends
            found += [os.path.join(folder, f) for f in sorted(files) if f.endswith((".txt", ".jsonl"))]
        return found
    if not os.path.exists(path):
        raise UserError(f"path not found: {path}")
    if not path.endswith((".txt", ".jsonl")):
        raise UserError(f"{path}: unknown file type (expected .txt, .jsonl or a folder of them)")
    return [path]


def read_inputs(paths):
    """Command-line paths -> [(source path, document text)] with empty documents left out."""
    docs = []
    for path in paths:
        files = list_files(path)  # check every path before reading any file
        docs += [(path, f) for f in files]
    out = [(src, text) for src, f in docs for text in read_file(f) if text.strip()]
    if not out:
        raise UserError(f"no text found in {', '.join(paths)} (empty corpus)")
    return out


# -----------------------------------------------------------------------------
# the train/val split

def split_text(text, val_fraction, breaks=(PARAGRAPH_BREAK, LINE_BREAK)):
    """Cut one document into (train, val), val being about its last val_fraction: at the paragraph
    break nearest that point, else the nearest line break, looked for only in the last
    2*val_fraction of the text. Returns (text, "") when there is none (document too short)."""
    target = len(text) * (1 - val_fraction)
    start = max(1, int(len(text) * (1 - 2 * val_fraction)))
    for pattern in breaks:
        cuts = [m for m in pattern.finditer(text, start) if m.end() < len(text)]
        if cuts:
            m = min(cuts, key=lambda m: abs(m.start() - target))
            return text[:m.start()], text[m.end():]
    return text, ""


def split_documents(docs, val_fraction):
    """[(source, text)] -> [(source, train, val)]. If no document could be split (all tiny), whole
    documents from the end go to val instead, so val is never empty."""
    parts = [(src, *split_text(text, val_fraction)) for src, text in docs]
    if any(val for _, _, val in parts):
        return parts
    if len(parts) == 1:  # a single document without line breaks: cut at a space, else anywhere
        src, text, _ = parts[0]
        train, val = split_text(text, val_fraction, breaks=(WHITESPACE,))
        if not val:
            cut = min(max(1, round(len(text) * (1 - val_fraction))), len(text) - 1)
            train, val = text[:cut], text[cut:]
        if not train.strip() or not val.strip():
            raise UserError("corpus too small to hold out a validation part")
        return [(src, train, val)]
    total, held = sum(len(t) for _, t, _ in parts), 0
    k = len(parts)
    while k > 1 and (held == 0 or held < val_fraction * total):  # keep at least one doc in train
        k -= 1
        held += len(parts[k][1])
    return parts[:k] + [(src, "", text) for src, text, _ in parts[k:]]


# -----------------------------------------------------------------------------
# documents -> token files

def write_dataset(out_dir, tok, parts, info):
    """Tokenize [(source, train_text, val_text)], append <|endoftext|> after every non-empty part,
    and write train.bin, val.bin, meta.json atomically (*.tmp, then os.replace). Returns meta."""
    assert tok.n_vocab <= 2**16, "token ids must fit in uint16"
    os.makedirs(out_dir, exist_ok=True)
    names = ("train.bin", "val.bin", "meta.json")
    final = {n: os.path.join(out_dir, n) for n in names}
    tmp = {n: p + ".tmp" for n, p in final.items()}
    counts = {}  # source -> counts
    try:
        with open(tmp["train.bin"], "wb") as ftrain, open(tmp["val.bin"], "wb") as fval, \
                tqdm(total=sum(len(a) + len(b) for _, a, b in parts), unit="char", unit_scale=True,
                     desc=os.path.basename(out_dir)) as bar:
            for source, train, val in parts:
                c = counts.setdefault(source, {"source": source, "documents": 0,
                                               "train_tokens": 0, "val_tokens": 0})
                c["documents"] += 1
                for split, text, f in (("train", train, ftrain), ("val", val, fval)):
                    if text:
                        ids = np.array(tok.encode(text) + [tok.eot], dtype=np.uint16)
                        f.write(ids.tobytes())
                        c[f"{split}_tokens"] += len(ids)
                    bar.update(len(text))
        meta = {
            "tokenizer": tok.name, "vocab_size": tok.vocab_size, "n_vocab": tok.n_vocab,
            "eot": tok.eot, "mask": tok.mask, "pad": tok.pad, "dtype": "uint16",
            "train_tokens": sum(c["train_tokens"] for c in counts.values()),
            "val_tokens": sum(c["val_tokens"] for c in counts.values()),
            **info,
            "sources": list(counts.values()),
        }
        with open(tmp["meta.json"], "w") as f:
            json.dump(meta, f, indent=2)
        for n in names:  # meta.json last: a dataset with meta.json is complete
            os.replace(tmp[n], final[n])
    finally:
        for p in tmp.values():
            if os.path.exists(p):
                os.remove(p)
    print(f"{out_dir}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens "
          f"({tok.name})")
    return meta


# -----------------------------------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one `error:` line (via common.run_main) instead of the usage text
        raise UserError(message)


def parse_args(argv):
    p = ArgumentParser(allow_abbrev=False, description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="Output: OUT_DIR/NAME/{train.bin,val.bin,meta.json}. "
                              "Bad input prints one `error:` line and exits with status 2.")
    p.add_argument("--input", nargs="+", metavar="PATH",
                   help="your own text: .txt files, .jsonl files (string field \"text\" per line) or "
                        "folders of them; default: the bundled Austen + Moby-Dick corpus")
    p.add_argument("--name", help="dataset name for --input (required with it); the bundled corpus "
                                  "is always written as austen_<tokenizer>")
    p.add_argument("--tokenizer", choices=NAMES + ("all",),
                   help="default: 'all' (both) for the bundled corpus, 'gpt2' for --input")
    p.add_argument("--val_fraction", type=float, default=0.05,
                   help="share of every document held out for validation (default 0.05)")
    p.add_argument("--out_dir", default=DATA_DIR, help="folder that receives the dataset folder(s) "
                                                        "(default: data/ in this repo)")
    args = p.parse_args(argv)
    if not 0 < args.val_fraction < 0.5:
        p.error(f"--val_fraction must be in (0, 0.5), got {args.val_fraction}")
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
    `error:` line, exit status 2) before anything is written; a failed write leaves no partial files."""
    args = parse_args(argv)
    pct = 100 * args.val_fraction
    try:
        if args.input is None:  # the bundled corpus, both tokenizers by default
            books = read_books()
            parts = [(name, *split_text(text, args.val_fraction)) for name, text in books]
            info = {"corpus": "Jane Austen's six novels + Moby-Dick (data/austen_moby.txt.gz), "
                              "paragraphs unwrapped to one line each",
                    "val_fraction": args.val_fraction,
                    "split": SPLIT_RULE.format(pct=pct, unit="book", fallback="")}
            for name in (NAMES if args.tokenizer in (None, "all") else (args.tokenizer,)):
                out = os.path.join(args.out_dir, f"austen_{name}")
                write_dataset(out, get_tokenizer(name), parts, info)
        else:
            parts = split_documents(read_inputs(args.input), args.val_fraction)
            info = {"corpus": "user text: " + ", ".join(args.input),
                    "val_fraction": args.val_fraction,
                    "split": SPLIT_RULE.format(pct=pct, unit="document", fallback=(
                        "documents with no break near their end go whole to train; if no document "
                        "can be cut, the last whole documents are validation (a lone document is "
                        "cut at a space); "))}
            tok = get_tokenizer(args.tokenizer or "gpt2")
            write_dataset(os.path.join(args.out_dir, args.name), tok, parts, info)
    except OSError as e:  # an unreadable input, a corrupt .gz, an out_dir we cannot write to
        raise UserError(str(e)) from None


if __name__ == "__main__":
    run_main(main)
