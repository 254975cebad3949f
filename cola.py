"""
Cola DLM as one model object: the text VAE (vae.py), the block-causal DiT prior (dit.py, flow.py)
and, in stage 2, a frozen copy of the stage-1 encoder. One class carries the training loss of both
stages, generation and the likelihood bound, as ar.py's ARLM does for the AR baseline, so train.py,
sample.py and eval.py talk to either through the same calls:

    model, ckpt = config.load_model("out/ckpt.pt")
    loss, stats = model(x)                                  # the stage's training loss on tokens x (B, L)
    new_ids = model.generate(prompts, max_new_tokens=64)    # lists of token ids in, lists out
    logp = model.score(x)                                   # log p(x) per sequence (here: the ELBO)

Generation (arXiv 2605.06548 §3.2.3, App. B.1): encode the prompt (posterior mean); its full blocks
prefill the KV caches (History); then block after block: Gaussian noise -> Euler steps with
classifier-free guidance, the prompt's tail inside the first block pinned to its clean latents
(clean-condition repaint, §5.2; flow.sample_block) -> decode the block with the cached causal decoder ->
commit its latents to the history at t = 0. The first block's other modes, the baselines of the paper's
Table 5, are partial repaint and padding the prompt to whole blocks (parse_first_block).
"""
import copy
import itertools
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import released
from data.tokenizer import get_tokenizer
from dit import DiT, DiTConfig, block_mask
from flow import FlowConfig, fm_by_t, fm_loss, prior_logp, sample_block, time_grid
from layers import (PAD_POS, Sampling, append_tokens, attention_dtype, noise_generator, parse_first_block, pick_tokens,
                    sample_generators)
from vae import TextVAE, VAEConfig, gaussian_kl

def pad_prompts(prompts, mode, eot, bs):
    """The padding modes: <|endoftext|> on the prompt's left ("left_pad") or right ("right_pad") up to a
    whole number of blocks, so that no block is shared by prompt and continuation."""
    pads = [[eot] * (-len(p) % bs) for p in prompts]
    return [q + p if mode == "left_pad" else p + q for p, q in zip(prompts, pads)]


def repaint_noise(prompts, seed, device):
    """Partial repaint's noise: streams of its own per sample, so every later block draws as with "clean"."""
    gens = sample_generators(prompts, -1 - seed, device)
    return lambda like: torch.stack([torch.randn(like.shape[1:], generator=g, device=device) for g in gens])


class Cola(nn.Module):
    """VAE + DiT (+ frozen reference encoder) in one module, so one optimizer and one DDP wrapper cover
    stage 2. Stage 1 is the same class with dit = None. The stage-2 loss weights and the VAE's learning
    rate ratio are the trainer's options (config.TrainConfig), passed in by name."""

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

    @classmethod
    def from_pretrained(cls, path):
        """The released checkpoint in directory path (cola_vae/, cola_dit/, tokenizer.json; released.py)."""
        vae_cfg, dit_cfg = released.read_configs(path)
        vae, dit = TextVAE(vae_cfg), DiT(dit_cfg)
        released.load_weights(vae, os.path.join(path, "cola_vae"))
        released.load_weights(dit, os.path.join(path, "cola_dit"))
        return cls(vae, dit)

    # ------------------------------------------------------------------------- what every model offers

    @property
    def tok(self):
        return get_tokenizer(self.vae.cfg.tokenizer)

    @property
    def block_size(self):
        """Tokens produced per sampler block: the DiT's block, times the latents in each of its tokens."""
        return self.dit.cfg.block_size * self.dit.cfg.patch_size

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
        p = self.dit.cfg.patch_size
        dit_tok = self.dit.flops(seq_len / p / 2) / p  # a DiT token, attending to ~L / 2p keys, per text token
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
        out["fm"], _ = fm_loss(self.dit, self.dit.patchify(z.detach()), self.flow_cfg,
                               z_src=None if src is None else self.dit.patchify(src))
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
                fm, st = fm_loss(self.dit, self.dit.patchify(self.vae.sample(mu, logvar)), self.flow_cfg)
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
        """Lay a batch of prompts out for the sampler. Each prompt, padded with <|pad|> to whole blocks as
        the released inference encodes it (the pads matter to a block-causal or bidirectional encoder), is
        encoded; its complete blocks become history, left-padded to a common length H (padding at PAD_POS,
        which no real query sees); the rest, its tail, is pinned inside the first generated block. Returns
        hist_z (B, H, d), hist_pos (B, H), tail (B, bs, d) with keep (B, bs) marking the pinned positions,
        and start (B,), the position of the first generated block. window: the encoder's, for prompts
        longer than the context."""
        tok, bs, B = self.tok, self.block_size, len(prompts)
        dev = next(self.parameters()).device
        lens = torch.tensor([len(p) for p in prompts], device=dev)
        start = lens // bs * bs  # (B,) first position of the first generated block
        padded = -(-lens // bs) * bs  # (B,) each prompt and its <|pad|>s
        H = int(start.max()) if B else 0
        x = torch.full((B, max(1, int(padded.max()) if B else 1)), tok.pad, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            x[i, :len(p)] = torch.tensor(p, dtype=torch.long, device=dev)
        pos = torch.arange(x.shape[1], device=dev).expand(B, -1)
        mu, _ = self.vae.encode(x, window, torch.where(pos < padded[:, None], pos, PAD_POS))  # (B, W, d)
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
    def generate(self, prompts, max_new_tokens=64, window=None, on_block=None, use_cache=True, compile=False,
                 **sampler):
        """New token ids for each prompt of a batch (lists of ints, any lengths), ending before the first
        <|endoftext|> (or <|im_end|>). sampler: layers.Sampling's options by name (steps, cfg_scale, shift,
        first_block, temperature, top_k, top_p, repetition_penalty, seed, seed_ids, stop_at_eot). Block after
        block (arXiv 2605.06548 §3.2.3): noise -> guided Euler steps, the prompt's tail pinned
        (flow.sample_block) -> decode -> commit.
        window: the most tokens any position sees (the training seq_len; None = all): past it the oldest
        whole blocks leave the history, so generation runs on past the training context.
        on_block(i, ids) streams sample i after every block. use_cache=False recomputes the history at
        every step (the reference the caches must match). compile: the DiT's forward through
        torch.compile; its shapes are the same at every step of every block (History), so it compiles
        once per run's batch size, steps and guidance (and once more for a first block that differs:
        prompt positions pinned, or no history and so unguided)."""
        s, tok, bs, B = Sampling(**sampler), self.tok, self.block_size, len(prompts)
        dev = next(self.parameters()).device
        gens = sample_generators(prompts, s.seed, dev)  # each sample's noise: independent of the batch
        if s.seed_ids is not None and len(s.seed_ids) != B:
            raise ValueError(f"seed_ids: one per prompt ({B}), got {len(s.seed_ids)}")
        mode, reps, frac = parse_first_block(s.first_block)
        if mode.endswith("_pad"):
            prompts = pad_prompts(prompts, mode, tok.eot, bs)
        p = self.dit.cfg.patch_size
        if p > 1:  # a DiT token holds p latents, all clean or all generated: prompts start with <|endoftext|>s
            prompts = pad_prompts(prompts, "left_pad", tok.eot, p)
        hist_z, hist_pos, tail, keep, start = self.prompt_layout(prompts, window)
        keep = keep if any(len(p) % bs for p in prompts) else None  # a prompt's tail in the first block?
        step = torch.compile(self.dit, dynamic=False) if compile else self.dit
        hist = History(self, step, B, hist_pos.shape[1] + bs + max_new_tokens, s, window, use_cache)
        hist.commit(hist_z, hist_pos, decoder=True)  # the prompt's full blocks
        repaint = (reps, frac, repaint_noise(prompts, s.seed, dev)) if mode == "repaint" else None
        out, done = [[] for _ in range(B)], [max_new_tokens <= 0] * B
        seen = torch.zeros(B, 0, dtype=torch.long, device=dev)  # every id decoded so far: the repetition penalty's
        stop = tok.stop if s.stop_at_eot else ()
        for block in itertools.count():
            if all(done):
                break
            pos = start[:, None] + torch.arange(bs, device=dev)  # (B, bs)
            draw = gens if s.seed_ids is None else [noise_generator(s.seed, i, block, dev) for i in s.seed_ids]
            noise = torch.stack([torch.randn(bs, tail.shape[-1], generator=g, device=dev) for g in draw])
            z = noise if keep is None else torch.where(keep[..., None], tail, noise)  # (B, bs, d), the tail clean
            guided = s.cfg_scale != 1 and hist.n > 0  # with no history at all, cond == uncond
            z = self.dit.unpatchify(sample_block(hist.dit_net(pos, guided), self.dit.patchify(z), keep if keep is None else
                                                 keep[:, ::p], guided, s, repaint, self.dit.cfg.self_cond))
            if keep is not None:  # the prompt's own latents stand (partial repaint moved them)
                z = torch.where(keep[..., None], tail, z)
            ids = pick_tokens(hist.decode(z, pos), s, gens, tok, seen)  # (B, bs)
            seen = torch.cat([seen, ids], 1)
            for i, new in enumerate(ids.tolist()):  # the one wait per block
                new = new if keep is None else [t for t, p in zip(new, keep[i].tolist()) if not p]  # prompt tokens stand
                done[i] = done[i] or append_tokens(out[i], new, max_new_tokens, stop)
                if on_block is not None:
                    on_block(i, out[i])
            if not all(done):
                hist.commit(z, pos)  # the finished block joins the history as clean latents (t = 0)
                start, keep, repaint = start + bs, None, None  # only the first block holds prompt tokens
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
            log_pz = prior_logp(self.dit, self.dit.patchify(z), ode_steps)
            ws.append(log_px + log_pz - log_q)
            for k, v in (("log_px", log_px), ("log_pz", log_pz), ("log_q", log_q)):
                parts[k] = parts[k] + v / samples
        return torch.stack(ws), parts

    @torch.no_grad()
    def score(self, x, ode_steps=32):
        """log p(x) per sequence (B,), estimated by a one-sample ELBO (a lower bound in expectation)."""
        return self.log_weights(x, 1, ode_steps)[0][0]



class History:
    """What a generation has behind it, as the DiT and the decoder see it: the clean latents of the prompt
    and of every committed block, in KV caches of a fixed number of slots (layers.KVCache: written in
    place, attended through masks built from the positions of the slots' tokens), n of them filled. Past
    the window the oldest blocks leave both caches. With guidance the DiT's cache has 2B rows, [cond |
    uncond]: the history lives in the first B, the unconditional rows see their block alone. use_cache=False keeps the
    latents instead and rebuilds the caches from them at every step: the reference the caches must match."""

    def __init__(self, model, step, B, need, s, window, use_cache):
        self.model, self.step, self.B, self.bs, self.use_cache = model, step, B, model.block_size, use_cache
        self.p = model.dit.cfg.patch_size  # latents per DiT token: the DiT's cache has a slot per p of the decoder's
        self.wb = None if window is None else window // self.bs - 1  # history blocks the DiT sees
        if self.wb is not None and self.wb < 1:
            raise ValueError(f"window {window} leaves no history: it must span at least 2 blocks of {self.bs} tokens")
        self.dec_window = None if self.wb is None else self.wb * self.bs + 1  # a block's first token sees wb blocks
        self.rows = 2 if s.cfg_scale != 1 else 1
        ts, _ = time_grid(s.steps, s.shift)  # the DiT's time table: entry 0 for t = 0, i + 1 for step i's t
        self.mod = model.dit.condition(torch.tensor([0.0] + ts[:-1], device=next(model.parameters()).device))
        self.latents = []  # use_cache=False: every committed (z, pos)
        self.reset(-(-need // self.bs) * self.bs if self.wb is None else self.wb * self.bs + self.bs)

    def reset(self, size):
        dev = self.mod.device
        self.dit_cache = self.model.dit.new_cache(self.rows * self.B, size // self.p, dev)
        self.dec_cache = self.model.vae.new_cache(self.B, size, dev)
        self.n = 0  # slots filled

    def commit(self, z, pos, decoder=False):
        """Clean latents z (B, L, d) at positions pos (B, L) join the history at t = 0, in slots n..n+L-1
        of the DiT's cache and, with decoder, of the decoder's (decode wrote a generated block's there)."""
        if not self.use_cache:
            self.latents.append((z, pos))
            self.n += pos.shape[1]
            return
        self.write(z, pos, decoder)
        self.dit_cache.pos[self.B:] = PAD_POS  # the unconditional rows keep no history
        old = 0 if self.wb is None else self.n - self.wb * self.bs
        if old > 0:  # past the window the oldest blocks leave
            self.dit_cache.evict(old // self.p), self.dec_cache.evict(old)
            self.n -= old

    def write(self, z, pos, decoder):
        n, L, bs, p = self.n, pos.shape[1], self.bs, self.p
        if n + L > self.dec_cache.pos.shape[1]:  # a prompt longer than the window: room for all of it (commit evicts)
            self.reset(n + L + bs)
        tokens, t_pos = self.model.dit.patchify(z), self.model.dit.token_pos(pos)
        cache = self.dit_cache.at(n // p, t_pos)
        k_pos = cache.pos[:self.B]  # (B, size): the history's positions, this call's included
        clean = torch.zeros_like(k_pos, dtype=torch.bool)
        mask = block_mask(t_pos // (bs // p), clean[:, :L // p], k_pos // (bs // p), clean, window=self.wb)
        self.model.dit(tokens, torch.zeros(1, device=z.device), torch.zeros_like(t_pos), t_pos, mask, cache)
        if decoder:
            self.model.vae.decode_hidden(z, pos, self.dec_cache.at(n, pos), self.dec_window)
        self.n += L

    def rebuild(self):
        """use_cache=False: every latent so far computed again, into new caches (the window in the masks)."""
        if self.latents:
            z, pos = (torch.cat(x, 1) for x in zip(*self.latents))
            self.reset(pos.shape[1] + self.bs)
            self.write(z, pos, decoder=True)

    def dit_net(self, pos, guided):
        """The DiT as flow.sample_block calls it for the block at positions pos (B, bs): its queries at pos
        (and guided, an unconditional copy at positions 0..bs-1, where a first block sits), its keys every
        slot, the block's own written to slots n..n+bs-1 at every step."""
        if not self.use_cache:
            self.rebuild()
        n, bs, B = self.n // self.p, self.bs // self.p, self.B  # in DiT tokens
        pos = self.model.dit.token_pos(pos)  # (B, bs)
        q_pos = torch.cat([pos, torch.arange(bs, device=pos.device).expand(B, bs)]) if guided else pos  # (rB, bs)
        k_pos = self.dit_cache.at(n, q_pos).pos[:len(q_pos)]  # (rB, S); the unconditional rows: their block alone
        slot = torch.arange(k_pos.shape[1], device=pos.device)
        noisy = ((slot >= n) & (slot < n + bs)).expand_as(k_pos)  # (rB, S)
        mask = block_mask(q_pos // bs, torch.ones_like(q_pos, dtype=torch.bool), k_pos // bs, noisy, window=self.wb)
        # additive, once for every step (what SDPA would make of a boolean mask at every call)
        mask = torch.zeros(mask.shape, device=pos.device, dtype=attention_dtype(pos.device)).masked_fill_(~mask, float("-inf"))
        rope, fresh = self.model.dit.rope(q_pos), True

        def net(z, steps, sc):  # the step's adaLN modulations (mod) and rotary tables (rope) come computed
            nonlocal fresh
            if not (self.use_cache or fresh):  # the reference: the history computed again at every step
                self.rebuild()
            fresh = False
            return self.step(z, None, steps, q_pos, mask, self.dit_cache.at(n, q_pos), sc=sc, mod=self.mod, rope=rope)
        return net

    def decode(self, z, pos):
        """Logits (B, bs, V) of the finished block z at positions pos, written to the decoder's cache."""
        if not self.use_cache:
            self.rebuild()
        return self.model.vae.decode(z, pos, self.dec_cache.at(self.n, pos), self.dec_window)
