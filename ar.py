"""
Autoregressive baseline: a nanoGPT-style causal transformer LM built from the same blocks as the
Cola models (RoPE, RMSNorm, QK-norm, SwiGLU; layers.py), trained by the same trainer on the same
data, so the two can be compared at matched parameters and compute (arXiv 2605.06548 §4.5, Fig. 10
compares Cola with AR). It offers the same calls as cola.Cola (forward, generate, score, diagnostics),
so sample.py and eval.py serve both.

    python train.py --model=ar --out_dir=out_ar # tiny AR, sized to the default Cola model's parameters
    python sample.py --ckpt=out_ar/ckpt.pt --prompt="Call me"
    python eval.py nll --ckpt=out_ar/ckpt.pt    # exact NLL (no bound)

Self-check (CPU, seconds): python ar.py
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.tokenizer import get_tokenizer
from layers import (PAD_POS, Transformer, append_tokens, causal_mask, compiled_step, init_weights, pick_tokens,
                    sample_generators, step_slots, transformer_flops)


@dataclass
class ARConfig:
    tokenizer: str = "bytes"
    n_layer: int = 10   # 10 x 256 wide: ~8.1M params, within 15% of the default Cola VAE + DiT (8.4M)
    width: int = 256
    n_head: int = 4


class ARLM(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.cfg = cfg
        tok = get_tokenizer(cfg.tokenizer)
        self.tok_emb = nn.Embedding(tok.vocab_size, cfg.width)
        self.transformer = Transformer(cfg.n_layer, cfg.width, cfg.n_head)
        init_weights(self, cfg.n_layer)

    @classmethod
    def from_checkpoint(cls, ckpt):
        model = cls(ARConfig(**ckpt["config"]["ar"]))
        model.load_state_dict(ckpt["ar"])
        return model

    @property
    def tok(self):
        return get_tokenizer(self.cfg.tokenizer)

    block_size = 1  # tokens per sampler step
    can_generate = True

    def parts(self):
        """As Cola.parts(): what the checkpoint holds, with the learning-rate scale."""
        return {"ar": (self, 1.0)}

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def logits(self, x, pos, cache=None, past_pos=None, window=None, keys=None):
        """x (B, L) at positions pos (B, L) -> logits (B, L, V). cache: a layers.KVCache whose slots
        [0, Lp) hold earlier tokens at positions past_pos (B, Lp); window: each token sees the last
        `window` tokens (itself included). keys: through layers.compiled_step, attending to the cache's
        first `keys` slots (those after this call's at PAD_POS, which the causal rule hides)."""
        pos_k = pos
        if cache is not None:
            pos_k = torch.cat([past_pos, pos], 1)
            cache.span(past_pos.shape[1], pos_k.shape[1], keys)
            if keys is not None:
                pos_k = torch.cat([pos_k, pos_k.new_full((x.shape[0], keys - pos_k.shape[1]), PAD_POS)], 1)
        network = self.network if keys is None else compiled_step(self.network, x.device.type == "cuda")
        return network(x, pos, causal_mask(pos, pos_k, window=window), cache)

    def network(self, x, pos, mask, cache=None):
        """The model itself: tokens x (B, L) -> logits (B, L, V) under an attention mask (B, 1, L, Lk)."""
        h = self.transformer(self.tok_emb(x), pos, mask, cache)
        return F.linear(h, self.tok_emb.weight)  # tied head (vae.VAE.head)

    def forward(self, x):
        """Next-token CE on windows x (B, L): predict x[:, 1:] from x[:, :-1]."""
        pos = torch.arange(x.shape[1] - 1, device=x.device).expand(x.shape[0], -1)
        logits = self.logits(x[:, :-1], pos)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        return loss, dict(loss=loss.detach())

    @torch.no_grad()
    def token_logprobs(self, x):
        """log p(x[:, i] | x[:, :i]) for i = 1..L-1: (B, L-1)."""
        pos = torch.arange(x.shape[1] - 1, device=x.device).expand(x.shape[0], -1)
        logp = self.logits(x[:, :-1], pos).float().log_softmax(-1)
        return logp.gather(-1, x[:, 1:, None]).squeeze(-1)

    @torch.no_grad()
    def score(self, x, **_):
        """Exact log p(x[:, 1:] | x[:, 0]) per sequence (B,) (the first token is given)."""
        return self.token_logprobs(x).sum(1)

    @torch.no_grad()
    def diagnostics(self, x, batch_size):
        """Held-out next-token loss over windows x (N, L)."""
        batches = [x[i:i + batch_size] for i in range(0, len(x), batch_size)]
        return {"loss": sum(self(xb)[0].item() * len(xb) for xb in batches) / len(x)}

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, seed=0, stop_at_eot=True,
                 on_block=None, window=None, use_cache=True, compile=False, **sampler):
        """KV-cached sampling for a batch of token-id prompts of any lengths (left-padded at PAD_POS,
        which the causal rule hides): new ids per prompt, as Cola.generate. window: the most tokens any
        position sees (the training seq_len; None = all), past which the oldest leave the cache.
        use_cache=False recomputes every position at every token (the reference). compile=True runs
        each new token's forward as one compiled graph (layers.compiled_step; as Cola.generate).
        `sampler` takes the diffusion sampler's options (steps, cfg_scale, ...): they do not apply here."""
        tok, dev, B = self.tok, self.tok_emb.weight.device, len(prompts)
        gens = sample_generators(prompts, seed, dev)
        prompts = [p if len(p) else [tok.eot] for p in prompts]  # an empty prompt starts a new document
        width = max(len(p) for p in prompts) if B else 1
        x = torch.full((B, width), tok.pad, dtype=torch.long, device=dev)
        pos = torch.full((B, width), PAD_POS, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            x[i, width - len(p):] = torch.tensor(p, device=dev)
            pos[i, width - len(p):] = torch.arange(len(p), device=dev)
        cache = keys = None
        if use_cache:  # allocated once: the prompt and every new token, or the window's worth
            need = width + max_new_tokens
            size = need if window is None else min(need, max(width, window))
            if compile:  # each token attends to `keys` slots: a number that runs of any length share
                keys = step_slots(need, window)
                size = max(size, keys)
            cache = self.transformer.new_cache(B, size, dev, static=compile)
        last = self.logits(x, pos, cache, pos[:, :0], window)[:, -1:]  # (B, 1, V)
        if use_cache and window is not None and width >= window:  # a prompt longer than the window
            cache.evict(width - window + 1)
            pos = pos[:, width - window + 1:]
        nxt = pos[:, -1:] + 1  # (B, 1) next positions
        out, done = [[] for _ in range(B)], [max_new_tokens <= 0] * B
        while not all(done):
            ids = pick_tokens(last, temperature, top_k, top_p, gens, tok)  # (B, 1)
            for i, new in enumerate(ids.tolist()):
                done[i] = done[i] or append_tokens(out[i], new, max_new_tokens, tok.eot if stop_at_eot else None)
                if on_block is not None:
                    on_block(i, out[i])
            if all(done):
                break
            if use_cache:
                last = self.logits(ids, nxt, cache, pos, window, keys)  # (B, 1, V)
                pos, nxt = torch.cat([pos, nxt], 1), nxt + 1
                if window is not None and pos.shape[1] >= window:  # the window is full: the oldest token leaves
                    cache.evict(1)
                    pos = pos[:, 1:]
            else:
                x, pos, nxt = torch.cat([x, ids], 1), torch.cat([pos, nxt], 1), nxt + 1
                last = self.logits(x, pos, window=window)[:, -1:]
        return out

    def flops(self, seq_len, **_):
        """FLOPs per training token and per generated token (matmuls; backward = 2 x forward)."""
        fwd = transformer_flops(self.cfg.n_layer, self.cfg.width, seq_len / 2) + 2 * self.cfg.width * self.tok_emb.num_embeddings
        return dict(train=3 * fwd, sample=fwd)


if __name__ == "__main__":
    torch.manual_seed(0)
    model = ARLM(ARConfig(n_layer=2, width=64, n_head=2))
    x = torch.randint(0, 256, (2, 33))
    print("params", sum(p.numel() for p in model.parameters()), "loss", model(x)[0].item())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(100):
        loss = model(x)[0]
        opt.zero_grad(); loss.backward(); opt.step()
    print("after 100 steps on one batch:", loss.item())
    full = model.generate([x[0, :8].tolist()], 16, stop_at_eot=False)[0]  # greedy
    print("continuation of a training prefix:", full, "\nexpected:", x[0, 8:24].tolist())
    assert loss.item() < 0.5
    print("ar.py self-check OK")
