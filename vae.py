"""
Text VAE of Cola DLM: tokens x (B, L) <-> continuous latents z (B, L, d), one latent per token.

  encoder q(z|x):  token embedding -> causal transformer -> mean (non-affine LayerNorm: unit scale)
                   and log-variance of a diagonal Gaussian per position
  decoder p(x|z):  Linear(d -> width) -> causal transformer -> logits (head tied to the embedding)

Both are causal, so latent i never sees tokens after i: the prompt's latents are the same whatever
follows, and generation can decode block by block with a KV cache (decode(..., cache=KVCache)).
Stage-1 loss (arXiv 2605.06548 §3.2.1, eq. 3.16):
    CE(x, dec(z)) + beta * KL(q || N(0, I)) + lambda_mask * L_mask,   z ~ q(z|x)
where L_mask is the BERT-style loss: re-encode a copy of x with a fraction mask_ratio of tokens replaced
by <|mask|>, decode, and score CE against the original tokens at the masked positions. In stage 2
(paper §3.2.2, eqs. 3.17-3.18) the KL term becomes the negative entropy E_q[log q]: forward(x, joint=True).

Self-check (CPU, seconds): python vae.py
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.tokenizer import get_tokenizer
from layers import Transformer, causal_mask, init_weights, transformer_flops


@dataclass
class VAEConfig:
    tokenizer: str = "bytes"        # "bytes" (tiny, CPU) or "gpt2"; fixes vocab size and special ids
    n_enc_layer: int = 2            # encoder transformer layers
    n_dec_layer: int = 2            # decoder transformer layers
    width: int = 256                # model width of both
    n_head: int = 4
    latent_dim: int = 16            # d: channels of the latent per token
    dec_block_causal: bool = False  # decoder attention: causal (default) or block-causal over block_size
    block_size: int = 16            # only used when dec_block_causal
    logvar_min: float = -10.0       # clamp of the posterior log-variance
    logvar_max: float = 2.0
    beta: float = 1e-4              # weight of KL(q || N(0,I)) per token (stage 1) / of E_q[log q] (stage 2)
    mask_ratio: float = 0.15        # fraction of encoder inputs replaced by <|mask|> for L_mask
    lambda_mask: float = 1.0        # weight of L_mask


def gaussian_kl(mu, logvar, mu_ref=None, logvar_ref=None):
    """KL(N(mu, e^logvar) || N(mu_ref, e^logvar_ref)) summed over channels -> (...). Default ref: N(0, I)."""
    if mu_ref is None:
        return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)
    return 0.5 * (logvar_ref - logvar + (logvar.exp() + (mu - mu_ref).pow(2)) / logvar_ref.exp() - 1.0).sum(-1)


def neg_entropy(logvar):
    """E_q[log q(z|x)] of a diagonal Gaussian, summed over channels -> (...)."""
    return -0.5 * (math.log(2 * math.pi) + 1.0 + logvar).sum(-1)


class TextVAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        tok = get_tokenizer(cfg.tokenizer)
        self.mask_id = tok.mask
        self.tok_emb = nn.Embedding(tok.vocab_size, cfg.width)
        self.encoder = Transformer(cfg.n_enc_layer, cfg.width, cfg.n_head)
        self.mean_head = nn.Linear(cfg.width, cfg.latent_dim)
        self.logvar_head = nn.Linear(cfg.width, cfg.latent_dim)
        self.z_in = nn.Linear(cfg.latent_dim, cfg.width)
        self.decoder = Transformer(cfg.n_dec_layer, cfg.width, cfg.n_head)
        init_weights(self, max(cfg.n_enc_layer, cfg.n_dec_layer))
        # start with small posterior variance (logSNR ~ 4.6) so reconstruction is learnable from step 0
        nn.init.zeros_(self.logvar_head.weight)
        nn.init.constant_(self.logvar_head.bias, -4.6)

    @staticmethod
    def positions(B, L, device, start=0):
        return torch.arange(start, start + L, device=device).expand(B, L)  # (B, L)

    def encode(self, x, window=None):
        """q(z|x): x (B, L) -> mu, logvar (B, L, d). Causal: position i depends on x[:, :i+1] only (with
        a window, on the last `window` tokens: prompts longer than the training context)."""
        B, L = x.shape
        pos = self.positions(B, L, x.device)
        h = self.encoder(self.tok_emb(x), pos, causal_mask(pos, pos, window=window))  # (B, L, W)
        # fp32 latents under autocast too: they are the flow's data and targets (eps - z), and the KL's input
        mu = F.layer_norm(self.mean_head(h).float(), (self.cfg.latent_dim,))  # non-affine LN: unit-scale latents
        logvar = self.logvar_head(h).float().clamp(self.cfg.logvar_min, self.cfg.logvar_max)
        return mu, logvar

    @staticmethod
    def sample(mu, logvar):
        return mu + (0.5 * logvar).exp() * torch.randn_like(mu)

    def decode_hidden(self, z, pos=None, cache=None, window=None):
        """Decoder trunk: z (B, L, d) at positions pos (B, L) (default 0..L-1) -> final hidden (B, L, W).
        cache: a layers.KVCache whose slots hold earlier latents, this call's written to the slots named by
        cache.at(). window: each token sees only the last `window` tokens."""
        B, L, _ = z.shape
        if pos is None:
            pos = self.positions(B, L, z.device)
        bs = self.cfg.block_size if self.cfg.dec_block_causal else 1
        k_pos = pos if cache is None else cache.pos[:B]  # every slot's position, PAD_POS (hidden) where empty
        return self.decoder(self.z_in(z), pos, causal_mask(pos, k_pos, bs, window), cache)

    def head(self, h):
        # tied output head: (..., W) -> (..., V); F.linear on the weight itself, not a transposed view, so
        # that bf16 autocast casts it once per autocast region, not at every call
        return F.linear(h, self.tok_emb.weight)

    def decode(self, z, pos=None, cache=None, window=None):
        """p(x|z) logits (B, L, V); with a cache it decodes incrementally (decode_hidden)."""
        return self.head(self.decode_hidden(z, pos, cache, window))

    def mask_tokens(self, x):
        """x (B, L) -> (x with <|mask|> at k random positions of each row, those positions (B, k)).
        k = round(mask_ratio L), at least 1, is fixed, as in BERT's data pipeline (num_to_predict), not
        drawn per token: every shape is then static (no host sync, no graph break under torch.compile)."""
        B, L = x.shape
        k = max(1, round(self.cfg.mask_ratio * L)) if self.cfg.mask_ratio > 0 else 0
        idx = torch.rand(B, L, device=x.device).topk(k, -1).indices  # (B, k): a uniform random subset per row
        return x.scatter(1, idx, self.mask_id), idx

    def forward(self, x, joint=False):
        """All VAE loss terms for tokens x (B, L). Returns (posterior mean, logvar, sample, dict of scalars).

        joint=False (stage 1, paper §3.2.1, eq. 3.16):
            loss = CE + beta * KL(q(z|x) || N(0, I)) + lambda_mask * L_mask
        joint=True (the VAE part of the stage-2 joint loss, paper §3.2.2, eqs. 3.17-3.18):
            loss = CE + beta * E_q[log q(z|x)] + lambda_mask * L_mask
        The stage-2 KL to the frozen stage-1 encoder and the flow-matching term are added by the caller.
        """
        cfg = self.cfg
        mu, logvar = self.encode(x)
        z = self.sample(mu, logvar)
        h = self.decode_hidden(z)
        ce = F.cross_entropy(self.head(h).flatten(0, 1).float(), x.flatten())
        kl = gaussian_kl(mu.float(), logvar.float()).mean()  # nats per token
        negent = neg_entropy(logvar.float()).mean()
        out = dict(ce=ce, kl=kl, negent=negent)
        loss = ce + cfg.beta * (negent if joint else kl)
        if cfg.lambda_mask > 0 and cfg.mask_ratio > 0:
            xm, idx = self.mask_tokens(x)
            hm = self.decode_hidden(self.sample(*self.encode(xm)))  # (B, L, W)
            # score only masked positions: with a 50k vocab the head is the cost, so gather first
            hm = hm.gather(1, idx[..., None].expand(-1, -1, hm.shape[-1]))  # (B, k, W)
            out["mask_ce"] = F.cross_entropy(self.head(hm).flatten(0, 1).float(), x.gather(1, idx).flatten())
            loss = loss + cfg.lambda_mask * out["mask_ce"]
        out["loss"] = loss
        return mu, logvar, z, out

    def flops(self, seq_len):
        """Forward FLOPs per token: encoder (with heads), decoder trunk, output head."""
        c = self.cfg
        return dict(enc=transformer_flops(c.n_enc_layer, c.width, seq_len / 2) + 4 * c.width * c.latent_dim,
                    dec=transformer_flops(c.n_dec_layer, c.width, seq_len / 2) + 2 * c.latent_dim * c.width,
                    head=2 * c.width * self.tok_emb.num_embeddings)

    @torch.no_grad()
    def diagnostics(self, x, posterior=None):
        """Token accuracy from the posterior mean, masked-position accuracy, logSNR, latent stats.
        posterior: (mu, logvar) of x if the caller has already encoded it."""
        mu, logvar = self.encode(x) if posterior is None else posterior
        acc = (self.decode(mu).argmax(-1) == x).float().mean()
        xm, idx = self.mask_tokens(x)
        mu_m, _ = self.encode(xm)
        pred_m = self.decode(mu_m).argmax(-1)
        masked_acc = (pred_m.gather(1, idx) == x.gather(1, idx)).float().mean()  # nan without masking
        var = logvar.float().exp()
        return dict(
            token_acc=acc.item(),
            masked_acc=masked_acc.item(),
            logsnr=math.log(mu.float().pow(2).mean().item() / var.mean().item()),  # paper App. H.7, Table 3
            kl=gaussian_kl(mu.float(), logvar.float()).mean().item(),
            latent_mean=mu.float().mean().item(),
            latent_std=mu.float().std().item(),
            sigma=var.sqrt().mean().item(),
        )


if __name__ == "__main__":
    torch.manual_seed(0)
    cfg = VAEConfig(n_enc_layer=1, n_dec_layer=1, width=64, n_head=2)
    vae = TextVAE(cfg)
    x = torch.randint(0, 256, (2, 32))
    mu, logvar, z, out = vae(x)
    print("latents", tuple(mu.shape), "losses", {k: round(v.item(), 3) for k, v in out.items()})
    # causality: changing token 20 leaves latents and logits at positions < 20 unchanged
    x2 = x.clone(); x2[:, 20] = (x2[:, 20] + 1) % 256
    mu2, _ = vae.encode(x2)
    assert torch.allclose(mu[:, :20], mu2[:, :20], atol=1e-6) and not torch.allclose(mu[:, 20], mu2[:, 20])
    # cached decode == full decode
    full = vae.decode(mu)
    pos, cache = TextVAE.positions(2, 32, "cpu"), vae.decoder.new_cache(2, 32, "cpu")
    a = vae.decode(mu[:, :16], pos[:, :16], cache.at(0, pos[:, :16]))
    b = vae.decode(mu[:, 16:], pos[:, 16:], cache.at(16, pos[:, 16:]))
    assert torch.allclose(full, torch.cat([a, b], 1), atol=1e-5)
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    for step in range(150):
        loss = vae(x)[3]["loss"]
        opt.zero_grad(); loss.backward(); opt.step()
    print("after 150 steps on one batch:", vae.diagnostics(x))
    print("vae.py self-check OK")
