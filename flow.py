"""
Flow matching for Cola DLM's latent prior (arXiv 2605.06548 §3.1.1, App. A.4), convention t = 1 is noise:

    z_t = (1 - t) z0 + t eps,   eps ~ N(0, I),   target velocity v* = eps - z0,   loss = MSE

Training draws one t per block from a logit-normal(loc, scale) and runs the DiT once over the 2L
layout [clean z0 | noisy z_t] (dit.py), so every block learns p(z^(b) | z^(<b)) in one forward.
Generation integrates dz/dt = v from t = 1 to 0 with Euler steps, block by block, with
classifier-free guidance (cond: block + history, uncond: block alone, one batched forward) and
clean-condition repaint (prompt latents inside the block stay clean with t = 0).

Self-check (CPU, under a minute): python flow.py  -- fits a 2-D Gaussian mixture and checks that
Euler samples reproduce its mean and covariance.
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from dit import block_mask, flex_mask_2L, layout_2L


@dataclass
class FlowConfig:
    t_dist: str = "logit_normal"  # "logit_normal" or "uniform" training times
    t_loc: float = 1.0            # logit-normal location; paper best 1.0 at d=16, ~1 + 0.5 ln(d/16) otherwise
    t_scale: float = 1.0          # logit-normal scale
    p_prompt_block: float = 0.1   # prob. that a block keeps a random leading part clean (prompt boundary)


def sample_t(shape, cfg, device="cpu"):
    if cfg.t_dist == "uniform":
        return torch.rand(shape, device=device)
    if cfg.t_dist != "logit_normal":
        raise ValueError(f"unknown t_dist {cfg.t_dist!r}")
    return torch.sigmoid(cfg.t_loc + cfg.t_scale * torch.randn(shape, device=device))


def interpolate(z0, eps, t):
    """The straight path z_t = (1 - t) z0 + t eps, t broadcast over the last (channel) axis."""
    t = t[..., None]
    return (1 - t) * z0 + t * eps


def fm_loss(dit, z0, cfg, z_src=None, t_block=None, history=None):
    """Flow-matching loss of the block-causal prior over latents z0 (B, L, d), in the 2L layout.

    z0 serves as clean history and velocity target (the caller passes it stop-gradient); z_src, if
    given, is the same latent with gradient, used only to build the noisy copy (lets FM gradients
    reach the encoder through the noisy block). Returns (loss, per-token stats for t-binned logging).
    Probes for evaluation: t_block (B, n_blocks) fixes the times instead of drawing them; history
    (B, L, d) replaces the clean copy the noisy blocks attend to (e.g. another sequence's latents).
    """
    B, L, d = z0.shape
    bs = dit.cfg.block_size
    nb = math.ceil(L / bs)
    t_blocks = sample_t((B, nb), cfg, z0.device) if t_block is None else t_block  # (B, nb)
    t = t_blocks.repeat_interleave(bs, dim=1)[:, :L]  # (B, L), one t per block
    within = torch.arange(L, device=z0.device) % bs  # position inside its block
    # prompt-boundary simulation: some blocks keep a clean leading part (t = 0, no loss), as the
    # first generated block does at inference when the prompt ends mid-block
    chosen = (torch.rand(B, nb, device=z0.device) < cfg.p_prompt_block).repeat_interleave(bs, 1)[:, :L]
    n_keep = torch.randint(1, bs, (B, nb), device=z0.device).repeat_interleave(bs, 1)[:, :L] if bs > 1 \
        else torch.zeros(B, L, dtype=torch.long, device=z0.device)
    pinned = chosen & (within < n_keep)  # (B, L)
    t = torch.where(pinned, torch.zeros_like(t), t)
    eps = torch.randn_like(z0)
    zt = interpolate(z0 if z_src is None else z_src, eps, t)  # pinned positions: exactly the clean latent
    pos, blk, noisy = layout_2L(B, L, bs, z0.device)
    inp = torch.cat([z0 if history is None else history, zt], 1)  # (B, 2L, d)
    # one mask, two forms: SDPA computes every score and masks, FlexAttention skips the empty tiles
    mask = flex_mask_2L(L, bs, z0.device) if dit.cfg.attn == "flex" else block_mask(blk, noisy, blk, noisy)
    # the DiT's times: entry 0 is t = 0 (the clean copy, pinned positions), entry b + 1 block b's t
    t_table = torch.cat([torch.zeros(B, 1, device=z0.device), t_blocks], 1)  # (B, 1 + nb)
    t_index = torch.cat([torch.zeros_like(pinned, dtype=torch.long),
                         torch.where(pinned, 0, torch.arange(L, device=z0.device) // bs + 1)], 1)  # (B, 2L)
    sc = None
    if dit.cfg.self_cond:  # Analog Bits (arXiv 2208.04202): half the rows see a first pass's clean estimate
        with torch.no_grad():
            est = zt - t[..., None] * dit(inp, t_table, t_index, pos, mask)[:, L:]  # (B, L, d): z_t - t v ~ z0
        use = torch.rand(B, 1, 1, device=z0.device) < 0.5
        sc = torch.cat([torch.zeros_like(z0), torch.where(use, est, torch.zeros_like(est))], 1)  # clean copy: none
    v = dit(inp, t_table, t_index, pos, mask, sc=sc)  # (B, 2L, d)
    per_token = (v[:, L:].float() - (eps - z0).float()).pow(2).mean(-1)  # (B, L), per channel
    w = (~pinned).float()
    loss = (per_token * w).sum() / w.sum().clamp(min=1)
    return loss, dict(t=t.detach(), per_token=per_token.detach(), weight=w)


def fm_by_t(t, loss, edges=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0)):
    """Mean per-channel FM loss in bins of t: {'0.0-0.2': value, ...} (nan for an empty bin)."""
    out = {}
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (t >= lo) & (t < hi) if hi < 1 else (t >= lo)
        out[f"{lo:.1f}-{hi:.1f}"] = loss[sel].mean().item() if sel.any() else float("nan")
    return out


# ----------------------------------------------------------------------------- held-out probes (eval.py fm)

def gauss_baseline(s2, t):
    """Per-channel FM loss of the best predictor for structureless latents N(m, s2) with no history:
    Var(v) - Cov(v, z_t)^2 / Var(z_t), with v = eps - z0, z_t = (1-t) z0 + t eps. s2 (C,), t (N,) -> (N,)."""
    t = t[:, None]
    return (1 + s2 - (t - (1 - t) * s2) ** 2 / ((1 - t) ** 2 * s2 + t ** 2)).mean(-1)


@torch.no_grad()
def history_gain(dit, flow_cfg, z, high=0.8, seed=0):
    """What the prior takes from its history: held-out FM loss at high noise (t ~ U(high, 1) per block,
    blocks after the first) with the true history and with another sequence's (z rolled over the batch),
    same t and noise; the relative drop (other - true) / other, at all positions and at block starts."""
    (B, L, _), bs = z.shape, dit.cfg.block_size
    t = high + (1 - high) * torch.rand(B, math.ceil(L / bs), generator=torch.Generator().manual_seed(seed))
    cfg = replace(flow_cfg, p_prompt_block=0.0)  # held-out losses score every position
    losses, pos, r = [], torch.arange(L, device=z.device), {}
    for history in (z, z.roll(1, 0)):
        torch.manual_seed(seed)  # the same noise for both
        losses.append(fm_loss(dit, z, cfg, t_block=t.to(z.device), history=history)[1]["per_token"])
    for name, sel in (("", pos >= bs), ("_first", (pos >= bs) & (pos % bs == 0))):
        true, other = (l[:, sel].mean().item() for l in losses)
        r.update({f"fm_high_t{name}": true, f"fm_high_t_other{name}": other, f"fm_history_gain{name}": (other - true) / other})
    return r


def time_grid(steps, shift=1.0):
    """The steps + 1 times of an Euler solve from t = 1 to 0 and its steps + 1 step sizes: uniform, or
    with shift > 1 more of them at high noise, where a block's content is decided: uniform s in [0, 1]
    maps to t = shift s / (1 + (shift - 1) s) (the time shift of SD3, arXiv 2403.03206 §5.3.2)."""
    dt = 1.0 / steps
    ts = [1.0 - i * dt for i in range(steps)] + [0.0]
    if shift == 1.0:
        return ts, [dt] * steps
    ts = [shift * s / (1 + (shift - 1) * s) for s in ts]
    return ts, [a - b for a, b in zip(ts, ts[1:])]


def euler(velocity, z, steps, keep=None, shift=1.0):
    """Integrate dz/dt = velocity(z, t) from t = 1 to 0 in `steps` Euler steps: z <- z - dt v.

    keep (B, L) marks positions pinned to their current (clean) value; velocity(z, t) receives the
    scalar time of the step and is responsible for giving pinned positions t = 0. shift: see time_grid.
    """
    ts, dts = time_grid(steps, shift)
    for i in range(steps):
        v = velocity(z, ts[i])
        if keep is not None:
            v = v.masked_fill(keep[..., None], 0.0)  # repaint: pinned latents stay bit-identical
        z = z - dts[i] * v
    return z


def renoise(z_s, s, t, eps):
    """Move z_s from time s forward to t > s along the path z_t = (1 - t) z0 + t eps: z_t = a z_s + b eps
    with a = (1 - t) / (1 - s) and b^2 = t^2 - a^2 s^2, so z_t has the marginal of the path at t."""
    a = (1 - t) / (1 - s)
    return a * z_s + math.sqrt(max(t * t - (a * s) ** 2, 0.0)) * eps


def euler_repaint(velocity, z, known, keep, steps, reps=1, frac=1.0, noise=torch.randn_like, shift=1.0):
    """Partial repaint, the first-block baseline of the paper's Table 5 (§5.2; RePaint, arXiv 2201.09865,
    in flow form). Every position runs at the current t. During the first ceil(frac x steps) steps the
    known positions (keep) are reset before each velocity call to their clean latent noised to that t,
    (1 - t) known + t eps, and each such step runs `reps` times, jumping back from the step's end to its
    start with fresh noise (renoise) between repetitions; the remaining steps integrate freely.
    noise(z) draws eps like z. frac = 1, reps = 1 is RePaint without resampling. Rows with no known
    position integrate plainly (no repetitions)."""
    (ts, dts), guided = time_grid(steps, shift), math.ceil(frac * steps)
    rows = keep.any(1)[:, None, None]  # (B, 1, 1)
    for i in range(steps):
        t, s = ts[i], ts[i + 1]
        n = reps if i < guided else 1
        for r in range(n):
            if i < guided:
                z = torch.where(keep[..., None], (1 - t) * known + t * noise(known), z)
            stepped = z - dts[i] * velocity(z, t)
            first = stepped if r == 0 else first
            z = renoise(stepped, s, t, noise(stepped)) if r < n - 1 else stepped
        z = torch.where(rows, z, first)  # rows without known positions: one plain step
    return z


@torch.no_grad()
def sample_block(net, z, keep, guided, s, repaint=None, self_cond=False):
    """One latent block by Euler integration from t = 1 (noise) to 0 with classifier-free guidance
    (arXiv 2605.06548 §3.2.3, App. B.1) and clean-condition repaint (§5.2).

    z (B, bs, d): Gaussian noise, except at positions keep (B, bs): the prompt's clean latents, pinned at
    t = 0 throughout (keep None: nothing pinned, one time-table row for every token).
    net(z, step, sc): the DiT with its history, positions and mask bound (cola.History), for latents
    z (rB, bs, d), each token's step of the solve (0 = clean: t = 0; i + 1: step i's t) and the
    self-conditioning input sc. Guided, rB = 2B rows [conditional | unconditional], one batched
    forward: v = v_u + w (v_c - v_u). s: a layers.Sampling (steps, cfg_scale, shift).
    repaint = (reps, frac, noise_fn): partial repaint (euler_repaint) instead of pinning the prompt.
    self_cond: the DiT also reads its last estimate of the clean block, z - t v (zero at the first step).
    """
    rows = 2 if guided else 1
    ts, _ = time_grid(s.steps, s.shift)
    step_of = {t: i + 1 for i, t in enumerate(ts[:-1])}
    repaint = None if keep is None else repaint  # nothing known, nothing to repaint
    pin = keep if repaint is None else torch.zeros_like(keep)  # positions at t = 0 in the DiT's input
    moving = torch.ones(1, 1, dtype=torch.long, device=z.device) if pin is None else (~pin).long().repeat(rows, 1)
    estimate = torch.zeros_like(z) if self_cond else None  # (B, bs, d)

    def velocity(z, t):
        nonlocal estimate
        sc = None if estimate is None else estimate.repeat(rows, 1, 1)  # (rB, bs, d)
        v = net(z.repeat(rows, 1, 1), moving * step_of[t], sc)  # (rB, bs, d)
        if guided:
            v_c, v_u = v.chunk(2)  # 2 x (B, bs, d)
            v = torch.lerp(v_u, v_c, s.cfg_scale)  # v_u + w (v_c - v_u)
        if estimate is not None:  # pinned positions: their clean latent
            estimate = z - t * v if pin is None else torch.where(pin[..., None], z, z - t * v)
        return v  # (B, bs, d)

    if repaint is not None:
        return euler_repaint(velocity, z, z, keep, s.steps, *repaint, shift=s.shift)
    return euler(velocity, z, s.steps, keep, s.shift)


# ----------------------------------------------------------------------------- likelihood

def cnf_logp(velocity, z0, steps, probe):
    """log-density of z0 (B, ...) under the flow, summed over all but the batch axis -> (B,).

    The instantaneous change of variables (paper §3.1.1, App. A.2-A.5): integrate d/dt [z, l] = [v, div v]
    from t = 0 (data) to t = 1 (noise); log p(z0) = log N(z1; 0, I) + l1. Midpoint (RK2) steps: the
    density is far more sensitive to discretisation than samples are (Euler's O(1/steps) bias is
    visible at a few hundred steps). div v is Hutchinson's estimate probe^T (dv/dz) probe with one
    probe fixed for the whole solve (Rademacher probes make it exact for a diagonal Jacobian).
    """

    def f(z, t):  # -> velocity and divergence estimate at (z, t)
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            v = velocity(z, t)
            (vjp,) = torch.autograd.grad(v, z, probe)  # probe^T J, one backward pass
        return v.detach(), (vjp * probe).flatten(1).sum(1)

    z, l, dt = z0.detach(), torch.zeros(z0.shape[0], device=z0.device), 1.0 / steps
    for i in range(steps):
        with torch.no_grad():
            v1 = velocity(z, i * dt)  # only the midpoint's divergence is needed
        v2, div = f(z + 0.5 * dt * v1, (i + 0.5) * dt)
        z, l = z + dt * v2, l + dt * div
    log_normal = -0.5 * (z.pow(2) + math.log(2 * math.pi)).flatten(1).sum(1)
    return log_normal + l


def prior_logp(dit, z0, steps=32):
    """log p_psi(z0) of latents z0 (B, L, d) under the block-causal prior: every block's conditional
    density given its clean history, all blocks in one solve thanks to the 2L layout (noisy blocks do
    not see each other, so the Jacobian is block-diagonal and one trace covers every block). The
    conditional velocity, no CFG, defines the density."""
    B, L, _ = z0.shape
    pos, blk, noisy = layout_2L(B, L, dit.cfg.block_size, z0.device)
    mask = block_mask(blk, noisy, blk, noisy)
    t_index = noisy.long()  # (B, 2L): the clean copy at entry 0 (t = 0), the noisy one at entry 1

    def velocity(z, t):
        return dit(torch.cat([z0, z], 1), torch.tensor([0.0, t], device=z.device), t_index, pos, mask)[:, L:]

    probe = torch.randint(0, 2, z0.shape, device=z0.device).float() * 2 - 1  # Rademacher
    return cnf_logp(velocity, z0, steps, probe)


# ----------------------------------------------------------------------------- self-check

class ToyVelocity(nn.Module):
    """A small MLP v(z, t) for low-dimensional checks."""

    def __init__(self, dim=2, hidden=128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, dim))

    def forward(self, z, t):
        t = torch.as_tensor(t, dtype=z.dtype).expand(z.shape[0], 1) if not torch.is_tensor(t) or t.dim() == 0 \
            else t.reshape(-1, 1)
        return self.net(torch.cat([z, t], -1))


def gmm_sample(n, generator=None):
    """A fixed 2-D mixture of three Gaussians with a non-trivial mean and covariance."""
    centers = torch.tensor([[2.0, 0.0], [-1.0, 1.5], [-1.0, -1.5]])
    idx = torch.multinomial(torch.tensor([0.5, 0.3, 0.2]), n, replacement=True, generator=generator)
    return centers[idx] + 0.3 * torch.randn(n, 2, generator=generator)


def fit_gmm(iters=1500, batch=1024, seed=0, n=20000):
    """Fit ToyVelocity to the mixture by flow matching; return (model, Euler samples, data samples)."""
    torch.manual_seed(seed)
    net = ToyVelocity()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)  # decay: a noisy final field biases the moments
    cfg = FlowConfig(t_dist="uniform")
    for _ in range(iters):
        z0 = gmm_sample(batch)
        eps, t = torch.randn_like(z0), sample_t((batch,), cfg)
        loss = (net(interpolate(z0, eps, t), t) - (eps - z0)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    with torch.no_grad():
        samples = euler(net, torch.randn(n, 2), steps=100)
    return net, samples, gmm_sample(n)


if __name__ == "__main__":
    _, samples, data = fit_gmm()
    print("mean  data", data.mean(0).tolist(), " euler", samples.mean(0).tolist())
    print("cov   data", torch.cov(data.T).flatten().tolist(), "\n      euler", torch.cov(samples.T).flatten().tolist())
    assert (samples.mean(0) - data.mean(0)).abs().max() < 0.1
    assert (torch.cov(samples.T) - torch.cov(data.T)).abs().max() < 0.15
    print("flow.py self-check OK (mean within 0.1, covariance entries within 0.15)")
