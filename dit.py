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

Architecture as in DiT (Peebles & Xie): adaLN-Zero modulation from the timestep embedding (here per
token), zero-initialised gates and output layer, so a fresh DiT outputs exactly zero. RoPE with
explicit position ids (the clean and noisy copies of a block share positions) and QK-norm.

Self-check (CPU, seconds): python dit.py
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from layers import Attention, SwiGLU, init_weights, rope_angles, transformer_flops


@dataclass
class DiTConfig:
    latent_dim: int = 16   # d, must match the VAE
    n_layer: int = 4
    width: int = 256
    n_head: int = 4
    block_size: int = 1    # latent positions per block: 1 for byte latents (tiny; RESULTS.md), 16 in the paper
    self_cond: bool = False  # also read an estimate of the clean block (self-conditioning, Analog Bits)


def block_mask(q_block, q_noisy, k_block, k_noisy, k_valid=None):
    """Attention mask (B, 1, Lq, Lk) from block ids (B, L) and noisy flags (B, L) of queries and keys.

    clean key:  visible to clean queries of the same or later blocks, to noisy queries of later blocks
    noisy key:  visible only to noisy queries of the same block
    k_valid (B, Lk) hides keys per row (the unconditional CFG rows hide their history). Padding needs
    no flag: it gets a position (layers.PAD_POS) beyond any real one, so no real query ever sees it.
    """
    qb, qn = q_block[:, :, None], q_noisy[:, :, None]  # (B, Lq, 1)
    kb, kn = k_block[:, None, :], k_noisy[:, None, :]  # (B, 1, Lk)
    clean_key = ~kn & ((kb < qb) | ((kb == qb) & ~qn))
    noisy_key = kn & qn & (kb == qb)
    mask = clean_key | noisy_key
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


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Scalar t in [0, 1] -> sinusoidal features of 1000 t -> MLP -> (..., width)."""

    def __init__(self, width, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (1000.0 * t.float())[..., None] * freqs  # (..., half)
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1))  # (..., freq_dim) -> (..., W)


class DiTBlock(nn.Module):
    def __init__(self, width, n_head):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, n_head)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = SwiGLU(width)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, c, rope, mask, past=None):
        """x (B, L, W); c: embeddings (U, W) of the U distinct timesteps and the token -> row map (B, L)."""
        c, inverse = c
        mod = self.adaLN_modulation(c)[inverse]  # (U, 6W) -> (B, L, 6W): each distinct t once, gathered per token
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)  # 6 x (B, L, W)
        a, kv = self.attn(modulate(self.norm1(x), shift1, scale1), rope, mask, past)  # (B, L, W), 2 x (B, H, L, W/H)
        x = x + gate1 * a  # (B, L, W)
        x = x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))  # (B, L, W)
        return x, kv


class FinalLayer(nn.Module):
    def __init__(self, width, out_dim):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, c):
        """x (B, L, W), c as in DiTBlock.forward -> velocity (B, L, d)."""
        c, inverse = c
        shift, scale = self.adaLN_modulation(c)[inverse].chunk(2, dim=-1)  # (U, 2W) -> 2 x (B, L, W)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, L, d)


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.x_embedder = nn.Linear(cfg.latent_dim, cfg.width)
        # self-conditioning input: no bias, so a zero estimate (clean tokens, first pass) adds nothing
        self.sc_embedder = nn.Linear(cfg.latent_dim, cfg.width, bias=False) if cfg.self_cond else None
        self.t_embedder = TimestepEmbedder(cfg.width)
        self.blocks = nn.ModuleList(DiTBlock(cfg.width, cfg.n_head) for _ in range(cfg.n_layer))
        self.final_layer = FinalLayer(cfg.width, cfg.latent_dim)
        init_weights(self, cfg.n_layer)
        # adaLN-Zero: every modulation and the output layer start at zero (identity blocks, zero output)
        for m in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                  self.final_layer.linear]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        if self.sc_embedder is not None:  # zero-initialised: the model learns when to use its estimate
            nn.init.zeros_(self.sc_embedder.weight)

    def flops(self, attended):
        """Forward FLOPs per latent token attending to `attended` keys (adaLN is per distinct t: ~free)."""
        c = self.cfg
        return transformer_flops(c.n_layer, c.width, attended) + 4 * c.latent_dim * c.width

    def forward(self, z, t, pos, mask, past=None, sc=None):
        """Velocity for latents z (B, L, d) at per-token times t (B, L), positions pos (B, L).

        mask (B, 1, L, Lp + L) from block_mask; past: per-layer (k, v) of Lp cached tokens; sc (B, L, d):
        the self-conditioning estimate of the clean latents (None = zeros; only with cfg.self_cond).
        Returns v (B, L, d) and this call's per-layer (k, v) for the caller's cache.
        """
        x = self.x_embedder(z)  # (B, L, W)
        if sc is not None and self.sc_embedder is not None:
            x = x + self.sc_embedder(sc)  # (B, L, W)
        # Per-token conditioning, but t takes few distinct values (one per block, 0 for clean tokens),
        # so embed and modulate each distinct t once and gather: exact, and most of adaLN's cost saved.
        t_unique, inverse = torch.unique(t, return_inverse=True)  # (U,), (B, L)
        c = (self.t_embedder(t_unique), inverse)  # (U, W) and the token -> row map (B, L)
        rope = rope_angles(pos, self.cfg.width // self.cfg.n_head)  # 2 x (B, 1, L, W/H/2)
        kvs = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, c, rope, mask, None if past is None else past[i])  # (B, L, W), 2 x (B, H, L, W/H)
            kvs.append(kv)
        return self.final_layer(x, c), kvs  # (B, L, d), n_layer x 2 x (B, H, L, W/H)


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
    z, t = torch.randn(B, 2 * L, cfg.latent_dim), torch.rand(B, 2 * L) * noisy
    v, _ = dit(z, t, pos, mask)
    assert v.abs().max() == 0, "a fresh DiT must output exactly zero"
    for p in dit.parameters():  # perturb so the next check is not trivial
        p.data.add_(0.02 * torch.randn_like(p))
    v, _ = dit(z, t, pos, mask)
    # the 2L trick: noisy block b in the 2L layout == a plain forward over [clean blocks < b, noisy block b]
    b, bs = 2, cfg.block_size
    sel = torch.cat([torch.arange(b * bs), L + torch.arange(b * bs, (b + 1) * bs)])
    vb, _ = dit(z[:, sel], t[:, sel], pos[:, sel], block_mask(blk[:, sel], noisy[:, sel], blk[:, sel], noisy[:, sel]))
    err = (vb[:, -bs:] - v[:, L + b * bs:L + (b + 1) * bs]).abs().max().item()
    print(f"2L vs direct max abs diff: {err:.2e}")
    assert err < 1e-5
    print("dit.py self-check OK")
