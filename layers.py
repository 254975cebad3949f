"""
Transformer building blocks shared by the text VAE (vae.py), the DiT (dit.py) and the AR baseline
(ar.py), and the token-level decoding both generators use (per-sample RNGs, top-k / top-p picking).

Pre-norm blocks with RoPE on explicit position ids, QK-norm and SwiGLU. Attention always goes
through F.scaled_dot_product_attention with a boolean mask (True = may attend), so one code path
serves CPU and GPU, and every attention pattern in the project (causal, block-causal, the DiT's 2L
layout, cached generation) is just a different mask. Keys/values of the current call are returned
so callers can keep a KV cache: `past` is prepended to the keys, never modified in place.
"""
import math
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F


PAD_POS = 1 << 20  # position of padding tokens: after every real position, so causal rules hide them


def swiglu_hidden(width):
    return 64 * math.ceil(8 * width / 3 / 64)  # ~8/3 width keeps params equal to a 4x GELU MLP


def rope_angles(pos, head_dim, base=10000.0):
    """cos/sin tables for rotary embeddings at integer positions pos (B, L) -> 2 x (B, 1, L, hd/2)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    ang = pos.to(torch.float32)[:, None, :, None] * inv_freq  # (B, 1, L, hd/2)
    return ang.cos(), ang.sin()


def apply_rope(x, rope):
    cos, sin = rope
    x1, x2 = x.float().chunk(2, dim=-1)  # rotate pairs (i, i + hd/2)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def causal_mask(pos_q, pos_k, block_size=1):
    """Key j visible to query i iff block(j) <= block(i); block_size=1 is plain causal. (B, 1, Lq, Lk)."""
    return ((pos_k // block_size)[:, None, None, :] <= (pos_q // block_size)[:, None, :, None])


class Attention(nn.Module):
    def __init__(self, width, n_head):
        super().__init__()
        assert width % n_head == 0
        self.n_head, self.head_dim = n_head, width // n_head
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        # QK-norm keeps attention logits bounded, which matters for the mixed clean/noisy inputs of the DiT
        self.q_norm = nn.RMSNorm(self.head_dim)
        self.k_norm = nn.RMSNorm(self.head_dim)

    def forward(self, x, rope, mask, past=None):
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, hd)
        q, k = apply_rope(self.q_norm(q), rope), apply_rope(self.k_norm(k), rope)
        kv = (k, v)  # this call's keys/values (RoPE applied), for the caller's cache
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, H, Lp + L, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, hd)
        return self.proj(y.transpose(1, 2).reshape(B, L, C)), kv


class SwiGLU(nn.Module):
    def __init__(self, width):
        super().__init__()
        hidden = swiglu_hidden(width)
        self.w13 = nn.Linear(width, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, width, bias=False)

    def forward(self, x):
        a, b = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(a) * b)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), x + mlp(norm(x))."""

    def __init__(self, width, n_head):
        super().__init__()
        self.norm1, self.attn = nn.RMSNorm(width), Attention(width, n_head)
        self.norm2, self.mlp = nn.RMSNorm(width), SwiGLU(width)

    def forward(self, x, rope, mask, past=None):
        a, kv = self.attn(self.norm1(x), rope, mask, past)
        x = x + a
        return x + self.mlp(self.norm2(x)), kv


class Transformer(nn.Module):
    """A stack of Blocks and a final norm. forward returns (hidden, [kv per layer])."""

    def __init__(self, n_layer, width, n_head):
        super().__init__()
        self.head_dim = width // n_head
        self.blocks = nn.ModuleList(Block(width, n_head) for _ in range(n_layer))
        self.norm = nn.RMSNorm(width)

    def forward(self, x, pos, mask, past=None):
        rope = rope_angles(pos, self.head_dim)
        kvs = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, rope, mask, None if past is None else past[i])
            kvs.append(kv)
        return self.norm(x), kvs


def init_weights(module, n_layer):
    """GPT-2 style init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layer)."""
    for name, p in module.named_parameters():
        if p.dim() == 2:
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("proj.weight", "w2.weight")) else 0.02
            nn.init.normal_(p, mean=0.0, std=std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)


def transformer_flops(n_layer, width, attended):
    """Forward FLOPs per token of layers.Transformer: 2 x (q,k,v,o + SwiGLU) matmuls plus attention
    scores and weighted sum over `attended` keys (the causal average, L/2, in training)."""
    hidden = swiglu_hidden(width)
    return n_layer * (2 * (4 * width * width + 3 * width * hidden) + 4 * attended * width)


def cat_kv(cache, kvs):
    """Append one call's per-layer (k, v) to a cache (None = empty) along the sequence axis."""
    if cache is None:
        return [(k, v) for k, v in kvs]
    return [(torch.cat([ck, k], 2), torch.cat([cv, v], 2)) for (ck, cv), (k, v) in zip(cache, kvs)]


# ----------------------------------------------------------------------------- decoding (cola.py and ar.py)

def sample_generators(prompts, seed, device):
    """One RNG per sample, seeded from (seed, the prompt, its repeat index in the batch), so a prompt's
    output does not depend on what else is in the batch; repeats of one prompt get different streams."""
    counts, gens = {}, []
    for p in prompts:
        k = counts[tuple(p)] = counts.get(tuple(p), -1) + 1
        s = (seed * 1_000_003 + zlib.crc32(bytes(str(list(p)), "ascii")) * 101 + k) % (1 << 62)
        gens.append(torch.Generator(device).manual_seed(s))
    return gens


def pick_tokens(logits, temperature, top_k, top_p, generators, tok=None):
    """logits (B, L, V) -> token ids (B, L): greedy at temperature 0, else top-k / top-p sampling with
    each row's own generator. With tok, only real tokens and <|endoftext|> can be picked (never
    <|mask|>, <|pad|> or the vocabulary padding)."""
    if tok is not None:
        banned = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        banned[tok.eot + 1:] = True  # the specials after eot and the vocabulary padding
        logits = logits.masked_fill(banned, float("-inf"))
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set with mass >= top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.stack([torch.multinomial(p, 1, generator=g).squeeze(-1) for p, g in zip(probs, generators)])


def append_tokens(out, new, max_new_tokens, eot=None):
    """Append new ids to one sample's output, stopping at eot (if given) or at max_new_tokens.
    Returns True when the sample is finished."""
    for t in new:
        if t == eot or len(out) >= max_new_tokens:
            return True
        out.append(t)
    return len(out) >= max_new_tokens
