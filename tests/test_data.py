"""
Tests for data/: the tokenizers, data/prepare.py on good and bad input (streamed output against the
in-memory rule, any number of workers, bounded memory), the batch loader (uint16 and uint32), and
train.py's warning for a corpus too small for its run.
User mistakes raise common.UserError, which the scripts report as one `error:` line (exit status 2).
Hermetic and fast: tiny synthetic text in tmp_path, no network, never the prepared corpus.
    python -m pytest -q tests/test_data.py
"""

import glob
import gzip
import hashlib
import itertools
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data.encode
import data.loader
import data.prepare
from common import UserError, run_main
from data.loader import BatchLoader, load_meta, resolve_data_dir, split_texts, val_windows
from data.prepare import BOOKS, main as prepare, read_books, split_lone, split_point
from data.tokenizer import EXTRA_TOKENS, Tokenizer, get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["bytes", "gpt2"]
OLMO_STYLE = os.path.join(ROOT, "tests", "fixtures", "released", "tokenizer.json")  # a tokenizer.json (cl100k regex)
CHECK_TEXT = "Hello world! The quick brown fox jumps over the lazy dog."
CHECK_IDS = [15496, 995, 0, 383, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13, 50256]
UNICODE = [
    "",
    "plain ascii, numbers 12345 and punctuation?!",
    "emoji 🐳🚀 and a family 👩‍👩‍👧 (zero-width joiners)",
    "CJK 日本語の文章、中文句子。한국어 문장",
    "combining marks: e\u0301 a\u0308 n\u0303, Devanagari \u0915\u094d\u0937",
    "a NUL \x00 byte, tabs\tand\nnew\r\nlines  with   spaces\n\n",
    "literal specials <|endoftext|> <|mask|><|pad|> stay text",
    "\ufeffBOM and the last code point \U0010ffff",
]


# -----------------------------------------------------------------------------
# tokenizers

def test_gpt2_check_vector():
    tok = get_tokenizer("gpt2")
    assert tok.encode(CHECK_TEXT) + [tok.eot] == CHECK_IDS
    assert tok.enc.encode(CHECK_TEXT + "<|endoftext|>", allowed_special={"<|endoftext|>"}) == CHECK_IDS


@pytest.mark.parametrize("name", NAMES)
def test_special_ids_and_sizes(name):
    tok = get_tokenizer(name)
    base = {"bytes": 256, "gpt2": 50256}[name]
    assert (tok.eot, tok.mask, tok.pad) == (base, base + 1, base + 2)
    assert [tok.enc.encode_single_token(s) for s in EXTRA_TOKENS] == [base, base + 1, base + 2]
    assert tok.n_vocab == base + 3 == {"bytes": 259, "gpt2": 50259}[name]
    assert tok.vocab_size == {"bytes": 320, "gpt2": 50304}[name] and tok.vocab_size % 64 == 0
    assert get_tokenizer(name) is tok  # cached


def test_unknown_tokenizer_lists_valid_names():
    with pytest.raises(UserError, match="bytes, gpt2"):
        get_tokenizer("llama")


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_unicode(name):
    tok = get_tokenizer(name)
    for text in UNICODE:
        ids = tok.encode(text)
        assert all(0 <= i < tok.eot for i in ids), "ordinary text must never produce specials"
        if name == "bytes":
            assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
        # tensors and arrays work; specials and padding ids (>= n_vocab) are dropped
        assert tok.decode(torch.tensor([tok.eot] + ids + [tok.mask, tok.pad])) == text
        assert tok.decode(np.array(ids + [tok.n_vocab, tok.vocab_size - 1], dtype=np.int64)) == text


def test_decode_partial_utf8_is_replaced():
    tok = get_tokenizer("bytes")
    ids = tok.encode("é🐳")  # 2 + 4 bytes
    assert tok.decode(ids[:1]) == "\ufffd"
    assert tok.decode(ids[:4]).startswith("é") and tok.decode(ids[:4]).endswith("\ufffd")


# -----------------------------------------------------------------------------
# prepare.py on good input

def make_doc(d, n_paragraphs=30):
    """A synthetic document: hard-wrapped paragraphs separated by blank lines, a bit of Unicode."""
    paragraphs = []
    for p in range(n_paragraphs):
        words = [f"doc{d} para{p} word{w}" + (" naïve 🐳" if w % 7 == 0 else "") for w in range(12)]
        paragraphs.append("\n".join(" ".join(words[i:i + 4]) for i in range(0, len(words), 4)))
    return "\n\n".join(paragraphs) + "\n"


def read_dataset(out):
    """-> meta, [(train_text, val_text) per document] after checking files against meta."""
    meta = load_meta(out)
    tok = get_tokenizer(meta["tokenizer"])
    assert not glob.glob(os.path.join(out, "*.tmp"))
    splits = {}
    for split in ("train", "val"):
        path = os.path.join(out, f"{split}.bin")
        assert os.path.getsize(path) == 2 * meta[f"{split}_tokens"] and meta["dtype"] == "uint16"
        ids = np.fromfile(path, dtype=np.uint16)
        assert ids.max() < tok.n_vocab and ids[-1] == tok.eot  # every part ends with eot
        cuts = np.flatnonzero(ids == tok.eot)
        splits[split] = [tok.decode(part) for part in np.split(ids, cuts + 1)[:-1]]
    assert meta["train_tokens"] == sum(s["train_tokens"] for s in meta["sources"])
    assert meta["val_tokens"] == sum(s["val_tokens"] for s in meta["sources"]) > 0
    assert (meta["vocab_size"], meta["eot"]) == (tok.vocab_size, tok.eot)
    return meta, splits


def check_split(doc, train, val, val_fraction=0.05):
    """train + (whitespace with a line break) + val == doc, val about the last val_fraction."""
    assert doc.startswith(train) and doc.endswith(val) and train and val
    between = doc[len(train):len(doc) - len(val)]
    assert "\n" in between and not between.strip()
    assert 0 < len(val) <= 2 * val_fraction * len(doc)


@pytest.mark.parametrize("name", NAMES)
def test_prepare_txt_files(tmp_path, name):
    docs = [make_doc(0), make_doc(1, 50)]
    paths = []
    for i, doc in enumerate(docs):
        paths.append(str(tmp_path / f"doc{i}.txt"))
        open(paths[-1], "w", encoding="utf-8").write(doc)
    args = ["--input", *paths, "--name=ds", f"--out_dir={tmp_path}", f"--tokenizer={name}"]
    prepare(args)
    meta, splits = read_dataset(str(tmp_path / "ds"))
    assert meta["tokenizer"] == name and [s["source"] for s in meta["sources"]] == paths
    assert len(splits["train"]) == len(splits["val"]) == 2  # every document was cut
    for doc, train, val in zip(docs, splits["train"], splits["val"]):
        check_split(doc, train, val)


def test_prepare_directory(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    docs = {"b.txt": make_doc(1), "sub/a.txt": make_doc(2)}
    for rel, doc in docs.items():
        (root / rel).write_text(doc, encoding="utf-8")
    (root / "sub/c.jsonl").write_text(json.dumps({"text": make_doc(3)}) + "\n", encoding="utf-8")
    (root / "notes.md").write_text("not text we read")  # other extensions inside folders are skipped
    (root / ".git/x.txt").write_text("hidden folders are skipped")
    (root / "empty.txt").write_text("")  # empty documents are skipped
    prepare(["--input", str(root), "--name=ds", f"--out_dir={tmp_path}"])  # gpt2 by default
    meta, splits = read_dataset(str(tmp_path / "ds"))
    assert meta["tokenizer"] == "gpt2" and meta["sources"][0]["documents"] == 3
    # sorted walk: b.txt, then sub/a.txt, sub/c.jsonl
    for doc, train, val in zip([make_doc(1), make_doc(2), make_doc(3)], splits["train"], splits["val"]):
        check_split(doc, train, val)


def test_prepare_jsonl_tiny_documents(tmp_path):
    docs = [f"short document number {i}" for i in range(40)]  # too short to cut
    rows = [json.dumps({"text": t, "id": i}) for i, t in enumerate(docs)]
    rows.insert(3, "")  # blank lines are fine
    (tmp_path / "d.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    prepare(["--input", str(tmp_path / "d.jsonl"), "--name=ds", f"--out_dir={tmp_path}", "--tokenizer=bytes"])
    meta, splits = read_dataset(str(tmp_path / "ds"))
    # no document could be cut, so whole documents at the end are validation
    assert 1 <= len(splits["val"]) < len(docs) and splits["train"] + splits["val"] == docs


def test_prepare_single_line_document(tmp_path):
    doc = " ".join(f"word{i}" for i in range(500))  # one document, no line breaks
    (tmp_path / "one.txt").write_text(doc)
    prepare(["--input", str(tmp_path / "one.txt"), "--name=ds", f"--out_dir={tmp_path}"])
    _, splits = read_dataset(str(tmp_path / "ds"))
    (train,), (val,) = splits["train"], splits["val"]
    assert train + " " + val == doc and 0 < len(val) < 0.1 * len(doc)


def split_text(text, val_fraction):
    """One document -> (train, val) as prepare.py cuts it; (text, "") when it cannot be cut."""
    end, start = split_point(text, val_fraction)
    return text[:end], text[start:]


def test_split_text():
    assert split_text("a\nb", 0.05) == ("a\nb", "")  # too short to cut
    text = "\n\n".join(" ".join([f"paragraph {i}"] * 5) for i in range(40))
    train, val = split_text(text, 0.05)
    assert train + "\n\n" + val == text and 0.03 < len(val) / len(text) < 0.07


# sha256 of the files the in-memory prepare.py wrote for the bundled corpus (before it streamed)
BUNDLED_SHA256 = {
    "austen_bytes/meta.json": "9b0d732d27b0af6ed7f45ecc22ad20f1ee3214fe0dd6c38c2e729530f1000f6f",
    "austen_bytes/train.bin": "fd1e3b8a7a413d5ecaa7dadeaa937c2fffe1b4961a3886aff0915b7c2e00995a",
    "austen_bytes/val.bin": "5e383b268677ca881c1fa265657b517c56a4929efcfcfc73240e1578b3760317",
    "austen_gpt2/meta.json": "bc0fdb179b244b26975ef30f8e73d2bb5c751e5d4dad2864f11e203f851f254f",
    "austen_gpt2/train.bin": "4da8cfcd458c501a5a7a12309bb4699e29fc0adf39fb9c801e6f9ddf4179dd52",
    "austen_gpt2/val.bin": "24e83059f8ec2154a53b3f8df28fb72ef4a0faff09e1d365e947027f820b99fa",
}


def test_bundled_corpus_books(tmp_path):
    books = read_books()
    assert [name for name, _ in books] == [name for _, name in BOOKS]
    for (title, _), (name, text) in zip(BOOKS, books):
        assert text.startswith(title + "\n\n") and len(text) > 300_000 and "\n\n\n" not in text
    # the default run (bundled corpus) into a temporary folder: byte for byte what it always wrote
    for workers in (1, 2):
        prepare([f"--out_dir={tmp_path}", f"--workers={workers}"])
        for rel, sha in BUNDLED_SHA256.items():
            assert hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest() == sha, (rel, workers)
    meta, splits = read_dataset(str(tmp_path / "austen_bytes"))
    assert len(splits["val"]) == 7 and 0.04 < meta["val_tokens"] / meta["train_tokens"] < 0.06
    for (name, text), train, val in zip(books, splits["train"], splits["val"]):
        assert text == train + "\n\n" + val


def test_prepare_runs_as_script_from_any_cwd(tmp_path):
    (tmp_path / "a.txt").write_text(make_doc(0))
    script = os.path.join(ROOT, "data", "prepare.py")
    run = lambda *args: subprocess.run([sys.executable, script, *args], cwd=tmp_path,
                                       capture_output=True, text=True, timeout=120)
    ok = run("--input", "a.txt", "--name=ds", "--out_dir=.", "--tokenizer=bytes")
    assert ok.returncode == 0, ok.stderr
    assert os.path.isfile(tmp_path / "ds" / "train.bin")
    bad = run("--input", "missing.txt", "--name=ds2", "--out_dir=.")
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr


# -----------------------------------------------------------------------------
# prepare.py streams: the same output as the in-memory rule, any number of workers, bounded memory

def reference(paths, tok, val_fraction=0.05):
    """What prepare.py writes for these files (each its own source), computed in memory by the rule
    it had before it streamed: -> (train ids, val ids, {source: [documents, train tokens, val tokens]})."""
    docs = []  # (source, text)
    for path in paths:
        raw = open(path, "rb").read()
        text = (gzip.decompress(raw) if path.endswith(".gz") else raw).decode("utf-8")
        text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
        docs += [(path, text)] if ".txt" in path else [
            (path, json.loads(line)["text"].replace("\r\n", "\n")) for line in text.split("\n") if line.strip()]
    docs = [(src, d) for src, d in docs if d.strip()]
    parts = [split_text(d, val_fraction) for _, d in docs]
    if not any(val for _, val in parts):  # no document could be cut
        if len(docs) == 1:
            parts = [split_lone(docs[0][1], val_fraction)]
        else:  # whole documents from the end, at least one kept in train
            total, held, k = sum(len(d) for _, d in docs), 0, len(docs)
            while k > 1 and (held == 0 or held < val_fraction * total):
                k -= 1
                held += len(docs[k][1])
            parts = [(d, "") for _, d in docs[:k]] + [("", d) for _, d in docs[k:]]
    train, val, sources = [], [], {}
    for (src, _), texts in zip(docs, parts):
        c = sources.setdefault(src, [0, 0, 0])
        c[0] += 1
        for i, (text, out) in enumerate(zip(texts, (train, val))):
            if text:
                ids = tok.encode(text) + [tok.eot]
                out += ids
                c[1 + i] += len(ids)
    return train, val, sources


def unicode_doc(n=12):
    """Paragraphs of awkward text: emoji, CJK, NUL, tabs, literal special tokens, trailing spaces."""
    return "\n\n".join(f"{i}: {UNICODE[1 + i % (len(UNICODE) - 2)]}  " for i in range(n * len(UNICODE)))


def jsonl(*texts):
    return "".join(json.dumps({"text": t}) + "\n" for t in texts)


CORPORA = {  # case -> {file: text}; .gz files are compressed, \n is written as \r\n where asked
    "txt": {"a.txt": make_doc(0), "b.txt": "\ufeff" + make_doc(1, 50), "u.txt": unicode_doc()},
    "crlf and lone cr": {"a.txt": make_doc(2).replace("\n", "\r\n"), "b.txt": make_doc(3).replace("\n", "\r")},
    "jsonl": {"d.jsonl": jsonl(make_doc(4), "", "x\u2028y " * 50, make_doc(5).replace("\n", "\r\n"), unicode_doc(3))},
    "gzip": {"a.txt.gz": make_doc(6), "d.jsonl.gz": jsonl(make_doc(7), make_doc(8)), "e.txt": make_doc(9)},
    "tiny documents": {"d.jsonl": jsonl(*(f"short document {i} " * (1 + i % 3) for i in range(60)))},
    "tiny documents in two files": {"a.jsonl": jsonl(*(f"doc {i}" for i in range(30))), "b.txt": "one more"},
    "lone line": {"one.txt": " ".join(f"word{i}" for i in range(400))},
}


def write_corpus(root, files):
    paths = []
    for name, text in files.items():
        data = text.encode("utf-8")
        (root / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
        paths.append(str(root / name))
    return paths


@pytest.fixture
def small_tasks(monkeypatch):
    """Tasks and reads of a few hundred characters, so small inputs take every path (many tasks, a
    pool of workers, \r\n across reads) that only big ones would take otherwise."""
    monkeypatch.setattr(data.encode, "TASK_CHARS", 300)
    monkeypatch.setattr(data.prepare, "READ_CHARS", 257)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("case", list(CORPORA))
def test_streamed_equals_in_memory(tmp_path, small_tasks, case, workers):
    paths = write_corpus(tmp_path, CORPORA[case])
    for name, tokenizer in [*zip(NAMES, NAMES), ("json", OLMO_STYLE)]:
        prepare(["--input", *paths, f"--name={name}", f"--out_dir={tmp_path}", f"--tokenizer={tokenizer}",
                 f"--workers={workers}"])
        train, val, sources = reference(paths, get_tokenizer(tokenizer))
        out = tmp_path / name
        assert np.fromfile(out / "train.bin", np.uint16).tolist() == train
        assert np.fromfile(out / "val.bin", np.uint16).tolist() == val
        meta, _ = read_dataset(str(out))
        assert {s["source"]: [s["documents"], s["train_tokens"], s["val_tokens"]] for s in meta["sources"]} == sources


TRICKY = UNICODE + ["  leading spaces", "word\n\n  \tword  ", "it's, we've 12345 678!!! ??", "日本語の文章中文句子",
                    "trailing   ", "\n\n\n", "a  b   c\t\td", " ".join(f"w{i}" for i in range(50)),
                    "The end.\nNext line!\n\nMore?\r\n'quoted' 1234567\n"]  # cl100k: "!\n" is one piece


@pytest.mark.parametrize("name", NAMES + [OLMO_STYLE])
def test_token_chunks_encode_like_the_whole(name):
    tok = get_tokenizer(name)
    text = "".join(TRICKY) + " ".join(TRICKY)
    for size in (1, 2, 3, 7, 50):
        chunks = list(data.encode.token_chunks(text, size=size))
        assert "".join(c for c, _ in chunks) == text
        assert [last for _, last in chunks] == [False] * (len(chunks) - 1) + [True]
        assert len(chunks) > len(text) / (10 * size)  # really cut
        assert [i for c, _ in chunks for i in tok.encode(c)] == tok.encode(text)


def test_long_document_in_pieces(tmp_path, monkeypatch):
    # a document longer than DOC_CHARS: pieces of at most that length, cut at paragraph breaks, each
    # split like a document; nothing lost but the breaks
    monkeypatch.setattr(data.prepare, "DOC_CHARS", 3000)
    monkeypatch.setattr(data.prepare, "READ_CHARS", 500)
    doc = make_doc(0, 200)
    (tmp_path / "long.txt").write_text(doc)
    pieces = [p for p, _, _ in data.prepare.read_file(str(tmp_path / "long.txt"))]
    assert len(pieces) > len(doc) / 3000 and max(map(len, pieces)) <= 3000
    assert "\n\n".join(pieces) == doc  # every cut at a paragraph break
    prepare(["--input", str(tmp_path / "long.txt"), "--name=ds", f"--out_dir={tmp_path}", "--tokenizer=bytes"])
    meta, splits = read_dataset(str(tmp_path / "ds"))
    assert meta["sources"][0]["documents"] == 1 and "3,000 characters" in meta["split"]
    assert len(splits["train"]) == len(splits["val"]) == len(pieces)
    for piece, train, val in zip(pieces, splits["train"], splits["val"]):
        check_split(piece, train, val)
    # no paragraph break at all: line breaks, then spaces, then anywhere
    for text, sep in (("line\n" * 2000, "\n"), ("word " * 2000, " "), ("x" * 7000, "")):
        (tmp_path / "t.txt").write_text(text)
        pieces = [p for p, _, _ in data.prepare.read_file(str(tmp_path / "t.txt"))]
        assert max(map(len, pieces)) <= 3000 and sep.join(pieces) == text


def test_reading_holds_a_piece_at_a_time(tmp_path, monkeypatch):
    # a 2 MB document read in blocks of 1,000 characters never gathers more than a piece
    monkeypatch.setattr(data.prepare, "READ_CHARS", 1000)
    (tmp_path / "big.txt").write_text(make_doc(0, 200) * 50)
    blocks = []
    real_cut_long = data.prepare.cut_long
    monkeypatch.setattr(data.prepare, "cut_long", lambda b, limit: real_cut_long(
        (blocks.append(len(x)) or x for x in b), limit))
    n = 0
    for piece, first, read in data.prepare.read_file(str(tmp_path / "big.txt"), limit=20_000):
        assert len(piece) <= 20_000 and len(blocks) * 1000 <= n + len(piece) + 20_000 + 1000
        n += len(piece)
    assert len(blocks) > 2000 and max(blocks) <= 1000


@pytest.mark.parametrize("workers", [1, 2])
def test_encoding_pulls_input_only_as_fast_as_it_encodes(monkeypatch, workers):
    # an endless input: the first results come back, and only a few tasks were read ahead of them
    monkeypatch.setattr(data.encode, "TASK_CHARS", 100)
    tok, pulled = get_tokenizer("bytes"), []
    endless = ((i, f"segment {i} ".ljust(100), True) for i in itertools.count() if not pulled.append(i))
    pool = data.encode.multiprocessing.get_context().Pool(workers, data.encode.init_worker, (tok, np.uint16)) \
        if workers > 1 else None
    try:
        stream = data.encode.encode_stream(endless, tok, np.uint16, pool, workers)
        for i, (key, ids) in enumerate(itertools.islice(stream, 50)):
            assert key == i and tok.decode(ids) == f"segment {i} ".ljust(100)
            assert len(pulled) <= i + 1 + 2 * workers
    finally:
        if pool:
            pool.terminate()


@pytest.mark.skipif(sys.platform != "linux", reason="reads peak memory from getrusage in kB")
def test_memory_does_not_grow_with_the_input(tmp_path):
    # a 16 MB text file, one worker, pieces of 1M characters: peak memory over what the imports take
    # stays far below what holding the text would need (the in-memory version took ~17 bytes per byte)
    (tmp_path / "big.txt").write_text(make_doc(0, 200) * 400)
    size = os.path.getsize(tmp_path / "big.txt")
    code = ("import resource, sys; from data import prepare; prepare.DOC_CHARS = 1_000_000; "
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; prepare.main(sys.argv[1:]); "
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)")
    p = subprocess.run([sys.executable, "-c", code, "--input", str(tmp_path / "big.txt"), "--name=ds",
                        f"--out_dir={tmp_path}", "--tokenizer=bytes", "--workers=1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    grown = int(p.stdout.split()[-1])
    assert size > 15e6 and grown < 100e6, f"{grown / 1e6:.0f} MB more for {size / 1e6:.0f} MB of text"


# -----------------------------------------------------------------------------
# prepare.py on bad input: UserError, i.e. one `error:` line and exit status 2, no .bin written

BAD_INPUTS = {  # case -> (files to create, extra args, text the message must contain)
    "missing path": ({}, ["--input", "{d}/nope.txt"], "not found"),
    "empty corpus": ({"e.txt": b"", "w.txt": b" \n\n \t"}, ["--input", "{d}/e.txt", "{d}/w.txt"],
                     "empty"),
    "empty folder": ({"f/x.md": b"no txt here"}, ["--input", "{d}/f"], "empty"),
    "unknown extension": ({"a.md": b"text"}, ["--input", "{d}/a.md"], "a.md"),
    "invalid utf-8": ({"ok.txt": b"fine\n", "bad.txt": b"hello \xff world"},
                      ["--input", "{d}/ok.txt", "{d}/bad.txt"],
                      "bad.txt: invalid UTF-8 at byte offset 6"),
    "jsonl not json": ({"d.jsonl": b'{"text": "ok"}\n{"text": oops}\n'}, ["--input", "{d}/d.jsonl"],
                       "d.jsonl, line 2"),
    "jsonl no text": ({"d.jsonl": b'{"title": "x"}\n'}, ["--input", "{d}/d.jsonl"], "d.jsonl, line 1"),
    "jsonl text not string": ({"d.jsonl": b'{"text": "a"}\n\n{"text": 3}\n'},
                              ["--input", "{d}/d.jsonl"],
                              "d.jsonl, line 3"),
    "jsonl not an object": ({"d.jsonl": b'["text"]\n'}, ["--input", "{d}/d.jsonl"], "line 1"),
    "no name": ({"a.txt": b"text"}, ["--input", "{d}/a.txt", "--name="], "--name"),
    "unknown tokenizer": ({"a.txt": b"text"}, ["--input", "{d}/a.txt", "--tokenizer=llama"], "llama"),
    "all with input": ({"a.txt": b"text"}, ["--input", "{d}/a.txt", "--tokenizer=all"], "all"),
    "bad val_fraction": ({"a.txt": b"text"}, ["--input", "{d}/a.txt", "--val_fraction=0.7"],
                         "val_fraction"),
    "unknown option": ({}, ["--inptu=x"], "--inptu"),
    "one char corpus": ({"a.txt": b"x"}, ["--input", "{d}/a.txt"], "too small"),
    "not gzip": ({"a.txt.gz": b"plain text"}, ["--input", "{d}/a.txt.gz"], "a.txt.gz: Not a gzipped file"),
    "truncated gzip": ({"a.jsonl.gz": gzip.compress(jsonl(make_doc(0)).encode())[:-30]},
                       ["--input", "{d}/a.jsonl.gz"], "a.jsonl.gz: Compressed file ended"),
    "invalid utf-8 far in, gzip'd": ({"b.txt.gz": gzip.compress(b"a" + "\u00e9".encode() * 10**6 + b"\xc3(")},
                                     ["--input", "{d}/b.txt.gz"], "b.txt.gz: invalid UTF-8 at byte offset 2000001"),
    "no workers": ({"a.txt": b"text"}, ["--input", "{d}/a.txt", "--workers=0"], "--workers"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_prepare_bad_input(tmp_path, capsys, case):
    files, args, expected = BAD_INPUTS[case]
    src = tmp_path / "src"
    for rel, content in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(content)
    args = [a.format(d=src) for a in args]
    if not any(a.startswith("--name") for a in args):
        args.append("--name=ds")
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        prepare(args + [f"--out_dir={out}"])
    assert expected in str(e.value)
    with pytest.raises(SystemExit) as e:  # what `python data/prepare.py ...` does with it
        run_main(lambda: prepare(args + [f"--out_dir={out}"]))
    assert e.value.code == 2
    # one `error:` line, last; before it at most the progress bar, if the error was found on the way
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[-1].startswith("error:") and expected in err[-1], err
    assert all(line.startswith("ds:") for line in err[:-1]) and "Traceback" not in "".join(err), err
    assert not glob.glob(str(out / "**" / "*.bin*"), recursive=True) and not (out / "ds").exists()


def test_prepare_os_error_is_a_user_error(tmp_path):
    (tmp_path / "a.txt").write_text(make_doc(0))
    with pytest.raises(UserError):  # out_dir is a file: the OSError becomes one `error:` line
        prepare(["--input", str(tmp_path / "a.txt"), "--name=ds", f"--out_dir={tmp_path / 'a.txt'}"])


class Crashing:
    """The bytes tokenizer, crashing on the second document (in whichever process encodes it)."""

    def __getattr__(self, name):
        return getattr(get_tokenizer("bytes"), name)

    def encode(self, text):
        if "doc1" in text:
            raise RuntimeError("crash")
        return get_tokenizer("bytes").encode(text)


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_failure_leaves_no_partial_files(tmp_path, monkeypatch, small_tasks, workers):
    (tmp_path / "a.txt").write_text(make_doc(0))
    (tmp_path / "b.txt").write_text(make_doc(1))
    args = ["--input", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--name=ds",
            f"--out_dir={tmp_path}", "--tokenizer=bytes", f"--workers={workers}"]
    prepare(args)
    before = {f: (tmp_path / "ds" / f).read_bytes() for f in ("train.bin", "val.bin", "meta.json")}
    # a crash half-way through tokenizing: the *.tmp files go, the complete old dataset stays
    monkeypatch.setattr(data.prepare, "get_tokenizer", lambda name: Crashing())
    with pytest.raises(RuntimeError, match="crash"):
        prepare(args)
    assert sorted(os.listdir(tmp_path / "ds")) == ["meta.json", "train.bin", "val.bin"]
    assert all((tmp_path / "ds" / f).read_bytes() == b for f, b in before.items())
    # so does bad input found half-way, after a first file was tokenized
    (tmp_path / "b.txt").write_bytes(make_doc(1).encode() + b"\xff")
    monkeypatch.setattr(data.prepare, "get_tokenizer", get_tokenizer)
    with pytest.raises(UserError, match="b.txt: invalid UTF-8"):
        prepare(args)
    assert all((tmp_path / "ds" / f).read_bytes() == b for f, b in before.items())


class Stalling(Crashing):
    """The bytes tokenizer, crashing on the start of the second document and slow on all else."""

    def encode(self, text):
        if "doc1 para0 " in text:
            raise RuntimeError("crash")
        time.sleep(0.2)
        return get_tokenizer("bytes").encode(text)


def test_pool_ends_whatever_sigterm_handler(tmp_path):
    # a training run in a process leaves common.StopFlag on SIGTERM, which only notes it; the pool
    # still ends its workers (with SIGTERM), even one busy when another crashed. In a new process:
    # a hang is killed by the timeout, not left to hang the tests
    (tmp_path / "a.txt").write_text(make_doc(0))
    (tmp_path / "b.txt").write_text(make_doc(1))
    code = ("import signal, sys; signal.signal(signal.SIGTERM, lambda *_: None)\n"
            "from data import encode, prepare; from tests.test_data import Stalling\n"
            "encode.TASK_CHARS, prepare.get_tokenizer = 300, lambda name: Stalling()\n"
            "try:\n    prepare.main(sys.argv[1:])\nexcept RuntimeError as e:\n    print('stopped:', e)")
    p = subprocess.run([sys.executable, "-c", code, "--input", str(tmp_path / "b.txt"), str(tmp_path / "a.txt"),
                        "--name=ds", f"--out_dir={tmp_path}", "--workers=2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "stopped: crash", p.stderr[-2000:]


# -----------------------------------------------------------------------------
# loader

def make_dataset(root, n_train=5000, n_val=1000, dtype=None, first=0):
    """A fake prepared dataset whose token at position i is first + i: windows are checkable. No
    dtype: meta.json has none, as datasets prepared before uint32 existed."""
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        (first + np.arange(n)).astype(dtype or np.uint16).tofile(root / f"{split}.bin")
    meta = {"tokenizer": "bytes", "train_tokens": n_train, "val_tokens": n_val}
    (root / "meta.json").write_text(json.dumps({**meta, **({"dtype": dtype} if dtype else {})}))
    return str(root)


def test_resolve_data_dir_and_meta(tmp_path):
    d = make_dataset(tmp_path / "ds")
    assert resolve_data_dir(d) == d and load_meta(d)["train_tokens"] == 5000


@pytest.mark.parametrize("name", ["{tmp}/missing", "{tmp}", "no_such_dataset_name"])
def test_resolve_data_dir_without_dataset(tmp_path, name):
    with pytest.raises(UserError, match="prepare.py"):  # the message says how to make one
        resolve_data_dir(name.format(tmp=tmp_path))


def test_load_meta_not_json(tmp_path):
    d = make_dataset(tmp_path / "ds")
    (tmp_path / "ds" / "meta.json").write_text('{"tokenizer": "bytes", ')  # cut short
    with pytest.raises(UserError, match="meta.json is not valid JSON"):
        load_meta(d)


def test_batch_loader_shapes_and_windows(tmp_path):
    d = make_dataset(tmp_path / "ds")
    loader = BatchLoader(d, "train", batch_size=4, seq_len=16)
    x = loader.get(0)
    assert x.shape == (4, 16) and x.dtype == torch.int64
    assert torch.all(x[:, 1:] - x[:, :-1] == 1)  # contiguous windows of the file
    assert x.min() >= 0 and x.max() < 5000


def test_batch_loader_deterministic_and_sliced_by_rank(tmp_path):
    d = make_dataset(tmp_path / "ds")
    make = lambda seed: BatchLoader(d, "train", batch_size=4, seq_len=16, seed=seed)
    a, b = make(1), make(1)
    batches = [a.get(k) for k in range(3)]
    assert all(torch.equal(batches[k], b.get(k)) for k in range(3))  # same (seed, step) -> same batch
    assert not torch.equal(batches[0], batches[1]) and not torch.equal(make(2).get(0), batches[0])
    # two ranks with 2 rows each (or one process with two micro-batches) see the same global batch
    rank0, rank1 = a.get(0, start=0, count=2), a.get(0, start=2, count=2)
    assert torch.equal(torch.cat([rank0, rank1]), batches[0]) and not torch.equal(rank0, rank1)
    with pytest.raises(AssertionError):
        a.get(0, start=3, count=2)


def test_batch_loader_too_short(tmp_path):
    d = make_dataset(tmp_path / "ds", n_train=16)
    with pytest.raises(UserError, match="fewer than"):
        BatchLoader(d, "train", batch_size=2, seq_len=16)
    BatchLoader(d, "train", batch_size=2, seq_len=15).get(0)  # seq_len + 1 tokens is enough


def test_val_windows_fixed_and_sharded(tmp_path):
    d = make_dataset(tmp_path / "ds", n_val=1000)
    full = val_windows(d, seq_len=32, n_windows=10)
    assert full.shape == (10, 32) and full.dtype == torch.int64
    assert torch.equal(full, val_windows(d, seq_len=32, n_windows=10))  # fixed
    assert full[0, 0] == 0 and full[-1, -1] == 999  # spans the whole file
    shards = [val_windows(d, 32, 10, rank=r, world_size=3) for r in range(3)]
    assert [len(s) for s in shards] == [4, 3, 3]
    starts = sorted(int(w[0]) for s in shards for w in s)
    assert starts == sorted(full[:, 0].tolist()) and len(set(starts)) == 10  # no overlap, no gap
    with pytest.raises(UserError, match="fewer than"):
        val_windows(d, seq_len=1001, n_windows=4)


def test_loader_on_prepared_dataset(tmp_path):
    (tmp_path / "a.txt").write_text(make_doc(0, 200))
    prepare(["--input", str(tmp_path / "a.txt"), "--name=ds", f"--out_dir={tmp_path}", "--tokenizer=bytes"])
    d = resolve_data_dir(str(tmp_path / "ds"))
    tok = get_tokenizer(load_meta(d)["tokenizer"])
    x = BatchLoader(d, "train", batch_size=2, seq_len=64, seed=0).get(0)
    assert x.shape == (2, 64) and tok.decode(x[0]) in make_doc(0, 200)
    assert val_windows(d, seq_len=64, n_windows=3).shape == (3, 64)


@pytest.mark.parametrize("dtype", [None, "uint16", "uint32"])
def test_loader_token_dtypes(tmp_path, dtype):
    first = 70_000 if dtype == "uint32" else 0  # ids that only uint32 holds
    d = make_dataset(tmp_path / "ds", dtype=dtype, first=first)
    x = BatchLoader(d, "train", batch_size=4, seq_len=16).get(0)
    assert torch.all(x[:, 1:] - x[:, :-1] == 1) and first <= x.min() and x.max() < first + 5000
    v = val_windows(d, seq_len=32, n_windows=10)
    assert v[0, 0] == first and v[-1, -1] == first + 999
    with pytest.raises(UserError, match="fewer than"):  # counted in tokens, not bytes
        val_windows(d, seq_len=1001, n_windows=4)
    meta = load_meta(d)
    (tmp_path / "ds" / "meta.json").write_text(json.dumps({**meta, "dtype": "float32"}))
    with pytest.raises(UserError, match="unknown dtype 'float32'"):
        BatchLoader(d, "train", batch_size=4, seq_len=16)


def pairs_tokenizer():
    """A real BPE tokenizer with too many ids for uint16 (65,795 with the specials): every byte, then
    every pair of bytes, pairs of lowercase letters last, so that words get ids above 65,535."""
    letters = range(97, 123)
    pairs = sorted(itertools.product(range(256), repeat=2), key=lambda p: (p[0] in letters and p[1] in letters, p))
    ranks = {bytes([i]): i for i in range(256)}
    ranks.update({bytes(p): 256 + i for i, p in enumerate(pairs)})
    return Tokenizer("pairs", ranks)


@pytest.mark.parametrize("workers", [1, 2])
def test_uint32_round_trip(tmp_path, monkeypatch, small_tasks, workers):
    tok = pairs_tokenizer()
    monkeypatch.setattr(data.prepare, "get_tokenizer", lambda name: tok)
    monkeypatch.setattr(data.loader, "get_tokenizer", lambda name: tok)
    paths = write_corpus(tmp_path, CORPORA["txt"])
    prepare(["--input", *paths, "--name=ds", f"--out_dir={tmp_path}", f"--workers={workers}"])
    d = str(tmp_path / "ds")
    train, val, _ = reference(paths, tok)
    meta = load_meta(d)
    assert (meta["dtype"], meta["n_vocab"], meta["train_tokens"], meta["val_tokens"]) == \
        ("uint32", 65795, len(train), len(val))
    assert max(train) >= 2**16 and os.path.getsize(os.path.join(d, "train.bin")) == 4 * len(train)
    assert np.fromfile(os.path.join(d, "train.bin"), np.uint32).tolist() == train
    # the loader reads uint32: windows of the token stream, and the documents back as text
    x = BatchLoader(d, "train", batch_size=4, seq_len=64, seed=0).get(0)
    offsets = np.random.default_rng([0, 0]).integers(0, len(train) - 64 + 1, size=4)
    assert x.tolist() == [train[o:o + 64] for o in offsets]
    assert val_windows(d, seq_len=64, n_windows=2).tolist() == [val[:64], val[-64:]]
    docs = [make_doc(0), make_doc(1, 50), unicode_doc().replace("\r\n", "\n")]
    assert split_texts(d, "val") == [split_text(doc, 0.05)[1] for doc in docs]


# -----------------------------------------------------------------------------
# train.py: a run that would cycle its corpus many times says so

def test_train_warns_when_a_run_repeats_its_data(tmp_path, capsys):
    import train
    from config import build_configs
    tc = build_configs(["--config=small"])["train"]
    capsys.readouterr()
    # small on the bundled corpus: each of its 1,156,705 GPT-2 training tokens ~567 times in stage 2
    assert round(train.warn_repeats("joint", tc, tc.joint_iters, 1_156_705)) == 567
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("warning: stage joint would see each of the 1,156,705 "
                                               "training tokens of austen_gpt2 ~567 times") and "README" in out[0]
    tc = build_configs([])["train"]  # tiny on austen_bytes (4,975,159 tokens): well under once
    assert train.warn_repeats("joint", tc, tc.joint_iters, 4_975_159) < 1 and not capsys.readouterr().out
    # a run says it as it starts: 1 step x 32 x 16 tokens over 40 tokens
    d = make_dataset(tmp_path / "ds", n_train=40, n_val=40)
    train.main(["--vae.width=32", "--vae.n_head=2", "--vae.n_enc_layer=1", "--vae.n_dec_layer=1", "--seq_len=16",
                "--batch_size=32", "--eval_windows=2", "--stage=vae", "--max_iters=1", f"--dataset={d}",
                f"--out_dir={tmp_path / 'out'}"])
    out = capsys.readouterr().out
    assert "warning: stage vae would see each of the 40 training tokens" in out and "~13 times" in out
