"""CUDA paths (skipped without a GPU): the block masks through SDPA's memory-efficient kernel give
the CPU result; bf16 autocast stays close; FlexAttention (--dit.attn=flex) trains as SDPA does;
generation runs on the GPU."""
import pytest
import torch

from common import autocast
from dit import block_mask, layout_2L
from tests.helpers import per_token, random_dit

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_efficient_attention_kernel_matches_cpu():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dit = random_dit(width=64)
    pos, blk, noisy = layout_2L(2, 22, 4, "cpu")
    z, t = torch.randn(2, 44, 16), torch.rand(2, 44) * noisy
    ref = dit(z, *per_token(t), pos, block_mask(blk, noisy, blk, noisy))
    dev = "cuda"
    g = dit.to(dev)
    args = (z.to(dev), *per_token(t.to(dev)), pos.to(dev), block_mask(blk, noisy, blk, noisy).to(dev))
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):  # fails loudly if this kernel rejects our masks
        out = g(*args)
    assert torch.allclose(out.cpu(), ref, atol=1e-4)
    with autocast(dev):
        half = g(*args)
    assert torch.allclose(half.float().cpu(), ref, atol=5e-2)


@cuda
def test_flex_attention_trains_like_sdpa():
    """The FM loss and every DiT gradient through the compiled FlexAttention kernel (forward and
    backward: CUDA only) = through SDPA's boolean mask, in fp32 and under bf16 autocast."""
    from flow import FlowConfig, fm_loss
    dit = random_dit(width=64).cuda().train()
    z0 = torch.randn(2, 150, 16, device="cuda")  # 2L = 300: 3 tiles of 128, the last partial
    for amp, tol in ((False, 1e-4), (True, 5e-2)):
        results = []
        for attn in ("sdpa", "flex"):
            dit.cfg.attn = attn
            torch.manual_seed(0)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                loss, _ = fm_loss(dit, z0, FlowConfig())
            results.append((loss, torch.autograd.grad(loss, list(dit.parameters()))))
        (loss, grads), (loss_flex, grads_flex) = results
        assert torch.allclose(loss_flex, loss, rtol=tol, atol=tol)
        assert all(torch.allclose(a, b, rtol=tol, atol=tol) for a, b in zip(grads_flex, grads))


@cuda
def test_generation_on_cuda():
    from cola import Cola
    from vae import TextVAE, VAEConfig
    torch.manual_seed(0)
    vae = TextVAE(VAEConfig(n_enc_layer=1, n_dec_layer=1, width=32, n_head=2, block_size=4))
    model = Cola(vae, random_dit(width=64)).cuda().eval()
    out = model.generate([list(b"Hello"), []], max_new_tokens=9, steps=3, stop_at_eot=False)
    assert [len(o) for o in out] == [9, 9]


@cuda
def test_compiled_sampling_on_cuda():
    """sample.py --compile on a GPU: the compiled step samples the eager sampler's tokens, Cola and AR
    alike, and a second run reuses its graphs."""
    from ar import ARConfig, ARLM
    from cola import Cola
    from vae import TextVAE, VAEConfig
    torch.manual_seed(0)
    vae = TextVAE(VAEConfig(n_enc_layer=1, n_dec_layer=1, width=32, n_head=2, block_size=4))
    cola = Cola(vae, random_dit(width=64)).cuda().eval()
    ar = ARLM(ARConfig(n_layer=2, width=32, n_head=2)).cuda().eval()
    for model in (cola, ar):
        kw = dict(max_new_tokens=24, steps=3, stop_at_eot=False, window=16)
        eager = model.generate([list(b"Hello"), list(b"Hi")], **kw)
        for _ in range(2):  # the second run compiles nothing
            assert model.generate([list(b"Hello"), list(b"Hi")], compile=True, **kw) == eager
