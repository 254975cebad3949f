"""eval.py: the Gaussian FM baseline, and every subcommand end to end on a tiny checkpoint."""
import json
import math
from dataclasses import asdict

import pytest
import torch

import eval as cola_eval
from cola import Cola
from common import UserError, save_checkpoint
from config import TrainConfig
from data import prepare
from data import quality as tq
from dit import DiT, DiTConfig
import flow
from flow import FlowConfig, interpolate, sample_t
from vae import TextVAE, VAEConfig
from tests.helpers import perturb


def test_gauss_baseline_value_and_monte_carlo():
    torch.manual_seed(0)
    t = sample_t((400_000,), FlowConfig())
    # unit-variance latents: 1 + 1 - (2t - 1)^2 / ((1-t)^2 + t^2), averaged over logit-normal(1, 1) t
    assert abs(flow.gauss_baseline(torch.ones(1), t).mean().item() - 1.61) < 0.01
    # Monte Carlo: the best linear predictor of v from z_t, per t, reaches the formula
    s2 = torch.tensor([0.5, 2.0])
    for tv in (0.2, 0.7):
        z0 = torch.randn(200_000, 2) * s2.sqrt()
        eps = torch.randn_like(z0)
        zt, v = interpolate(z0, eps, torch.full((200_000,), tv)), eps - z0
        coef = (zt * v).mean(0) / (zt * zt).mean(0)
        mse = (v - coef * zt).pow(2).mean().item()
        assert abs(mse - flow.gauss_baseline(s2, torch.tensor([tv])).item()) < 0.02


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    text = root / "corpus.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the whale swam past the ship, and Emma smiled." for i in range(300)))
    prepare.main(["--input", str(text), "--name", "tiny", "--tokenizer", "bytes", "--out_dir", str(root)])
    torch.manual_seed(0)
    vae = TextVAE(VAEConfig(n_enc_layer=1, n_dec_layer=1, width=32, n_head=2, block_size=4))
    dit = DiT(DiTConfig(n_layer=1, width=32, n_head=2, block_size=4))
    perturb(dit, scale=0.02)
    tc = TrainConfig(dataset=str(root / "tiny"), seq_len=32)
    path = str(root / "ckpt.pt")
    cfg = dict(vae=asdict(vae.cfg), dit=asdict(dit.cfg), train=asdict(tc), flow=asdict(FlowConfig()))
    save_checkpoint(dict(config=cfg, vae=vae.state_dict(), dit=dit.state_dict(), stage="joint", step=0), path)
    vae_only = str(root / "vae.pt")
    save_checkpoint(dict(config=cfg, vae=vae.state_dict(), dit=None, stage="vae", step=0), vae_only)
    return root, path, vae_only


def test_iwae_bound_is_tighter_than_elbo():
    torch.manual_seed(0)
    vae = TextVAE(VAEConfig(n_enc_layer=1, n_dec_layer=1, width=32, n_head=2))
    dit = DiT(DiTConfig(n_layer=1, width=32, n_head=2, block_size=4))
    vae.encoder.final_layer.bias.data[vae.cfg.latent_dim:].fill_(0.0)  # a wide posterior: the K samples differ a lot
    w, _ = Cola(vae, dit).log_weights(torch.randint(0, 256, (3, 12)), samples=8, ode_steps=2)
    iwae, elbo = torch.logsumexp(w, 0) - math.log(8), w.mean(0)
    assert w.shape == (8, 3) and torch.all(iwae >= elbo) and torch.all(iwae > elbo + 1e-3)


def test_recon_fm_speed_end_to_end(tiny_run, capsys):
    root, path, vae_only = tiny_run
    r = cola_eval.main(["recon", f"--ckpt={path}", "--limit=8", f"--out={root / 'r.json'}"])
    saved = json.loads((root / "r.json").read_text())
    for key in ("token_acc", "masked_acc", "logsnr", "robustness"):
        assert key in saved
    assert set(saved["robustness"]) == {"0.1", "0.15", "0.2", "0.3", "0.4", "0.5", "0.6"}
    assert 0 <= r["token_acc"] <= 1
    r = cola_eval.main(["fm", f"--ckpt={path}", "--limit=8"])
    assert r["fm_loss"] > 0 and r["fm_loss_gauss"] > 0 and set(r["bins"]) == set(r["bins_gauss"])
    assert r["fm_history_gain"] == pytest.approx((r["fm_high_t_other"] - r["fm_high_t"]) / r["fm_high_t_other"])
    assert r["fm_history_gain_first"] == pytest.approx(1 - r["fm_high_t_first"] / r["fm_high_t_other_first"])
    r = cola_eval.main(["nll", f"--ckpt={path}", "--limit=4", "--samples=3", "--ode_steps=2"])
    assert r["nll_iwae"] <= r["nll_elbo"] and r["nll"] == r["nll_iwae"] and r["params"] > 0
    assert r["bpb"] == pytest.approx(r["nll"] * r["tokens"] / r["bytes"] / math.log(2))
    assert r["ppl"] == pytest.approx(math.exp(r["nll"]))
    assert r["dtype"] == "fp32"  # a likelihood stays fp32 unless bf16 is asked for
    r = cola_eval.main(["speed", f"--ckpt={path}", "--limit=1", "--quick"])
    assert len(r["rows"]) == 2 and r["cache_speedup"] == r["cache_free_seconds"] / r["cached_seconds"]
    assert r["dtype"] == "fp32"  # auto on a CPU
    half = cola_eval.main(["speed", f"--ckpt={path}", "--limit=1", "--quick", "--dtype=bf16"])
    assert half["dtype"] == "bf16" and len(half["rows"]) == 2
    # any size without training: fresh weights from train.py's options
    fresh = cola_eval.main(["speed", "--random_init", "--quick", "--dit.block_size=4", "--vae.width=32", "--vae.n_head=2",
                            "--dit.width=32", "--dit.n_head=2", "--dit.n_layer=1"])
    assert len(fresh["rows"]) == 2 and fresh["stage"] == "random_init" and "--dit.block_size=4" in fresh["ckpt"]
    fresh = cola_eval.main(["speed", "--random_init", "--quick", "--model=ar", "--ar.width=32", "--ar.n_head=2",
                            "--ar.n_layer=1"])
    assert len(fresh["rows"]) == 2 and "cache_speedup" not in fresh
    for bad in (["speed"], ["speed", f"--ckpt={path}", "--random_init"], ["speed", f"--ckpt={path}", "--dit.width=8"],
                ["speed", f"--ckpt={path}", "--dtype=fp16"], ["speed", f"--ckpt={path}", "--steps", "8", "0"]):
        with pytest.raises(UserError):  # one `error:` line under common.run_main
            cola_eval.main(bad)
    for row in r["rows"]:  # 20-token prompt with blocks of 4: the tail is empty, every block is new tokens
        assert row["tok_s"] == pytest.approx(row["batch"] * row["new_tokens"] / row["seconds"])
        assert row["block_ms"] == pytest.approx(1000 * row["seconds"] / (row["new_tokens"] / 4))
    with pytest.raises(UserError, match="stage-2"):
        cola_eval.main(["fm", f"--ckpt={vae_only}"])
    # bench, both protocols, on a tiny multiple-choice file in the authors' format, with their generations
    items = root / "mc.jsonl"
    items.write_text("\n".join(json.dumps(dict(id=i, few_shot_prefix="Question: ", prompt=f"Q{i}?\n(A) yes\n(B) no\nAnswer:",
                                               choices=["yes", "no"], ground_truth="yes", generate=" yes"))
                               for i in range(6)))
    r = cola_eval.main(["bench", f"--ckpt={path}", "--task=obqa", f"--data={items}", "--steps=2", "--limit=3"])
    assert r["n"] == 3 and r["chance"] == 50 and 0 <= r["ci95"][0] <= r["ci95"][1] <= 100 and 0 <= r["same_as_file"] <= 3
    assert [x["correct"] for x in r["items"]] == [x["generated"].strip().lower() in ("yes", "a") for x in r["items"]]
    r = cola_eval.main(["bench", f"--ckpt={path}", "--task=obqa", f"--data={items}", "--protocol=rank"])
    assert r["n"] == 6 and r["accuracy"] in [100 * k / 6 for k in range(7)]
    bad = root / "bad.jsonl"
    bad.write_text(json.dumps(dict(prompt="q", ground_truth="a")) + "\n{broken\n")
    with pytest.raises(UserError, match="bad.jsonl, line 2"):
        cola_eval.main(["bench", f"--ckpt={path}", "--task=lambada", f"--data={bad}"])
    r = cola_eval.main(["all", f"--ckpt={path}", "--limit=4", "--steps=2"])
    assert {"recon", "fm", "nll", "speed"} <= set(r) and r["nll"]["params"] > 0
    with pytest.raises(UserError, match="rank needs a multiple-choice"):
        cola_eval.main(["bench", f"--ckpt={path}", "--task=lambada", f"--data={items}", "--protocol=rank"])
    assert "token_acc" in capsys.readouterr().out


def test_rescore_scores_a_files_generations(tmp_path, capsys):
    """eval.py rescore: the authors' rules on the file's `generate`, no model; accuracy in percent, per item."""
    rows = [dict(id=1, prompt="p", ground_truth="Savior", generate=" Savior.\u201d"),
            dict(id=2, prompt="p", ground_truth="dog", generate=" cat"),
            dict(id=3, prompt="p", ground_truth="dog", generate="")]
    path = tmp_path / "lambada.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    r = cola_eval.main(["rescore", "--task=lambada", f"--data={path}", f"--out={tmp_path / 'r.json'}"])
    assert r["accuracy"] == pytest.approx(100 / 3) and [x["correct"] for x in r["items"]] == [True, False, False]
    assert json.load(open(tmp_path / "r.json"))["items"][0] == dict(id=1, generated=" Savior.\u201d", key="savior",
                                                                     correct=True)
    assert "accuracy 33.33% [" in capsys.readouterr().out
    path.write_text(json.dumps(dict(id=1, prompt="p", ground_truth="x")))
    with pytest.raises(UserError, match="no \"generate\""):
        cola_eval.main(["rescore", "--task=lambada", f"--data={path}"])
    with pytest.raises(UserError, match="unknown task"):
        cola_eval.main(["rescore", "--task=nope", f"--data={path}"])


def test_text_stats_bracket_real_text_and_noise():
    vocab = {"the", "whale", "swam", "past", "ship", "and", "emma", "smiled", "at"}
    real = ["the whale swam past the ship and emma smiled at the whale.", "and the ship swam past emma."]
    torch.manual_seed(0)
    letters = "abcdefghijklmnopqrstuvwxyz     "  # random letters and spaces: letter soup
    noise = ["".join(letters[i] for i in torch.randint(0, len(letters), (80,)).tolist()) for _ in range(2)]
    loop = ["of the sea " * 8]
    s_real, s_noise, s_loop = (tq.text_stats(t, vocab) for t in (real, noise, loop))
    assert s_real["word_valid"] == 1.0 and s_noise["word_valid"] < 0.1
    assert tq.text_stats(["xq zzv the whale."], vocab)["word_valid"] == pytest.approx(0.5)
    assert tq.words("the whale swa") == ["the", "whale"]  # a word cut by the end is left out
    assert s_real["distinct4"] == 1.0 and s_loop["distinct4"] < 0.4
    assert s_loop["byte_entropy"] < s_real["byte_entropy"] < 8


@pytest.fixture(scope="module")
def judge(tiny_run):
    """An AR judge trained for a few seconds on the tiny corpus: it knows its sentences."""
    root, path, _ = tiny_run
    from ar import ARConfig, ARLM
    from data.loader import BatchLoader
    torch.manual_seed(0)
    ar = ARLM(ARConfig(n_layer=1, width=64, n_head=2))
    opt = torch.optim.AdamW(ar.parameters(), lr=1e-2)
    loader = BatchLoader(str(root / "tiny"), "train", 16, 64)
    for step in range(60):
        loss = ar(loader.get(step))[0]
        opt.zero_grad(); loss.backward(); opt.step()
    judge_path = str(root / "judge.pt")
    save_checkpoint(dict(config=dict(ar=asdict(ar.cfg), train=asdict(TrainConfig(dataset=str(root / "tiny"),
                                                                                 seq_len=64))),
                         ar=ar.state_dict(), stage="ar", step=60), judge_path)
    return judge_path


def test_quality_end_to_end(tiny_run, judge, tmp_path):
    root, path, _ = tiny_run
    out = tmp_path / "q.json"
    r = cola_eval.main(["quality", f"--ckpt={path}", f"--judge={judge}", "--prompts=6", "--new_tokens=12",
                        "--steps=2", f"--out={out}"])
    saved = json.loads(out.read_text())
    assert saved["settings"]["prompts"] == 6 and len(saved["samples"]) == 6 and saved["self_judged"] is False
    for key in ("gen_bpb", "gen_bpb_true", "word_valid", "word_valid_true", "word_valid_unigram", "distinct4",
                "byte_entropy"):
        assert key in saved
    # the true continuations score near the top, unigram-sampled bytes near the floor
    assert r["word_valid_true"] > 0.9 and r["word_valid_unigram"] < 0.5
    assert r["gen_bpb_true"] < 0.5 * r["gen_bpb_unigram"]
    # prompts end at a word boundary and the same prompts come back for another model
    assert all(s["true"].startswith(" ") and s["prompt"][-1].isalpha() for s in r["samples"])
    r2 = cola_eval.main(["quality", f"--ckpt={judge}", f"--judge={judge}", "--prompts=6", "--new_tokens=12"])
    assert [s["prompt"] for s in r2["samples"]] == [s["prompt"] for s in r["samples"]] and r2["self_judged"]
    with pytest.raises(UserError, match="must be an AR"):
        cola_eval.main(["quality", f"--ckpt={path}", f"--judge={path}", "--prompts=2", "--new_tokens=8"])


def test_history_gain_sees_a_prior_that_copies_its_history():
    """A velocity field that reads the history gets a positive gain; one that ignores it gets ~0."""
    torch.manual_seed(0)
    vae = TextVAE(VAEConfig(n_enc_layer=1, n_dec_layer=1, width=32, n_head=2))
    dit = DiT(DiTConfig(n_layer=1, width=32, n_head=2, block_size=4))
    model = Cola(vae, dit)
    z = torch.randn(8, 4, 16).repeat(1, 3, 1)  # every block repeats the first: the history predicts it
    r = flow.history_gain(model.dit, model.flow_cfg, z)
    assert r["fm_history_gain"] == pytest.approx(0.0, abs=1e-6)  # a fresh DiT outputs zero whatever it sees

    class Copier(torch.nn.Module):  # v = eps - z0 estimated from z_t and the previous block of the clean copy
        cfg = dit.cfg

        def forward(self, z_in, t, t_index, pos, mask, cache=None, sc=None):
            L = z_in.shape[1] // 2
            clean, noisy, tt = z_in[:, :L], z_in[:, L:], t.gather(1, t_index)[:, L:, None]
            guess = clean.roll(4, 1)  # the previous block's clean latents
            v = (noisy - guess) / tt.clamp(min=1e-3)  # (z_t - z0) / t = eps - z0 when the guess is right
            return torch.cat([torch.zeros_like(clean), v], 1)

    model.dit = Copier()
    r = flow.history_gain(model.dit, model.flow_cfg, z)
    assert r["fm_history_gain"] > 0.5 and r["fm_history_gain_first"] > 0.5
