"""Flow matching: t sampling, the loss on pinned positions, Euler, CFG and repaint, a 2-D fit."""
import pytest
import torch

from dit import DiT, DiTConfig, block_mask
from flow import FlowConfig, cnf_logp, euler, fit_gmm, fm_loss, prior_logp, sample_block, sample_t, time_grid
from layers import PAD_POS, Sampling
from tests.helpers import per_token, random_dit


def test_logit_normal_t():
    torch.manual_seed(0)
    t = sample_t((200000,), FlowConfig(t_loc=1.0, t_scale=1.0))
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean() - 1.0) < 0.02 and abs(logit.std() - 1.0) < 0.02
    u = sample_t((200000,), FlowConfig(t_dist="uniform"))
    assert abs(u.mean() - 0.5) < 0.01
    with pytest.raises(ValueError):
        sample_t((3,), FlowConfig(t_dist="beta"))


def test_fm_loss_of_zero_velocity_and_pinning():
    """A fresh DiT predicts v = 0, so the loss is E|eps - z0|^2 per channel = 1 + E z0^2."""
    torch.manual_seed(0)
    dit = DiT(DiTConfig(n_layer=1, width=32, n_head=2, block_size=4))
    z0 = 2.0 * torch.randn(64, 16, 16)
    loss, st = fm_loss(dit, z0, FlowConfig(p_prompt_block=0.0))
    assert abs(loss.item() - 5.0) < 0.15 and st["weight"].min() == 1
    # t is shared within a block
    t = st["t"].view(64, 4, 4)
    assert torch.equal(t, t[:, :, :1].expand_as(t))
    # every block keeps a clean leading part: t = 0 there, excluded from the loss, 1..bs-1 long
    loss, st = fm_loss(dit, z0, FlowConfig(p_prompt_block=1.0))
    pinned = st["weight"] == 0
    assert torch.all(st["t"][pinned] == 0) and torch.all(st["t"][~pinned] > 0)
    per_block = pinned.view(64, 4, 4).sum(-1)
    assert per_block.min() >= 1 and per_block.max() <= 3
    assert torch.all(pinned.view(64, 4, 4)[:, :, 0])  # the pinned part is a prefix of the block


def test_euler_is_exact_for_constant_velocity_and_keeps_pinned():
    z1 = torch.randn(3, 5, 2)
    keep = torch.zeros(3, 5, dtype=torch.bool)
    keep[:, :2] = True
    out = euler(lambda z, t: torch.ones_like(z), z1.clone(), steps=7, keep=keep)
    assert torch.allclose(out[~keep], z1[~keep] - 1.0, atol=1e-6)
    assert torch.equal(out[keep], z1[keep])


def test_shifted_euler_visits_high_noise_more_and_still_ends_at_t0():
    seen = []
    out = euler(lambda z, t: seen.append(t) or torch.ones_like(z), torch.zeros(1, 2), steps=4, shift=3.0)
    assert torch.allclose(out, torch.full((1, 2), -1.0))  # the step sizes still sum to 1
    assert seen[0] == 1.0 and seen[2] == pytest.approx(3 * 0.5 / (1 + 2 * 0.5)) and seen[2] > 0.5


def test_self_conditioning_trains_its_input_and_starts_as_a_no_op():
    torch.manual_seed(0)
    dit = DiT(DiTConfig(n_layer=1, width=32, n_head=2, block_size=4, self_cond=True))
    z = torch.randn(8, 8, 16)  # 8 rows: each sees the estimate with probability 1/2
    pos = torch.arange(8).expand(8, 8)
    mask = block_mask(pos // 4, torch.ones(8, 8, dtype=torch.bool), pos // 4, torch.ones(8, 8, dtype=torch.bool))
    for p in dit.parameters():
        if p is not dit.sc_embedder.weight:
            p.data.add_(0.05 * torch.randn_like(p))
    t = torch.full((8, 8), 0.7)
    assert torch.equal(dit(z, *per_token(t), pos, mask), dit(z, *per_token(t), pos, mask, sc=torch.randn_like(z)))  # zero-init
    loss, _ = fm_loss(dit, z, FlowConfig())
    loss.backward()
    assert dit.sc_embedder.weight.grad.abs().sum() > 0  # the estimate reaches the loss


def test_cfg_one_equals_conditional_and_guidance_formula():
    """sample_block against Euler written out by hand: w = 1 is the conditional model, w = 0 the block
    alone, any other w the guidance formula v_u + w (v_c - v_u) computed in one batched forward; pinned
    latents stay bit-identical."""
    dit, B, L, bs = random_dit(), 2, 8, 4
    hist_pos, pos, alone_pos = torch.arange(L).expand(B, L), L + torch.arange(bs).expand(B, bs), torch.arange(bs).expand(B, bs)
    cache = dit.new_cache(2 * B, L + bs, "cpu")  # 2B rows: room for the unconditional half; the history in the first B
    clean = torch.zeros(B, L + bs, dtype=torch.bool)
    k_hist = torch.cat([hist_pos, torch.full((B, bs), PAD_POS)], 1)  # slots L.. are empty
    dit(torch.randn(B, L, 16), *per_token(torch.zeros(B, L)), hist_pos, block_mask(hist_pos // bs, clean[:, :L], k_hist // bs, clean),
        cache.at(0, hist_pos))
    k_cond = torch.cat([hist_pos, pos], 1)  # (B, L + bs)
    k_alone = torch.cat([torch.full((B, L), PAD_POS), alone_pos], 1)  # the unconditional rows see no history
    ts = time_grid(4)[0]
    mod = dit.condition(torch.tensor([0.0] + ts[:-1]))

    def mask(q_pos, k_pos):
        noisy = (torch.arange(L + bs) >= L).expand(len(q_pos), L + bs)
        return block_mask(q_pos // bs, torch.ones_like(q_pos, dtype=torch.bool), k_pos // bs, noisy)

    def net(q_pos, k_pos):  # the DiT as cola.History binds it for a block in slots L..L+bs-1
        m = mask(q_pos, k_pos)
        return lambda z, step, sc: dit(z, None, step, q_pos, m, cache.at(L, q_pos), mod=mod)

    noise = torch.randn(B, bs, 16)
    keep = torch.zeros(B, bs, dtype=torch.bool)
    keep[0, :3] = True  # sample 0: three prompt latents inside the block
    guided = net(torch.cat([pos, alone_pos]), torch.cat([k_cond, k_alone]))
    for w in (1.0, 0.0, 7.0):
        out = sample_block(guided if w != 1 else net(pos, k_cond), noise, keep, w != 1, Sampling(steps=4, cfg_scale=w))
        by_hand = noise.clone()
        for i in range(4):
            t = torch.full((B, bs), ts[i]).masked_fill(keep, 0.0)
            v_c = dit(by_hand, *per_token(t), pos, mask(pos, k_cond), cache.at(L, pos))
            v_u = dit(by_hand, *per_token(t), alone_pos, mask(alone_pos, k_alone), cache.at(L, alone_pos))
            by_hand = by_hand - 0.25 * (v_u + w * (v_c - v_u)).masked_fill(keep[..., None], 0.0)
        assert torch.allclose(out, by_hand, atol=1e-5), w
        assert torch.equal(out[keep], noise[keep]) and not torch.equal(out[~keep], noise[~keep])
    alone = sample_block(net(alone_pos, k_alone), noise, keep, False, Sampling(steps=4, cfg_scale=1.0))
    assert not torch.allclose(alone, sample_block(net(pos, k_cond), noise, keep, False, Sampling(steps=4)), atol=1e-3)


def test_flow_fits_gaussian_mixture():
    _, samples, data = fit_gmm(iters=1500)
    assert (samples.mean(0) - data.mean(0)).abs().max() < 0.1
    assert (torch.cov(samples.T) - torch.cov(data.T)).abs().max() < 0.15


def test_cnf_logp_matches_closed_form_gaussian():
    """The exact FM velocity of Gaussian data N(m, s2) transports N(0, I) to it: the CNF density of
    a point must be the Gaussian log-density."""
    m, s2 = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 2.0])

    def v(z, t):
        return -m + (t - (1 - t) * s2) / ((1 - t) ** 2 * s2 + t ** 2) * (z - (1 - t) * m)

    torch.manual_seed(0)
    z0 = torch.randn(64, 2) * s2.sqrt() + m
    probe = torch.randint(0, 2, z0.shape).float() * 2 - 1
    lp = cnf_logp(v, z0, steps=100, probe=probe)
    ref = torch.distributions.Normal(m, s2.sqrt()).log_prob(z0).sum(1)
    assert torch.allclose(lp, ref, atol=2e-3), (lp - ref).abs().max()


def test_prior_logp_is_the_sum_of_per_block_conditionals():
    """One 2L solve == a separate solve per block given its clean history (same probe)."""
    dit = random_dit(bs=4)
    torch.manual_seed(1)
    B, L = 2, 10
    z0 = torch.randn(B, L, 16)
    torch.manual_seed(2)
    total = prior_logp(dit, z0, steps=5)
    torch.manual_seed(2)
    probe = torch.randint(0, 2, z0.shape).float() * 2 - 1  # the probe prior_logp drew
    per_block = torch.zeros(B)
    for lo in range(0, L, 4):
        hi = min(L, lo + 4)
        hist = z0[:, :lo]
        pos = torch.cat([torch.arange(lo), torch.arange(lo, hi)]).expand(B, -1)
        noisy = (torch.arange(hi) >= lo).expand(B, -1)
        mask = block_mask(pos // 4, noisy, pos // 4, noisy)

        def v(z, t):
            tt = torch.cat([torch.zeros(B, lo), torch.full((B, hi - lo), t)], 1)
            return dit(torch.cat([hist, z], 1), *per_token(tt), pos, mask)[:, lo:]

        lp = cnf_logp(v, z0[:, lo:hi], steps=5, probe=probe[:, lo:hi])
        # cnf_logp adds log N(z1) for this block's dims only, so the sum over blocks is the whole
        per_block += lp
    assert torch.allclose(total, per_block, atol=1e-3)
