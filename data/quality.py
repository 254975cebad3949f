"""
Held-out prompts and text statistics for `eval.py quality` (the model side lives there): the share
of generated words found in the training split's vocabulary (a cheap proxy, not a published
standard), distinct word 4-grams and byte entropy per sample (low values flag repetitive samples, as
BD3-LM's entropy check does), next to the true continuations (the ceiling) and unigram-sampled
tokens (the floor).
"""
import bisect
import itertools
import re

import numpy as np
import torch

from common import UserError
from data.loader import load_meta, open_split, split_texts
from data.tokenizer import get_tokenizer


def quality_prompts(data_dir, n, prompt_chars, tok, new_tokens):
    """n (prompt, true continuation) pairs evenly spaced over the validation split's documents: a
    prompt of up to prompt_chars characters, whole words, and the next new_tokens tokens of the text."""
    docs = [d for d in split_texts(data_dir, "val") if len(d) > prompt_chars + 16 * new_tokens]
    if not docs:
        raise UserError(f"the validation split of {data_dir} has no document long enough for these prompts")
    ends = list(itertools.accumulate(len(d) - prompt_chars - 16 * new_tokens for d in docs))
    pairs = []
    for i in range(n):
        o = (i + 0.5) * ends[-1] / n  # an offset into the concatenated usable ranges
        j = min(bisect.bisect_right(ends, o), len(docs) - 1)  # the document it falls in
        text, p = docs[j], prompt_chars + int(o - (ends[j - 1] if j else 0))
        while p < len(text) - 1 and not (text[p] == " " and text[p - 1].isalpha()):
            p += 1  # the prompt ends with a whole word, the continuation starts with a space
        q = p - prompt_chars
        while q < p and not (text[q - 1].isspace() and not text[q].isspace()):
            q += 1  # ... and starts with a whole word
        cont = tok.decode(tok.encode(text[p:p + 16 * new_tokens])[:new_tokens])
        pairs.append((text[q:p], cont))
    return pairs


WORD = re.compile(r"[A-Za-z]+")


def words(text):
    """Lowercased alphabetic words; a word cut by the end of the text is left out."""
    return [m.group().lower() for m in WORD.finditer(text) if m.end() < len(text)]


def text_stats(texts, vocab):
    """word_valid: share of alphabetic words found in vocab (pooled). Per sample, averaged: distinct4, the
    share of distinct whitespace-word 4-grams (samples of 4+ words), and byte_entropy in bits."""
    ws = [w for t in texts for w in words(t)]
    d4, ent = [], []
    for t in texts:
        toks = t.split()
        grams = [tuple(toks[i:i + 4]) for i in range(len(toks) - 3)]
        if grams:
            d4.append(len(set(grams)) / len(grams))
        counts = torch.bincount(torch.tensor(list(t.encode()), dtype=torch.long), minlength=256).float()
        if counts.sum() > 0:
            p = counts[counts > 0] / counts.sum()
            ent.append(-(p * p.log2()).sum().item())
    mean = lambda v: sum(v) / len(v) if v else None
    return dict(word_valid=mean([w in vocab for w in ws]), words=len(ws), distinct4=mean(d4), byte_entropy=mean(ent))


def train_vocabulary(data_dir):
    """Every alphabetic word (lowercased) of the training split."""
    return {w.lower() for text in split_texts(data_dir, "train") for w in WORD.findall(text)}


def unigram_texts(data_dir, n, length, seed=0):
    """n texts of `length` tokens drawn from the training split's token frequencies (no specials)."""
    tok = get_tokenizer(load_meta(data_dir)["tokenizer"])
    counts = torch.from_numpy(np.bincount(open_split(data_dir, "train", 1), minlength=tok.vocab_size)).float()
    counts[tok.eot:] = 0
    draws = torch.multinomial(counts, n * length, replacement=True, generator=torch.Generator().manual_seed(seed))
    return [tok.decode(d.tolist()) for d in draws.view(n, length)]
