"""
Tests for a HuggingFace tokenizer.json read into tiktoken (data/tokenizer.py): the same ids as the
`tokenizers` library on the cases stored beside the test file (an OLMo 2 style byte-level BPE, 480
regular tokens + 4 specials), decode, special ids by name, one-line errors for the files tiktoken
cannot reproduce, and a corpus prepared with it read back through the loader (uint16 and uint32).
Hermetic: no `tokenizers` library, no network.
    python -m pytest -q tests/test_tokenizer.py
"""
import copy
import json
import os

import numpy as np
import pytest

import data.prepare
from common import UserError
from data.loader import BatchLoader, load_meta, split_texts
from data.prepare import dataset_name, split_point, token_dtype
from data.tokenizer import GPT2_PAT, byte_level_chars, get_tokenizer, read_tokenizer_json

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "released")
PATH = os.path.join(FIXTURES, "tokenizer.json")
with open(os.path.join(FIXTURES, "tokenizer_cases.json"), encoding="utf-8") as f:
    CASES = json.load(f)  # texts and the ids tokenizers.Tokenizer.encode(text, add_special_tokens=False) gives
with open(PATH, encoding="utf-8") as f:
    TJ = json.load(f)
SPLIT, BYTE_LEVEL = TJ["pre_tokenizer"]["pretokenizers"]  # Split(cl100k regex, Isolated), ByteLevel(use_regex=false)


def test_ids_equal_the_tokenizers_library():
    tok = get_tokenizer(PATH)
    for case in CASES["cases"]:
        text, ids = case["text"], case["ids"]
        assert tok.enc.encode(text, allowed_special="all") == ids, text  # the library matches specials in text
        if not any(s in text for s in CASES["specials"]):
            assert tok.encode(text) == ids, text
            assert tok.decode(ids) == text
        else:  # encode keeps special-token strings as text, and decode gets them back
            assert tok.decode(tok.encode(text)) == text
            assert all(i in tok.regular for i in tok.encode(text))


def test_special_ids_and_sizes():
    tok = get_tokenizer(PATH)
    assert tok.name == PATH and get_tokenizer(PATH) is tok
    assert {s: tok.enc.encode_single_token(s) for s in CASES["specials"]} == CASES["specials"]
    assert (tok.eot, tok.pad) == (CASES["specials"]["<|endoftext|>"], CASES["specials"]["<|pad|>"]) == (480, 483)
    # ids 0..483; the mask is the next one, the released VAE's extra embedding row; no padding to 64
    assert tok.n_vocab == tok.vocab_size == CASES["vocab_size"] == tok.mask == 484
    assert tok.regular == set(range(CASES["regular_vocab_size"]))
    # decode drops every id that is not a regular token: specials, the mask, anything past the vocab
    ids = tok.encode("Emma Woodhouse")
    assert tok.decode([tok.eot, *ids, 481, 482, tok.pad, tok.mask, tok.mask + 7]) == "Emma Woodhouse"
    assert tok.decode(np.array(ids[:1] + [tok.pad] + ids[1:])) == "Emma Woodhouse"


def write(tmp_path, tj, name="tokenizer.json"):
    path = tmp_path / name
    path.write_text(tj if isinstance(tj, str) else json.dumps(tj), encoding="utf-8")
    return str(path)


def edited(**changes):
    """The test tokenizer.json with fields replaced: changes maps 'model.merges' and the like to values."""
    tj = copy.deepcopy(TJ)
    for key, value in changes.items():
        *outer, last = key.split(".")
        d = tj
        for k in outer:
            d = d[k]
        d[last] = value
    return tj


def sequence(*steps):
    return {"type": "Sequence", "pretokenizers": list(steps)}


def test_pre_tokenizer_forms():
    cl100k = SPLIT["pattern"]["Regex"]
    removed = dict(SPLIT, behavior="Removed", invert=True)  # OLMo 2's form: keep the matches
    alone = dict(BYTE_LEVEL, use_regex=True)  # GPT-2's: ByteLevel splits with its own regex
    for pre, pat in ((TJ["pre_tokenizer"], cl100k), (sequence(removed, BYTE_LEVEL), cl100k),
                     (alone, GPT2_PAT), (sequence(alone), GPT2_PAT)):
        assert read_tokenizer_json(edited(pre_tokenizer=pre))[1] == pat


def toy(merges):
    """The test file cut down to the 256 bytes, bc, ab, abc (ranked in that order) and the given merges."""
    vocab = {**byte_level_chars(), "bc": 256, "ab": 257, "abc": 258}  # printable ASCII stands for itself
    specials = [dict(TJ["added_tokens"][0], id=259), dict(TJ["added_tokens"][3], id=260)]
    return edited(**{"model.vocab": vocab, "model.merges": merges, "added_tokens": specials})


def test_merges_must_be_the_ones_tiktoken_implies(tmp_path):
    # tiktoken merges bc (rank 256) before ab (257): abc can only come from a + bc, and a file that
    # says so gives tiktoken's ids
    tok = get_tokenizer(write(tmp_path, toy(["b c", "a b", "a bc"])))
    assert tok.encode("abca") == [258, ord("a")]
    # ab + c follows the rank order too, but is not tiktoken's merge: HuggingFace would stop at
    # [a, bc, a] (no merge a + bc), tiktoken makes abc
    with pytest.raises(UserError, match=r"merge 2 should make token 258 of b'a' \+ b'bc', but it is b'ab' \+ b'c'"):
        get_tokenizer(write(tmp_path, toy(["b c", "a b", "ab c"]), "ab_c.json"))


BAD = {  # case -> (tokenizer.json text or edits of the test file, what the one-line error says)
    "invalid JSON": ('{"model": {"type": "BPE", ', "not valid JSON"),
    "not an object": ("[1, 2]", "not a tokenizer.json"),
    "WordPiece": (edited(model={"type": "WordPiece", "vocab": {"a": 0}, "unk_token": "[UNK]"}),
                  "model type 'WordPiece': only BPE is supported"),
    "Unigram": (edited(model={"type": "Unigram", "vocab": [["a", 0.0]]}), "model type 'Unigram'"),
    "normalizer": (edited(normalizer={"type": "NFC"}), "normalizer 'NFC'"),
    "no pre-tokenizer": (edited(pre_tokenizer=None), "unsupported pre_tokenizer"),
    "whitespace pre-tokenizer": (edited(pre_tokenizer={"type": "Whitespace"}), "unsupported pre_tokenizer"),
    "Split dropping the matches": (edited(pre_tokenizer=sequence(dict(SPLIT, behavior="Removed"), BYTE_LEVEL)),
                                   "unsupported pre_tokenizer"),
    "add_prefix_space": (edited(pre_tokenizer=dict(BYTE_LEVEL, add_prefix_space=True, use_regex=True)),
                         "add_prefix_space"),
    "regex tiktoken cannot compile": (edited(pre_tokenizer=sequence(dict(SPLIT, pattern={"Regex": "(a"}), BYTE_LEVEL)),
                                      "pre_tokenizer regex: Parsing error"),
    "subword prefix": (edited(**{"model.continuing_subword_prefix": "##"}), "continuing_subword_prefix"),
    "not byte-level": (edited(**{"model.vocab": {**TJ["model"]["vocab"], "a b": 999}}), "'a b' is not byte-level"),
    "repeated ids": (edited(**{"model.vocab": {**TJ["model"]["vocab"], "zzqzz": 5}}), "token ids repeat"),
    "a byte missing": (edited(**{"model.vocab": {s: i for s, i in TJ["model"]["vocab"].items() if s != "!"}}),
                       "lacks some of the 256 single bytes"),
    "no pad": (edited(added_tokens=TJ["added_tokens"][:3]), "no <|pad|> among added_tokens"),
    "merges swapped": (edited(**{"model.merges": [TJ["model"]["merges"][1], TJ["model"]["merges"][0],
                                                  *TJ["model"]["merges"][2:]]}), "merge 0 should make token 256"),
    "a merge missing": (edited(**{"model.merges": TJ["model"]["merges"][:-1]}), "merge 223 should make token 479"),
    "a merge too many": (edited(**{"model.merges": TJ["model"]["merges"] + [["a", "b"]]}), "225 merges for 224"),
    "no vocab": (edited(model={"type": "BPE", "merges": []}), "not a tokenizer.json (KeyError: 'vocab')"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_unsupported_tokenizer_json_is_one_line(tmp_path, case):
    tj, expected = BAD[case]
    path = write(tmp_path, tj)
    with pytest.raises(UserError) as e:
        get_tokenizer(path)
    assert expected in str(e.value) and str(e.value).startswith(path) and "\n" not in str(e.value)


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(UserError, match=f"cannot read tokenizer file {tmp_path}/nope.json: No such file"):
        get_tokenizer(str(tmp_path / "nope.json"))
    with pytest.raises(UserError, match="unknown tokenizer 'llama'; valid: bytes, gpt2 or the path of a tokenizer"):
        get_tokenizer("llama")


# -----------------------------------------------------------------------------
# data/prepare.py with a tokenizer.json

def test_token_dtype_and_dataset_name():
    assert [token_dtype(n).name for n in (259, 50259, 2**16, 2**16 + 1, 100278)] == \
        ["uint16", "uint16", "uint16", "uint32", "uint32"]
    assert dataset_name("gpt2") == "austen_gpt2" and dataset_name("ckpt/olmo2/tokenizer.json") == "austen_olmo2"


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_prepare_with_tokenizer_json(tmp_path, monkeypatch, dtype):
    """A corpus prepared with the test file and read back: the ids are its encoding, uint16 as its 484
    ids need, or uint32 as OLMo 2's 100,278 do (forced here)."""
    monkeypatch.setattr(data.prepare, "token_dtype", lambda n_vocab: np.dtype(dtype))
    doc = "\n\n".join(f"Paragraph {i}: Emma said, \"It is very true.\"\nA new line!\n" for i in range(40))
    (tmp_path / "a.txt").write_text(doc, encoding="utf-8")
    data.prepare.main(["--input", str(tmp_path / "a.txt"), "--name=ds", f"--out_dir={tmp_path}", f"--tokenizer={PATH}"])
    d, tok = str(tmp_path / "ds"), get_tokenizer(PATH)
    meta = load_meta(d)
    assert (meta["tokenizer"], meta["dtype"], meta["vocab_size"], meta["eot"], meta["mask"], meta["pad"]) == \
        (PATH, dtype, 484, 480, 484, 483)
    end, start = split_point(doc, 0.05)
    train, val = tok.encode(doc[:end]) + [tok.eot], tok.encode(doc[start:]) + [tok.eot]
    assert os.path.getsize(os.path.join(d, "train.bin")) == np.dtype(dtype).itemsize * len(train)
    x = BatchLoader(d, "train", batch_size=3, seq_len=16, seed=0).get(0)
    offsets = np.random.default_rng([0, 0]).integers(0, len(train) - 16 + 1, size=3)
    assert x.tolist() == [train[o:o + 16] for o in offsets]
    assert split_texts(d, "train") == [doc[:end]] and split_texts(d, "val") == [doc[start:]]
    assert np.fromfile(os.path.join(d, "val.bin"), dtype).tolist() == val
