"""The AR baseline: matched size, cached sampling, exact likelihood, and the shared CLIs."""
import math

import pytest
import torch

import eval as cola_eval
import sample
import train
from ar import ARConfig, ARLM
from common import UserError
from config import build_configs
from dit import DiT, DiTConfig
from vae import TextVAE, VAEConfig


def test_default_sizes_match_within_15_percent():
    n_ar = sum(p.numel() for p in ARLM(ARConfig()).parameters())
    n_cola = sum(p.numel() for m in (TextVAE(VAEConfig()), DiT(DiTConfig())) for p in m.parameters())
    assert abs(n_ar - n_cola) / n_cola < 0.15, (n_ar, n_cola)


def random_ar():
    torch.manual_seed(0)
    return ARLM(ARConfig(n_layer=2, width=32, n_head=2)).eval()


def test_cached_sampling_equals_recomputation_and_batching():
    ar = random_ar()
    prompts = [list(b"Call me"), list(b"It is a truth"), [5]]
    outs = ar.generate(prompts, 10, stop_at_eot=False)  # greedy
    for p, o in zip(prompts, outs):
        seq = list(p)
        for _ in range(10):  # no cache: the whole sequence every token
            x = torch.tensor([seq])
            seq.append(int(ar.logits(x, torch.arange(len(seq))[None])[0, -1].argmax()))
        assert o == seq[len(p):]
        assert ar.generate([p], 10, stop_at_eot=False)[0] == o  # alone == in a batch


def test_score_is_the_exact_log_likelihood():
    ar = random_ar()
    x = torch.randint(0, 256, (2, 9))
    manual = torch.zeros(2)
    for i in range(1, 9):
        logits = ar.logits(x[:, :i], torch.arange(i).expand(2, i))[:, -1]
        manual += logits.log_softmax(-1).gather(1, x[:, i:i + 1]).squeeze(1)
    assert torch.allclose(ar.score(x), manual, atol=1e-4)


def test_flops_counter():
    ar = ARLM(ARConfig())
    f_ar = ar.flops(128)
    assert f_ar["train"] == 3 * f_ar["sample"]
    # an AR forward is about 2 x non-embedding params FLOPs per token, plus attention and the head
    n = sum(p.numel() for p in ar.transformer.parameters())
    assert 2 * n < f_ar["sample"] < 2 * n * 1.5


def test_train_sample_eval_on_an_ar_checkpoint(tmp_path, capsys):
    from tests.test_train_run import TINY
    from data import prepare
    (tmp_path / "c.txt").write_text("\n\n".join(f"Chapter {i}. Call me Ishmael." for i in range(200)))
    prepare.main(["--input", str(tmp_path / "c.txt"), "--name", "d", "--tokenizer", "bytes", "--out_dir", str(tmp_path)])
    out = tmp_path / "ar"
    train.main(TINY + ["--model=ar", "--ar.n_layer=1", "--ar.width=32", "--ar.n_head=2", "--ar_iters=3",
                       f"--dataset={tmp_path / 'd'}", f"--out_dir={out}"])
    ckpt = str(out / "ckpt.pt")
    assert "MFLOPs per training token" in capsys.readouterr().out
    sample.main([f"--ckpt={ckpt}", "--prompt=Call", "--max_new_tokens=5"])
    assert capsys.readouterr().out.startswith("Call")
    r = cola_eval.main(["nll", f"--ckpt={ckpt}", "--limit=4"])
    assert r["exact"] and r["ppl"] == pytest.approx(math.exp(r["nll"])) and r["tokens"] == 4 * 15
    r = cola_eval.main(["speed", f"--ckpt={ckpt}", "--quick", "--limit=1"])
    assert len(r["rows"]) == 2 and "cache_speedup" not in r
    r = cola_eval.main(["speed", f"--ckpt={ckpt}", f"--against={ckpt}", "--quick", "--limit=1"])  # timed in turns
    assert all(row["against_tok_s"] > 0 for row in r["rows"]) and "against" in capsys.readouterr().out
    with pytest.raises(UserError, match="AR baseline"):
        cola_eval.main(["recon", f"--ckpt={ckpt}"])


@pytest.mark.parametrize("preset", ["small", "paper"])
def test_preset_sizes_match_within_15_percent(preset):
    """Count parameters without building the big models: meta-device tensors cost nothing."""
    with torch.device("meta"):
        cola = build_configs([f"--config={preset}"])
        n_cola = sum(p.numel() for m in (TextVAE(cola["vae"]), DiT(cola["dit"])) for p in m.parameters())
        n_ar = sum(p.numel() for p in ARLM(build_configs([f"--config={preset}", "--model=ar"])["ar"]).parameters())
    assert abs(n_ar - n_cola) / n_cola < 0.15, (n_ar, n_cola)
