"""Generation: caches == recomputation, batch-composition independence, the command line."""
from dataclasses import asdict

import pytest
import torch

import sample
from cola import Cola, History
from common import UserError, run_main, save_checkpoint
from config import TrainConfig
from dit import DiT, DiTConfig, block_mask, layout_2L
from layers import Sampling, pick_tokens
from vae import TextVAE, VAEConfig
from tests.helpers import generate_blocks, perturb


def random_cola(seed=0, self_cond=False, block=4, patch=1):
    torch.manual_seed(seed)
    vae = TextVAE(VAEConfig(n_enc_layer=1, n_dec_layer=2, width=32, n_head=2, block_size=4))
    dit = DiT(DiTConfig(n_layer=2, width=32, n_head=2, block_size=block, patch_size=patch, self_cond=self_cond))
    perturb(vae, dit)  # a random, non-trivial model (no zero init left)
    return Cola(vae, dit).eval()


@pytest.mark.parametrize("cfg_scale, self_cond, shift", [(1.0, False, 1.0), (7.0, False, 1.0), (7.0, True, 3.0)])
def test_cached_generation_equals_recomputation(cfg_scale, self_cond, shift):
    model = random_cola(self_cond=self_cond)
    prompts = [list(b"Hello, wor"), list(b"ab"), []]  # ends mid-block (10 = 2 blocks + 2), short, empty
    (out_c, tr_c), (out_f, tr_f) = [generate_blocks(model, prompts, max_new_tokens=14, steps=3, cfg_scale=cfg_scale,
                                                    seed=1, use_cache=use_cache, shift=shift) for use_cache in (True, False)]
    assert len(tr_c) == len(tr_f) >= 4
    for (zc, lc), (zf, lf) in zip(tr_c, tr_f):
        assert torch.allclose(zc, zf, atol=1e-5) and torch.allclose(lc, lf, atol=1e-5)
    assert out_c == out_f


@pytest.mark.parametrize("block, patch", [(1, 4), (2, 2)])
def test_patched_dit_samples_what_it_trains_on(block, patch):
    """Several latents per DiT token: the sampler's velocity for a block after a clean history equals the
    training layout's (2L, flow.fm_loss); caches equal recomputation; prompts start on whole tokens."""
    model = random_cola(block=block, patch=patch)
    dit, bs = model.dit, model.block_size
    x = torch.randint(0, 256, (1, 2 * bs))
    z0 = model.vae.encode(x)[0]
    zt = torch.randn_like(z0)
    pos, blk, noisy = layout_2L(1, 2 * bs // patch, block, "cpu")
    tokens = dit.patchify(torch.cat([z0, zt], 1))
    v_train = dit(tokens, torch.tensor([0.0, 1.0]), noisy.long(), pos, block_mask(blk, noisy, blk, noisy))
    hist = History(model, dit, 1, 3 * bs, Sampling(steps=1, cfg_scale=1.0), None, True)
    p = torch.arange(2 * bs)[None]
    hist.commit(z0[:, :bs], p[:, :bs], decoder=True)
    v_sample = hist.dit_net(p[:, bs:], False)(dit.patchify(zt[:, bs:]), torch.ones(1, block, dtype=torch.long), None)
    assert torch.allclose(v_train[:, -block:], v_sample, atol=1e-5)
    prompts = [list(b"Hello, wor"), list(b"abc"), []]
    kw = dict(max_new_tokens=13, steps=3, cfg_scale=7.0, seed=1)
    (out_c, tr_c), (out_f, tr_f) = (generate_blocks(model, prompts, use_cache=c, **kw) for c in (True, False))
    assert out_c == out_f and all(torch.allclose(a[0], b[0], atol=1e-5) for a, b in zip(tr_c, tr_f))
    assert [len(o) for o in out_c] == [13] * 3


@pytest.mark.parametrize("cfg_scale", [1.0, 7.0])
def test_sliding_window_cached_equals_recomputation(cfg_scale):
    """Past the window the caches drop their oldest blocks; the cache-free reference keeps every latent
    and hides the old ones by its masks alone: the two agree, for prompts longer than the window too."""
    model = random_cola()
    prompts = [list(b"Hello, wor"), list(b"It is a truth universally acknowledged"), []]  # 10, 38 (> window), 0
    kw = dict(max_new_tokens=30, steps=2, cfg_scale=cfg_scale, seed=2, window=16, stop_at_eot=False)
    (out_c, tr_c), (out_f, tr_f) = [generate_blocks(model, prompts, use_cache=c, **kw) for c in (True, False)]
    for (zc, lc), (zf, lf) in zip(tr_c, tr_f):  # the reference attends to more (masked) slots: another
        assert torch.allclose(zc, zf, atol=1e-3) and torch.allclose(lc, lf, atol=1e-3)  # summation order, ~1e-6
    assert out_c == out_f and all(len(o) == 30 for o in out_c)  # per forward, which later blocks build on
    # the window matters: without it the history is longer and the output differs
    assert model.generate(prompts, **{**kw, "window": None}) != out_c
    with pytest.raises(ValueError, match="window"):
        model.generate(prompts, **{**kw, "window": 7})  # less than two blocks of 4


def test_ar_sliding_window_cached_equals_recomputation():
    from ar import ARConfig, ARLM
    torch.manual_seed(0)
    ar = ARLM(ARConfig(n_layer=2, width=32, n_head=2))
    perturb(ar)
    prompts = [list(b"Hello, world"), list(b"ab"), []]
    kw = dict(max_new_tokens=24, window=8, stop_at_eot=False, temperature=1.0, seed=1)
    cached, free = ar.eval().generate(prompts, **kw), ar.generate(prompts, use_cache=False, **kw)
    assert cached == free and all(len(o) == 24 for o in cached)
    assert ar.generate(prompts, **{**kw, "window": None}) != cached


def test_prompt_output_does_not_depend_on_batch():
    model = random_cola()
    prompts = [list(b"The whale"), list(b"It is a truth universally"), list(b"x")]
    together = model.generate(prompts, max_new_tokens=12, steps=4, seed=3)
    for p, out in zip(prompts, together):
        alone = model.generate([p], max_new_tokens=12, steps=4, seed=3)[0]
        assert alone == out
    assert all(len(o) <= 12 for o in together)


def test_a_misspelled_sampler_option_is_an_error():
    from ar import ARConfig, ARLM
    torch.manual_seed(0)
    for model in (random_cola(), ARLM(ARConfig(n_layer=1, width=32, n_head=2)).eval()):
        with pytest.raises(TypeError, match="stepz"):
            model.generate([list(b"ab")], 4, stepz=3)


def test_sampling_options_and_seed():
    model = random_cola()
    kw = dict(max_new_tokens=8, steps=2, temperature=1.0, top_k=20, top_p=0.9)
    a = model.generate([list(b"abc")], seed=5, **kw)
    b = model.generate([list(b"abc")], seed=5, **kw)
    assert a == b  # --seed makes runs reproducible
    # top-k / top-p keep only allowed ids
    logits = torch.tensor([[[5.0, 4.0, 0.0, -1.0]]])
    g = [torch.Generator().manual_seed(0)]
    picks = {int(pick_tokens(logits, Sampling(temperature=1.0, top_k=2), g)) for _ in range(50)}
    assert picks <= {0, 1}
    picks = {int(pick_tokens(logits, Sampling(temperature=1.0, top_p=0.5), g)) for _ in range(50)}
    assert picks == {0}


@pytest.fixture()
def ckpt(tmp_path):
    model = random_cola()
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(dict(config=dict(vae=asdict(model.vae.cfg), dit=asdict(model.dit.cfg),
                                     train=asdict(TrainConfig(seq_len=64))),
                         vae=model.vae.state_dict(), dit=model.dit.state_dict(), stage="joint", step=1), path)
    return path


def test_cli_generates_and_streams(ckpt, capsys):
    sample.main([f"--ckpt={ckpt}", "--prompt=Once", "--max_new_tokens=9", "--steps=2"])
    assert capsys.readouterr().out.startswith("Once")
    sample.main([f"--ckpt={ckpt}", "--prompt=", "--num_samples=2", "--max_new_tokens=5", "--steps=2"])
    assert capsys.readouterr().out.count("--- sample") == 2
    for mode in ("repaint:3:0.7", "left_pad", "right_pad"):
        sample.main([f"--ckpt={ckpt}", "--prompt=Once", "--max_new_tokens=9", "--steps=2", f"--first_block={mode}"])
        assert capsys.readouterr().out.startswith("Once")


def test_cli_dtype(ckpt, capsys, monkeypatch):
    """--dtype=bf16 samples under bf16 autocast with the matmul weights stored in bf16 (common.cast_for);
    --dtype=fp32 and auto (on a CPU) run without autocast."""
    seen = []
    generate = Cola.generate

    def spy(model, *a, **k):
        seen.append((torch.is_autocast_enabled("cpu"), model.dit.blocks[0].msa.proj_qkv.weight.dtype,
                     model.vae.encoder.wte.weight.dtype, model.dit.blocks[0].msa.norm_q.weight.dtype))
        return generate(model, *a, **k)

    monkeypatch.setattr(Cola, "generate", spy)
    for dtype in ("bf16", "fp32", "auto"):
        sample.main([f"--ckpt={ckpt}", "--prompt=Once", "--max_new_tokens=9", "--steps=2", f"--dtype={dtype}"])
        assert capsys.readouterr().out.startswith("Once")
    bf16, f32 = torch.bfloat16, torch.float32
    assert seen == [(True, bf16, bf16, f32), (False, f32, f32, f32), (False, f32, f32, f32)]  # norms stay fp32


@pytest.mark.parametrize("bad", [["--steps=0"], ["--cfg=-1"], ["--top_p=0"], ["--top_p=1.5"], [],
                                 ["--top_k=5"], ["--first_block=middle"], ["--first_block=repaint:0"],
                                 ["--dtype=fp16"]])
def test_cli_argument_errors(ckpt, bad, capsys):
    """A bad command line: one `error:` line and exit status 2, as `python sample.py ...` runs it."""
    args = [f"--ckpt={ckpt}"] + bad + (["--prompt=a"] if bad else [])
    with pytest.raises(SystemExit) as e:
        run_main(lambda: sample.main(args))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


def test_cli_generates_four_times_the_context(ckpt, capsys):
    """seq_len 64: a prompt of 40 bytes and 256 new ones run on a sliding window."""
    sample.main([f"--ckpt={ckpt}", "--prompt=" + "a" * 40, "--max_new_tokens=256", "--steps=1", "--cfg=1"])
    out = capsys.readouterr().out.rstrip("\n")
    assert out.startswith("a" * 40) and len(out.encode()) >= 40 + 200  # (this random model rarely picks <|endoftext|>)


def test_cli_user_errors(ckpt, tmp_path, capsys):
    with pytest.raises(UserError, match="not found"):
        sample.main([f"--ckpt={tmp_path / 'nope.pt'}", "--prompt=a"])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        sample.main([f"--ckpt={junk}", "--prompt=a"])


def test_ar_repeats_differ_and_padding_ids_are_never_sampled():
    from ar import ARConfig, ARLM
    from data.tokenizer import get_tokenizer
    torch.manual_seed(0)
    ar = ARLM(ARConfig(n_layer=1, width=32, n_head=2)).eval()
    outs = ar.generate([list(b"ab")] * 3, max_new_tokens=12, temperature=1.0, seed=0)
    assert len({tuple(o) for o in outs}) == 3  # --num_samples gives different samples
    tok = get_tokenizer("bytes")
    logits = torch.zeros(1, 1, tok.vocab_size)
    logits[..., tok.n_vocab + 3] = 100.0  # a padding row of the embedding, past the vocabulary
    logits[..., 7] = 50.0
    assert int(pick_tokens(logits, Sampling(), None, tok)) == 7
