"""
Tokenizers: the one place they are built; everything else calls get_tokenizer(name). Both are plain
tiktoken Encodings built offline, with three special tokens right after the base vocab:
  gpt2  - GPT-2 BPE (r50k_base) from the bundled rank file data/gpt2.tiktoken
  bytes - every UTF-8 byte is one token (ids 0..255); keeps the output head tiny for CPU runs
    tok = get_tokenizer("gpt2")
    text = tok.decode(tok.encode("Hello world!") + [tok.eot])   # specials are dropped on decode
A quick self-check: python data/tokenizer.py
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
        ids = ids.tolist() if hasattr(ids, "tolist") else ids  # torch.Tensor / np.ndarray
        ids = [int(i) for i in ids if 0 <= int(i) < self.eot]  # specials sit right after the base vocab
        return self.enc.decode_bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self):
        return f"Tokenizer({self.name!r}, n_vocab={self.n_vocab}, vocab_size={self.vocab_size})"


@functools.lru_cache(maxsize=None)
def get_tokenizer(name):
    """Build (once per process) the tokenizer called name: 'gpt2' or 'bytes'."""
    if name == "gpt2":
        with open(GPT2_RANKS, "rb") as f:  # one `base64(token bytes) rank` per line
            pairs = (line.split() for line in f if line.strip())
            return Tokenizer("gpt2", {base64.b64decode(token): int(rank) for token, rank in pairs})
    if name == "bytes":
        return Tokenizer("bytes", {bytes([i]): i for i in range(256)})
    raise ValueError(f"unknown tokenizer {name!r}; valid names: {', '.join(NAMES)}")


if __name__ == "__main__":
    for name in NAMES:
        tok = get_tokenizer(name)
        text = "Hello world! <|endoftext|> héllo 🐳"
        ids = tok.encode(text)
        print(tok, len(ids), "tokens, round trip ok:", tok.decode(ids) == text)
