"""
Tokenizers: the one place they are built. Everything else calls get_tokenizer(name).

Two tokenizers, both plain tiktoken Encodings built offline (no download, no cache dir):
  gpt2  - GPT-2 BPE (r50k_base) from the bundled rank file data/gpt2.tiktoken
  bytes - every UTF-8 byte is one token (ids 0..255); keeps the output head tiny for CPU runs
Both get three special tokens right after the base vocab, in the order of EXTRA_TOKENS.

    from data.tokenizer import get_tokenizer
    tok = get_tokenizer("gpt2")
    ids = tok.encode("Hello world!") + [tok.eot]
    text = tok.decode(ids)          # specials are dropped on decode
"""

import base64
import functools
import os

import tiktoken

EXTRA_TOKENS = ("<|endoftext|>", "<|mask|>", "<|pad|>")  # ids follow the base vocab in this order
NAMES = ("bytes", "gpt2")
# GPT-2's pre-tokenizer regex (what tiktoken's r50k_base uses)
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_RANKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpt2.tiktoken")


def load_ranks(path):
    """Read a tiktoken rank file: one `base64(token_bytes) rank` per line."""
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


class Tokenizer:
    """A tiktoken Encoding plus the special ids and sizes the models need."""

    def __init__(self, name, mergeable_ranks):
        base = len(mergeable_ranks)  # gpt2: 50256 (eot is not a merge rank), bytes: 256
        specials = {s: base + i for i, s in enumerate(EXTRA_TOKENS)}
        self.name = name
        self.enc = tiktoken.Encoding(name=f"cola_{name}", pat_str=GPT2_PAT,
                                     mergeable_ranks=mergeable_ranks, special_tokens=specials)
        self.eot, self.mask, self.pad = (specials[s] for s in EXTRA_TOKENS)
        self.n_vocab = base + len(EXTRA_TOKENS)  # ids that mean something
        # embedding rows: padded up to a multiple of 64 (faster matmuls, as in nanoGPT)
        self.vocab_size = (self.n_vocab + 63) // 64 * 64

    def encode(self, text):
        """Ordinary text -> ids. Special-token strings inside text are encoded as plain text."""
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        """ids (list, tensor or ndarray) -> text. Specials and padding ids (>= n_vocab) are dropped;
        byte sequences that are not valid UTF-8 (e.g. a cut multi-byte char) become U+FFFD."""
        if hasattr(ids, "tolist"):  # torch.Tensor / np.ndarray
            ids = ids.tolist()
        first_special = self.eot  # specials sit right after the base vocab
        ids = [int(i) for i in ids if 0 <= int(i) < first_special]
        return self.enc.decode_bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self):
        return f"Tokenizer({self.name!r}, n_vocab={self.n_vocab}, vocab_size={self.vocab_size})"


@functools.lru_cache(maxsize=None)
def get_tokenizer(name):
    """Build (once per process) the tokenizer called name: 'gpt2' or 'bytes'."""
    if name == "gpt2":
        return Tokenizer("gpt2", load_ranks(GPT2_RANKS))
    if name == "bytes":
        return Tokenizer("bytes", {bytes([i]): i for i in range(256)})
    raise ValueError(f"unknown tokenizer {name!r}; valid names: {', '.join(NAMES)}")


if __name__ == "__main__":
    # quick self-check: python data/tokenizer.py
    for name in NAMES:
        tok = get_tokenizer(name)
        text = "Hello world! <|endoftext|> héllo 🐳"
        ids = tok.encode(text)
        print(tok, len(ids), "tokens, round trip ok:", tok.decode(ids) == text)
