"""
Cola DLM as one model object: the text VAE (vae.py), the block-causal DiT prior (dit.py, flow.py)
and, in stage 2, a frozen copy of the stage-1 encoder. One class carries the training loss of both
stages, generation and the likelihood bound, as ar.py's ARLM does for the AR baseline, so train.py,
sample.py and eval.py talk to either through the same calls:

    model, ckpt = common.load_model("out/ckpt.pt")
    loss, stats = model(x)                                  # the stage's training loss on tokens x (B, L)
    new_ids = model.generate(prompts, max_new_tokens=64)    # lists of token ids in, lists out
    logp = model.score(x)                                   # log p(x) per sequence (here: the ELBO)

Generation (arXiv 2605.06548 §3.2.3, App. B.1): encode the prompt (posterior mean); its full blocks
prefill the DiT and decoder KV caches; then block after block: Gaussian noise -> Euler steps with
classifier-free guidance (flow.sample_block), the prompt's tail inside the first block pinned to its
clean latents (clean-condition repaint, §5.2) -> decode the block with the cached causal decoder ->
commit its latents to the DiT cache with t = 0.

The first block has three other modes, the baselines of the paper's Table 5 (first_block=): partial
repaint ("repaint:R:M", flow.euler_repaint: the prompt's tail noised to the current t and re-imposed
during the first fraction M of the steps, each such step run R times; the prompt's own latents then
enter the history, so only the continuation's latents differ), and padding the prompt with
<|endoftext|> to a whole number of blocks, on its left ("left_pad") or between it and the
continuation ("right_pad"), so that no block is shared by prompt and continuation.
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.tokenizer import get_tokenizer
from dit import DiT, DiTConfig, block_mask
from flow import FlowConfig, fm_by_t, fm_loss, prior_logp, sample_block, step_conditions
from layers import PAD_POS, append_tokens, compiled_step, pick_tokens, sample_generators, step_slots
from vae import TextVAE, VAEConfig, gaussian_kl

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


class Cola(nn.Module):
    """VAE + DiT (+ frozen reference encoder) in one module, so one optimizer and one DDP wrapper cover
    stage 2. Stage 1 is the same class with dit = None. The stage-2 loss weights and the VAE's learning
    rate ratio are the trainer's options (train.py TrainConfig), passed in by name."""

    def __init__(self, vae, dit=None, ref=None, flow_cfg=None, lambda_vae=1.0, lambda_fm=1.0, lambda_ref=1.0,
                 vae_lr_ratio=1.0, fm_grad_to_encoder=False):
        super().__init__()
        self.vae, self.dit, self.ref = vae, dit, ref
        self.flow_cfg = flow_cfg or FlowConfig()
        self.lambda_vae, self.lambda_fm, self.lambda_ref = lambda_vae, lambda_fm, lambda_ref
        self.vae_lr_ratio, self.fm_grad_to_encoder = vae_lr_ratio, fm_grad_to_encoder
        if ref is not None:
            ref.requires_grad_(False).eval()
        if dit is not None and vae_lr_ratio == 0:  # the frozen-VAE ablation: only the prior trains
            vae.requires_grad_(False)

    LOSS_OPTIONS = ("lambda_vae", "lambda_fm", "lambda_ref", "vae_lr_ratio", "fm_grad_to_encoder")

    @classmethod
    def build(cls, cfgs, stage, vae_state=None):
        """A fresh model for a training stage. "vae": a new VAE. "joint": the VAE (from vae_state, the
        stage-1 weights, when given), a new DiT and a frozen copy of the encoder as the reference."""
        vae = TextVAE(cfgs["vae"])
        if stage == "vae":
            return cls(vae)
        dit = DiT(cfgs["dit"])
        if vae_state is not None:
            vae.load_state_dict(vae_state)
        opts = {k: getattr(cfgs["train"], k) for k in cls.LOSS_OPTIONS}
        return cls(vae, dit, copy.deepcopy(vae), cfgs["flow"], **opts)

    @classmethod
    def from_checkpoint(cls, ckpt):
        """The model of a train.py checkpoint (no reference encoder: it only serves training)."""
        cfg = ckpt["config"]
        vae = TextVAE(VAEConfig(**cfg["vae"]))
        vae.load_state_dict(ckpt["vae"])
        dit = None
        if ckpt.get("dit") is not None:
            dit = DiT(DiTConfig(**cfg["dit"]))
            dit.load_state_dict(ckpt["dit"])
        flow_cfg = FlowConfig(**cfg["flow"]) if "flow" in cfg else None
        return cls(vae, dit, None, flow_cfg, **{k: cfg["train"][k] for k in cls.LOSS_OPTIONS if k in cfg["train"]})

    # ------------------------------------------------------------------------- what every model offers

    @property
    def tok(self):
        return get_tokenizer(self.vae.cfg.tokenizer)

    @property
    def block_size(self):
        """Tokens produced per sampler block."""
        return self.dit.cfg.block_size

    @property
    def can_generate(self):
        return self.dit is not None  # a stage-1 checkpoint has no prior

    def parts(self):
        """Sub-modules as saved in the checkpoint, with their learning-rate scale (None: not trained)."""
        if self.dit is None:
            return {"vae": (self.vae, 1.0)}
        return {"vae": (self.vae, self.vae_lr_ratio or None), "dit": (self.dit, 1.0), "ref": (self.ref, None)}

    def num_params(self):
        """Parameters of the model (the reference encoder is a training-time copy: not counted)."""
        return sum(p.numel() for m in (self.vae, self.dit) if m is not None for p in m.parameters())

    def flops(self, seq_len, steps=16, cfg_scale=7.0):
        """FLOPs per training token of this stage and per generated token (matmul-based estimate).
        Stage 1: encoder + decoder, again for the mask pass (head only at masked positions).
        Stage 2 adds the reference encoder (forward only) and the DiT over the 2L layout (2 tokens per
        token). Sampling: steps x (2 with CFG) DiT forwards, one commit forward, the decoder."""
        f = self.vae.flops(seq_len)
        vae_fwd = 2 * (f["enc"] + f["dec"]) + f["head"] * (1 + self.vae.cfg.mask_ratio)
        if self.dit is None:
            return dict(train=3 * vae_fwd, sample=0.0)
        dit_tok = self.dit.flops(seq_len / 2)  # one latent token, attending to ~L/2 keys
        train = (3 * vae_fwd + f["enc"] if self.vae_lr_ratio else f["enc"]) + (3 + self.dit.cfg.self_cond) * 2 * dit_tok
        sample = steps * (2 if cfg_scale != 1 else 1) * dit_tok + dit_tok + f["dec"] + f["head"]
        return dict(train=train, sample=sample)

    # ------------------------------------------------------------------------- training

    def forward(self, x):
        """The training loss of tokens x (B, L): (loss, dict of detached scalars).

        Stage 1 (arXiv 2605.06548 §3.2.1, eq. 3.16), z ~ q_phi(z|x):
            L = CE(x, dec(z)) + beta KL(q_phi(z|x) || N(0, I)) + lambda_mask L_mask
        Stage 2, joint VAE + prior (§3.2.2, eqs. 3.17-3.18; Fig. 1):
            L = lambda_vae (CE(x, dec(z)) + beta E_q[log q_phi(z|x)] + lambda_mask L_mask)
              + lambda_fm  E_{t, eps} || v_psi(z_t, t | sg(z^(<b))) - (eps - sg(z)) ||^2    (per block b)
              + lambda_ref KL(q_phi(z|x) || q_ref(z|x))
        with z_t = (1 - t) sg(z) + t eps, one t per block, and sg() a stop-gradient: the DiT's clean
        history and its target never push the encoder (fm_grad_to_encoder lets the noisy block do so).
        q_ref is the frozen stage-1 encoder; with vae_lr_ratio = 0 the VAE is frozen and only FM trains.
        """
        if self.dit is None:  # stage 1
            _, _, _, out = self.vae(x)
            return out["loss"], {k: v.detach() for k, v in out.items()}
        frozen = self.vae_lr_ratio == 0
        if frozen:
            with torch.no_grad():
                mu, logvar = self.vae.encode(x)
                z = self.vae.sample(mu, logvar)
            out, loss = {}, 0.0
        else:
            mu, logvar, z, out = self.vae(x, joint=True)
            out["ref_kl"] = self.ref_kl(x, mu, logvar)
            loss = self.lambda_vae * out["loss"] + self.lambda_ref * out["ref_kl"]
        src = z if (self.fm_grad_to_encoder and not frozen) else None
        out["fm"], _ = fm_loss(self.dit, z.detach(), self.flow_cfg, z_src=src)
        loss = loss + self.lambda_fm * out["fm"]
        out["loss"] = loss
        return loss, {k: v.detach() for k, v in out.items()}

    def ref_kl(self, x, mu, logvar):
        """KL(q(z|x) || q_ref(z|x)) per token, nats: how far the encoder drifted from stage 1."""
        with torch.no_grad():
            mu_r, logvar_r = self.ref.encode(x)
        return gaussian_kl(mu.float(), logvar.float(), mu_r.float(), logvar_r.float()).mean()

    @torch.no_grad()
    def diagnostics(self, x, batch_size):
        """Held-out diagnostics over windows x (N, L): reconstruction, masked accuracy, logSNR, ...;
        in stage 2 also the reference KL and the FM loss, overall and per t-bin (fm_t<lo>-<hi>)."""
        stats, t_all, l_all = {}, [], []
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size]
            mu, logvar = self.vae.encode(xb)
            d = self.vae.diagnostics(xb, (mu, logvar))
            if self.dit is not None:
                d["ref_kl"] = self.ref_kl(xb, mu, logvar).item()
                fm, st = fm_loss(self.dit, self.vae.sample(mu, logvar), self.flow_cfg)
                d["fm"] = fm.item()
                keep = st["weight"] > 0
                t_all.append(st["t"][keep].cpu()); l_all.append(st["per_token"][keep].cpu())
            for k, v in d.items():
                stats[k] = stats.get(k, 0.0) + v * len(xb) / len(x)
        if t_all:
            stats.update({f"fm_t{k}": v for k, v in fm_by_t(torch.cat(t_all), torch.cat(l_all)).items()})
        return stats

    # ------------------------------------------------------------------------- generation

    def prompt_layout(self, prompts, window=None):
        """Lay a batch of prompts out for the sampler. Each prompt's complete blocks become history,
        left-padded to a common length H (padding at PAD_POS, which no real query sees); the rest, its
        tail, is pinned inside the first generated block. Returns hist_z (B, H, d), hist_pos (B, H),
        tail (B, bs, d) with keep (B, bs) marking the pinned positions, and start (B,), the position of
        the first generated block. window: the encoder's, for prompts longer than the context."""
        tok, bs, B = self.tok, self.block_size, len(prompts)
        dev = next(self.parameters()).device
        lens = torch.tensor([len(p) for p in prompts], device=dev)
        start = lens // bs * bs  # (B,) first position of the first generated block
        H = int(start.max()) if B else 0
        x = torch.full((B, max(1, int(lens.max()) if B else 1)), tok.pad, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            x[i, :len(p)] = torch.tensor(p, dtype=torch.long, device=dev)
        mu, _ = self.vae.encode(x, window)  # (B, W, d); causal, so the right padding changes nothing
        d = mu.shape[-1]
        hist_z, hist_pos = torch.zeros(B, H, d, device=dev), torch.full((B, H), PAD_POS, dtype=torch.long, device=dev)
        tail = torch.zeros(B, bs, d, device=dev)
        for i in range(B):
            n, m = int(start[i]), int(lens[i])
            hist_z[i, H - n:], hist_pos[i, H - n:] = mu[i, :n], torch.arange(n, device=dev)
            tail[i, :m - n] = mu[i, n:m]
        keep = torch.arange(bs, device=dev)[None, :] < (lens - start)[:, None]  # (B, bs)
        return hist_z, hist_pos, tail, keep, start

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens=64, steps=16, cfg_scale=7.0, temperature=0.0, top_k=0, top_p=1.0,
                 seed=0, stop_at_eot=True, on_block=None, use_cache=True, trace=None, shift=1.0, first_block="clean",
                 window=None, compile=False):
        """New token ids for each prompt of a batch (lists of ints, any lengths), ending before the
        first <|endoftext|> (stop_at_eot=False: always max_new_tokens). steps: Euler steps per block;
        cfg_scale: guidance w (1 = off); shift > 1: more steps at high noise (flow.euler); temperature 0
        decodes greedily, else top-k / top-p sampling. first_block: how the prompt's tail enters the first
        block (parse_first_block; "clean" is the paper's clean-condition repaint).
        window: the most tokens any position sees (the training seq_len; None = all). Past it the
        oldest whole blocks leave the history, so generation runs on past the training context: the DiT
        sees the last window / bs - 1 blocks before its own, the decoder (and the prompt's encoder)
        the tokens within that span.
        Each sample draws its noise from its own seed (prompt, repeat index), so its output does not
        depend on the rest of the batch. on_block(i, ids) streams sample i after every block.
        use_cache=False recomputes the history at every step (the reference the caches must match);
        trace, a list, receives every block's (latents, logits).
        compile=True runs the Euler steps through layers.compiled_step(dit): one graph for every step
        of every block (and one for a first block that differs: prompt positions pinned, or no history),
        its attention over a fixed number of cache slots, the window's (flow.sample_block's keys). A
        graph is specialised to the batch size, the steps, guidance on or off and that number: a run
        with new ones compiles anew, whatever its length (without a window: per power of 2)."""
        tok, bs, B = self.tok, self.block_size, len(prompts)
        dev = next(self.parameters()).device
        gens = sample_generators(prompts, seed, dev)
        mode, reps, frac = parse_first_block(first_block)
        wb = None if window is None else window // bs - 1  # history blocks the DiT sees
        if wb is not None and wb < 1:
            raise ValueError(f"window {window} leaves no history: it must span at least 2 blocks of {bs} tokens")
        dec_window = None if wb is None else wb * bs + 1  # the decoder: a block's first token sees wb blocks
        if mode.endswith("_pad"):  # whole prompt blocks: <|endoftext|> on the prompt's left or right
            pads = [[tok.eot] * (-len(p) % bs) for p in prompts]
            prompts = [q + p if mode == "left_pad" else p + q for p, q in zip(prompts, pads)]
        hist_z, hist_pos, tail, keep, start = self.prompt_layout(prompts, window)
        repaint = None
        if mode == "repaint":  # its noise from streams of its own, so every later block draws as with "clean"
            r_gens = sample_generators(prompts, -1 - seed, dev)
            repaint = (reps, frac, lambda like: torch.stack([torch.randn(like.shape[1:], generator=g, device=dev)
                                                             for g in r_gens]))
        zero_t, H = torch.zeros(1, device=dev), hist_pos.shape[1]  # prefill and commit: every token at t = 0
        keys = None  # compiled: the number of cache slots every step attends to
        mod = step_conditions(self.dit, steps, shift, dev)  # the step times' modulations, for every block

        def slide(k_pos):  # past the window the oldest blocks leave both caches; k_pos: the cached positions
            n = 0 if wb is None else max(0, k_pos.shape[1] - wb * bs)
            if n:
                dit_cache.evict(n), dec_cache.evict(n)
            return k_pos[:, n:]

        if use_cache:  # KV caches for the whole run, allocated once; prefilled with the prompt's full blocks
            need = H + -(-(bs + max_new_tokens) // bs) * bs  # the prompt's full blocks and the generated ones
            size = need if wb is None else min(need, max(H, wb * bs) + bs)
            if compile:  # the steps attend to `keys` slots: a number that runs of any length share
                keys = step_slots(need, None if wb is None else wb * bs + bs)
                size = max(size, keys)
            rows = 2 if cfg_scale != 1 else 1  # guided: [cond | uncond]
            dit_cache = self.dit.new_cache(rows * B, size, dev, static=compile)
            dec_cache = self.vae.decoder.new_cache(B, size, dev)
            if H:
                blk, clean = hist_pos // bs, torch.zeros_like(hist_pos, dtype=torch.bool)
                self.dit(hist_z, zero_t, torch.zeros_like(hist_pos), hist_pos, block_mask(blk, clean, blk, clean, window=wb),
                         dit_cache.span(0, H))
                self.vae.decode_hidden(hist_z, hist_pos, dec_cache, hist_pos[:, :0], dec_window)
                hist_pos = slide(hist_pos)  # a prompt longer than the window keeps its last blocks
        offs = torch.arange(bs, device=dev)
        out, done = [[] for _ in range(B)], [max_new_tokens <= 0] * B
        pinned = any(len(p) % bs for p in prompts)  # does the block hold prompt positions? the first one may
        step_dit = compiled_step(self.dit, dev.type == "cuda") if keys else self.dit
        while not all(done):
            pos = start[:, None] + offs  # (B, bs)
            noise = torch.stack([torch.randn(bs, tail.shape[-1], generator=g, device=dev) for g in gens])
            z = torch.where(keep[..., None], tail, noise) if pinned else noise  # (B, bs, d) at t = 1, the tail clean
            history = dict(cache=dit_cache) if use_cache else dict(hist_z=hist_z)
            z = sample_block(step_dit, z, pos, keep if pinned else None, hist_pos, steps=steps, cfg_scale=cfg_scale,
                             shift=shift, repaint=repaint, window=wb, mod=mod, keys=keys, **history)
            if pinned:  # the prompt's own latents stand (partial repaint moved them)
                z = torch.where(keep[..., None], tail, z)
            if use_cache:
                logits = self.vae.decode(z, pos, dec_cache, hist_pos, dec_window)  # (B, bs, V)
            else:
                logits = self.vae.decode(torch.cat([hist_z, z], 1), torch.cat([hist_pos, pos], 1), window=dec_window)
                logits = logits[:, -bs:]
            if trace is not None:
                trace.append((z.clone(), logits.clone()))
            ids = pick_tokens(logits, temperature, top_k, top_p, gens, tok)  # (B, bs)
            for i, (new, pinned) in enumerate(zip(ids.tolist(), keep.tolist())):  # the one wait per block
                new = [t for t, p in zip(new, pinned) if not p]  # prompt tokens stand
                done[i] = done[i] or append_tokens(out[i], new, max_new_tokens, tok.eot if stop_at_eot else None)
                if on_block is not None:
                    on_block(i, out[i])
            if all(done):
                break
            # commit: the finished block joins the history as clean latents (t = 0), in the slots it used
            k_pos = torch.cat([hist_pos, pos], 1)
            if use_cache:
                clean = torch.zeros_like(k_pos, dtype=torch.bool)
                mask = block_mask(pos // bs, clean[:, -bs:], k_pos // bs, clean, window=wb)
                self.dit(z, zero_t, torch.zeros_like(pos), pos, mask, dit_cache.span(hist_pos.shape[1], k_pos.shape[1]))
                k_pos = slide(k_pos)
            else:  # the cache-free reference keeps every latent and applies the window in its masks
                hist_z = torch.cat([hist_z, z], 1)
            hist_pos, start, keep = k_pos, start + bs, torch.zeros_like(keep)
            repaint, pinned = None, False  # only the first block holds prompt tokens
        return out

    # ------------------------------------------------------------------------- likelihood

    @torch.no_grad()
    def log_weights(self, x, samples=1, ode_steps=32):
        """Importance log-weights w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x), z_k ~ q(z|x): (K, B),
        with each term per sequence (averaged over k) for the report. mean_k w is the ELBO, logmeanexp_k
        w the IWAE bound (§3.1.1, App. A.2-A.5); log p(z) is the CNF density of the prior (flow.prior_logp)."""
        B, L = x.shape
        mu, logvar = self.vae.encode(x)
        ws, parts = [], {"log_px": 0.0, "log_pz": 0.0, "log_q": 0.0}
        for _ in range(samples):
            z = self.vae.sample(mu, logvar)
            logits = self.vae.decode(z)
            log_px = -F.cross_entropy(logits.flatten(0, 1).float(), x.flatten(), reduction="none").view(B, L).sum(1)
            log_q = (-0.5 * ((z - mu).pow(2) / logvar.exp() + logvar + math.log(2 * math.pi))).flatten(1).sum(1)
            log_pz = prior_logp(self.dit, z, ode_steps)
            ws.append(log_px + log_pz - log_q)
            for k, v in (("log_px", log_px), ("log_pz", log_pz), ("log_q", log_q)):
                parts[k] = parts[k] + v / samples
        return torch.stack(ws), parts

    @torch.no_grad()
    def score(self, x, ode_steps=32):
        """log p(x) per sequence (B,), estimated by a one-sample ELBO (a lower bound in expectation)."""
        return self.log_weights(x, 1, ode_steps)[0][0]

