"""
What the text VAE (vae.py), the DiT (dit.py) and the AR baseline (ar.py) share: RoPE on explicit position
ids, attention, the KV cache, and the token-level decoding both generators use (per-sample RNGs, top-k /
top-p picking, the repetition penalty); and the AR baseline's own pre-norm blocks (RMSNorm, QK-norm,
SwiGLU), while the VAE and the DiT have the released checkpoint's layers. Attention goes through
F.scaled_dot_product_attention with a boolean mask (True = may attend), so one code path serves CPU
and GPU, and every attention pattern in the project (causal, block-causal, the DiT's 2L layout, cached
generation, sliding windows) is just a different mask; the DiT's 2L training mask may also come as a
FlexAttention BlockMask (dit.flex_mask_2L), whose empty tiles are skipped. Generation keeps keys and
values in a KVCache: buffers allocated once, written in place, that every attention layer reads from.
"""
import functools
import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention


PAD_POS = 1 << 20  # position of padding tokens: after every real position, so causal rules hide them


def swiglu_hidden(width):
    return 64 * math.ceil(8 * width / 3 / 64)  # ~8/3 width keeps params equal to a 4x GELU MLP


def rope_angles(pos, head_dim, base=10000.0, rotated=None, interleaved=False):
    """Rotary tables at integer positions pos (B, L) -> (cos, sin), each (B, L, 1, hd), broadcast over
    the head axis of a (B, L, H, hd) layout. The first `rotated` channels (default all) turn in pairs,
    channel i with i + rotated/2 (halves: the VAE's and the AR model's), or 2i with 2i + 1 (interleaved:
    the DiT's); the rest pass through (cos 1, sin 0). The tables suit apply_rope's one-swap form: each
    cos twice, each sin as (-sin, sin)."""
    rotated = rotated or head_dim
    inv_freq = base ** (-torch.arange(0, rotated, 2, device=pos.device, dtype=torch.float32) / rotated)
    ang = pos.to(torch.float32)[:, :, None, None] * inv_freq  # (B, L, 1, rotated/2)
    cos, sin = ang.cos(), ang.sin()
    join = (lambda a, b: torch.stack([a, b], -1).flatten(-2)) if interleaved else (lambda a, b: torch.cat([a, b], -1))
    cos, sin = join(cos, cos), join(-sin, sin)  # (B, L, 1, rotated)
    rest = head_dim - rotated
    return F.pad(cos, (0, rest), value=1.0), F.pad(sin, (0, rest))


def apply_rope(x, rope, interleaved=False):
    """Rotate each channel pair (x1, x2) by its angle: (x1 cos - x2 sin, x2 cos + x1 sin), computed as
    x cos + swap(x) (-sin, sin), where swap exchanges the partners of every pair."""
    cos, sin = rope
    if interleaved:
        swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x0, x1, ...) -> (x1, x0, ...)
    else:
        swapped = x.roll(x.shape[-1] // 2, -1)  # the halves exchanged
    return x * cos + swapped * sin


def attend(q, k, v, mask, cache=None, layer=0):
    """Attention of q over k, v, each (B, L, H, hd) (q, k already normed and rotated) -> (B, L, H x hd).
    With a KVCache this call's keys and values are written to its slots and every slot is attended; mask
    (B, 1, L, Lk): boolean (True = may attend) or additive, over this call's tokens or the cache's slots,
    or a FlexAttention BlockMask over this call's tokens (no cache), whose empty tiles are skipped."""
    q, k, v = (t.to(v.dtype).transpose(1, 2) for t in (q, k, v))  # (B, H, L, hd), one dtype for all three
    if cache is not None:
        k, v = cache.update(layer, k, v)  # (B, H, size, hd): every slot, this call's written
    if isinstance(mask, BlockMask):
        assert cache is None, "a BlockMask covers this call's tokens only"
        flex = flex_attention if torch.compiler.is_compiling() else compiled_flex_attention()
        y = flex(q, k, v, block_mask=mask)  # (B, H, L, hd)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, hd)
    return y.transpose(1, 2).flatten(2)  # (B, L, H x hd)


def causal_mask(pos_q, pos_k, block_size=1, window=None):
    """Key j visible to query i iff block(j) <= block(i); block_size=1 is plain causal, 0 bidirectional
    (every key but the empty slots, at PAD_POS). (B, 1, Lq, Lk). window: also block(j) > block(i) - window,
    the sliding window of long generation (in blocks)."""
    if block_size == 0:
        return (pos_k != PAD_POS)[:, None, None, :].expand(-1, 1, pos_q.shape[1], -1)
    qb, kb = (pos_q // block_size)[:, None, :, None], (pos_k // block_size)[:, None, None, :]
    mask = kb <= qb
    return mask if window is None else mask & (kb > qb - window)


@functools.cache
def compiled_flex_attention():
    """flex_attention compiled once, on first use (compiling loads the compiler: seconds). Uncompiled it
    computes every score, masked or not; inside a compiled model dynamo captures the plain call."""
    return torch.compile(flex_attention, dynamic=False)


def attention_dtype(device):
    """What attention reads on this device now: bf16 under bf16 autocast (half the memory), else fp32."""
    kind = torch.device(device or "cpu").type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else torch.float32


class KVCache:
    """Keys and values of every attention layer for `size` slots, one (B, H, size, hd) tensor of each per
    layer, allocated once and written in place (the pattern of gpt-fast), and the position of every slot's
    token, `pos` (B, size; PAD_POS: empty). `at(lo, pos)` names the slots the next forwards write; they
    attend to every slot, and the caller's mask, built from `pos`, alone decides who sees what. So a
    forward's shapes never change, and torch.compile builds one graph for all of them. Keys are stored
    with RoPE applied; a call with fewer rows than the cache uses its first rows."""

    def __init__(self, n_layer, batch, n_head, head_dim, size, device=None):
        shape, dtype = (batch, n_head, size, head_dim), attention_dtype(device)
        # zeros, never garbage: a masked-out slot must not be NaN
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.pos = torch.full((batch, size), PAD_POS, dtype=torch.long, device=device)
        self.slots = None

    def at(self, lo, pos):
        """The next forwards write their tokens at positions pos (b, n) to slots lo..lo+n-1 of the first b rows."""
        self.slots = torch.arange(lo, lo + pos.shape[1], device=pos.device)
        self.pos[:pos.shape[0], lo:lo + pos.shape[1]] = pos
        return self

    def update(self, layer, k, v):
        """Write this call's keys/values (b, H, n, hd) to its slots; return every slot's (b, H, size, hd)."""
        k_buf, v_buf = self.k[layer][:k.shape[0]], self.v[layer][:k.shape[0]]
        k_buf.index_copy_(2, self.slots, k), v_buf.index_copy_(2, self.slots, v)
        return k_buf, v_buf

    def evict(self, n):
        """Drop the oldest n slots, moving the rest to the front: a sliding window over the history."""
        for buf in self.k + self.v:
            buf[:, :, :-n] = buf[:, :, n:].clone()
        self.pos = torch.cat([self.pos[:, n:], torch.full_like(self.pos[:, :n], PAD_POS)], 1)


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

    def forward(self, x, rope, mask, cache=None, layer=0):
        """x (B, L, W) -> (B, L, W); mask as layers.attend takes it."""
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_head, self.head_dim).unbind(2)  # 3 x (B, L, H, hd)
        # QK-norm and RoPE in fp32 under autocast too (attend casts q and k back to v's dtype)
        q, k = (apply_rope(norm(t.float()), rope) for norm, t in ((self.q_norm, q), (self.k_norm, k)))
        return self.proj(attend(q, k, v, mask, cache, layer))


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

    def forward(self, x, rope, mask, cache=None, layer=0):
        x = x + self.attn(self.norm1(x), rope, mask, cache, layer)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of Blocks and a final norm."""

    def __init__(self, n_layer, width, n_head):
        super().__init__()
        self.head_dim = width // n_head
        self.blocks = nn.ModuleList(Block(width, n_head) for _ in range(n_layer))
        self.norm = nn.RMSNorm(width)

    def forward(self, x, pos, mask, cache=None):
        x = x.float()  # the residual stream stays fp32 under autocast (a bf16 input, z_in's, would make it bf16)
        rope = rope_angles(pos, self.head_dim)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, mask, cache, i)
        return self.norm(x)

    def new_cache(self, batch, size, device):
        return KVCache(len(self.blocks), batch, self.blocks[0].attn.n_head, self.head_dim, size, device)


def init_weights(module, n_layer, residual=("proj.weight", "w2.weight")):
    """GPT-2 style init: N(0, 0.02), the residual branches' output projections (names ending in one of
    `residual`) scaled by 1/sqrt(2 * n_layer); biases zero, norms' gains one."""
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(residual) else 0.02
            nn.init.normal_(p, mean=0.0, std=std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)


def transformer_flops(n_layer, width, attended, mlp=None):
    """Forward FLOPs per token of a transformer: 2 x (q,k,v,o + MLP) matmuls plus attention scores and
    weighted sum over `attended` keys (the causal average, L/2, in training). mlp: the MLP's weights
    per layer (default: layers.SwiGLU's)."""
    mlp = 3 * width * swiglu_hidden(width) if mlp is None else mlp
    return n_layer * (2 * (4 * width * width + mlp) + 4 * attended * width)


# ----------------------------------------------------------------------------- decoding (cola.py and ar.py)

@dataclass
class Sampling:
    """A generator's options, as Cola.generate and ARLM.generate take them by name (a misspelled one is an
    error). The first four steer Cola's ODE; the AR baseline has none and ignores them."""
    steps: int = 16             # Euler steps per block
    cfg_scale: float = 7.0      # classifier-free guidance w (1 = off)
    shift: float = 1.0          # > 1: more steps at high noise (flow.time_grid)
    first_block: str = "clean"  # how the prompt's tail enters the first block (cola.parse_first_block)
    temperature: float = 0.0    # 0 decodes greedily, else top-k / top-p sampling
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.1  # > 1: logits of ids already generated shrink (CTRL, arXiv 1909.05858)
    seed: int = 0               # with the prompt, seeds each sample's noise (sample_generators)
    seed_ids: tuple = None      # an id per prompt: noise seeded from it as the released inference does (noise_generator)
    stop_at_eot: bool = True    # end a sample at <|endoftext|> or <|im_end|> (else always max_new_tokens)

    def check(self):
        """The options' ranges, as a ValueError naming them (sample.py and eval.py check before loading a model)."""
        if self.steps < 1 or self.cfg_scale < 0 or self.shift <= 0:
            raise ValueError("--steps must be >= 1, --cfg >= 0 and --shift > 0")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError("--temperature and --top_k must be >= 0, --top_p in (0, 1], --repetition_penalty > 0")
        if self.temperature == 0 and (self.top_k or self.top_p < 1):
            raise ValueError("--top_k / --top_p apply to sampling: add --temperature > 0 (0 is greedy)")
        parse_first_block(self.first_block)
        return self


FIRST_BLOCK_MODES = ("clean", "repaint", "left_pad", "right_pad")


def parse_first_block(spec):
    """A first-block mode -> (mode, reps, frac): "clean" (default), "left_pad", "right_pad", or partial
    repaint "repaint[:R[:M]]" with R >= 1 repetitions per guided step and guided fraction M in (0, 1]."""
    mode, *args = str(spec).split(":")
    if mode not in FIRST_BLOCK_MODES or (args and mode != "repaint") or len(args) > 2:
        raise ValueError(f"first_block must be one of clean, left_pad, right_pad, repaint[:R[:M]], got {spec!r}")
    try:
        reps, frac = int(args[0]) if args else 1, float(args[1]) if len(args) > 1 else 1.0
    except ValueError:
        raise ValueError(f"first_block {spec!r}: R must be an integer and M a number") from None
    if reps < 1 or not 0 < frac <= 1:
        raise ValueError(f"first_block {spec!r}: needs R >= 1 and 0 < M <= 1")
    return mode, reps, frac


def sample_generators(prompts, seed, device):
    """One RNG per sample, seeded from (seed, the prompt, its repeat index in the batch), so a prompt's
    output does not depend on what else is in the batch; repeats of one prompt get different streams."""
    counts, gens = {}, []
    for p in prompts:
        k = counts[tuple(p)] = counts.get(tuple(p), -1) + 1
        s = (seed * 1_000_003 + zlib.crc32(bytes(str(list(p)), "ascii")) * 101 + k) % (1 << 62)
        gens.append(torch.Generator(device).manual_seed(s))
    return gens


def noise_generator(seed, sample_id, block, device):
    """The released inference's noise seeding: block `block` of the sample with id `sample_id` (an integer,
    else the CRC-32 of its text) draws from its own generator, seeded seed + 1000 id + 10^7 block."""
    try:
        sample_id = int(sample_id)
    except (TypeError, ValueError):
        sample_id = zlib.crc32(str(sample_id).encode("utf-8"))
    return torch.Generator(device).manual_seed(seed + sample_id * 1_000 + block * 10_000_000)


def pick_tokens(logits, s, generators, tok=None, seen=None):
    """logits (B, L, V) -> token ids (B, L): greedy at temperature 0, else top-k / top-p sampling (s: a
    Sampling) with each row's own generator. With tok, ids past its vocabulary (the embedding's padding
    rows) are never picked. seen (B, n): ids generated so far, whose logits the repetition penalty
    divides (positive) or multiplies (negative) by s.repetition_penalty, as the released inference does."""
    if tok is not None and logits.shape[-1] > tok.n_vocab:
        logits = logits[..., :tok.n_vocab]
    if seen is not None and seen.shape[1] and s.repetition_penalty != 1:
        idx = seen[:, None, :].expand(-1, logits.shape[1], -1)  # (B, L, n)
        logits = logits.float()
        score = logits.gather(-1, idx)
        logits = logits.scatter(-1, idx, torch.where(score < 0, score * s.repetition_penalty, score / s.repetition_penalty))
    if s.temperature == 0:
        return logits.float().argmax(-1)  # fp32: a bf16 argmax runs some 10x slower on a CPU
    logits = logits.float() / s.temperature
    if s.top_k:
        kth = logits.topk(min(s.top_k, logits.shape[-1]), -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, idx = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= s.top_p  # keep the smallest set with mass >= top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.stack([torch.multinomial(p, 1, generator=g).squeeze(-1) for p, g in zip(probs, generators)])


def append_tokens(out, new, max_new_tokens, stop=()):
    """Append new ids to one sample's output, ending before the first id in `stop` or at max_new_tokens.
    Returns True when the sample is finished."""
    for t in new:
        if t in stop or len(out) >= max_new_tokens:
            return True
        out.append(t)
    return len(out) >= max_new_tokens
