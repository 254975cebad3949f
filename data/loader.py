"""
Batches of token windows from the token files data/prepare.py writes (uint16, or uint32 as meta.json's
"dtype" says). A missing dataset, or one too short for seq_len, raises common.UserError.

    data_dir = resolve_data_dir("austen_bytes")            # or a path to any prepared folder
    loader = BatchLoader(data_dir, "train", batch_size=32, seq_len=128, seed=0)
    x = loader.get(step, start=8 * rank, count=8)          # (8, 128) int64: this rank's rows of the step's batch
    xv = val_windows(data_dir, seq_len=128, n_windows=64) # fixed evaluation windows

The global batch of step k is batch_size windows at offsets from np.random.default_rng([seed, k]):
every process draws the same offsets and reads only its own rows, so 1 process with gradient
accumulation and N processes see the same global batch, and resuming a run needs only its step.
"""
import json
import os

import numpy as np
import torch

from common import UserError
from data.tokenizer import get_tokenizer

DATA_DIR = os.path.dirname(os.path.abspath(__file__))


def resolve_data_dir(name_or_path):
    """'austen_bytes' -> <repo>/data/austen_bytes; an existing folder is used as it is."""
    for d in (name_or_path, os.path.join(DATA_DIR, name_or_path)):
        if os.path.isdir(d) and os.path.isfile(os.path.join(d, "meta.json")):
            return os.path.abspath(d)
    raise UserError(f"no prepared dataset at {name_or_path!r} (nor {os.path.join(DATA_DIR, name_or_path)}); "
                    f"run `python data/prepare.py` (bundled corpus) or "
                    f"`python data/prepare.py --input PATH --name NAME` (your text) first")


def load_meta(data_dir):
    """The dataset's meta.json: tokenizer name, vocab_size, special ids, token counts."""
    path = os.path.join(data_dir, "meta.json")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e}); run `python data/prepare.py` again") from None


def open_split(data_dir, split, min_tokens):
    """Memory-map <split>.bin read-only, checking it holds at least min_tokens tokens."""
    path = os.path.join(data_dir, f"{split}.bin")
    if not os.path.isfile(path):
        raise UserError(f"{path} not found; run `python data/prepare.py`")
    dtype = load_meta(data_dir).get("dtype", "uint16")  # none: a dataset prepared before uint32 existed
    if dtype not in ("uint16", "uint32"):
        raise UserError(f"{os.path.join(data_dir, 'meta.json')}: unknown dtype {dtype!r} (expected uint16 or uint32)")
    n = os.path.getsize(path) // np.dtype(dtype).itemsize
    if n < min_tokens:
        raise UserError(f"{path} has {n} tokens, fewer than the {min_tokens} needed (seq_len "
                        f"too long for this dataset?)")
    return np.memmap(path, dtype=dtype, mode="r")


def split_texts(data_dir, split):
    """The documents of a split as text: decoded with the dataset's tokenizer, cut at <|endoftext|>."""
    tok = get_tokenizer(load_meta(data_dir)["tokenizer"])
    ids = np.array(open_split(data_dir, split, 1))
    return [text for d in np.split(ids, np.where(ids == tok.eot)[0]) if (text := tok.decode(d))]


class BatchLoader:
    """Random windows from one split: the global batch of each step, deterministic in (seed, step)."""

    def __init__(self, data_dir, split, batch_size, seq_len, seed=0):
        self.data_dir, self.split = data_dir, split
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        data = open_split(data_dir, split, seq_len + 1)  # fail early, not at step 1
        self.n_tokens, self.dtype = len(data), data.dtype

    def get(self, step, start=0, count=None):
        """Rows start..start+count of step's global batch -> (count, seq_len) int64."""
        count = self.batch_size - start if count is None else count
        assert 0 <= start and start + count <= self.batch_size, "rows outside the global batch"
        rng = np.random.default_rng([self.seed, step])
        offsets = rng.integers(0, self.n_tokens - self.seq_len + 1, size=self.batch_size)[start:start + count]
        # re-open the memmap for every batch (cheap; avoids a memory leak, as in nanoGPT)
        data = np.memmap(os.path.join(self.data_dir, f"{self.split}.bin"), dtype=self.dtype, mode="r")
        x = np.stack([data[i:i + self.seq_len] for i in offsets]).astype(np.int64)  # (count, T)
        return torch.from_numpy(x)


def val_windows(data_dir, seq_len, n_windows, rank=0, world_size=1):
    """n_windows windows of seq_len tokens evenly spaced over val.bin, from its start to its end; rank
    r of world_size gets windows r, r + world_size, ... -> (n_local, seq_len) int64."""
    assert 0 <= rank < world_size and n_windows >= 1
    data = open_split(data_dir, "val", seq_len)
    offsets = np.linspace(0, len(data) - seq_len, n_windows).round().astype(np.int64)[rank::world_size]
    x = np.stack([data[i:i + seq_len] for i in offsets]) if len(offsets) else np.zeros((0, seq_len))
    return torch.from_numpy(x.astype(np.int64))  # (n_local, T)
