"""Block-causal DiT: every mask against a brute-force reference, the 2L trick, zero init."""
import math
import random

import pytest
import torch

from dit import DiT, DiTConfig, block_mask, layout_2L
from layers import PAD_POS, KVCache
from tests.helpers import per_token, random_dit


def allowed(q_pos, q_noisy, k_pos, k_noisy, bs):
    """The 2L mask rules of dit.py's docstring, one (query, key) pair at a time."""
    qb, kb = q_pos // bs, k_pos // bs
    if not k_noisy:                       # clean keys: earlier blocks, or the same block for clean queries
        return kb < qb or (kb == qb and not q_noisy)
    return q_noisy and kb == qb           # noisy keys: only the noisy copy of the same block


@pytest.mark.parametrize("bs", [1, 4, 16])
def test_2L_mask_matches_reference(bs):
    rng = random.Random(bs)
    for L in [1, bs, bs + 1, 3 * bs - 1, rng.randint(2, 50)]:
        pos, blk, noisy = layout_2L(2, L, bs, "cpu")
        m = block_mask(blk, noisy, blk, noisy)
        assert m.shape == (2, 1, 2 * L, 2 * L)
        ref = torch.tensor([[allowed(pos[0, i].item(), noisy[0, i].item(), pos[0, j].item(), noisy[0, j].item(), bs)
                             for j in range(2 * L)] for i in range(2 * L)])
        assert torch.equal(m[0, 0], ref) and torch.equal(m[1, 0], ref)


@pytest.mark.parametrize("bs", [1, 4, 16])
def test_generation_mask_matches_reference(bs):
    """[cache of clean blocks | current noisy block], with some cache slots invalid (padding)."""
    rng = random.Random(100 + bs)
    for n_hist in [0, 1, 3]:
        Lp = n_hist * bs
        pos_k = torch.cat([torch.arange(Lp), Lp + torch.arange(bs)])[None]
        noisy_k = (torch.arange(Lp + bs) >= Lp)[None]
        valid = torch.tensor([[rng.random() > 0.3 for _ in range(Lp)] + [True] * bs])
        pos_q = Lp + torch.arange(bs)[None]
        m = block_mask(pos_q // bs, torch.ones(1, bs, dtype=torch.bool), pos_k // bs, noisy_k, valid)[0, 0]
        ref = torch.tensor([[valid[0, j].item() and allowed(pos_q[0, i].item(), True, pos_k[0, j].item(),
                                                            noisy_k[0, j].item(), bs)
                             for j in range(Lp + bs)] for i in range(bs)])
        assert torch.equal(m, ref)


def test_fresh_dit_outputs_exactly_zero():
    dit = DiT(DiTConfig(n_layer=2, width=32, n_head=2, block_size=4))
    pos, blk, noisy = layout_2L(2, 10, 4, "cpu")
    v = dit(torch.randn(2, 20, 16), *per_token(torch.rand(2, 20)), pos, block_mask(blk, noisy, blk, noisy))
    assert torch.count_nonzero(v) == 0


@pytest.mark.parametrize("L", [12, 14])
def test_2L_layout_computes_factorised_prior(L):
    """Velocity of noisy block b in the 2L layout == plain forward over [clean blocks < b, noisy block b]."""
    bs = 4
    dit = random_dit(bs)
    pos, blk, noisy = layout_2L(2, L, bs, "cpu")
    z = torch.randn(2, 2 * L, 16)
    t = torch.rand(2, 2 * L) * noisy  # clean copy at t = 0
    v = dit(z, *per_token(t), pos, block_mask(blk, noisy, blk, noisy))
    for b in range((L + bs - 1) // bs):
        lo, hi = b * bs, min(L, (b + 1) * bs)
        sel = torch.cat([torch.arange(lo), L + torch.arange(lo, hi)])
        vb = dit(z[:, sel], *per_token(t[:, sel]), pos[:, sel], block_mask(blk[:, sel], noisy[:, sel], blk[:, sel], noisy[:, sel]))
        assert torch.allclose(vb[:, lo:], v[:, L + lo:L + hi], atol=1e-5), f"block {b}"


def test_cached_history_equals_full_forward():
    """A noisy block attending to a KV cache of clean blocks == the same tokens in one forward."""
    bs = 4
    dit = random_dit(bs)
    L = 3 * bs
    z = torch.randn(1, L + bs, 16)
    t = torch.cat([torch.zeros(1, L), torch.full((1, bs), 0.7)], 1)
    pos = torch.cat([torch.arange(L), L + torch.arange(bs)])[None]
    noisy = (torch.arange(L + bs) >= L)[None]
    blk = pos // bs
    full = dit(z, *per_token(t), pos, block_mask(blk, noisy, blk, noisy))
    cache = dit.new_cache(1, L + bs, "cpu")  # every call attends to all slots; empty ones at PAD_POS, hidden
    empty = torch.where(noisy, PAD_POS, pos)
    dit(z[:, :L], *per_token(t[:, :L]), pos[:, :L], block_mask(blk[:, :L], noisy[:, :L], empty // bs, noisy),
        cache.at(0, pos[:, :L]))
    v = dit(z[:, L:], *per_token(t[:, L:]), pos[:, L:], block_mask(blk[:, L:], noisy[:, L:], blk, noisy),
            cache.at(L, pos[:, L:]))
    assert torch.allclose(v, full[:, L:], atol=1e-5)
    # the cache is written in place: the same block again, at other times, overwrites its own slots
    v2 = dit(z[:, L:], *per_token(t[:, L:] * 0.5), pos[:, L:], block_mask(blk[:, L:], noisy[:, L:], blk, noisy),
             cache.at(L, pos[:, L:]))
    ref = dit(z, *per_token(torch.cat([t[:, :L], t[:, L:] * 0.5], 1)), pos, block_mask(blk, noisy, blk, noisy))
    assert torch.allclose(v2, ref[:, L:], atol=1e-5)


def test_per_block_times_equal_per_token_times():
    """The compact table (t = 0 and one t per block, gathered per token) gives the per-token result,
    prompt-boundary positions (t = 0 inside a noisy block) included."""
    bs, L, B = 4, 14, 3
    dit = random_dit(bs)
    pos, blk, noisy = layout_2L(B, L, bs, "cpu")
    nb = -(-L // bs)
    t_blocks = torch.rand(B, nb)
    pinned = torch.rand(B, 2 * L) < 0.2  # some noisy positions held at t = 0
    t_index = torch.where(noisy & ~pinned, blk + 1, 0)  # entry 0: t = 0; entry b + 1: block b
    t_tok = torch.cat([torch.zeros(B, 1), t_blocks], 1).gather(1, t_index)  # (B, 2L)
    z, mask = torch.randn(B, 2 * L, 16), block_mask(blk, noisy, blk, noisy)
    compact = dit(z, torch.cat([torch.zeros(B, 1), t_blocks], 1), t_index, pos, mask)
    assert torch.allclose(compact, dit(z, *per_token(t_tok), pos, mask), atol=1e-6)
    # precomputed modulations (the sampler's once-per-block path) are the same call
    table = torch.cat([torch.zeros(B, 1), t_blocks], 1)
    assert torch.equal(compact, dit(z, None, t_index, pos, mask, mod=dit.condition(table)))


def test_kv_cache_evicts_oldest_slots():
    cache = KVCache(1, 1, 1, 2, 5)
    cache.at(0, torch.arange(5)[None]).update(0, torch.arange(10.0).view(1, 1, 5, 2), torch.zeros(1, 1, 5, 2))
    cache.evict(2)
    assert cache.pos.tolist() == [[2, 3, 4, PAD_POS, PAD_POS]]  # the positions move with their slots
    assert cache.k[0][0, 0, :3].flatten().tolist() == [4.0, 5.0, 6.0, 7.0, 8.0, 9.0]


def test_forward_is_textbook_adaLN():
    """DiT.forward (whose condition() stores each scale as 1 + scale, and whose RoPE runs in one-swap
    form) equals the released DiT written out plainly: x + gate attn(LN(x) (1 + scale) + shift), the same
    for the GELU MLP, an affine LN with shift and scale before the output, per-head LayerNorm on q and k,
    and the first rope_dim channels of each head rotated in pairs (2i, 2i + 1) by pos / 10000^(2i/rope_dim)."""
    import torch.nn.functional as F
    dit = random_dit(bs=4, width=32)
    B, L, W, H = 2, 8, 32, 2
    hd, r = W // H, dit.rope_dim
    z, t, pos = torch.randn(B, L, dit.cfg.latent_dim), torch.rand(B, L), torch.arange(L).expand(B, L) + 5
    ang = pos[..., None].float() / 10000 ** (torch.arange(r // 2) * 2 / r)  # (B, L, r/2)

    def rotate(u):  # (B, H, L, hd)
        u1, u2 = u[..., :r:2], u[..., 1:r:2]
        c, s = ang.cos()[:, None], ang.sin()[:, None]
        turned = torch.stack([u1 * c - u2 * s, u2 * c + u1 * s], -1).flatten(-2)
        return torch.cat([turned, u[..., r:]], -1)

    feats = 1000 * t[..., None] * torch.exp(-math.log(10000) * torch.arange(128) / 128)
    e = dit.emb_in
    c = e.proj_out(F.silu(e.proj_hid(F.silu(e.proj_in(torch.cat([feats.sin(), feats.cos()], -1))))))  # (B, L, W)
    x = dit.txt_in.proj(z)
    for blk in dit.blocks:
        shift1, scale1 = blk.ada.msa_in(c).chunk(2, -1)
        h = F.layer_norm(x, (W,), eps=1e-5) * (1 + scale1) + shift1
        q, k, v = blk.msa.proj_qkv(h).view(B, L, 3, H, hd).transpose(1, 3).unbind(2)  # 3 x (B, H, L, hd)
        q, k = rotate(blk.msa.norm_q(q)), rotate(blk.msa.norm_k(k))
        a = torch.softmax(q @ k.transpose(-1, -2) / hd ** 0.5, -1) @ v  # (B, H, L, hd), no mask
        x = x + blk.ada.msa_out(c) * blk.msa.proj_out(a.transpose(1, 2).reshape(B, L, W))
        shift2, scale2 = blk.ada.mlp_in(c).chunk(2, -1)
        h = F.layer_norm(x, (W,), eps=1e-5) * (1 + scale2) + shift2
        x = x + blk.ada.mlp_out(c) * blk.mlp.proj_out(F.gelu(blk.mlp.proj_in(h), approximate="tanh"))
    shift, scale = dit.txt_out_ada.out_in(c).chunk(2, -1)
    ref = dit.txt_out.proj(dit.txt_out_norm(x) * (1 + scale) + shift)
    with torch.no_grad():
        out = dit(z, *per_token(t), pos, torch.ones(B, 1, L, L, dtype=torch.bool))
    assert torch.allclose(out, ref.detach(), atol=1e-5)
