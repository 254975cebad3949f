"""
Tests for data/: the tokenizers, data/prepare.py on good and bad input, and the batch loader.
User mistakes raise common.UserError, which the scripts report as one `error:` line (exit status 2).
Hermetic and fast: tiny synthetic text in tmp_path, no network, never the prepared corpus.
    python -m pytest -q tests/test_data.py
"""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from common import UserError, run_main
from data.loader import BatchLoader, load_meta, resolve_data_dir, val_windows
from data.prepare import BOOKS, main as prepare, read_books, split_text
from data.tokenizer import EXTRA_TOKENS, get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["bytes", "gpt2"]
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
    with pytest.raises(ValueError, match="bytes, gpt2"):
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
        assert os.path.getsize(path) == 2 * meta[f"{split}_tokens"]
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


def test_split_text():
    assert split_text("a\nb", 0.05) == ("a\nb", "")  # too short to cut
    text = "\n\n".join(" ".join([f"paragraph {i}"] * 5) for i in range(40))
    train, val = split_text(text, 0.05)
    assert train + "\n\n" + val == text and 0.03 < len(val) / len(text) < 0.07


def test_bundled_corpus_books(tmp_path):
    books = read_books()
    assert [name for name, _ in books] == [name for _, name in BOOKS]
    for (title, _), (name, text) in zip(BOOKS, books):
        assert text.startswith(title + "\n\n") and len(text) > 300_000 and "\n\n\n" not in text
    # default run (bundled corpus) into a temporary folder, bytes only for speed
    prepare([f"--out_dir={tmp_path}", "--tokenizer=bytes"])
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
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_prepare_bad_input(tmp_path, capsys, case):
    files, args, expected = BAD_INPUTS[case]
    src = tmp_path / "src"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
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
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and expected in err[0], err
    assert not glob.glob(str(out / "**" / "*.bin*"), recursive=True)


def test_prepare_os_error_is_a_user_error(tmp_path):
    (tmp_path / "a.txt").write_text(make_doc(0))
    with pytest.raises(UserError):  # out_dir is a file: the OSError becomes one `error:` line
        prepare(["--input", str(tmp_path / "a.txt"), "--name=ds", f"--out_dir={tmp_path / 'a.txt'}"])


def test_prepare_failure_leaves_no_partial_files(tmp_path, monkeypatch):
    import data.prepare
    (tmp_path / "a.txt").write_text(make_doc(0))
    (tmp_path / "b.txt").write_text(make_doc(1))
    args = ["--input", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--name=ds",
            f"--out_dir={tmp_path}", "--tokenizer=bytes"]
    prepare(args)
    before = {f: (tmp_path / "ds" / f).read_bytes() for f in ("train.bin", "val.bin", "meta.json")}
    # a crash half-way through tokenizing: the *.tmp files go, the complete old dataset stays
    tok = get_tokenizer("bytes")

    class Crashing:  # the bytes tokenizer, crashing on the third piece of text
        n_calls = 0

        def __getattr__(self, name):
            return getattr(tok, name)

        def encode(self, text):
            Crashing.n_calls += 1
            if Crashing.n_calls > 2:
                raise RuntimeError("crash")
            return tok.encode(text)

    monkeypatch.setattr(data.prepare, "get_tokenizer", lambda name: Crashing())
    with pytest.raises(RuntimeError):
        prepare(args)
    assert sorted(os.listdir(tmp_path / "ds")) == ["meta.json", "train.bin", "val.bin"]
    assert all((tmp_path / "ds" / f).read_bytes() == b for f, b in before.items())


# -----------------------------------------------------------------------------
# loader

def make_dataset(root, n_train=5000, n_val=1000):
    """A fake prepared dataset whose token at position i is i (mod 2**16): windows are checkable."""
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        (np.arange(n) % 2**16).astype(np.uint16).tofile(root / f"{split}.bin")
    (root / "meta.json").write_text(json.dumps({"tokenizer": "bytes", "train_tokens": n_train,
                                                "val_tokens": n_val}))
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
