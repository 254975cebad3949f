"""
Autoregressive baseline: a nanoGPT-style causal transformer LM (pre-norm blocks with RoPE, RMSNorm,
QK-norm and SwiGLU; layers.py), trained by the same trainer on the same
data, so the two can be compared at matched parameters and compute (arXiv 2605.06548 §4.5, Fig. 10
compares Cola with AR). It offers the same calls as cola.Cola (forward, generate, score, diagnostics),
so sample.py and eval.py serve both.

    python train.py --model=ar --out_dir=out_ar # tiny AR, sized to the default Cola model's parameters
    python sample.py --ckpt=out_ar/ckpt.pt --prompt="Call me"
    python eval.py nll --ckpt=out_ar/ckpt.pt    # exact NLL (no bound)

Self-check (CPU, seconds): python ar.py
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.tokenizer import get_tokenizer
from layers import (PAD_POS, Sampling, Transformer, append_tokens, causal_mask, init_weights, pick_tokens,
                    sample_generators, transformer_flops)


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

    def logits(self, x, pos, window=None):
        """x (B, L) at positions pos (B, L) -> logits (B, L, V); window: each token sees the last `window`
        tokens (itself included)."""
        return self.network(x, pos, causal_mask(pos, pos, window=window))

    def network(self, x, pos, mask, cache=None):
        """The model itself: tokens x (B, L) -> logits (B, L, V) under an attention mask (B, 1, L, Lk)."""
        h = self.transformer(self.tok_emb(x), pos, mask, cache)
        return F.linear(h, self.tok_emb.weight)  # tied head

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
    def continuation_bits(self, prompt, cont, context):
        """(bits, UTF-8 bytes) of the text cont after the text prompt, within the first `context` tokens:
        how eval.py quality's judge scores generated text."""
        tok = self.tok
        p, c = tok.encode(prompt) or [tok.eot], tok.encode(cont)
        c = c[:max(0, context - len(p))]
        if not c:
            return 0.0, 0
        x = torch.tensor([p + c], device=self.tok_emb.weight.device)
        return -self.token_logprobs(x)[0, len(p) - 1:].sum().item() / math.log(2), len(tok.enc.decode_bytes(c))

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
    def generate(self, prompts, max_new_tokens=64, window=None, on_block=None, use_cache=True, compile=False,
                 **sampler):
        """New ids per prompt, token by token, for a batch of token-id prompts of any lengths (left-padded at
        PAD_POS, which the causal rule hides). It takes Cola.generate's arguments; of layers.Sampling's
        options those of Cola's ODE (steps, cfg_scale, shift, first_block) do not apply. window: the most
        tokens any position sees (None = all), past which the oldest leave the KV cache (layers.KVCache).
        use_cache=False recomputes every position at every token (the reference). compile: the network's
        forward through torch.compile; a new token's shapes are the same at every step."""
        s, tok, dev, B = Sampling(**sampler), self.tok, self.tok_emb.weight.device, len(prompts)
        gens = sample_generators(prompts, s.seed, dev)
        prompts = [p if len(p) else [tok.eot] for p in prompts]  # an empty prompt starts a new document
        W = max(len(p) for p in prompts) if B else 1
        x = torch.full((B, W), tok.pad, dtype=torch.long, device=dev)
        pos = torch.full((B, W), PAD_POS, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            x[i, W - len(p):] = torch.tensor(p, device=dev)
            pos[i, W - len(p):] = torch.arange(len(p), device=dev)
        net = torch.compile(self.network, dynamic=False) if compile else self.network
        if use_cache:  # the prompt, then one slot per new token, or the window's worth
            cache = self.transformer.new_cache(B, max(W, window or W + max_new_tokens), dev).at(0, pos)
            last = self.network(x, pos, causal_mask(pos, cache.pos, window=window), cache)[:, -1:]  # (B, 1, V)
        else:
            last = self.logits(x, pos, window)[:, -1:]
        n, nxt = W, pos[:, -1:] + 1  # slots filled, the next positions (B, 1)
        out, done = [[] for _ in range(B)], [max_new_tokens <= 0] * B
        seen = torch.zeros(B, 0, dtype=torch.long, device=dev)  # the ids generated so far (repetition penalty)
        stop = tok.stop if s.stop_at_eot else ()
        while not all(done):
            ids = pick_tokens(last, s, gens, tok, seen)  # (B, 1)
            seen = torch.cat([seen, ids], 1)
            for i, new in enumerate(ids.tolist()):
                done[i] = done[i] or append_tokens(out[i], new, max_new_tokens, stop)
                if on_block is not None:
                    on_block(i, out[i])
            if all(done):
                break
            if use_cache:
                if window is not None and n >= window:  # the window is full: the oldest tokens leave
                    cache.evict(n - window + 1)
                    n = window - 1
                cache.at(n, nxt)
                last = net(ids, nxt, causal_mask(nxt, cache.pos, window=window), cache)  # (B, 1, V)
                n += 1
            else:
                x, pos = torch.cat([x, ids], 1), torch.cat([pos, nxt], 1)
                last = self.logits(x, pos, window)[:, -1:]
            nxt = nxt + 1
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
