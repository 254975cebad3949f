"""
Train Cola DLM: stage 1 (text VAE), stage 2 (joint VAE + block-causal DiT), or both.

    python train.py                                  # stage 1 then stage 2 on `tiny` (CPU, minutes) -> out/ckpt.pt
    python train.py --stage=vae --out_dir=out_vae    # stage 1 only
    python train.py --stage=joint --init_vae=out_vae/ckpt.pt
    python train.py --config=small                   # one GPU
    torchrun --standalone --nproc_per_node=4 train.py --config=small

Options are --key=value: train options by name (--lr=1e-3), component options with a prefix
(--vae.beta=1e-3, --dit.n_layer=6, --flow.t_loc=1.0). Unknown keys are an error.
The checkpoint out_dir/ckpt.pt carries every config, so sample.py and eval.py need only --ckpt;
--resume continues a run exactly from it.
"""
import contextlib
import copy
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ar import ARConfig, ARLM
from common import (UserError, all_reduce_mean, autocast, check_resume, load_checkpoint, load_vae_state,
                    parse_overrides, run_main, save_checkpoint, setup)
from data.loader import BatchLoader, load_meta, resolve_data_dir, val_windows
from dit import DiT, DiTConfig
from flow import FlowConfig, fm_by_t, fm_loss
from vae import TextVAE, VAEConfig, gaussian_kl


@dataclass
class TrainConfig:
    model: str = "cola"         # "cola", or "ar": the autoregressive baseline (ar.py), same data and trainer
    stage: str = "all"          # cola: "vae" (stage 1), "joint" (stage 2), "all" (1 then 2 into one out_dir)
    config: str = "tiny"        # preset: tiny | small | paper (applied before other overrides)
    dataset: str = "austen_bytes"  # data/NAME prepared by data/prepare.py, or a path
    out_dir: str = "out"
    init_vae: str = ""          # stage-1 checkpoint to start stage 2 from (--stage=joint)
    resume: bool = False        # continue exactly from out_dir/ckpt.pt
    seq_len: int = 128          # tokens per training window
    batch_size: int = 16        # global batch in sequences (the invariant under DDP / accumulation)
    micro_batch: int = 0        # sequences per forward per process; 0 = batch_size / world_size
    vae_iters: int = 300        # stage-1 steps
    joint_iters: int = 220      # stage-2 steps
    ar_iters: int = 600         # AR baseline steps: ~ the training FLOPs of the default Cola run
    max_iters: int = 0          # if > 0, overrides vae_iters / joint_iters for the stage(s) run
    lr: float = 2e-3            # peak learning rate (DiT; VAE in stage 1)
    min_lr: float = 1e-4        # end of the cosine decay
    warmup_iters: int = 50
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    vae_lr_ratio: float = 1.0   # stage 2: VAE lr = ratio x lr (paper best 1.0; 0 freezes the VAE)
    lambda_vae: float = 1.0     # stage 2 loss weights (SPEC §1)
    lambda_fm: float = 1.0
    lambda_ref: float = 1.0     # KL(q || q_ref) to the frozen stage-1 encoder
    fm_grad_to_encoder: bool = False  # let FM gradients reach the encoder through the noisy block
    eval_interval: int = 100
    eval_windows: int = 64      # held-out windows per validation
    log_interval: int = 20
    ckpt_interval: int = 200
    seed: int = 1337
    device: str = "auto"        # auto = cuda > mps > cpu
    compile: bool = False       # torch.compile the model (useful on CUDA)
    stop_after: int = 0         # if > 0: save and exit after this many steps in this process (time-boxed jobs)


PRESETS = {
    "tiny": {},  # the dataclass defaults
    "small": dict(train=dict(dataset="austen_gpt2", seq_len=512, batch_size=64, lr=6e-4, min_lr=6e-5,
                             vae_iters=5000, joint_iters=20000, warmup_iters=500, eval_interval=500, ckpt_interval=1000),
                  vae=dict(tokenizer="gpt2", n_enc_layer=4, n_dec_layer=4, width=512, n_head=8),
                  dit=dict(n_layer=12, width=768, n_head=12), ar=dict(n_layer=20, width=768, n_head=12)),
    # the paper's 2.3B model (SPEC §2); FFN width here follows SwiGLU's 8/3 rule, not the paper's 6144
    "paper": dict(train=dict(dataset="austen_gpt2", seq_len=512, batch_size=1408, lr=1.5e-4, min_lr=1e-5,
                             vae_iters=20000, joint_iters=100000, warmup_iters=2000, eval_interval=1000),
                  vae=dict(tokenizer="gpt2", n_enc_layer=4, n_dec_layer=4, width=1536, n_head=12),
                  dit=dict(n_layer=24, width=2048, n_head=16), ar=dict(n_layer=40, width=2048, n_head=16)),
}
# options that may differ on --resume without changing the training itself
RESUME_FREE = {"resume", "out_dir", "eval_interval", "log_interval", "ckpt_interval", "device", "compile", "stage",
               "stop_after"}


def build_configs(argv):
    cfgs = dict(train=TrainConfig(), vae=VAEConfig(), dit=DiTConfig(), flow=FlowConfig(), ar=ARConfig())
    preset = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "tiny")
    if preset not in PRESETS:
        raise UserError(f"unknown --config={preset}; choose from {', '.join(PRESETS)}")
    for part, values in PRESETS[preset].items():
        for k, v in values.items():
            setattr(cfgs[part], k, v)
    parse_overrides(argv, {"": cfgs["train"], **{k: v for k, v in cfgs.items() if k != "train"}},
                    verbose=int(os.environ.get("RANK", 0)) == 0)
    tc = cfgs["train"]
    if tc.stage not in ("vae", "joint", "all"):
        raise UserError(f"--stage must be vae, joint or all, got {tc.stage!r}")
    if tc.model not in ("cola", "ar"):
        raise UserError(f"--model must be cola or ar, got {tc.model!r}")
    for name in ("eval_interval", "log_interval", "ckpt_interval", "batch_size", "seq_len", "eval_windows"):
        if getattr(tc, name) < 1:
            raise UserError(f"--{name} must be >= 1")
    if cfgs["flow"].t_dist not in ("logit_normal", "uniform"):
        raise UserError(f"--flow.t_dist must be logit_normal or uniform, got {cfgs['flow'].t_dist!r}")
    if cfgs["vae"].tokenizer not in ("bytes", "gpt2"):
        raise UserError(f"--vae.tokenizer must be bytes or gpt2, got {cfgs['vae'].tokenizer!r}")
    for part in ("vae", "dit", "ar"):
        if cfgs[part].width % cfgs[part].n_head or (cfgs[part].width // cfgs[part].n_head) % 2:
            raise UserError(f"--{part}.width must be a multiple of 2 x n_head (even head size for RoPE)")
    given = {a[2:].split("=", 1)[0] for a in argv}
    for key, why in (("dit.latent_dim", "it follows --vae.latent_dim"), ("vae.block_size", "it follows --dit.block_size"),
                     ("ar.tokenizer", "it follows --vae.tokenizer")):
        if key in given:
            raise UserError(f"--{key} cannot be set: {why}")
    if "init_vae" in given and tc.stage != "joint":
        raise UserError("--init_vae is for --stage=joint (--stage=all trains its own stage 1)")
    cfgs["dit"].latent_dim = cfgs["vae"].latent_dim  # the prior models the VAE's latents
    cfgs["vae"].block_size = cfgs["dit"].block_size  # a block-causal decoder decodes the DiT's blocks
    cfgs["ar"].tokenizer = cfgs["vae"].tokenizer     # one tokenizer per preset / dataset
    if tc.model == "ar":
        return dict(train=tc, ar=cfgs["ar"])
    del cfgs["ar"]
    return cfgs


class Cola(nn.Module):
    """VAE + DiT (+ frozen reference encoder) in one module, so one optimizer and one DDP wrapper
    cover stage 2. forward(x) returns (loss, dict of detached stats)."""

    def __init__(self, vae, dit=None, ref=None, tc=None, flow_cfg=None):
        super().__init__()
        self.vae, self.dit, self.ref = vae, dit, ref
        self.tc, self.flow_cfg = tc, flow_cfg
        if ref is not None:
            ref.requires_grad_(False).eval()

    def parts(self):
        """Sub-modules as saved in the checkpoint, with their learning-rate scale (None: not trained)."""
        if self.dit is None:
            return {"vae": (self.vae, 1.0)}
        return {"vae": (self.vae, self.tc.vae_lr_ratio or None), "dit": (self.dit, 1.0), "ref": (self.ref, None)}

    def flops(self, seq_len, steps=16, cfg_scale=7.0):
        """FLOPs per training token of this stage and per generated token (matmul-based estimate).
        Stage 1: encoder + decoder, again for the mask pass (head only at masked positions).
        Stage 2 adds the reference encoder (forward only) and the DiT over the 2L layout (2 tokens per
        token). Sampling: steps x (2 with CFG) DiT forwards, one commit forward, the decoder."""
        f = self.vae.flops(seq_len)
        vae_fwd = 2 * (f["enc"] + f["dec"]) + f["head"] * (1 + self.vae.cfg.mask_ratio)
        if self.dit is None:
            return dict(train=3 * vae_fwd, sample=0.0)
        dit_tok = self.dit.flops(seq_len / 2)  # one latent token, attending to ~L/2 keys
        train = (3 * vae_fwd + f["enc"] if self.tc.vae_lr_ratio else f["enc"]) + 3 * 2 * dit_tok
        sample = steps * (2 if cfg_scale != 1 else 1) * dit_tok + dit_tok + f["dec"] + f["head"]
        return dict(train=train, sample=sample)

    def forward(self, x):
        if self.dit is None:  # stage 1
            _, _, _, out = self.vae(x, stage=1)
            return out["loss"], {k: v.detach() for k, v in out.items()}
        tc = self.tc
        frozen = tc.vae_lr_ratio == 0
        if frozen:  # the frozen-VAE ablation: only the prior trains
            with torch.no_grad():
                mu, logvar = self.vae.encode(x)
                z = self.vae.sample(mu, logvar)
            out, loss = {}, 0.0
        else:
            mu, logvar, z, out = self.vae(x, stage=2)
            with torch.no_grad():
                mu_r, logvar_r = self.ref.encode(x)
            out["ref_kl"] = gaussian_kl(mu.float(), logvar.float(), mu_r.float(), logvar_r.float()).mean()
            loss = tc.lambda_vae * out["loss"] + tc.lambda_ref * out["ref_kl"]
        # the DiT models a posterior sample; history and target are stop-gradient (SPEC §1 Stage 2)
        src = z if (tc.fm_grad_to_encoder and not frozen) else None
        out["fm"], _ = fm_loss(self.dit, z.detach(), self.flow_cfg, z_src=src)
        loss = loss + tc.lambda_fm * out["fm"]
        out["loss"] = loss
        return loss, {k: v.detach() for k, v in out.items()}


def build_cola(stage, cfgs, load_init=True):
    """Stage 1: a fresh VAE. Stage 2: VAE from stage 1 (unless resuming: the checkpoint has it), a
    fresh DiT, a frozen copy of the encoder."""
    tc = cfgs["train"]
    vae = TextVAE(cfgs["vae"])
    dit = ref = None
    if stage == "joint":
        dit = DiT(cfgs["dit"])
        if load_init:
            vae.load_state_dict(load_vae_state(tc.init_vae, cfgs["vae"]))
        ref = copy.deepcopy(vae)
        if tc.vae_lr_ratio == 0:
            vae.requires_grad_(False)
    return Cola(vae, dit, ref, tc, cfgs["flow"])


def lr_factor(step, tc, max_iters):
    """Linear warmup then cosine decay from 1 to min_lr / lr."""
    if step < tc.warmup_iters:
        return (step + 1) / tc.warmup_iters
    progress = min(1.0, (step - tc.warmup_iters) / max(1, max_iters - tc.warmup_iters))
    floor = tc.min_lr / tc.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, tc, device):
    """AdamW; decay on matrices only; each part at its lr scale (stage 2: VAE at vae_lr_ratio x lr)."""
    groups = []
    for module, scale in model.parts().values():
        params = [p for p in module.parameters() if p.requires_grad] if scale else []
        if params:
            groups += [dict(params=[p for p in params if p.dim() >= 2], weight_decay=tc.weight_decay, lr_scale=scale),
                       dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0, lr_scale=scale)]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2),
                             fused=str(device).startswith("cuda"))


@torch.no_grad()
def evaluate(model, x_val, device, micro):
    """Held-out diagnostics (flat dict of floats; FM loss also per t-bin as fm_t<lo>-<hi>).
    Runs under a fixed seed in a forked RNG, so validation never perturbs the training stream."""
    model.eval()
    stats, t_all, l_all = {}, [], []
    devices = [torch.device(device).index or 0] if str(device).startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(1234)
        for i in range(0, len(x_val), micro):
            x = x_val[i:i + micro].to(device)
            with autocast(device):
                if not isinstance(model, Cola):  # the AR baseline: held-out next-token loss
                    d = {"loss": model(x)[0].item()}
                else:
                    mu, logvar = model.vae.encode(x)
                    d = model.vae.diagnostics(x, (mu, logvar))
                if getattr(model, "dit", None) is not None:
                    mu_r, logvar_r = model.ref.encode(x)
                    d["ref_kl"] = gaussian_kl(mu.float(), logvar.float(), mu_r.float(), logvar_r.float()).mean().item()
                    fm, st = fm_loss(model.dit, model.vae.sample(mu, logvar), model.flow_cfg)
                    d["fm"] = fm.item()
                    keep = st["weight"] > 0
                    t_all.append(st["t"][keep].cpu()); l_all.append(st["per_token"][keep].cpu())
            for k, v in d.items():
                stats[k] = stats.get(k, 0.0) + v * len(x) / len(x_val)
    if t_all:
        stats.update({f"fm_t{k}": v for k, v in fm_by_t(torch.cat(t_all), torch.cat(l_all)).items()})
    model.train()
    return stats


def run_stage(stage, cfgs, ctx):
    """Train one stage ("vae", "joint" or "ar") to max_iters, checkpointing to out_dir/ckpt.pt."""
    tc = cfgs["train"]
    rank, world, device, print0 = ctx["rank"], ctx["world"], ctx["device"], ctx["print0"]
    max_iters = tc.max_iters or dict(vae=tc.vae_iters, joint=tc.joint_iters, ar=tc.ar_iters)[stage]
    micro = tc.micro_batch or tc.batch_size // world
    if micro < 1 or tc.eval_windows < world:
        raise UserError(f"batch_size ({tc.batch_size}) and eval_windows ({tc.eval_windows}) must be >= world size {world}")
    if tc.batch_size % (micro * world):
        raise UserError(f"batch_size {tc.batch_size} is not a multiple of micro_batch {micro} x world {world}")
    accum = tc.batch_size // (micro * world)
    ckpt_path = os.path.join(tc.out_dir, "ckpt.pt")

    resume = None
    if tc.resume and not os.path.isfile(ckpt_path):
        print0(f"--resume: no checkpoint at {ckpt_path}, starting {stage} from scratch")
    elif tc.resume:
        resume = load_checkpoint(ckpt_path)
        if resume.get("stage") == stage:
            check_resume(resume, cfgs, RESUME_FREE)
        elif tc.stage == "all" and stage == "joint" and resume.get("stage") == "vae":
            resume = None  # stage 1 finished (out_dir/vae.pt); stage 2 had not saved yet
        else:
            raise UserError(f"--resume: {ckpt_path} holds stage {resume.get('stage')!r}, not {stage!r}; "
                            f"refusing to overwrite it (use another --out_dir)")

    torch.manual_seed(tc.seed)  # same initial weights on every rank
    if stage == "ar":
        model = ARLM(cfgs["ar"]).to(device)
    else:
        model = build_cola(stage, cfgs, load_init=resume is None).to(device)
    opt = make_optimizer(model, tc, device)
    try:
        data_dir = resolve_data_dir(tc.dataset)
        tokenizer = cfgs["ar" if stage == "ar" else "vae"].tokenizer
        if load_meta(data_dir)["tokenizer"] != tokenizer:
            raise UserError(f"dataset {tc.dataset} is tokenized with {load_meta(data_dir)['tokenizer']!r} but the model "
                            f"uses {tokenizer!r} (set --vae.tokenizer, or prepare the data with --tokenizer={tokenizer})")
        loader = BatchLoader(data_dir, "train", tc.batch_size, tc.seq_len, seed=tc.seed + 1000 * (stage == "joint"))
        x_val = val_windows(data_dir, tc.seq_len, tc.eval_windows, rank=rank, world_size=world)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e))
    step = 0
    if resume is not None:
        for name, (module, _) in model.parts().items():
            module.load_state_dict(resume[name])
        opt.load_state_dict(resume["optimizer"])
        step = resume["step"]  # also the data position and the RNG position (see the training loop)
        print0(f"resumed {stage} from {ckpt_path} at step {step}")
    n_params = sum(p.numel() for name, (m, _) in model.parts().items() if name != "ref" for p in m.parameters())
    n_train = sum(p.numel() for g in opt.param_groups for p in g["params"])
    flops = model.flops(tc.seq_len)
    print0(f"stage {stage}: {n_params / 1e6:.2f}M params ({n_train / 1e6:.2f}M trained), {max_iters} iters, "
           f"batch {tc.batch_size} x {tc.seq_len} tokens (micro {micro} x accum {accum} x world {world}), device {device}, "
           f"{flops['train'] / 1e6:.1f} MFLOPs per training token")
    wrapped = torch.compile(model) if tc.compile else model
    if world > 1:
        wrapped = DDP(wrapped, device_ids=[ctx["local_rank"]] if str(device).startswith("cuda") else None)

    def save(step):
        # no data-loader or RNG state: both are functions of (seed, step), see the training loop
        if rank == 0:
            save_checkpoint(dict(stage=stage, step=step, config={k: asdict(v) for k, v in cfgs.items()},
                                 optimizer=opt.state_dict(), flops_per_token=flops,
                                 **{name: m.state_dict() for name, (m, _) in model.parts().items()}), ckpt_path)

    metrics = open(os.path.join(tc.out_dir, "metrics.jsonl"), "a") if rank == 0 else None
    t0, t_start, start_step, last_log = time.time(), time.time(), step, step
    def validate():
        ev = evaluate(model, x_val, device, micro)
        ev = all_reduce_mean({k: torch.tensor(v, device=device) for k, v in ev.items()}, world)
        print0(f"val {stage} step {step}: " + " | ".join(f"{k} {v:.4f}" for k, v in ev.items()))
        if metrics:
            metrics.write(json.dumps(dict(stage=stage, step=step, split="val", **ev)) + "\n"); metrics.flush()

    while step < max_iters:
        if step % tc.eval_interval == 0:
            t_eval = time.time()
            validate()
            t0 += time.time() - t_eval  # throughput counts training time only
        factor = lr_factor(step, tc, max_iters)
        for g in opt.param_groups:
            g["lr"] = tc.lr * factor * g["lr_scale"]
        sums = {}
        for micro_step in range(accum):
            # micro-batch i of the global batch: its rows and its random draws (masks, noise, t) depend
            # only on (seed, stage, step, i), so 1 process x accumulation N == N processes, and a resumed
            # run continues the exact same streams
            i = rank * accum + micro_step
            x = loader.get(step, i * micro, micro).to(device)
            torch.manual_seed(int(np.random.SeedSequence([tc.seed, stage == "joint", step, i]).generate_state(1)[0]))
            sync = micro_step == accum - 1
            with (wrapped.no_sync() if world > 1 and not sync else contextlib.nullcontext()), autocast(device):
                loss, stats = wrapped(x)
                (loss / accum).backward()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v.float() / accum
        logged = all_reduce_mean(sums, world)  # averaged over ranks, so every rank takes the same decision
        if not math.isfinite(logged["loss"]):
            raise UserError(f"non-finite loss at {stage} step {step}; stopped, the last checkpoint {ckpt_path} is kept")
        grad_norm = torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % tc.log_interval == 0 or step == max_iters:
            dt = (time.time() - t0) / (step - last_log)  # seconds per step since the last log line
            t0, last_log = time.time(), step
            tok_s = tc.batch_size * tc.seq_len / dt
            eta = (max_iters - step) * (time.time() - t_start) / (step - start_step)
            print0(f"{stage} step {step:5d} | " + " | ".join(f"{k} {v:.4f}" for k, v in logged.items())
                   + f" | gnorm {grad_norm.item():.2f} | lr {tc.lr * factor:.2e} | {dt * 1000:.0f} ms | {tok_s:.0f} tok/s"
                   + f" | {tok_s * flops['train'] / 1e12:.3f} TFLOP/s | eta {eta / 60:.1f} min")
            if metrics:
                metrics.write(json.dumps(dict(stage=stage, step=step, split="train", lr=tc.lr * factor, dt=dt,
                                              tok_s=tok_s, grad_norm=grad_norm.item(),
                                              stage_flops=step * tc.batch_size * tc.seq_len * flops["train"], **logged))
                              + "\n")
                metrics.flush()
        ctx["steps_run"] += 1
        if world > 1:  # a signal that reached any rank stops all of them at the same step
            flag = torch.tensor(float(ctx["stop"]), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            ctx["stop"] = bool(flag.item())
        stop = ctx["stop"] or ctx["steps_run"] == tc.stop_after
        if step % tc.ckpt_interval == 0 or step == max_iters or stop:
            t_save = time.time()
            save(step)
            t0 += time.time() - t_save
        if stop:
            print0(f"stopped at {stage} step {step} ({'signal' if ctx['stop'] else 'stop_after'}); "
                   f"checkpoint saved to {ckpt_path}, continue with --resume")
            sys.exit(0)
    if step > start_step:
        validate()  # the final model
    if metrics:
        metrics.close()
    print0(f"stage {stage} done in {(time.time() - t_start) / 60:.1f} min -> {ckpt_path}")
    return model


def train_stages(cfgs, ctx):
    """--model=ar, or Cola's stage 1, stage 2, or both (stage 1 kept as out_dir/vae.pt)."""
    tc = cfgs["train"]
    if tc.model == "ar":
        run_stage("ar", cfgs, ctx)
        return
    if tc.stage in ("vae", "all"):
        vae_done = tc.stage == "all" and tc.resume and os.path.isfile(os.path.join(tc.out_dir, "vae.pt"))
        if not vae_done:
            run_stage("vae", cfgs, ctx)
        if tc.stage == "all":
            vae_path = os.path.join(tc.out_dir, "vae.pt")
            if not vae_done and ctx["rank"] == 0:
                shutil.copyfile(os.path.join(tc.out_dir, "ckpt.pt"), vae_path)  # keep stage 1 for ablations
            if ctx["world"] > 1:
                dist.barrier()
            tc.init_vae = vae_path
    if tc.stage in ("joint", "all"):
        run_stage("joint", cfgs, ctx)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfgs = build_configs(argv)
    tc = cfgs["train"]
    ctx = setup(tc.device)
    os.makedirs(tc.out_dir, exist_ok=True)
    clean_exit = False
    try:
        train_stages(cfgs, ctx)
        clean_exit = True
    except SystemExit as e:  # a signal or --stop_after: every rank stops at the same step
        clean_exit = not e.code
        raise
    finally:
        if ctx["world"] > 1:
            if clean_exit:
                dist.barrier()  # rank 0 may still be writing the checkpoint: tearing gloo down under it aborts
            dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
