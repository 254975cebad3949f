"""
Helpers shared by the scripts (train.py, sample.py, eval.py, data/): one-line errors, --key=value
overrides, device, precision and DDP setup, run logging, checkpoint I/O. Imports no model: config.py
makes the models.
"""
import argparse
import collections
import contextlib
import dataclasses
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist


class UserError(Exception):
    """A mistake on the command line or in an input file: reported as one line, no traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one `error:` line (via run_main), not the usage text."""

    def error(self, message):
        raise UserError(message)


def run_main(main):
    """Run main(); UserError -> 'error: ...' on stderr and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


# ----------------------------------------------------------------------------- command line

BOOLEANS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def parse_overrides(argv, configs, verbose=True):
    """Apply --key=value arguments to dataclass configs, {prefix: instance}: with {"": train, "vae": vae},
    --lr=1e-3 sets train.lr and --vae.beta=0.01 vae.beta; a bare --flag sets a boolean option true."""
    for arg in argv:
        if not arg.startswith("--"):
            raise UserError(f"arguments look like --key=value (or --flag for a boolean), got {arg!r}")
        key, eq, text = arg[2:].partition("=")
        prefix, _, name = key.rpartition(".")
        cfg = configs.get(prefix)
        if cfg is None or name not in {f.name for f in dataclasses.fields(cfg)}:
            raise UserError(f"unknown option --{key}")
        default = getattr(cfg, name)
        if not eq and not isinstance(default, bool):
            raise UserError(f"--{key} needs a value: --{key}=VALUE")
        try:  # to the type of the default it overrides
            value = BOOLEANS[text.lower() if eq else "true"] if isinstance(default, bool) else type(default)(text)
        except (KeyError, ValueError):
            raise UserError(f"--{key}: expected {type(default).__name__}, got {text!r}")
        setattr(cfg, name, value)
        if verbose:
            print(f"override: {key} = {value!r}")


# ----------------------------------------------------------------------------- device / DDP

def pick_device(name="auto"):
    """cuda > mps > cpu, or the device named (checked)."""
    available = dict(cuda=torch.cuda.is_available(), mps=torch.backends.mps.is_available(), cpu=True)
    if name == "auto":
        return next(kind for kind, ok in available.items() if ok)
    try:
        kind = torch.device(name).type
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}")
    if not available.get(kind, True):
        raise UserError(f"--device={name} but {kind.upper()} is not available here")
    return name


DTYPES = ("auto", "fp32", "bf16")


def autocast(device, dtype="auto"):
    """The precision of a forward: "auto" is bf16 autocast on CUDA, fp32 elsewhere; "bf16" anywhere (on a CPU
    it pays off only with native bf16 matmuls: RESULTS.md, 'Sampler speed'); "fp32" never autocasts. Under
    bf16 the matmuls and KV caches are bf16; residual streams, latents and losses stay fp32."""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16) if precision(kind, dtype) == "bf16" else contextlib.nullcontext()


def cast_for(model, device, dtype="auto"):
    """The model, ready for inference under autocast(device, dtype): with bf16, its Linear and Embedding
    weights are stored in bf16 once. Autocast caches its casts only for weights that require grad, so a
    frozen model (a 51 MB GPT-2 output head above all) would be cast again at every call."""
    if precision(device, dtype) == "bf16":
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                m.to(torch.bfloat16)
    return model


def precision(device, dtype="auto"):
    """What autocast(device, dtype) runs in: "bf16" or "fp32"."""
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return "bf16" if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return dtype


Env = collections.namedtuple("Env", "rank world local_rank device")


def setup(device_name="auto"):
    """Device and DDP -> Env: DDP is on exactly when RANK is set (torchrun), gloo on CPU, nccl on CUDA."""
    rank, world, local_rank = 0, 1, 0
    device = pick_device(device_name)
    if "RANK" in os.environ:
        rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        if device == "cuda":
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if str(device).startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Env(rank, world, local_rank, device)


def print0(*args):
    """print on rank 0 only (a plain run is rank 0)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, flush=True)


def all_reduce_mean(values, world):
    """Average a dict of scalar tensors over ranks -> floats (logging, validation, the finite-loss check)."""
    if world == 1:
        return {k: v.item() for k, v in values.items()}
    keys = sorted(values)
    t = torch.stack([values[k].float() for k in keys])
    dist.all_reduce(t)
    return {k: (v / world).item() for k, v in zip(keys, t)}


# ----------------------------------------------------------------------------- training runs

class StopFlag:
    """SIGTERM / SIGINT, or --stop_after steps in this process, end the run after the current step
    with a checkpoint; under DDP a signal that reached any rank stops all of them at the same step."""

    def __init__(self, stop_after):
        self.signalled, self.steps, self.stop_after = False, 0, stop_after
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)

    def on_signal(self, signum, frame):
        self.signalled = True

    def after_step(self, env):
        self.steps += 1
        if env.world > 1:
            flag = torch.tensor(float(self.signalled), device=env.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.signalled = bool(flag.item())
        return self.signalled or self.steps == self.stop_after


class Log:
    """One line per log_interval and per validation, the same as JSON lines in out_dir/metrics.jsonl.
    Throughput counts training time only: validation and checkpoint writes run inside paused()."""

    def __init__(self, stage, tc, env, flops, step, max_iters):
        self.stage, self.tc, self.flops, self.max_iters = stage, tc, flops, max_iters
        self.path = os.path.join(tc.out_dir, "metrics.jsonl") if env.rank == 0 else None
        self.t_start = self.t_last = time.time()
        self.start = self.last = step

    @contextlib.contextmanager
    def paused(self):
        t = time.time()
        yield
        self.t_last += time.time() - t

    def write(self, **row):
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(dict(stage=self.stage, **row)) + "\n")

    def val(self, step, stats):
        print0(f"val {self.stage} step {step}: " + " | ".join(f"{k} {v:.4f}" for k, v in stats.items()))
        self.write(step=step, split="val", **stats)

    def train(self, step, stats, grad_norm, lr):
        tc = self.tc
        if step % tc.log_interval and step != self.max_iters:
            return
        dt = (time.time() - self.t_last) / (step - self.last)  # seconds per step since the last line
        self.t_last, self.last = time.time(), step
        tok_s = tc.batch_size * tc.seq_len / dt
        eta = (self.max_iters - step) * (time.time() - self.t_start) / (step - self.start)
        print0(f"{self.stage} step {step:5d} | " + " | ".join(f"{k} {v:.4f}" for k, v in stats.items())
               + f" | gnorm {grad_norm:.2f} | lr {lr:.2e} | {dt * 1000:.0f} ms | {tok_s:.0f} tok/s"
               + f" | {tok_s * self.flops['train'] / 1e12:.3f} TFLOP/s | eta {eta / 60:.1f} min")
        self.write(step=step, split="train", lr=lr, dt=dt, tok_s=tok_s, grad_norm=grad_norm,
                   stage_flops=step * tc.batch_size * tc.seq_len * self.flops["train"], **stats)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(obj, path):
    """Atomic write: a crash mid-save never leaves a truncated ckpt.pt behind."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated file, a pickle from elsewhere, ...
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")


def load_vae_state(path, vae_cfg):
    """The VAE weights of a stage-1 checkpoint, checked against the VAE architecture of vae_cfg; None for
    path "scratch" (stage 2 with a fresh VAE: the all-from-scratch ablation of the paper's Fig. 3)."""
    if not path:
        raise UserError("--stage=joint needs --init=PATH (a stage-1 checkpoint or the released checkpoint's directory) "
                        "or --init=scratch")
    if path == "scratch":
        return None
    ckpt = load_checkpoint(path)
    if "vae" not in ckpt:
        raise UserError(f"{path} holds no VAE weights")
    # the architecture must match; loss weights (beta, mask_ratio, ...) may change for stage 2
    arch = ("tokenizer", "n_enc_layer", "n_dec_layer", "width", "n_head", "ffn_dim", "latent_dim", "block_causal",
            "block_size", "rope_theta", "norm_eps", "scaling_factor", "shifting_factor")
    diff = {k: (ckpt["config"]["vae"].get(k), getattr(vae_cfg, k)) for k in arch
            if ckpt["config"]["vae"].get(k) != getattr(vae_cfg, k)}
    if diff:
        raise UserError(f"--init {path} has a different VAE architecture (checkpoint, now): {diff}")
    return ckpt["vae"]


def check_resume(ckpt, cfgs, free=()):
    """Refuse a resume whose configs differ from the checkpoint's (options in `free` may change: train
    options by name, others as "part.name")."""
    now = {k: dataclasses.asdict(v) for k, v in cfgs.items()}
    diff = []
    for part, values in ckpt["config"].items():
        for k, v in values.items():
            if not ((part == "train" and k in free) or f"{part}.{k}" in free) and now[part].get(k) != v:
                diff.append(f"{part}.{k}: checkpoint {v!r}, now {now[part].get(k)!r}")
    if diff:
        raise UserError("--resume with settings that differ from the checkpoint: " + "; ".join(diff))

