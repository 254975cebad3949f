"""
Block-causal DiT: the velocity network v(z_t, t | history) of Cola DLM's latent prior.

Latents (B, L, d) are cut into blocks of block_size positions. Every token carries a position id,
a block id, a clean/noisy flag and its own timestep t (clean tokens: t = 0). One function,
`block_mask`, turns those into the attention mask for both uses:

  training, the "2L" layout: [clean z0 (pos 0..L-1) | noisy z_t (pos 0..L-1)]
      clean block b -> clean blocks <= b;  noisy block b -> clean blocks < b and noisy block b
      (clean never sees noisy), so one forward trains every factor p(z^(b) | z^(<b)) of the
      block-causal prior (arXiv 2605.06548 §3.1.1, eq. 3.3) under the stage-2 visible set
      {sg(z0^(<b)), z_t^(b)} (paper §3.2.2, Fig. 1).
  generation: [cached clean blocks | current noisy block], the same rules.

The layers are those of the released checkpoint (github ByteDance-Seed/Cola-DLM), with its parameter
names, so its weights load as they are (released.py): a DiT (Peebles & Xie) whose every layer has four
adaLN heads (shift and scale before attention and MLP, a gate after each) on a non-affine LayerNorm, a
GELU-tanh MLP with biases, per-head LayerNorm on q and k, RoPE on the first rope_dim channels of each
head in interleaved pairs, and an affine final LayerNorm with its own shift and scale. The timestep
embedding is an MLP of three layers on [sin | cos] features of 1000 t. adaLN and output layers start at
zero (adaLN-Zero), so a fresh DiT outputs exactly zero. A token's time takes few values (0 when clean,
its block's t when noisy), so the caller passes a small table of times and each token's entry in it:
the modulation runs once per entry and is gathered per token, with shapes that never depend on the data
(torch.compile-friendly).

Self-check (CPU, seconds): python dit.py
"""
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask

from layers import KVCache, apply_rope, attend, init_weights, rope_angles, transformer_flops


@dataclass
class DiTConfig:
    latent_dim: int = 16   # d, must match the VAE
    n_layer: int = 4
    width: int = 256
    n_head: int = 4
    rope_dim: int = 0      # channels of each head that RoPE turns; 0: about 3/4 of them, as the released 96 of 128
    mlp_ratio: int = 4     # MLP hidden width = mlp_ratio x width
    norm_eps: float = 1e-5
    block_size: int = 1    # DiT tokens per block: 1 for byte latents (tiny; RESULTS.md), 16 in the paper
    patch_size: int = 1    # latents per DiT token (the released patch_size): a token reads and writes their channels
    self_cond: bool = False  # also read an estimate of the clean block (self-conditioning, Analog Bits)
    attn: str = "sdpa"     # training attention: "sdpa" (boolean masks) or "flex" (FlexAttention skips masked
                           # tiles; needs CUDA to train: torch has no FlexAttention backward on CPU)


def visible(qb, qn, kb, kn, window=None):
    """The rule behind every DiT mask: may a query (block qb, noisy flag qn) attend to a key (kb, kn)?
    Broadcasting tensors, so block_mask and the FlexAttention mask (flex_mask_2L) share it."""
    clean_key = ~kn & ((kb < qb) | ((kb == qb) & ~qn))
    if window is not None:
        clean_key = clean_key & (kb >= qb - window)
    return clean_key | (kn & qn & (kb == qb))


def block_mask(q_block, q_noisy, k_block, k_noisy, k_valid=None, window=None):
    """Attention mask (B, 1, Lq, Lk) from block ids (B, L) and noisy flags (B, L) of queries and keys.

    clean key:  visible to clean queries of the same or later blocks, to noisy queries of later blocks
    noisy key:  visible only to noisy queries of the same block
    k_valid (B, Lk) hides keys per row (the unconditional CFG rows hide their history). Padding needs
    no flag: it gets a position (layers.PAD_POS) beyond any real one, so no real query ever sees it.
    window: clean keys only from the last `window` blocks before the query's (long generation).
    """
    qb, qn = q_block[:, :, None], q_noisy[:, :, None]  # (B, Lq, 1)
    kb, kn = k_block[:, None, :], k_noisy[:, None, :]  # (B, 1, Lk)
    mask = visible(qb, qn, kb, kn, window)  # (B, Lq, Lk)
    if k_valid is not None:
        mask = mask & k_valid[:, None, :]
    # a query row with no visible key (a history token of an unconditional row) would turn into NaN
    # and poison the keys computed from it: let such rows, whose outputs are never used, see everything
    mask = mask | ~mask.any(-1, keepdim=True)
    return mask[:, None]  # (B, 1, Lq, Lk), broadcast over heads


def layout_2L(B, L, block_size, device):
    """Position ids, block ids and noisy flags (B, 2L) of the training layout [clean | noisy]."""
    pos = torch.arange(L, device=device).repeat(2)  # both copies share RoPE positions
    noisy = torch.arange(2 * L, device=device) >= L
    return pos.expand(B, -1), (pos // block_size).expand(B, -1), noisy.expand(B, -1)


@functools.lru_cache(maxsize=8)  # a training run asks for the same mask at every step
def flex_mask_2L(L, block_size, device):
    """block_mask of the 2L layout as a FlexAttention BlockMask, the same for every row and head.

    Only ~1/4 of the (2L)^2 scores are visible (attention_sparsity), and FlexAttention skips the
    128 x 128 tiles the mask leaves empty, where SDPA computes every score and masks it. The ids come
    from the indices (token i < L: clean, position i; else noisy, position i - L); indices >= 2L
    are the kernel's padding up to whole tiles, hidden. Generation keeps SDPA: there a block of a few
    queries meets the cache, a small mask that changes every block, with nothing to gain from tiles."""
    def mask_mod(b, h, q, k):
        qn, kn = q >= L, k >= L
        return visible((q - qn * L) // block_size, qn, (k - kn * L) // block_size, kn) & (q < 2 * L) & (k < 2 * L)
    return create_block_mask(mask_mod, None, None, 2 * L, 2 * L, device=device)


def attention_sparsity(L, block_size):
    """The fraction of the 2L attention matrix, and so of its FLOPs, that a block-sparse kernel can
    skip: exactly, from block_mask (3/4 - block_size / 4L when block_size divides L), and what
    FlexAttention skips: the tiles of its BlockMask that no visible score touches."""
    _, blk, noisy = layout_2L(1, L, block_size, "cpu")
    exact = 1 - block_mask(blk, noisy, blk, noisy).float().mean().item()
    bm = flex_mask_2L(L, block_size, "cpu")
    tiles = math.ceil(2 * L / bm.BLOCK_SIZE[0]) * math.ceil(2 * L / bm.BLOCK_SIZE[1])
    visited = bm.kv_num_blocks.sum() + (0 if bm.full_kv_num_blocks is None else bm.full_kv_num_blocks.sum())
    return dict(exact=exact, tiles=1 - visited.item() / tiles)


def modulate(x, shift, scale1):
    return torch.addcmul(shift, x, scale1)  # x (1 + scale) + shift; DiT.condition stores scale1 = 1 + scale


def ada_heads(width, names):
    """adaLN heads, each SiLU -> Linear from the timestep embedding: "<branch>_in" gives the (shift, scale)
    of the norm before a branch (2W), "<branch>_out" the gate after it (W)."""
    return nn.ModuleDict({n: nn.Sequential(nn.SiLU(), nn.Linear(width, (2 if n.endswith("_in") else 1) * width))
                          for n in names})


class TimestepEmbedder(nn.Module):
    """Scalar t in [0, 1] -> [sin | cos] features of 1000 t -> 3-layer MLP -> (..., width)."""

    def __init__(self, width, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.proj_in, self.proj_hid, self.proj_out = nn.Linear(freq_dim, width), nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (1000.0 * t.float())[..., None] * freqs  # (..., half)
        h = F.silu(self.proj_in(torch.cat([args.sin(), args.cos()], dim=-1)))  # (..., W)
        return self.proj_out(F.silu(self.proj_hid(h)))  # (..., W)


class Attention(nn.Module):
    """Multi-head attention with a LayerNorm per head on q and k, and RoPE on their first rope_dim
    channels in interleaved pairs."""

    def __init__(self, width, n_head, eps):
        super().__init__()
        self.n_head, self.head_dim = n_head, width // n_head
        self.proj_qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj_out = nn.Linear(width, width, bias=False)
        self.norm_q, self.norm_k = nn.LayerNorm(self.head_dim, eps=eps), nn.LayerNorm(self.head_dim, eps=eps)

    def forward(self, x, rope, mask, cache=None, layer=0):
        B, L, _ = x.shape
        q, k, v = self.proj_qkv(x).view(B, L, 3, self.n_head, self.head_dim).unbind(2)  # 3 x (B, L, H, hd)
        q, k = (apply_rope(norm(t).float(), rope, interleaved=True) for norm, t in ((self.norm_q, q), (self.norm_k, k)))
        return self.proj_out(attend(q, k, v, mask, cache, layer))  # (B, L, W)


class DiTBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        W = cfg.width
        self.msa_norm = nn.LayerNorm(W, elementwise_affine=False, eps=cfg.norm_eps)
        self.msa = Attention(W, cfg.n_head, cfg.norm_eps)
        self.mlp_norm = nn.LayerNorm(W, elementwise_affine=False, eps=cfg.norm_eps)
        self.mlp = nn.Sequential()  # GELU (tanh) MLP with biases, named as released: proj_in, proj_out
        self.mlp.add_module("proj_in", nn.Linear(W, cfg.mlp_ratio * W))
        self.mlp.add_module("act", nn.GELU("tanh"))
        self.mlp.add_module("proj_out", nn.Linear(cfg.mlp_ratio * W, W))
        self.ada = ada_heads(W, ("msa_in", "msa_out", "mlp_in", "mlp_out"))

    def forward(self, x, mod, rope, mask, cache=None, layer=0):
        """x (B, L, W); mod (B, L, 6W): this layer's modulation of every token."""
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)  # 6 x (B, L, W); scales as 1 + scale
        x = torch.addcmul(x, gate1, self.msa(modulate(self.msa_norm(x), shift1, scale1), rope, mask, cache, layer))
        return torch.addcmul(x, gate2, self.mlp(modulate(self.mlp_norm(x), shift2, scale2)))  # x + gate mlp: (B, L, W)


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg, W = cfg, cfg.width
        C = cfg.latent_dim * cfg.patch_size  # channels per token
        self.txt_in = nn.ModuleDict(dict(proj=nn.Linear(C, W)))
        # self-conditioning input: no bias, so a zero estimate (clean tokens, first pass) adds nothing
        self.sc_embedder = nn.Linear(C, W, bias=False) if cfg.self_cond else None
        self.emb_in = TimestepEmbedder(W)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.n_layer))
        self.txt_out_norm = nn.LayerNorm(W, eps=cfg.norm_eps)
        self.txt_out_ada = ada_heads(W, ("out_in",))
        self.txt_out = nn.ModuleDict(dict(proj=nn.Linear(W, C)))
        init_weights(self, cfg.n_layer, residual=("proj_out.weight",))
        # adaLN-Zero: every modulation and the output layer start at zero (identity blocks, zero output)
        for m in [h[-1] for b in self.blocks for h in b.ada.values()] + [self.txt_out_ada.out_in[-1], self.txt_out.proj]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        if self.sc_embedder is not None:  # zero-initialised: the model learns when to use its estimate
            nn.init.zeros_(self.sc_embedder.weight)
        # condition() stores every scale as 1 + scale, so modulation is one kernel: ones at the scale slots
        one, zero = torch.ones(W), torch.zeros(W)
        per_block = torch.cat([zero, one, zero, zero, one, zero])  # shift, scale, gate of attention, of the MLP
        self.register_buffer("scale_one", torch.cat([per_block] * cfg.n_layer + [zero, one]), persistent=False)

    def flops(self, attended):
        """Forward FLOPs per DiT token attending to `attended` keys (adaLN is per distinct t: ~free)."""
        c = self.cfg
        return transformer_flops(c.n_layer, c.width, attended, 2 * c.mlp_ratio * c.width ** 2) + 4 * c.latent_dim * c.patch_size * c.width

    def patchify(self, z):
        """Latents (B, L, d) -> the DiT's tokens (B, L / p, p d): each token is p consecutive latents."""
        (B, L, d), p = z.shape, self.cfg.patch_size
        return z.reshape(B, L // p, p * d)

    def token_pos(self, pos):
        """Positions (B, L) of latents -> those of their tokens (B, L / p)."""
        return pos[:, ::self.cfg.patch_size] // self.cfg.patch_size

    def unpatchify(self, tokens):
        """(B, n, p d) -> (B, n p, d), the inverse of patchify."""
        return tokens.reshape(tokens.shape[0], -1, self.cfg.latent_dim)

    def condition(self, t):
        """The adaLN modulations of times t (..., K), every layer's side by side: (..., K, C) with C =
        n_layer x 6W + 2W, every scale stored as 1 + scale. They depend on t alone, so a caller that
        reuses its times (the sampler: the same Euler times in every block) computes them once and
        passes them to forward as `mod`."""
        c = self.emb_in(t)  # (..., K, W)
        mods = [h(c) for b in self.blocks for h in b.ada.values()] + [self.txt_out_ada.out_in(c)]
        return torch.cat(mods, -1) + self.scale_one  # (..., K, C), each scale as 1 + scale

    def forward(self, z, t, t_index, pos, mask, cache=None, sc=None, mod=None, rope=None):
        """Velocity (B, L, d) for latents z (B, L, d) at positions pos (B, L).

        t: a table of times, (K,) shared by every row or (B, K); t_index (B, L): each token's entry in
        it (a clean token: an entry with t = 0), or (1, 1) with a (K,) table when every token shares one.
        mod: condition(t) computed beforehand (t unused); rope: rope_angles(pos) computed beforehand
        (the sampler's steps share a block's positions).
        mask (B, 1, L, Lk) from block_mask, over this call's tokens or, with a layers.KVCache, over the
        cache's slots (all of them); sc (B, L, d): the self-conditioning estimate of the clean latents (None =
        zeros; only with cfg.self_cond).
        """
        B, L = z.shape[:2]
        mod = self.condition(t) if mod is None else mod  # (K, C) or (B, K, C)
        # every entry computed once, looked up per token: (B, L, C), then one slice per layer
        mod = F.embedding(t_index, mod) if mod.dim() == 2 else mod.gather(1, t_index[..., None].expand(B, L, mod.shape[-1]))
        W = self.cfg.width
        mods = mod.split([6 * W] * len(self.blocks) + [2 * W], -1)
        x = self.txt_in.proj(z).float()  # (B, L, W): the residual stream stays fp32 under autocast
        if sc is not None and self.sc_embedder is not None:
            x = x + self.sc_embedder(sc)  # (B, L, W)
        rope = self.rope(pos) if rope is None else rope
        for i, block in enumerate(self.blocks):
            x = block(x, mods[i], rope, mask, cache, i)  # (B, L, W)
        shift, scale1 = mods[-1].chunk(2, dim=-1)  # 2 x (B, L, W)
        return self.txt_out.proj(modulate(self.txt_out_norm(x), shift, scale1))  # (B, L, d)

    def rope(self, pos):
        """Rotary tables of positions pos (B, L): 2 x (B, L, 1, W/H)."""
        return rope_angles(pos, self.cfg.width // self.cfg.n_head, rotated=self.rope_dim, interleaved=True)

    @property
    def rope_dim(self):
        hd = self.cfg.width // self.cfg.n_head
        return self.cfg.rope_dim or 2 * (3 * hd // 8)

    def new_cache(self, batch, size, device):
        c = self.cfg
        return KVCache(c.n_layer, batch, c.n_head, c.width // c.n_head, size, device)


if __name__ == "__main__":
    torch.manual_seed(0)
    cfg = DiTConfig(n_layer=2, width=64, n_head=2, block_size=4)
    dit = DiT(cfg)
    B, L = 2, 12
    pos, blk, noisy = layout_2L(B, L, cfg.block_size, "cpu")
    mask = block_mask(blk, noisy, blk, noisy)
    print("2L mask (rows: queries [clean | noisy], cols: keys):")
    for row in mask[0, 0].int().tolist():
        print("".join(".#"[v] for v in row))
    z, t = torch.randn(B, 2 * L, cfg.latent_dim), torch.rand(B, L // cfg.block_size)  # one t per noisy block
    t_table = torch.cat([torch.zeros(B, 1), t], 1)  # entry 0: clean
    t_index = torch.where(noisy, blk + 1, 0)  # (B, 2L)
    v = dit(z, t_table, t_index, pos, mask)
    assert v.abs().max() == 0, "a fresh DiT must output exactly zero"
    for p in dit.parameters():  # perturb so the next check is not trivial
        p.data.add_(0.02 * torch.randn_like(p))
    v = dit(z, t_table, t_index, pos, mask)
    # the 2L trick: noisy block b in the 2L layout == a plain forward over [clean blocks < b, noisy block b]
    b, bs = 2, cfg.block_size
    sel = torch.cat([torch.arange(b * bs), L + torch.arange(b * bs, (b + 1) * bs)])
    vb = dit(z[:, sel], t_table, t_index[:, sel], pos[:, sel],
             block_mask(blk[:, sel], noisy[:, sel], blk[:, sel], noisy[:, sel]))
    err = (vb[:, -bs:] - v[:, L + b * bs:L + (b + 1) * bs]).abs().max().item()
    print(f"2L vs direct max abs diff: {err:.2e}")
    assert err < 1e-5
    # what a block-sparse kernel saves on the 2L layout (--dit.attn=flex): the small preset's block 16 and tiny's 1
    for L in (512, 2048):
        for bs in (16, 1):
            sp = attention_sparsity(L, bs)
            print(f"2L attention, seq_len {L}, block {bs:2d}: {sp['exact']:.2%} of the scores masked, "
                  f"{sp['tiles']:.2%} of FlexAttention's 128 x 128 tiles skipped")
    print("dit.py self-check OK")
