"""
Text VAE of Cola DLM: tokens x (B, L) <-> continuous latents z (B, L, d), one latent per token.

  encoder q(z|x):  token embedding -> transformer -> mean (non-affine LayerNorm: unit scale) and
                   log-variance of a diagonal Gaussian per position
  decoder p(x|z):  Linear(d -> width) -> transformer -> affine LayerNorm -> logits

The layers are those of the released checkpoint (github ByteDance-Seed/Cola-DLM), with its parameter
names, so its weights load as they are (released.py): post-norm blocks (x = LN(x) + attn(x), then
x + LN(mlp(x))) with biases, a LayerNorm over the full width of q and of k, RoPE (theta 500000), a
SwiGLU MLP, and an untied output head with a bias. Attention is block-causal over block_size tokens in
both encoder and decoder: block_size 1, strictly causal, is what the paper describes and what models
trained here use; the released configuration says 4 (and block_causal false means bidirectional). With
causal attention latent i never sees tokens after i, so a prompt's latents are the same whatever
follows; generation decodes block by block with a KV cache (decode(..., cache=KVCache)).
The prior sees the latents as (mean - shifting_factor) * scaling_factor (1 and 0 here; the released
config.json sets them), and so does the decoder, as the released inference feeds it.
Stage-1 loss (arXiv 2605.06548 §3.2.1, eq. 3.16):
    CE(x, dec(z)) + beta * KL(q || N(0, I)) + lambda_mask * L_mask,   z ~ q(z|x)
where L_mask is the BERT-style loss: re-encode a copy of x with a fraction mask_ratio of tokens replaced
by <|mask|>, decode, and score CE against the original tokens at the
masked positions. In stage 2 (paper §3.2.2, eqs. 3.17-3.18) the KL term becomes the negative entropy
E_q[log q]: forward(x, joint=True).

Self-check (CPU, seconds): python vae.py
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.tokenizer import get_tokenizer
from layers import KVCache, apply_rope, attend, causal_mask, init_weights, rope_angles, transformer_flops


@dataclass
class VAEConfig:
    tokenizer: str = "bytes"        # "bytes" (tiny, CPU), "gpt2", or a tokenizer.json; fixes vocab and special ids
    n_enc_layer: int = 2            # encoder transformer layers
    n_dec_layer: int = 2            # decoder transformer layers
    width: int = 256                # model width of both
    n_head: int = 4
    ffn_dim: int = 1024             # SwiGLU: width -> ffn_dim, halved by the gate, -> width
    latent_dim: int = 16            # d: channels of the latent per token
    block_causal: bool = True       # attention block-causal over block_size tokens (False: bidirectional)
    block_size: int = 1             # 1: causal (the paper); the released checkpoint's config says 4
    rope_theta: float = 500000.0
    norm_eps: float = 1e-6
    scaling_factor: float = 1.0     # latents as the prior sees them: (mean - shifting_factor) * scaling_factor
    shifting_factor: float = 0.0
    logvar_min: float = -10.0       # clamp of the posterior log-variance
    logvar_max: float = 2.0
    beta: float = 1e-4              # weight of KL(q || N(0,I)) per token (stage 1) / of E_q[log q] (stage 2)
    mask_ratio: float = 0.15        # fraction of encoder inputs replaced by <|mask|> for L_mask
    lambda_mask: float = 1.0        # weight of L_mask


class VAEBlock(nn.Module):
    """Post-norm transformer block: x = LN(x) + attn(x); x = x + LN(SwiGLU(x))."""

    def __init__(self, cfg):
        super().__init__()
        W, self.n_head = cfg.width, cfg.n_head
        self.qkv_proj = nn.Linear(W, 3 * W, bias=False)
        self.q_norm, self.k_norm = nn.LayerNorm(W, eps=cfg.norm_eps), nn.LayerNorm(W, eps=cfg.norm_eps)
        self.attn_out_proj = nn.Linear(W, W)
        self.norm_attn = nn.LayerNorm(W, eps=cfg.norm_eps)
        self.ffn_proj = nn.Linear(W, cfg.ffn_dim)
        self.ffn_out = nn.Linear(cfg.ffn_dim // 2, W)
        self.norm_ffn = nn.LayerNorm(W, eps=cfg.norm_eps)

    def forward(self, x, rope, mask, cache=None, layer=0):
        B, L, W = x.shape
        q, k, v = self.qkv_proj(x).split(W, -1)  # 3 x (B, L, W)
        q, k = self.q_norm(q), self.k_norm(k)  # over the full width, before the split into heads
        q, k, v = (t.unflatten(-1, (self.n_head, -1)) for t in (q, k, v))  # (B, L, H, hd)
        q, k = apply_rope(q.float(), rope), apply_rope(k.float(), rope)
        x = self.norm_attn(x) + self.attn_out_proj(attend(q, k, v, mask, cache, layer))
        a, gate = self.ffn_proj(x).chunk(2, -1)  # 2 x (B, L, ffn_dim / 2)
        return x + self.norm_ffn(self.ffn_out(F.silu(gate) * a))


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
        self.cfg, W, d = cfg, cfg.width, cfg.latent_dim
        tok = get_tokenizer(cfg.tokenizer)
        V, self.mask_id = tok.vocab_size, tok.mask  # a tokenizer.json's <|mask|>: V, the embedding's extra row
        self.encoder = nn.ModuleDict(dict(
            wte=nn.Embedding(V + 1, W),  # one row more than the head, as released
            patch_embedder=nn.Conv1d(W, W, 1),  # one token per latent: a linear map
            blocks=nn.ModuleList(VAEBlock(cfg) for _ in range(cfg.n_enc_layer)),
            final_layer=nn.Linear(W, 2 * d)))  # -> mean, log-variance
        self.decoder = nn.ModuleDict(dict(
            in_layer=nn.Linear(d, W),
            blocks=nn.ModuleList(VAEBlock(cfg) for _ in range(cfg.n_dec_layer)),
            unpatch_layer=nn.Linear(W, W),
            final_norm=nn.LayerNorm(W, eps=cfg.norm_eps),
            final_layer=nn.Linear(W, V)))
        init_weights(self, max(cfg.n_enc_layer, cfg.n_dec_layer), residual=("attn_out_proj.weight", "ffn_out.weight"))
        # start with small posterior variance (logSNR ~ 4.6) so reconstruction is learnable from step 0
        nn.init.zeros_(self.encoder.final_layer.weight[d:])
        nn.init.constant_(self.encoder.final_layer.bias[d:], -4.6)

    @staticmethod
    def positions(B, L, device, start=0):
        return torch.arange(start, start + L, device=device).expand(B, L)  # (B, L)

    def trunk(self, blocks, x, pos, mask, cache=None):
        """The encoder's or the decoder's blocks over x (B, L, W) at positions pos (B, L)."""
        x = x.float()  # the residual stream stays fp32 under autocast
        rope = rope_angles(pos, self.cfg.width // self.cfg.n_head, self.cfg.rope_theta)
        for i, block in enumerate(blocks):
            x = block(x, rope, mask, cache, i)
        return x

    def new_cache(self, batch, size, device):
        """A KVCache for the decoder."""
        c = self.cfg
        return KVCache(c.n_dec_layer, batch, c.n_head, c.width // c.n_head, size, device)

    def mask(self, pos_q, pos_k, window=None):
        """The attention mask of encoder and decoder: block-causal over block_size (window: the last
        `window` tokens), or bidirectional; keys at PAD_POS are never seen."""
        c = self.cfg
        return causal_mask(pos_q, pos_k, c.block_size if c.block_causal else 0, window and -(-window // c.block_size))

    def encode(self, x, window=None, pos=None):
        """q(z|x): x (B, L) at positions pos (default 0..L-1; PAD_POS: batch padding, never attended) ->
        mu, logvar (B, L, d), in the prior's scale. Causal (block_size 1): position i depends on x[:, :i+1]
        only (with a window, on the last `window` tokens: prompts longer than the training context)."""
        B, L = x.shape
        pos = self.positions(B, L, x.device) if pos is None else pos
        e = self.encoder
        h = F.linear(e.wte(x), e.patch_embedder.weight[..., 0], e.patch_embedder.bias)  # (B, L, W)
        h = e.final_layer(self.trunk(e.blocks, h, pos, self.mask(pos, pos, window)))  # (B, L, 2d)
        # fp32 latents under autocast too: they are the flow's data and targets (eps - z), and the KL's input
        mean, logvar = h.float().chunk(2, -1)
        c = self.cfg
        mu = (F.layer_norm(mean, (c.latent_dim,), eps=c.norm_eps) - c.shifting_factor) * c.scaling_factor
        logvar = logvar.clamp(c.logvar_min, c.logvar_max) + 2 * math.log(c.scaling_factor)
        return mu, logvar

    @staticmethod
    def sample(mu, logvar):
        return mu + (0.5 * logvar).exp() * torch.randn_like(mu)

    def decode_hidden(self, z, pos=None, cache=None, window=None):
        """Decoder trunk: z (B, L, d) at positions pos (B, L) (default 0..L-1) -> final hidden (B, L, W).
        cache: a layers.KVCache whose slots hold earlier latents, this call's written to the slots named by
        cache.at(). window: each token sees only the last `window` tokens."""
        B, L, _ = z.shape
        pos = self.positions(B, L, z.device) if pos is None else pos
        k_pos = pos if cache is None else cache.pos[:B]  # every slot's position, PAD_POS (hidden) where empty
        d = self.decoder
        h = self.trunk(d.blocks, d.in_layer(z), pos, self.mask(pos, k_pos, window), cache)
        return d.final_norm(d.unpatch_layer(h))  # (B, L, W)

    def head(self, h):
        return self.decoder.final_layer(h)  # (..., W) -> (..., V)

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
        c, mlp = self.cfg, 1.5 * self.cfg.width * self.cfg.ffn_dim
        return dict(enc=transformer_flops(c.n_enc_layer, c.width, seq_len / 2, mlp) + 2 * c.width * (c.width + 2 * c.latent_dim),
                    dec=transformer_flops(c.n_dec_layer, c.width, seq_len / 2, mlp) + 2 * c.width * (c.latent_dim + c.width),
                    head=2 * c.width * self.decoder.final_layer.out_features)

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
    pos, cache = TextVAE.positions(2, 32, "cpu"), vae.new_cache(2, 32, "cpu")
    a = vae.decode(mu[:, :16], pos[:, :16], cache.at(0, pos[:, :16]))
    b = vae.decode(mu[:, 16:], pos[:, 16:], cache.at(16, pos[:, 16:]))
    assert torch.allclose(full, torch.cat([a, b], 1), atol=1e-5)
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    for step in range(150):
        loss = vae(x)[3]["loss"]
        opt.zero_grad(); loss.backward(); opt.step()
    print("after 150 steps on one batch:", vae.diagnostics(x))
    print("vae.py self-check OK")
