"""Small models shared by the tests."""
import torch

from dit import DiT, DiTConfig


def perturb(*modules, scale=0.05):
    """Move every weight off its init (the DiT's exact-zero adaLN and output layers included), so
    outputs and gradients are non-trivial."""
    for m in modules:
        for p in m.parameters():
            p.data.add_(scale * torch.randn_like(p))


def per_token(t):
    """Arbitrary per-token times (B, L) as the DiT takes them: a table with each token its own entry."""
    return t, torch.arange(t.shape[1]).expand_as(t)


def random_dit(bs=4, width=32):
    """A 2-layer DiT with random (non-zero-initialised) weights, in eval mode."""
    torch.manual_seed(0)
    dit = DiT(DiTConfig(n_layer=2, width=width, n_head=2, block_size=bs))
    perturb(dit)
    return dit.eval()


def generate_blocks(model, *args, **kw):
    """model.generate(*args, **kw) and every block's (latents, logits) as Cola decodes them."""
    seen, decode = [], model.vae.decode

    def spy(z, *a, **k):
        logits = decode(z, *a, **k)
        seen.append((z.clone(), logits.clone()))
        return logits

    model.vae.decode = spy
    try:
        return model.generate(*args, **kw), seen
    finally:
        del model.vae.decode
