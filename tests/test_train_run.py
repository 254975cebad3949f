"""Whole training runs on a tiny synthetic corpus: exact resume, signals, non-finite loss, DDP."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from common import UserError
from data import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--vae.width=32", "--vae.n_head=2", "--vae.n_enc_layer=1", "--vae.n_dec_layer=1",
        "--dit.width=32", "--dit.n_head=2", "--dit.n_layer=1", "--dit.block_size=4", "--vae_lr_ratio=1", "--seq_len=16",
        "--batch_size=4", "--eval_windows=4", "--eval_interval=3", "--log_interval=1", "--warmup_iters=2", "--lr=3e-3"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "c.txt").write_text("\n\n".join(f"Chapter {i}. Call me Ishmael, said Mr. Darcy to the whale."
                                            for i in range(200)))
    prepare.main(["--input", str(root / "c.txt"), "--name", "tiny", "--tokenizer", "bytes", "--out_dir", str(root)])
    return str(root / "tiny")


def run(args, env=None, check=True, **kw):
    """train.py in a new process (what a user runs)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py")] + args, cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300, **kw)
    if check:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def same_weights(a, b, exact=True, atol=0.0):
    for part in ("vae", "dit", "ref"):
        if a.get(part) is None:
            assert b.get(part) is None
            continue
        for k in a[part]:
            ok = torch.equal(a[part][k], b[part][k]) if exact else torch.allclose(a[part][k], b[part][k], atol=atol)
            assert ok, f"{part}.{k} differs"


def test_resume_is_exact(dataset, tmp_path):
    common = TINY + [f"--dataset={dataset}", "--vae_iters=4", "--joint_iters=6", "--ckpt_interval=100"]
    run(common + [f"--out_dir={tmp_path / 'straight'}"])
    # the same run cut twice, each time continued by a new process: inside stage 2, then at a stage boundary
    p = run(common + [f"--out_dir={tmp_path / 'cut'}", "--stop_after=6"])
    assert "continue with --resume" in p.stdout
    assert load(tmp_path / "cut" / "ckpt.pt")["stage"] == "joint" and load(tmp_path / "cut" / "ckpt.pt")["step"] == 2
    run(common + [f"--out_dir={tmp_path / 'cut'}", "--resume", "--stop_after=2"])  # a bare boolean flag
    run(common + [f"--out_dir={tmp_path / 'cut'}", "--resume=true"])
    a, b = load(tmp_path / "straight" / "ckpt.pt"), load(tmp_path / "cut" / "ckpt.pt")
    assert a["step"] == b["step"] == 6 and a["stage"] == b["stage"] == "joint"
    same_weights(a, b)  # bitwise on CPU
    assert all(torch.equal(x, y) for x, y in zip(a["optimizer"]["state"][0].values(), b["optimizer"]["state"][0].values()))
    # a resume whose settings differ from the checkpoint is refused with a clear message
    p = run(common + [f"--out_dir={tmp_path / 'cut'}", "--resume=true", "--lr=1e-2"], check=False)
    assert p.returncode == 2 and "train.lr" in p.stderr and "Traceback" not in p.stderr


def test_sigterm_saves_a_loadable_checkpoint(dataset, tmp_path):
    out = tmp_path / "sig"
    args = TINY + [f"--dataset={dataset}", "--stage=vae", "--vae_iters=100000", "--ckpt_interval=100000",
                   f"--out_dir={out}"]
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py")] + args, cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and '"split": "train"' in metrics.read_text()):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr
    assert "signal" in stdout
    ckpt = load(out / "ckpt.pt")  # weights_only=True
    assert isinstance(ckpt["step"], int) and ckpt["step"] >= 1 and not (out / "ckpt.pt.tmp").exists()


def test_non_finite_loss_stops_and_keeps_checkpoint(dataset, tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = train.Cola.forward

    def poisoned(self, x):
        loss, stats = forward(self, x)
        calls["n"] += 1
        if calls["n"] == 4:  # the 4th step (index 3) goes bad
            loss = loss * float("nan")
            stats["loss"] = loss.detach()
        return loss, stats

    monkeypatch.setattr(train.Cola, "forward", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(UserError, match="non-finite loss at vae step 3"):
        train.main(TINY + [f"--dataset={dataset}", "--stage=vae", "--vae_iters=10", "--ckpt_interval=1",
                           f"--out_dir={out}"])
    assert load(out / "ckpt.pt")["step"] == 3  # the last good state, after steps 0..2
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def test_ddp_two_processes_equal_one_process_with_accumulation(dataset, tmp_path):
    common = TINY + [f"--dataset={dataset}", "--stage=all", "--vae_iters=3", "--joint_iters=3", "--micro_batch=2"]
    run(common + [f"--out_dir={tmp_path / 'one'}"])  # 1 process x accumulation 2
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py")] + common + [f"--out_dir={tmp_path / 'two'}"]
    for attempt in range(2):  # one retry, only for a failure to set up the process group (a busy port)
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        setup_failure = any(s in p.stderr for s in ("Address already in use", "rendezvous", "Connection refused"))
        if p.returncode == 0 or not setup_failure:
            break
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    a, b = load(tmp_path / "one" / "ckpt.pt"), load(tmp_path / "two" / "ckpt.pt")
    same_weights(a, b, exact=False, atol=1e-5)
    lines = [json.loads(l) for l in open(tmp_path / "two" / "metrics.jsonl")]
    assert any(l["split"] == "val" for l in lines) and any(l["split"] == "train" for l in lines)


@pytest.mark.parametrize("args, message", [
    (["--dataset=MISSING"], "prepare.py"),
    (["--vae.tokenizer=gpt2"], "tokenized with 'bytes'"),
    (["--log_interval=0"], "log_interval must be >= 1"),
    (["--flow.t_dist=beta"], "t_dist"),
    (["--seq_len=100000"], "fewer than"),
    (["--batch_size=4", "--micro_batch=3"], "multiple of micro_batch"),
])
def test_user_mistakes_get_one_line_errors(dataset, tmp_path, args, message):
    args = [a.replace("MISSING", str(tmp_path / "missing")) for a in args]
    p = run(TINY + [f"--out_dir={tmp_path / 'x'}", "--stage=vae", "--vae_iters=1", f"--dataset={dataset}"] + args,
            check=False)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr[-500:]
    assert not (tmp_path / "x" / "ckpt.pt").exists()


def test_a_finished_run_is_never_overwritten_by_accident(dataset, tmp_path):
    out = tmp_path / "x"
    base = TINY + [f"--out_dir={out}", f"--dataset={dataset}", "--stage=vae", "--vae_iters=1"]
    run(base)
    before = (out / "ckpt.pt").read_bytes()
    p = run(base, check=False)  # the same command again: refused, the run kept
    assert p.returncode == 2 and "--resume" in p.stderr and "--overwrite" in p.stderr and "Traceback" not in p.stderr
    assert (out / "ckpt.pt").read_bytes() == before
    # --resume never silently restarts over a checkpoint of another stage or model
    p = run(TINY + [f"--out_dir={out}", f"--dataset={dataset}", "--model=ar", "--resume"], check=False)
    assert p.returncode == 2 and "refusing to overwrite" in p.stderr
    assert (out / "ckpt.pt").read_bytes() == before
    # --overwrite starts afresh, with a fresh metrics log
    run(base + ["--overwrite", "--vae_iters=2"])
    assert load(out / "ckpt.pt")["step"] == 2
    assert all(json.loads(l)["step"] <= 2 for l in open(out / "metrics.jsonl"))
    assert sum(json.loads(l)["split"] == "val" and json.loads(l)["step"] == 0 for l in open(out / "metrics.jsonl")) == 1
