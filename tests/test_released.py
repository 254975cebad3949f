"""The released checkpoint's format, layers and sampler against the released code's own outputs.

tests/fixtures/released/ holds tiny random models in the released layout, in three configurations (bc4:
block-causal VAE with blocks of 4, DiT blocks of 4, sharded VAE weights; bidir8: bidirectional VAE, DiT
blocks of 8; bc1: blocks of 1, sharded DiT weights; all with non-trivial latent scaling and shifting),
and what the released code computes from them in fp32: encoder means, decoder logits, DiT velocities with
and without history, and a greedy generation (tests/fixtures/released/make_fixtures.py made them).
"""
import json
import math
import os
import shutil

import pytest
import torch

import released
from cola import Cola
from common import UserError
from dit import block_mask
from layers import PAD_POS

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "released")
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", params=["bc4", "bidir8", "bc1"])
def case(request):
    path = os.path.join(FIX, request.param)
    with open(os.path.join(path, "reference.json")) as f:
        meta = json.load(f)
    return Cola.from_pretrained(path).eval(), released.read_safetensors(os.path.join(path, "reference.safetensors")), meta


def padded(seqs, fill):
    """Sequences of different lengths as one batch, the short ones padded at the end (positions PAD_POS)."""
    L = max(len(s) for s in seqs)
    x = torch.stack([torch.cat([s, s.new_full((L - len(s), *s.shape[1:]), fill)]) for s in seqs])
    pos = torch.stack([torch.where(torch.arange(L) < len(s), torch.arange(L), PAD_POS) for s in seqs])
    return x, pos


@torch.no_grad()
def test_encoder_matches_released(case):
    """(The released bidirectional VAE has no mask between the samples of a batch: its one-sample
    outputs, "_solo", are the reference where they exist.)"""
    model, ref, _ = case
    ids = [ref[f"enc.ids.{i}"] for i in range(2)]
    x, pos = padded(ids, 0)
    mu, logvar = model.vae.encode(x, pos=pos)  # one batch, as the released code encodes both in one call
    logvar = logvar - 2 * math.log(model.vae.cfg.scaling_factor)  # ours: of the scaled latents; theirs: unscaled
    for i, s in enumerate(ids):
        torch.testing.assert_close(mu[i, :len(s)], ref.get(f"enc.mean_solo.{i}", ref[f"enc.mean.{i}"]), **TOL)
        torch.testing.assert_close(logvar[i, :len(s)], ref.get(f"enc.logvar_solo.{i}", ref[f"enc.logvar.{i}"]), **TOL)


@torch.no_grad()
def test_decoder_matches_released(case):
    model, ref, _ = case
    zs = [ref[f"dec.z.{i}"] for i in range(2)]
    z, pos = padded(zs, 0.0)
    logits = model.vae.decode(z, pos)
    for i, s in enumerate(zs):
        torch.testing.assert_close(logits[i, :len(s)], ref.get(f"dec.logits_solo.{i}", ref[f"dec.logits.{i}"]), **TOL)


@torch.no_grad()
def test_dit_velocities_match_released(case):
    """With history: the clean prefix then the noisy block in one forward (the block-causal mask keeps the
    prefix from seeing the block); without: the block alone (the unconditional branch of guidance)."""
    model, ref, _ = case
    dit, bs = model.dit, model.block_size
    for i in range(2):
        prefix, block, t = ref[f"dit.prefix.{i}"], ref[f"dit.block.{i}"], ref[f"dit.t.{i}"] / 1000  # theirs: 0..1000
        n = len(prefix)
        pos = torch.arange(n + bs)[None]
        noisy = pos >= n
        table = torch.cat([torch.zeros(1), t])  # entry 0: clean; entry 1 + j: the block's token j
        index = torch.where(noisy, pos - n + 1, 0)
        v = dit(torch.cat([prefix, block])[None], table, index, pos, block_mask(pos // bs, noisy, pos // bs, noisy))[0]
        torch.testing.assert_close(v[:n], ref[f"dit.v_prefix.{i}"], **TOL)
        torch.testing.assert_close(v[n:], ref[f"dit.v_cond.{i}"], **TOL)
        pos, noisy = torch.arange(bs)[None], torch.ones(1, bs, dtype=torch.bool)
        v = dit(block[None], table, torch.arange(1, bs + 1)[None], pos, block_mask(pos // bs, noisy, pos // bs, noisy))[0]
        torch.testing.assert_close(v, ref[f"dit.v_uncond.{i}"], **TOL)


@torch.no_grad()
@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_matches_released(case, use_cache):
    """Greedy, guidance 7, 4 Euler steps, repetition penalty 1.1, the released per-sample noise seeding:
    token for token what the released sampler wrote (its first block's prompt positions trimmed), one
    prompt per call (in one batch the released bidirectional VAE lets the samples see each other)."""
    model, ref, meta = case
    gen = meta["generation"]
    prompts = [p["ids"] for p in gen["prompts"]]
    want = [p["generated_ids_trimmed_solo"] for p in gen["prompts"]]
    s = gen["settings"]
    out = model.generate(prompts, max_new_tokens=max(map(len, want)), steps=s["timestep_num"],
                         cfg_scale=s["guidance_scale"], repetition_penalty=s["repetition_penalty"],
                         seed=int(gen["env"]["COLA_INFER_PER_SAMPLE_NOISE_SEED"]),
                         seed_ids=tuple(p["id"] for p in gen["prompts"]), stop_at_eot=False, use_cache=use_cache)
    assert [o[:len(w)] for o, w in zip(out, want)] == want


def test_tokenizer_of_the_release(case):
    model, _, meta = case
    for p in meta["generation"]["prompts"]:
        assert model.tok.encode(p["question"]) == p["ids"]
    assert model.tok.pad == meta["pad_id"] and model.tok.vocab_size == meta["vocab_size"]


def test_parameter_counts_of_the_paper_preset():
    """--config=paper builds the released sizes: the released classes at their defaults count 1,829,875,728
    (DiT) and 501,871,574 (VAE, with OLMo 2's 100,278 tokens; the preset's GPT-2 vocabulary differs)."""
    from config import build_configs
    from dit import DiT
    from vae import TextVAE
    cfgs = build_configs(["--config=paper"])
    with torch.device("meta"):
        dit, vae = DiT(cfgs["dit"]), TextVAE(cfgs["vae"])
    assert sum(p.numel() for p in dit.parameters()) == 1_829_875_728
    V, W = vae.decoder.final_layer.out_features, cfgs["vae"].width
    olmo2 = sum(p.numel() for p in vae.parameters()) + (100_278 - V) * (2 * W + 1)  # embedding row, head row, bias
    assert olmo2 == 501_871_574


def copy_release(tmp_path, name="bc4"):
    dst = tmp_path / name
    shutil.copytree(os.path.join(FIX, name), dst)
    return dst


@pytest.mark.parametrize("breakage, message", [
    (lambda d: os.remove(d / "cola_dit" / "model.safetensors"), "cannot read"),
    (lambda d: (d / "cola_dit" / "model.safetensors").write_bytes((d / "cola_dit" / "model.safetensors").read_bytes()[:5000]),
     "truncated"),
    (lambda d: (d / "cola_dit" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      "),
     "not a safetensors file"),
    (lambda d: (d / "cola_dit" / "config.json").write_text("{"), "not valid JSON"),
    (lambda d: edit_json(d / "cola_vae" / "config.json", post_norm=False), "post_norm=False is not supported"),
    (lambda d: edit_json(d / "cola_dit" / "config.json", patch_size=2), "patch_size=2 is not supported"),
    (lambda d: edit_json(d / "cola_dit" / "config.json", surprise=1), "unknown fields surprise"),
    (lambda d: edit_json(d / "cola_dit" / "config.json", num_layers=3), "weights missing"),
    (lambda d: edit_json(d / "cola_vae" / "config.json", ffn_dim=128), "has shape"),
])
def test_bad_release_is_one_line_error(tmp_path, breakage, message):
    d = copy_release(tmp_path)
    breakage(d)
    with pytest.raises(UserError, match=message) as e:
        Cola.from_pretrained(str(d))
    assert "\n" not in str(e.value)


def edit_json(path, **changes):
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def write_safetensors(path, tensors):
    """A minimal safetensors writer (the format released.read_safetensors documents)."""
    header, data = {}, b""
    for name, t in tensors.items():
        raw = t.contiguous().numpy().tobytes()
        header[name] = dict(dtype="F32", shape=list(t.shape), data_offsets=[len(data), len(data) + len(raw)])
        data += raw
    head = json.dumps(header).encode()
    path.write_bytes(len(head).to_bytes(8, "little") + head + data)


def test_every_released_weight_is_consumed(tmp_path):
    """A tensor the model has no place for is an error, not silently dropped."""
    d = copy_release(tmp_path)
    index = d / "cola_vae" / "model.safetensors.index.json"
    cfg = json.loads(index.read_text())
    cfg["weight_map"]["decoder.extra.weight"] = "extra.safetensors"
    index.write_text(json.dumps(cfg))
    write_safetensors(d / "cola_vae" / "extra.safetensors", {"decoder.extra.weight": torch.ones(2, 2)})
    with pytest.raises(UserError, match="not in the model: decoder.extra.weight"):
        Cola.from_pretrained(str(d))


def test_sample_bench_and_train_take_a_released_directory(tmp_path, capsys):
    """sample.py --ckpt=DIR, eval.py bench --ckpt=DIR and train.py --stage=joint --init=DIR (stage 2 continued from
    the released weights, on data prepared with the release's tokenizer.json)."""
    import data.prepare
    import eval as evaluate
    import sample
    import train
    from config import load_model
    d = os.path.join(FIX, "bc4")
    sample.main([f"--ckpt={d}", "--prompt=The sea", "--max_new_tokens=8", "--steps=2"])
    assert capsys.readouterr().out.startswith("The sea")
    items = tmp_path / "lambada.jsonl"
    items.write_text("".join(json.dumps(dict(id=i, prompt="She was the youngest of the", ground_truth="two")) + "\n"
                             for i in range(3)))
    r = evaluate.main(["bench", f"--ckpt={d}", "--task=lambada", f"--data={items}", "--steps=2"])
    assert r["stage"] == "released" and len(r["items"]) == 3
    text = "\n\n".join(f"Paragraph {i}: Emma said, \"It is very true.\"\nA new line!\n" for i in range(60))
    (tmp_path / "a.txt").write_text(text)
    data.prepare.main(["--input", str(tmp_path / "a.txt"), "--name=ds", f"--out_dir={tmp_path}",
                       f"--tokenizer={os.path.join(d, 'tokenizer.json')}"])
    out = tmp_path / "ft"
    train.main(["--stage=joint", f"--init={d}", f"--dataset={tmp_path / 'ds'}", f"--out_dir={out}", "--joint_iters=2",
                "--seq_len=16", "--batch_size=2", "--eval_windows=2", "--eval_interval=2", "--warmup_iters=1"])
    tuned, ckpt = load_model(str(out / "ckpt.pt"))
    start = Cola.from_pretrained(d)
    assert ckpt["config"]["vae"]["block_size"] == 4 and ckpt["config"]["vae"]["scaling_factor"] == 1.7
    for name, p in start.vae.state_dict().items():  # tiny's stage 2 freezes the VAE
        assert torch.equal(tuned.vae.state_dict()[name], p)
    assert not torch.equal(tuned.dit.txt_out.proj.weight, start.dit.txt_out.proj.weight)  # the prior trained on
    with pytest.raises(UserError, match="fixes the architecture"):
        train.main(["--stage=joint", f"--init={d}", "--dit.n_layer=3", f"--out_dir={tmp_path / 'x'}"])
