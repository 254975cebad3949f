"""What a GPU run exercises, checked on CPU: the DiT and the VAE compile without graph breaks and give
the eager results; train.py --compile compiles the whole training forward; the FlexAttention form of
the 2L mask (dit.flex_mask_2L) is block_mask's, and the DiT gives the SDPA results through it; bf16
autocast (CUDA's training setting) trains and samples close to fp32, with consistent dtypes.

Compiling is slow on 2 cores (a C++ build per graph), so the tests are few and tiny: inductor, the
backend --compile uses, builds the DiT and the FlexAttention kernel; the rest goes through
aot_eager, which runs dynamo's capture (what fullgraph=True checks) and AOTAutograd's backward
without building kernels."""
import copy
import json
import warnings
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.attention.flex_attention as fa
import torch.nn.functional as F

import config
import layers
import train
from cola import Cola
from common import UserError, check_resume, save_checkpoint
from dit import DiT, DiTConfig, attention_sparsity, block_mask, flex_mask_2L, layout_2L
from flow import FlowConfig, fm_loss
from tests.helpers import generate_blocks, perturb
from vae import TextVAE, VAEConfig


def dit_2L(bs, L, B=2, **kw):
    """A random tiny DiT and the inputs of one 2L forward, as fm_loss makes them."""
    torch.manual_seed(0)
    dit = DiT(DiTConfig(n_layer=2, width=32, n_head=2, block_size=bs, **kw))
    perturb(dit)
    pos, blk, noisy = layout_2L(B, L, bs, "cpu")
    t_table = torch.cat([torch.zeros(B, 1), torch.rand(B, -(-L // bs))], 1)  # entry 0: clean; b + 1: block b
    t_index = torch.where(noisy, blk + 1, 0)
    return dit, (torch.randn(B, 2 * L, 16), t_table, t_index, pos), block_mask(blk, noisy, blk, noisy)


def tiny_vae():
    torch.manual_seed(0)
    vae = TextVAE(VAEConfig(n_enc_layer=1, n_dec_layer=1, width=32, n_head=2))
    perturb(vae)
    return vae


# ----------------------------------------------------------------------------- torch.compile

def test_dit_compiles_fullgraph():
    """The DiT's 2L forward (self-conditioning input included) in one graph, inductor = eager."""
    dit, args, mask = dit_2L(4, 10, self_cond=True)
    sc = torch.randn_like(args[0])
    compiled = torch.compile(dit, fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(*args, mask, sc=sc), dit(*args, mask, sc=sc), atol=1e-5)


def test_vae_compiles_fullgraph():
    """encode, decode and both stages' losses in one graph each, backward included, = eager (same
    noise and masks: aot_eager draws them as eager does)."""
    vae = tiny_vae()
    x = torch.randint(0, 256, (2, 12))
    mu, logvar = torch.compile(vae.encode, backend="aot_eager", fullgraph=True)(x)
    ref = vae.encode(x)
    assert torch.allclose(mu, ref[0], atol=1e-5) and torch.allclose(logvar, ref[1], atol=1e-5)
    assert torch.allclose(torch.compile(vae.decode, backend="aot_eager", fullgraph=True)(mu), vae.decode(mu), atol=1e-5)
    compiled = torch.compile(vae, backend="aot_eager", fullgraph=True)
    for joint in (False, True):
        torch.manual_seed(1)
        out = compiled(x, joint=joint)[3]
        grads = torch.autograd.grad(out["loss"], list(vae.parameters()))
        torch.manual_seed(1)
        ref = vae(x, joint=joint)[3]
        ref_grads = torch.autograd.grad(ref["loss"], list(vae.parameters()))
        assert all(torch.allclose(out[k], ref[k], atol=1e-5) for k in ref)
        assert all(torch.allclose(g, r, atol=1e-5) for g, r in zip(grads, ref_grads))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A prepared byte-level dataset, written directly (the files data/prepare.py makes)."""
    root = tmp_path_factory.mktemp("bytes")
    text = " ".join(f"Call me Ishmael, said Mr. Darcy to the whale ({i})." for i in range(300)).encode()
    for split, data in (("train", text), ("val", text[:4000])):
        np.frombuffer(data, dtype=np.uint8).astype(np.uint16).tofile(root / f"{split}.bin")
    (root / "meta.json").write_text(json.dumps(dict(tokenizer="bytes")))
    return str(root)


def test_train_compile_compiles_the_training_forward(dataset, tmp_path, monkeypatch):
    """train.py --compile hands the whole model to torch.compile (its forward is the loss: stage 2's
    here, the VAE's stage-1 loss and the FM loss with the DiT), and the run trains as the eager one
    does. fullgraph=True makes any graph break fail."""
    args = ["--vae.width=32", "--vae.n_head=2", "--vae.n_enc_layer=1", "--vae.n_dec_layer=1", "--dit.width=32",
            "--dit.n_head=2", "--dit.n_layer=1", "--dit.block_size=4", "--vae_lr_ratio=1", "--seq_len=16",
            "--batch_size=4", "--eval_windows=4", "--stage=joint", "--init=scratch", "--joint_iters=2",
            "--warmup_iters=1", f"--dataset={dataset}"]
    compiled, real = [], torch.compile

    def spy(model, **kw):
        compiled.append(model)
        return real(model, backend="aot_eager", fullgraph=True)

    train.main(args + [f"--out_dir={tmp_path / 'eager'}"])
    monkeypatch.setattr(torch, "compile", spy)
    train.main(args + [f"--out_dir={tmp_path / 'compiled'}", "--compile"])
    assert len(compiled) == 1 and type(compiled[0]).__name__ == "Cola" and compiled[0].dit is not None
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("eager", "compiled"))
    for part in ("vae", "dit"):
        for k in a[part]:
            assert torch.allclose(a[part][k], b[part][k], atol=1e-5), f"{part}.{k}"


# ----------------------------------------------------------------------------- FlexAttention

@pytest.mark.parametrize("bs", [1, 4, 16])
def test_flex_mask_is_block_mask(bs):
    """Score by score, and tile by tile: a tile the BlockMask skips holds no visible score."""
    for L in (1, bs, 3 * bs - 1, 10, 70):
        _, blk, noisy = layout_2L(1, L, bs, "cpu")
        dense = block_mask(blk, noisy, blk, noisy)[0, 0]  # (2L, 2L)
        bm = flex_mask_2L(L, bs, "cpu")
        assert torch.equal(fa.create_mask(bm.mask_mod, None, None, 2 * L, 2 * L)[0, 0], dense)
        tq, tk = bm.BLOCK_SIZE
        nq, nk = -(-2 * L // tq), -(-2 * L // tk)
        padded = torch.zeros(nq * tq, nk * tk, dtype=torch.bool)
        padded[:2 * L, :2 * L] = dense
        touched = padded.view(nq, tq, nk, tk).any(3).any(1)  # (nq, nk): tiles with a visible score
        assert torch.equal(bm.to_dense()[0, 0, :nq, :nk].bool(), touched)


def test_attention_sparsity():
    """3/4 of the 2L matrix is hidden, less the noisy blocks' own diagonal: 3/4 - bs / 4L."""
    for L, bs in ((512, 16), (512, 1), (64, 4)):
        assert attention_sparsity(L, bs)["exact"] == pytest.approx(3 / 4 - bs / (4 * L))
    assert attention_sparsity(512, 16)["tiles"] == pytest.approx(1 - 24 / 64)  # of 8 x 8 tiles, 10 + 10 + 4 run


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("bs", [1, 4])
def test_flex_matches_sdpa_forward_and_backward(bs, monkeypatch):
    """The DiT through the BlockMask = through SDPA's boolean mask: velocities, and gradients of every
    parameter and of the input latents. torch has no CPU FlexAttention backward, so this runs torch's
    reference flex_attention (uncompiled: dense scores under mask_mod, with autograd); the compiled
    kernel's forward is the next test."""
    monkeypatch.setattr(fa, "_validate_device", lambda *a: None)  # it refuses CPU inputs that need gradients
    monkeypatch.setattr(layers, "compiled_flex_attention", lambda: fa.flex_attention)
    L = 10  # not a multiple of 4, nor of the kernel's 128-token tiles
    dit, (z, *rest), mask = dit_2L(bs, L)
    results = []
    for m in (mask, flex_mask_2L(L, bs, "cpu")):
        zz = z.clone().requires_grad_(True)
        v = dit(zz, *rest, m)
        grads = torch.autograd.grad(v.pow(2).sum(), [zz] + list(dit.parameters()))
        results.append((v, grads))
    (v, grads), (v_flex, grads_flex) = results
    assert torch.allclose(v_flex, v, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads_flex, grads))


def test_flex_option(tmp_path):
    """--dit.attn is sdpa or flex; flex training is refused on CPU (no FlexAttention backward there)
    before anything runs; a run may resume with the other kernel."""
    assert config.build_configs(["--dit.attn=flex"])["dit"].attn == "flex"
    with pytest.raises(UserError, match="sdpa or flex"):
        config.build_configs(["--dit.attn=dense"])
    with pytest.raises(UserError, match="CUDA only"):
        train.main(["--dit.attn=flex", "--device=cpu", f"--out_dir={tmp_path}"])
    assert not any(tmp_path.iterdir())
    ckpt = dict(config={k: asdict(v) for k, v in config.build_configs([]).items()})  # an sdpa run
    cfgs = config.build_configs(["--dit.attn=flex"])
    check_resume(ckpt, cfgs, config.RESUME_FREE)
    cfgs["dit"].n_layer += 1
    with pytest.raises(UserError, match="dit.n_layer"):
        check_resume(ckpt, cfgs, config.RESUME_FREE)


def test_compiled_flex_forward_matches_sdpa():
    """The compiled FlexAttention kernel (the one training runs), through fm_loss: over 2L = 300 tokens
    (3 tiles, the last partial; block 4 does not divide L) it skips a tile and gives the SDPA loss."""
    L, bs = 150, 4
    dit, _, _ = dit_2L(bs, L)
    assert attention_sparsity(L, bs)["tiles"] > 0
    z0 = torch.randn(2, L, 16)
    losses = []
    for attn in ("sdpa", "flex"):
        dit.cfg.attn = attn
        torch.manual_seed(0)
        with torch.no_grad():
            losses.append(fm_loss(dit, z0, FlowConfig())[1]["per_token"])
    assert torch.allclose(losses[1], losses[0], atol=1e-5)


# ----------------------------------------------------------------------------- bf16 autocast

def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def tiny_cola(stage):
    vae = TextVAE(VAEConfig(n_enc_layer=1, n_dec_layer=1, width=32, n_head=2, block_size=4))
    dit = DiT(DiTConfig(n_layer=2, width=32, n_head=2, block_size=4))
    perturb(vae, dit)
    return Cola(vae) if stage == "vae" else Cola(vae, dit, copy.deepcopy(vae), FlowConfig(), vae_lr_ratio=1)


@pytest.mark.parametrize("stage", ["vae", "joint"])
def test_bf16_training_steps_match_fp32(stage):
    """Three optimizer steps under bf16 autocast: finite losses and gradients, every loss term within
    5% of the fp32 run's at each step (same data, noise and masks; most agree to 0.2%, the reference
    KL, which measures how far the encoder moved, to ~2.5%). The latents stay fp32, and no norm sees
    a bf16 input with its fp32 weight (the residual streams stay fp32)."""
    torch.manual_seed(0)
    model, x = tiny_cola(stage), torch.randint(0, 256, (4, 16))
    runs = []
    for autocast in (False, True):
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        stats = []
        for step in range(3):
            torch.manual_seed(step)
            with bf16() if autocast else torch.autocast("cpu", enabled=False), warnings.catch_warnings():
                warnings.filterwarnings("error", "Mismatch dtype")  # an unfused norm: mixed dtypes
                loss, st = m(x)
                assert all(t.dtype == torch.float32 for t in m.vae.encode(x))
            loss.backward()
            assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
            opt.step()
            opt.zero_grad()
            stats.append(st)
        runs.append(stats)
    for fp32, half in zip(*runs):
        for k in fp32:
            assert half[k].dtype == torch.float32 and torch.isfinite(half[k]), k
            assert torch.allclose(half[k], fp32[k], rtol=5e-2, atol=1e-3), (k, half[k].item(), fp32[k].item())


def test_bf16_generation_matches_fp32(monkeypatch):
    """Cola.generate under bf16 autocast: q, k and v reach attention in one dtype, bf16, the cached keys
    included (the KV caches follow autocast), and every block's latents and logits are finite and
    close to fp32's."""
    torch.manual_seed(0)
    model = tiny_cola("joint").eval()
    kw = dict(max_new_tokens=8, steps=3, stop_at_eot=False)
    seen = set()
    _, ref = generate_blocks(model, [list(b"Hello"), []], **kw)
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None):
        seen.add((q.dtype, k.dtype, v.dtype))
        return sdpa(q, k, v, attn_mask=attn_mask)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with bf16():
        assert model.dit.new_cache(1, 4, "cpu").k[0].dtype == torch.bfloat16
        _, half = generate_blocks(model, [list(b"Hello"), []], **kw)
    assert model.dit.new_cache(1, 4, "cpu").k[0].dtype == torch.float32
    assert seen == {(torch.bfloat16,) * 3}
    assert len(half) == len(ref) == 3  # until the first prompt has its 8: 3 + 4 + 1 new tokens
    for (z, logits), (z_ref, logits_ref) in zip(half, ref):
        assert torch.isfinite(z).all() and torch.isfinite(logits).all()
        assert torch.allclose(z, z_ref, atol=5e-2) and torch.allclose(logits.float(), logits_ref, atol=5e-2)


def test_cast_for_bf16_matches_autocast():
    """common.cast_for stores the Linear weights in bf16 once: under bf16 autocast the DiT then computes
    exactly what autocast computes from the fp32 weights (it rounds them the same way). The embedding
    (the encoder's input, the tied head) is stored in bf16 too, so the whole sampler stays close."""
    from common import autocast, cast_for, precision
    torch.manual_seed(0)
    model = tiny_cola("joint").eval()
    twin = copy.deepcopy(model)
    z, t = torch.randn(2, 8, model.dit.cfg.latent_dim), torch.rand(2, 2)
    t_index = torch.arange(8).div(4, rounding_mode="floor").expand(2, 8)
    pos, mask = torch.arange(8).expand(2, 8), torch.ones(2, 1, 8, 8, dtype=torch.bool)
    with bf16():
        ref = model.dit(z, t, t_index, pos, mask)
    assert cast_for(twin, "cpu", "fp32") is twin and twin.dit.blocks[0].mlp.proj_out.weight.dtype == torch.float32
    cast_for(twin, "cpu", "bf16")
    with autocast("cpu", "bf16"):
        assert torch.equal(twin.dit(z, t, t_index, pos, mask), ref)
        kw = dict(max_new_tokens=8, steps=3, stop_at_eot=False)
        with bf16():
            _, ref_trace = generate_blocks(model, [list(b"Hello"), []], **kw)
        _, trace = generate_blocks(twin, [list(b"Hello"), []], **kw)
    for (z1, l1), (z0, l0) in zip(trace, ref_trace):
        assert torch.allclose(z1, z0, atol=5e-2) and torch.allclose(l1.float(), l0.float(), atol=5e-2)
    assert (precision("cpu"), precision("cpu", "bf16"), precision("cpu", "fp32")) == ("fp32", "bf16", "fp32")
    with pytest.raises(UserError, match="unknown dtype"):
        precision("cpu", "fp16")


# ----------------------------------------------------------------------------- the compiled sampler step

@pytest.fixture()
def fresh_compiler():
    """No compiled code, from this test or an earlier one, is reused or left behind."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def count_graphs(monkeypatch):
    """torch.compile as generate(compile=True) calls it, but fullgraph (a graph break fails the test) and
    with a backend that counts the graphs and runs them."""
    graphs, compile_ = [], torch.compile

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend=counting, fullgraph=True, **kw))
    return graphs


@pytest.mark.parametrize("cfg_scale, window, prompts, n_graphs", [
    (1.0, 16, [b"Hello, wor", b"It is a truth universally acknowledged"], 2),  # 10 and 38 (> window) bytes
    (7.0, 16, [b"Hello, wor", b"It is a truth universally acknowledged"], 2),
    (7.0, None, [b"Hello, wor", b"It is a truth universally acknowledged"], 2),
    (7.0, 16, [b"Hello, w", b"It is a truth universally acknowledged, "], 1),  # whole blocks: nothing pinned
    (7.0, 16, [b"", b""], 2),  # no history at the first block: unguided, half the rows
])
def test_compiled_sampler_is_one_graph(cfg_scale, window, prompts, n_graphs, fresh_compiler, monkeypatch):
    """generate(compile=True): the Euler step is one graph for every step of every block, on to past the
    window (a first block that differs has its own: prompt positions pinned, or no history and so
    unguided); a second call compiles nothing. The compiled step samples the eager sampler's latents and
    tokens."""
    graphs = count_graphs(monkeypatch)
    model = tiny_cola("joint").eval()
    prompts = [list(p) for p in prompts]
    kw = dict(max_new_tokens=30, steps=2, cfg_scale=cfg_scale, seed=2, window=window, stop_at_eot=False)
    eager, ref = generate_blocks(model, prompts, **kw)
    compiled, out = generate_blocks(model, prompts, compile=True, **kw)
    assert compiled == eager and len(out) == len(ref) >= 8
    for (z, logits), (z_ref, logits_ref) in zip(out, ref):
        assert torch.allclose(z, z_ref, atol=1e-5) and torch.allclose(logits, logits_ref, atol=1e-5)
    assert len(graphs) == n_graphs
    assert model.generate(prompts, compile=True, **kw) == eager
    assert len(graphs) == n_graphs


def test_compiled_sampler_inductor(fresh_compiler):
    """The compiled step as --compile builds it (inductor, the KV cache written in place by the graph)
    samples what the eager step samples, its first block's prompt positions pinned."""
    model = tiny_cola("joint").eval()
    kw = dict(max_new_tokens=12, steps=2, seed=0, stop_at_eot=False)
    eager, ref = generate_blocks(model, [list(b"Hello, wor")], **kw)  # two whole blocks and 2 bytes
    compiled, out = generate_blocks(model, [list(b"Hello, wor")], compile=True, **kw)
    assert compiled == eager and len(out) == len(ref) == 4
    for (z, logits), (z_ref, logits_ref) in zip(out, ref):
        assert torch.allclose(z, z_ref, atol=1e-4) and torch.allclose(logits, logits_ref, atol=1e-4)


def test_cli_compile(fresh_compiler, monkeypatch, tmp_path, capsys):
    """sample.py --compile and eval.py speed --compile run the compiled step, for Cola and AR."""
    import eval as cola_eval
    import sample
    graphs = count_graphs(monkeypatch)
    model = tiny_cola("joint")
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(dict(config=dict(vae=asdict(model.vae.cfg), dit=asdict(model.dit.cfg),
                                     train=asdict(config.TrainConfig(seq_len=32))),
                         vae=model.vae.state_dict(), dit=model.dit.state_dict(), stage="joint", step=1), path)
    texts = []
    for flag in ([], ["--compile"]):
        sample.main([f"--ckpt={path}", "--prompt=Once", "--max_new_tokens=9", "--steps=2", "--cfg=1"] + flag)
        texts.append(capsys.readouterr().out)
    assert texts[1] == texts[0] and len(texts[0].encode()) > len("Once") + 1  # the eager samples
    assert len(graphs) == 1  # a whole-block prompt, no guidance: one graph
    r = cola_eval.main(["speed", "--random_init", "--quick", "--compile", "--dit.block_size=4", "--vae.width=32",
                        "--vae.n_head=2", "--dit.width=32", "--dit.n_head=2", "--dit.n_layer=1"])
    assert r["compile"] and len(r["rows"]) == 2 and len(graphs) == 1 + 2  # one per setting, compiled before its timing
    r = cola_eval.main(["speed", "--random_init", "--quick", "--compile", "--model=ar", "--ar.width=32",
                        "--ar.n_head=2", "--ar.n_layer=1"])
    assert r["compile"] and len(graphs) == 3 + 2


@pytest.mark.parametrize("window, n_graphs", [(8, 1), (None, 2)])
def test_compiled_ar_sampler_is_one_graph(window, n_graphs, fresh_compiler, monkeypatch):
    """ARLM.generate(compile=True): one graph for every new token, past the window too (runs of any
    length share it: the cache holds the window), and the eager tokens."""
    from ar import ARConfig, ARLM
    graphs = count_graphs(monkeypatch)
    torch.manual_seed(0)
    ar = ARLM(ARConfig(n_layer=2, width=32, n_head=2)).eval()
    perturb(ar)
    prompts = [list(b"Hello"), list(b"It is a truth")]  # 5 and 13 (> window) bytes
    for n in (20, 30):  # without a window the cache holds the run: one graph per length
        kw = dict(max_new_tokens=n, window=window, stop_at_eot=False)
        assert ar.generate(prompts, compile=True, **kw) == ar.generate(prompts, **kw)
    assert len(graphs) == n_graphs


def test_compiled_sampler_past_the_recompile_limit(fresh_compiler, monkeypatch):
    """More sets of shapes than torch keeps graphs for (here 2): the step runs eager, with torch's
    warning, and samples as before, where fullgraph would have raised."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend="eager", **kw))
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    model = tiny_cola("joint").eval()
    kw = dict(max_new_tokens=8, steps=2, window=16, stop_at_eot=False)
    for b in (1, 2, 3, 4):  # a graph for each batch size
        prompts = [list(b"Hello, wor")] * b
        assert model.generate(prompts, compile=True, **kw) == model.generate(prompts, **kw)
