"""Text VAE: shapes, causality, KL/entropy maths, the mask loss, overfitting, cached decoding."""
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from layers import PAD_POS, causal_mask
from vae import TextVAE, VAEConfig, gaussian_kl, neg_entropy
from tests.helpers import perturb


def tiny_vae(**kw):
    torch.manual_seed(0)
    return TextVAE(VAEConfig(n_enc_layer=1, n_dec_layer=1, width=32, n_head=2, **kw))


def test_shapes_and_unit_scale_mean():
    vae = tiny_vae()
    x = torch.randint(0, 256, (3, 20))
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (3, 20, 16)
    assert torch.allclose(mu.pow(2).mean(-1), torch.ones(3, 20), atol=5e-3)  # non-affine LayerNorm (eps)
    logits = vae.decode(mu)
    assert logits.shape == (3, 20, vae.decoder.final_layer.out_features)
    _, _, z, out = vae(x)
    assert z.shape == mu.shape and set(out) >= {"ce", "kl", "negent", "mask_ce", "loss"}


@pytest.mark.parametrize("bs", [1, 4])
def test_causality(bs):
    """Block-causal encoder and decoder: changing token (latent) j changes nothing before j's block."""
    vae = tiny_vae(block_size=bs)
    perturb(vae)
    x = torch.randint(0, 256, (2, 24))
    j = 13
    first = j // bs * bs
    x2 = x.clone()
    x2[:, j] = (x2[:, j] + 7) % 256
    mu, _ = vae.encode(x)
    mu2, _ = vae.encode(x2)
    assert torch.equal(mu[:, :first], mu2[:, :first])
    assert not torch.allclose(mu[:, j], mu2[:, j]) and (bs == 1 or not torch.allclose(mu[:, first], mu2[:, first]))
    z2 = mu.clone()
    z2[:, j] += 1.0
    a, b = vae.decode(mu), vae.decode(z2)
    assert torch.equal(a[:, :first], b[:, :first])
    assert not torch.allclose(a[:, j], b[:, j])


def test_bidirectional_vae_sees_everything_but_padding():
    """block_causal=False (a released configuration): every token sees every other, except batch padding."""
    vae = tiny_vae(block_causal=False)
    perturb(vae)
    x = torch.randint(0, 256, (1, 12))
    x2 = x.clone()
    x2[:, 11] = (x2[:, 11] + 7) % 256
    assert not torch.allclose(vae.encode(x)[0][:, 0], vae.encode(x2)[0][:, 0])
    pos = torch.where(torch.arange(16) < 12, torch.arange(16), PAD_POS)[None]
    padded = torch.cat([x, torch.randint(0, 256, (1, 4))], 1)
    torch.testing.assert_close(vae.encode(padded, pos=pos)[0][:, :12], vae.encode(x)[0])


@pytest.mark.parametrize("bs", [1, 4])
def test_causal_mask_matches_reference(bs):
    pos = torch.arange(11)[None]
    m = causal_mask(pos, pos, bs)[0, 0]
    ref = torch.tensor([[k // bs <= q // bs for k in range(11)] for q in range(11)])
    assert torch.equal(m, ref)


def test_kl_and_entropy_against_torch_distributions():
    torch.manual_seed(1)
    mu, logvar = torch.randn(5, 16), torch.randn(5, 16)
    mu_r, logvar_r = torch.randn(5, 16), torch.randn(5, 16)
    q = Normal(mu, (0.5 * logvar).exp())
    ref = kl_divergence(q, Normal(torch.zeros(5, 16), torch.ones(5, 16))).sum(-1)
    assert torch.allclose(gaussian_kl(mu, logvar), ref, atol=1e-5)
    ref2 = kl_divergence(q, Normal(mu_r, (0.5 * logvar_r).exp())).sum(-1)
    assert torch.allclose(gaussian_kl(mu, logvar, mu_r, logvar_r), ref2, atol=1e-4)
    assert torch.allclose(neg_entropy(logvar), -q.entropy().sum(-1), atol=1e-5)
    # and a Monte-Carlo check of E_q[log q]
    z = q.sample((20000,))
    mc = q.log_prob(z).sum(-1).mean(0)
    assert torch.allclose(neg_entropy(logvar), mc, atol=0.15)


def test_mask_loss_really_masks():
    vae = tiny_vae(mask_ratio=0.5)
    x = torch.randint(0, 256, (4, 32))
    torch.manual_seed(3)
    xm, idx = vae.mask_tokens(x)
    m = torch.zeros_like(x, dtype=torch.bool).scatter(1, idx, True)
    assert torch.all(xm[m] == vae.mask_id) and torch.equal(xm[~m], x[~m])
    assert m.sum(1).tolist() == [16] * 4  # exactly round(0.5 x 32) per row, at distinct positions
    # mask_ratio 0: no mask term at all; > 0: a term that changes the loss
    assert "mask_ce" not in tiny_vae(mask_ratio=0.0)(x)[3]
    torch.manual_seed(0)
    out = vae(x)[3]
    assert out["mask_ce"] > 0 and torch.isclose(out["loss"], out["ce"] + vae.cfg.beta * out["kl"] + out["mask_ce"])


@pytest.mark.parametrize("joint", [False, True])
def test_loss_of_each_stage(joint):
    """Stage 1 regularises with KL(q || N(0, I)) (paper §3.2.1, eq. 3.16), the joint stage with
    E_q[log q] (paper §3.2.2, eqs. 3.17-3.18); CE and the mask loss are the same in both."""
    vae = tiny_vae()
    x = torch.randint(0, 256, (4, 32))
    torch.manual_seed(0)
    out = vae(x, joint=joint)[3]
    reg = out["negent"] if joint else out["kl"]
    assert torch.isclose(out["loss"], out["ce"] + vae.cfg.beta * reg + vae.cfg.lambda_mask * out["mask_ce"])
    torch.manual_seed(0)
    other = vae(x, joint=not joint)[3]
    assert all(torch.equal(out[k], other[k]) for k in ("ce", "kl", "negent", "mask_ce"))
    assert not torch.isclose(out["loss"], other["loss"])


def test_overfits_one_batch():
    vae = tiny_vae(mask_ratio=0.0)
    x = torch.randint(0, 256, (4, 32))
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-2)
    for _ in range(120):
        loss = vae(x)[3]["loss"]
        opt.zero_grad(); loss.backward(); opt.step()
    d = vae.diagnostics(x)
    assert d["token_acc"] == 1.0
    assert math.isfinite(d["logsnr"])


def test_cached_decode_equals_full_decode():
    vae = tiny_vae()
    perturb(vae)
    z = torch.randn(2, 40, 16)
    full = vae.decode(z)
    pos = TextVAE.positions(2, 40, "cpu")
    cache, outs, start = vae.new_cache(2, 40, "cpu"), [], 0
    for n in (16, 5, 16, 3):  # uneven chunks, including mid-block boundaries
        outs.append(vae.decode(z[:, start:start + n], pos[:, start:start + n], cache.at(start, pos[:, start:start + n])))
        start += n
    assert torch.allclose(full, torch.cat(outs, 1), atol=1e-5)
