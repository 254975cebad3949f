"""
Helpers shared by train.py, sample.py and eval.py: command-line overrides, device and DDP setup,
checkpoint I/O and rebuilding models from a checkpoint. Each lives here once and is imported.
"""
import ast
import contextlib
import dataclasses
import os
import signal
import sys

import torch
import torch.distributed as dist


class UserError(Exception):
    """A mistake on the command line or in an input file: reported as one line, no traceback."""


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

def parse_value(text, default):
    """Parse a command-line string to the type of the default it overrides."""
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise UserError(f"expected a boolean, got {text!r}")
    if isinstance(default, str) or default is None:
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise UserError(f"cannot parse {text!r} as {type(default).__name__}")
    if isinstance(default, float) and isinstance(value, int):
        value = float(value)
    if type(value) is not type(default):
        raise UserError(f"expected {type(default).__name__}, got {text!r}")
    return value


def parse_overrides(argv, configs, verbose=True):
    """Apply --key=value arguments to dataclass configs.

    configs maps a prefix to a dataclass instance: {"": train_cfg, "vae": vae_cfg, ...}; "--lr=1e-3"
    sets train_cfg.lr, "--vae.beta=0.01" sets vae_cfg.beta. Unknown keys are an error; every
    override is printed.
    """
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(f"arguments look like --key=value, got {arg!r}")
        key, text = arg[2:].split("=", 1)
        prefix, _, name = key.rpartition(".")
        cfg = configs.get(prefix)
        if cfg is None or name not in {f.name for f in dataclasses.fields(cfg)}:
            raise UserError(f"unknown option --{key}")
        try:
            setattr(cfg, name, parse_value(text, getattr(cfg, name)))
        except UserError as e:
            raise UserError(f"--{key}: {e}")
        if verbose:
            print(f"override: {key} = {getattr(cfg, name)!r}")


# ----------------------------------------------------------------------------- device / DDP

def pick_device(name="auto"):
    """cuda > mps > cpu, or the device named (checked)."""
    if name != "auto":
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise UserError(f"unknown --device {name!r}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device={name} but CUDA is not available here")
        if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError(f"--device={name} but MPS is not available here")
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def autocast(device):
    """bf16 autocast where it is fast and supported (CUDA), full fp32 elsewhere."""
    if str(device).startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def setup(device_name="auto"):
    """Device and DDP (exactly when RANK is set, i.e. under torchrun: gloo on CPU, nccl on CUDA); SIGTERM/SIGINT
    set ctx["stop"] so the trainer saves and exits after the current step."""
    ddp = "RANK" in os.environ
    rank, world, local_rank = 0, 1, 0
    device = pick_device(device_name)
    if ddp:
        rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        if device == "cuda":
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if str(device).startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ctx = dict(rank=rank, world=world, local_rank=local_rank, device=device, stop=False, steps_run=0,
               print0=lambda *a: print(*a, flush=True) if rank == 0 else None)

    def on_signal(signum, frame):  # finish the current step, save, exit
        ctx["stop"] = True
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return ctx


def all_reduce_mean(values, world):
    """Average a dict of scalar tensors over ranks -> floats (logging, validation, the finite-loss check)."""
    if world == 1:
        return {k: v.item() for k, v in values.items()}
    keys = sorted(values)
    t = torch.stack([values[k].float() for k in keys])
    dist.all_reduce(t)
    return {k: (v / world).item() for k, v in zip(keys, t)}


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
    """The VAE weights of a stage-1 checkpoint, checked against the VAE architecture of vae_cfg."""
    if not path:
        raise UserError("--stage=joint needs --init_vae=PATH (a stage-1 checkpoint)")
    ckpt = load_checkpoint(path)
    if "vae" not in ckpt:
        raise UserError(f"{path} holds no VAE weights")
    # the architecture must match; loss weights (beta, mask_ratio, ...) may change for stage 2
    arch = ("tokenizer", "n_enc_layer", "n_dec_layer", "width", "n_head", "latent_dim", "dec_block_causal", "block_size")
    diff = {k: (ckpt["config"]["vae"].get(k), getattr(vae_cfg, k)) for k in arch
            if ckpt["config"]["vae"].get(k) != getattr(vae_cfg, k)}
    if diff:
        raise UserError(f"--init_vae {path} has a different VAE architecture (checkpoint, now): {diff}")
    return ckpt["vae"]


def check_resume(ckpt, cfgs, free=()):
    """Refuse a resume whose configs differ from the checkpoint's (train options in `free` may change)."""
    now = {k: dataclasses.asdict(v) for k, v in cfgs.items()}
    diff = []
    for part, values in ckpt["config"].items():
        for k, v in values.items():
            if not (part == "train" and k in free) and now[part].get(k) != v:
                diff.append(f"{part}.{k}: checkpoint {v!r}, now {now[part].get(k)!r}")
    if diff:
        raise UserError("--resume with settings that differ from the checkpoint: " + "; ".join(diff))


def load_models(path, device="cpu"):
    """Rebuild the models of a train.py checkpoint in eval mode: ({"vae", "dit"} or {"ar"}, ckpt).
    A stage-1 checkpoint has dit None."""
    ckpt = load_checkpoint(path)
    if "config" not in ckpt or not ({"vae", "ar"} & set(ckpt)):
        raise UserError(f"{path} is not a cola checkpoint (no model weights / configs in it)")
    if "ar" in ckpt:
        from ar import ARConfig, ARLM
        ar = ARLM(ARConfig(**ckpt["config"]["ar"]))
        ar.load_state_dict(ckpt["ar"])
        return {"ar": ar.to(device).eval()}, ckpt
    from dit import DiT, DiTConfig
    from vae import TextVAE, VAEConfig
    vae = TextVAE(VAEConfig(**ckpt["config"]["vae"]))
    vae.load_state_dict(ckpt["vae"])
    dit = None
    if ckpt.get("dit") is not None:
        dit = DiT(DiTConfig(**ckpt["config"]["dit"]))
        dit.load_state_dict(ckpt["dit"])
        dit.to(device).eval()
    return {"vae": vae.to(device).eval(), "dit": dit}, ckpt
