"""
Tokenizers: the one place they are built; everything else calls get_tokenizer(name). All are plain
tiktoken Encodings built offline:
  gpt2  - GPT-2 BPE (r50k_base) from the bundled rank file data/gpt2.tiktoken
  bytes - every UTF-8 byte is one token (ids 0..255); keeps the output head tiny for CPU runs
  PATH  - a HuggingFace tokenizer.json of a byte-level BPE, e.g. OLMo 2's (the released checkpoint's)
gpt2 and bytes get three special tokens right after the base vocab (EXTRA_TOKENS); a tokenizer.json
brings its own (see read_tokenizer_json).
    tok = get_tokenizer("gpt2")
    text = tok.decode(tok.encode("Hello world!") + [tok.eot])   # specials are dropped on decode
A quick self-check: python data/tokenizer.py [PATH/tokenizer.json]
"""
import base64
import functools
import json
import os
import sys

import tiktoken

if __name__ == "__main__":  # run as a script: make `common` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import UserError  # noqa: E402

EXTRA_TOKENS = ("<|endoftext|>", "<|mask|>", "<|pad|>")  # ids follow the base vocab in this order
NAMES = ("bytes", "gpt2")
# GPT-2's pre-tokenizer regex (what tiktoken's r50k_base uses)
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_RANKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpt2.tiktoken")


class Tokenizer:
    """A tiktoken Encoding plus the special ids and sizes the models need. Without special_tokens
    (gpt2, bytes): EXTRA_TOKENS follow the base vocab and the embedding is padded to a multiple of 64
    rows. With them (a tokenizer.json): eot and pad by name, no padding, and the mask is one id past
    the last, as in the released VAE, whose embedding has one extra row for it."""

    def __init__(self, name, mergeable_ranks, pat_str=GPT2_PAT, special_tokens=None):
        ours = special_tokens is None
        if ours:  # gpt2: 50256 (eot is not a merge rank), bytes: 256
            special_tokens = {s: len(mergeable_ranks) + i for i, s in enumerate(EXTRA_TOKENS)}
        self.name = name
        self.enc = tiktoken.Encoding(name=f"cola_{name}", pat_str=pat_str,
                                     mergeable_ranks=mergeable_ranks, special_tokens=special_tokens)
        self.regular = frozenset(mergeable_ranks.values())  # the ids decode keeps
        self.eot, self.pad = special_tokens["<|endoftext|>"], special_tokens["<|pad|>"]
        # where a generated sample ends, as in the released inference: EOS, and im_end where the vocabulary has it
        self.stop = tuple(special_tokens[s] for s in ("<|endoftext|>", "<|im_end|>") if s in special_tokens)
        self.n_vocab = self.enc.n_vocab  # ids that mean something: the largest + 1
        self.mask = special_tokens["<|mask|>"] if ours else self.n_vocab
        # embedding rows: padded up to a multiple of 64 (faster matmuls, as in nanoGPT) for ours;
        # a tokenizer.json's are its ids, as in the released output head
        self.vocab_size = (self.n_vocab + 63) // 64 * 64 if ours else self.n_vocab

    def encode(self, text):
        """Ordinary text -> ids. Special-token strings inside text are encoded as plain text."""
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        """ids (list, tensor or ndarray) -> text. Specials, the mask and padding ids are dropped;
        byte sequences that are not valid UTF-8 (e.g. a cut multi-byte char) become U+FFFD."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids  # torch.Tensor / np.ndarray
        ids = [i for i in map(int, ids) if i in self.regular]
        return self.enc.decode_bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self):
        return f"Tokenizer({self.name!r}, n_vocab={self.n_vocab}, vocab_size={self.vocab_size})"


def byte_level_chars():
    """GPT-2's byte <-> unicode table as {character: byte}: a byte-level BPE writes byte b as the
    character chr(b) if it is printable, else as one of chr(256 + n) in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(c): b for c, b in zip(printable + [256 + n for n in range(len(others))], printable + others)}


def bpe_parts(token, ranks):
    """tiktoken's byte-pair merging (lowest rank first, leftmost on ties) of the bytes of `token`,
    with only the tokens ranked below it: where it stops, the two parts whose merge makes `token`."""
    parts, limit = [token[i:i + 1] for i in range(len(token))], ranks[token]
    while len(parts) > 2:
        pair_ranks = [ranks.get(a + b, limit) for a, b in zip(parts, parts[1:])]
        rank = min(pair_ranks)
        if rank >= limit:
            break
        i = pair_ranks.index(rank)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def from_tokenizer_json(path):
    """A HuggingFace tokenizer.json -> Tokenizer (see read_tokenizer_json); a missing, unreadable or
    unsupported file is a one-line UserError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            tj = json.load(f)
        ranks, pat_str, specials = read_tokenizer_json(tj)
    except OSError as e:
        raise UserError(f"cannot read tokenizer file {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    except ValueError as e:  # what read_tokenizer_json finds, or invalid UTF-8
        raise UserError(f"{path}: {e}") from None
    except (AttributeError, KeyError, TypeError) as e:  # a field of the wrong kind
        raise UserError(f"{path}: not a tokenizer.json ({type(e).__name__}: {e})") from None
    try:
        return Tokenizer(os.path.abspath(path), ranks, pat_str, specials)
    except ValueError as e:  # a regex tiktoken's engine cannot compile
        raise UserError(f"{path}: pre_tokenizer regex: {e}") from None


def read_tokenizer_json(tj):
    """A parsed tokenizer.json -> (mergeable ranks, pat_str, special tokens), for the files tiktoken
    reproduces exactly: byte-level BPE written from a tiktoken encoding, as OLMo 2's is. Where it goes:
      model.vocab      -> mergeable ranks: each string mapped to its bytes (byte_level_chars), rank = id;
                          the ids of added_tokens left out (OLMo 2 lists its specials in the vocab too)
      model.merges     -> checked, not used: they must be exactly the merges tiktoken's BPE implies for
                          these ranks, the i-th making the i-th multi-byte token from the parts bpe_parts
                          gives (what HuggingFace's converter writes for a tiktoken encoding). Merges
                          that merely follow the rank order are not enough: tiktoken joins any adjacent
                          pair that makes a token, HuggingFace only the pairs it lists, so with ab + c
                          listed for abc, tiktoken also makes abc of a + bc, HuggingFace does not.
      pre_tokenizer    -> pat_str: the Regex of a Split followed by ByteLevel(use_regex=false), or
                          GPT-2's pattern for a lone ByteLevel(use_regex=true); add_prefix_space false.
                          The Split keeps the matches as tiktoken does (Removed with invert, OLMo 2's),
                          or all text (Isolated: the same for a pattern that matches every character).
      added_tokens     -> special tokens, content -> id, <|endoftext|> and <|pad|> among them
      normalizer       -> must be null: tiktoken has none
    post_processor and decoder are not read: encode gives the ids of the text alone (HuggingFace's
    add_special_tokens=False), decode the UTF-8 of the regular tokens' bytes. Raises ValueError."""
    model, pre = tj["model"], tj.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"model type {model.get('type')!r}: only BPE is supported")
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError("BPE dropout, continuing_subword_prefix and end_of_word_suffix are not supported")
    if tj.get("normalizer"):
        raise ValueError(f"normalizer {tj['normalizer'].get('type')!r}: tiktoken has none, it must be null")
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    split = steps[0] if len(steps) == 2 and steps[0].get("type") == "Split" else {}
    if [s.get("type") for s in steps] == ["ByteLevel"] and steps[0].get("use_regex", True):
        pat_str = GPT2_PAT  # HuggingFace's ByteLevel regex as tiktoken writes it (the same pieces)
    elif split and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True) and \
            (split.get("behavior"), split.get("invert")) in (("Isolated", False), ("Removed", True)) and \
            "Regex" in split.get("pattern", {}):
        pat_str = split["pattern"]["Regex"]
    else:
        raise ValueError("unsupported pre_tokenizer: expected Split(Regex) then ByteLevel(use_regex=false), "
                         "or ByteLevel(use_regex=true), as in byte-level BPE tokenizers like OLMo 2's")
    if steps[-1].get("add_prefix_space", True):
        raise ValueError("ByteLevel add_prefix_space=true is not supported")

    chars = byte_level_chars()

    def to_bytes(s):
        if any(c not in chars for c in s):
            raise ValueError(f"token {s!r} is not byte-level BPE (characters outside GPT-2's byte table)")
        return bytes(chars[c] for c in s)

    specials = {t["content"]: t["id"] for t in tj.get("added_tokens") or []}
    special_ids = set(specials.values())
    ranks = {to_bytes(s): i for s, i in model["vocab"].items() if i not in special_ids}
    if len(set(ranks.values())) != len(ranks) or len(special_ids) != len(specials):
        raise ValueError("token ids repeat")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise ValueError("the vocab lacks some of the 256 single bytes")
    for name in ("<|endoftext|>", "<|pad|>"):
        if name not in specials:
            raise ValueError(f"no {name} among added_tokens")
    merges = [tuple(map(to_bytes, m.split(" ") if isinstance(m, str) else m)) for m in model["merges"]]
    tokens = [t for t in sorted(ranks, key=ranks.get) if len(t) > 1]  # what the merges make, in order
    for i, token in enumerate(tokens):
        want = tuple(bpe_parts(token, ranks))
        if i >= len(merges) or merges[i] != want:
            have = f"it is {' + '.join(map(repr, merges[i]))}" if i < len(merges) else "there is none"
            raise ValueError(f"merges are not those tiktoken's merging implies for the ids: merge {i} should "
                             f"make token {ranks[token]} of {' + '.join(map(repr, want))}, but {have}")
    if len(merges) != len(tokens):
        raise ValueError(f"{len(merges)} merges for {len(tokens)} multi-byte tokens")
    return ranks, pat_str, specials


@functools.lru_cache(maxsize=None)
def get_tokenizer(name):
    """Build (once per process) the tokenizer called name: 'gpt2', 'bytes', or the path of a
    tokenizer.json (see from_tokenizer_json)."""
    if name == "gpt2":
        with open(GPT2_RANKS, "rb") as f:  # one `base64(token bytes) rank` per line
            pairs = (line.split() for line in f if line.strip())
            return Tokenizer("gpt2", {base64.b64decode(token): int(rank) for token, rank in pairs})
    if name == "bytes":
        return Tokenizer("bytes", {bytes([i]): i for i in range(256)})
    if name.endswith(".json") or os.path.exists(name):
        return from_tokenizer_json(name)
    raise UserError(f"unknown tokenizer {name!r}; valid: {', '.join(NAMES)} or the path of a tokenizer.json")


if __name__ == "__main__":
    for name in [*NAMES, *sys.argv[1:]]:
        tok = get_tokenizer(name)
        text = "Hello world! <|endoftext|> héllo 🐳"
        ids = tok.encode(text)
        print(tok, len(ids), "tokens, round trip ok:", tok.decode(ids) == text)
