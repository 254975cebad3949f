"""
Train Cola DLM: stage 1 (text VAE), stage 2 (joint VAE + block-causal DiT), or both; or the AR baseline.

    python train.py                                  # stage 1 then stage 2 on `tiny` (CPU, minutes) -> out/ckpt.pt
    python train.py --stage=vae --out_dir=out_vae    # stage 1 only
    python train.py --stage=joint --init=out_vae/ckpt.pt --out_dir=out_joint
    python train.py --stage=joint --init=cola_dlm/ --dataset=DIR --out_dir=out_ft   # fine-tune the released model
    python train.py --model=ar --out_dir=out_ar      # the autoregressive baseline (ar.py)
    python train.py --config=small --out_dir=out_small                      # one GPU
    python train.py --config=small --dit.attn=flex --compile --out_dir=out_small  # FlexAttention for the DiT (CUDA)
    torchrun --standalone --nproc_per_node=4 train.py --config=small --out_dir=out_small4

Options are --key=value (--help lists them; config.py holds them, the presets and their checks): train
options by name (--lr=1e-3), the others with a prefix (--vae.beta=1e-3, --dit.n_layer=6); a boolean
also as a bare --flag. out_dir/ckpt.pt carries every config, so sample.py and eval.py need only --ckpt;
--resume continues a run exactly, and a run is never overwritten without --overwrite. The losses live
with the models (cola.Cola.forward, ar.ARLM.forward); this file is the loop around them.

--compile compiles the whole training forward, loss included; validation runs eagerly. --dit.attn=flex
skips the tiles of the DiT's 2L score matrix the mask hides (~3/4: dit.attention_sparsity); CUDA only.
"""
import contextlib
import dataclasses
import math
import os
import shutil
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import released
from ar import ARLM
from cola import Cola
from common import (Log, StopFlag, UserError, all_reduce_mean, autocast, check_resume, load_checkpoint,
                    load_vae_state, print0, run_main, save_checkpoint, setup)
from config import PARTS, RESUME_FREE, build_configs
from data.loader import BatchLoader, load_meta, resolve_data_dir, val_windows


# ----------------------------------------------------------------------------- model, optimizer, schedule

def build_model(stage, cfgs, fresh=True):
    """The model a stage trains: the AR baseline, or Cola (stage 2 starts from --init, the stage-1 VAE or
    the released checkpoint, unless it is resumed: then the checkpoint has every weight)."""
    torch.manual_seed(cfgs["train"].seed)  # the same initial weights on every rank
    if stage == "ar":
        return ARLM(cfgs["ar"])
    init = cfgs["train"].init if stage == "joint" and fresh else None
    if init and os.path.isdir(init):  # the released VAE and DiT (config.build_configs took their architecture)
        model = Cola.build(cfgs, stage)
        released.load_weights(model.vae, os.path.join(init, "cola_vae"))
        released.load_weights(model.dit, os.path.join(init, "cola_dit"))
        model.ref.load_state_dict(model.vae.state_dict())
        return model
    return Cola.build(cfgs, stage, load_vae_state(init, cfgs["vae"]) if init is not None else None)


def make_optimizer(model, tc, device):
    """AdamW; decay on matrices only; each part at its lr scale (stage 2: VAE at vae_lr_ratio x lr)."""
    groups = []
    for module, scale in model.parts().values():
        params = [p for p in module.parameters() if p.requires_grad] if scale else []
        if params:
            groups += [dict(params=[p for p in params if p.dim() >= 2], weight_decay=tc.weight_decay, lr_scale=scale),
                       dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0, lr_scale=scale)]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=str(device).startswith("cuda"))


def lr_factor(step, tc, max_iters):
    """Linear warmup then cosine decay from 1 to min_lr / lr."""
    if step < tc.warmup_iters:
        return (step + 1) / tc.warmup_iters
    progress = min(1.0, (step - tc.warmup_iters) / max(1, max_iters - tc.warmup_iters))
    floor = tc.min_lr / tc.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def micro_seed(seed, stage, step, i):
    """Seed of every random draw (masks, noise, t) of micro-batch i at a step: a function of these
    alone, so 1 process x accumulation N == N processes, and a resumed run continues the same streams."""
    return int(np.random.SeedSequence([seed, stage == "joint", step, i]).generate_state(1)[0])


@torch.no_grad()
def evaluate(model, x_val, env, batch_size):
    """Held-out diagnostics averaged over ranks, under a fixed seed in a forked RNG so that validation
    never perturbs the training stream."""
    model.eval()
    devices = [torch.device(env.device).index or 0] if str(env.device).startswith("cuda") else []
    with torch.random.fork_rng(devices=devices), autocast(env.device):
        torch.manual_seed(1234)
        stats = model.diagnostics(x_val, batch_size)
    model.train()
    return all_reduce_mean({k: torch.tensor(v, device=env.device) for k, v in stats.items()}, env.world)


# ----------------------------------------------------------------------------- run-level helpers

def warn_repeats(stage, tc, max_iters, train_tokens, threshold=10):
    """How many times a stage sees each training token (iters x global batch x seq_len over the
    train split); one warning line above threshold: a corpus that small is memorised, not learned."""
    repeats = max_iters * tc.batch_size * tc.seq_len / train_tokens
    if repeats > threshold:
        print0(f"warning: stage {stage} would see each of the {train_tokens:,} training tokens of {tc.dataset} "
               f"~{repeats:,.0f} times ({max_iters} iters x {tc.batch_size} x {tc.seq_len} tokens); prepare a "
               f"bigger corpus (README.md, 'A real corpus for small')")
    return repeats


def check_out_dir(tc, env):
    """Never lose a run by accident: a fresh run into an out_dir that holds one is refused unless
    --overwrite says so (then its old metrics log goes too)."""
    found = [f for f in ("ckpt.pt", "vae.pt") if os.path.isfile(os.path.join(tc.out_dir, f))]
    if found and not (tc.resume or tc.overwrite):
        raise UserError(f"{tc.out_dir} already holds a run ({', '.join(found)}); continue it with --resume, "
                        f"replace it with --overwrite, or choose another --out_dir")
    if env.rank == 0:
        os.makedirs(tc.out_dir, exist_ok=True)
        if tc.overwrite and os.path.isfile(os.path.join(tc.out_dir, "metrics.jsonl")):
            os.remove(os.path.join(tc.out_dir, "metrics.jsonl"))


def resume_checkpoint(stage, cfgs, path):
    """With --resume: the checkpoint to continue this stage from, or None (nothing saved yet)."""
    tc = cfgs["train"]
    if not tc.resume:
        return None
    if not os.path.isfile(path):
        print0(f"--resume: no checkpoint at {path}, starting {stage} from scratch")
        return None
    ckpt = load_checkpoint(path)
    if ckpt.get("stage") == stage:
        check_resume(ckpt, cfgs, RESUME_FREE)
        return ckpt
    if tc.stage == "all" and stage == "joint" and ckpt.get("stage") == "vae":
        return None  # stage 1 finished (out_dir/vae.pt); stage 2 had not saved yet
    raise UserError(f"--resume: {path} holds stage {ckpt.get('stage')!r}, not {stage!r}; refusing to overwrite it "
                    f"(use another --out_dir)")


# ----------------------------------------------------------------------------- training

def train_stage(stage, cfgs, env, stop):
    """Train one stage ("vae", "joint" or "ar") to its iterations, checkpointing to out_dir/ckpt.pt."""
    tc = cfgs["train"]
    if stage == "ar":  # the AR baseline's own peak learning rate
        tc = dataclasses.replace(tc, lr=tc.ar_lr)
    max_iters = tc.max_iters or dict(vae=tc.vae_iters, joint=tc.joint_iters, ar=tc.ar_iters)[stage]
    micro = tc.micro_batch or tc.batch_size // env.world
    if micro < 1 or tc.eval_windows < env.world or tc.batch_size % (micro * env.world):
        raise UserError(f"batch_size ({tc.batch_size}) must be a multiple of micro_batch ({micro}) x world size "
                        f"({env.world}), and eval_windows ({tc.eval_windows}) at least the world size")
    accum = tc.batch_size // (micro * env.world)
    ckpt_path = os.path.join(tc.out_dir, "ckpt.pt")
    resume = resume_checkpoint(stage, cfgs, ckpt_path)
    model = build_model(stage, cfgs, fresh=resume is None).to(env.device)
    opt = make_optimizer(model, tc, env.device)

    data_dir = resolve_data_dir(tc.dataset)
    tokenizer, data_tokenizer = model.tok.name, load_meta(data_dir)["tokenizer"]
    if data_tokenizer != tokenizer:
        raise UserError(f"dataset {tc.dataset} is tokenized with {data_tokenizer!r} but the model uses {tokenizer!r} "
                        f"(set --vae.tokenizer, or prepare the data with --tokenizer={tokenizer})")
    loader = BatchLoader(data_dir, "train", tc.batch_size, tc.seq_len, seed=tc.seed + 1000 * (stage == "joint"))
    x_val = val_windows(data_dir, tc.seq_len, tc.eval_windows, rank=env.rank, world_size=env.world).to(env.device)

    step = 0
    if resume is not None:
        for name, (module, _) in model.parts().items():
            module.load_state_dict(resume[name])
        opt.load_state_dict(resume["optimizer"])
        step = resume["step"]  # also the data position and the RNG position (see micro_seed)
        print0(f"resumed {stage} from {ckpt_path} at step {step}")
    flops = model.flops(tc.seq_len)
    print0(f"stage {stage}: {model.num_params() / 1e6:.2f}M params "
           f"({sum(p.numel() for g in opt.param_groups for p in g['params']) / 1e6:.2f}M trained), {max_iters} iters, "
           f"batch {tc.batch_size} x {tc.seq_len} tokens (micro {micro} x accum {accum} x world {env.world}), "
           f"device {env.device}, {flops['train'] / 1e6:.1f} MFLOPs per training token")
    warn_repeats(stage, tc, max_iters, loader.n_tokens)
    wrapped = torch.compile(model) if tc.compile else model
    if env.world > 1:
        wrapped = DDP(wrapped, device_ids=[env.local_rank] if str(env.device).startswith("cuda") else None)
    log = Log(stage, tc, env, flops, step, max_iters)

    def validate():
        with log.paused():
            log.val(step, evaluate(model, x_val, env, micro))

    while step < max_iters:
        if step % tc.eval_interval == 0:
            validate()
        lr = tc.lr * lr_factor(step, tc, max_iters)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        sums = {}
        for micro_step in range(accum):
            i = env.rank * accum + micro_step  # this micro-batch's index in the global batch
            x = loader.get(step, i * micro, micro).to(env.device)
            torch.manual_seed(micro_seed(tc.seed, stage, step, i))
            last = micro_step == accum - 1  # DDP syncs gradients on the last micro-step only
            with (wrapped.no_sync() if env.world > 1 and not last else contextlib.nullcontext()), autocast(env.device):
                loss, stats = wrapped(x)
                (loss / accum).backward()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v.float() / accum
        stats = all_reduce_mean(sums, env.world)  # the same on every rank, so every rank takes the same decisions
        if not math.isfinite(stats["loss"]):
            raise UserError(f"non-finite loss at {stage} step {step}; stopped, the last checkpoint {ckpt_path} is kept")
        grad_norm = torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        log.train(step, stats, grad_norm.item(), lr)
        stopping = stop.after_step(env)
        if (step % tc.ckpt_interval == 0 or step == max_iters or stopping) and env.rank == 0:
            with log.paused():  # no loader or RNG state to save: both are functions of (seed, step)
                save_checkpoint(dict(stage=stage, step=step, config={k: asdict(v) for k, v in cfgs.items()},
                                     optimizer=opt.state_dict(), flops_per_token=flops,
                                     **{name: m.state_dict() for name, (m, _) in model.parts().items()}), ckpt_path)
        if stopping:
            print0(f"stopped at {stage} step {step} ({'signal' if stop.signalled else 'stop_after'}); "
                   f"checkpoint saved to {ckpt_path}, continue with --resume")
            sys.exit(0)
    if step > log.start:
        validate()  # the final model
    print0(f"stage {stage} done in {(time.time() - log.t_start) / 60:.1f} min -> {ckpt_path}")


def train(cfgs, env, stop):
    """--model=ar, or Cola's stage 1, stage 2, or both (stage 1 kept as out_dir/vae.pt for ablations)."""
    tc = cfgs["train"]
    if tc.model == "ar":
        return train_stage("ar", cfgs, env, stop)
    vae_path = os.path.join(tc.out_dir, "vae.pt")
    if tc.stage == "vae" or (tc.stage == "all" and not (tc.resume and os.path.isfile(vae_path))):
        train_stage("vae", cfgs, env, stop)
        if tc.stage == "all" and env.rank == 0:
            shutil.copyfile(os.path.join(tc.out_dir, "ckpt.pt"), vae_path)
    if tc.stage == "all":
        if env.world > 1:
            dist.barrier()  # vae.pt is written
        tc.init = vae_path
    if tc.stage in ("joint", "all"):
        train_stage("joint", cfgs, env, stop)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(__doc__.strip() + "\n\noptions (tiny defaults; --config=small/paper change some):")
        for part, make in PARTS.items():
            prefix = "" if part == "train" else part + "."
            print("  " + " ".join(f"--{prefix}{k}={v}" for k, v in asdict(make()).items()))
        return
    cfgs = build_configs(argv)
    env = setup(cfgs["train"].device)
    cuda = str(env.device).startswith("cuda")
    if "dit" in cfgs and cfgs["dit"].attn == "flex" and cfgs["train"].stage != "vae" and not cuda:
        raise UserError(f"--dit.attn=flex trains on CUDA only (torch {torch.__version__} has no FlexAttention "
                        f"backward on {env.device}); use --dit.attn=sdpa")
    check_out_dir(cfgs["train"], env)
    clean_exit = False
    try:
        train(cfgs, env, StopFlag(cfgs["train"].stop_after))
        clean_exit = True
    except SystemExit as e:  # a signal or --stop_after: every rank stops at the same step
        clean_exit = not e.code
        raise
    finally:
        if env.world > 1:
            if clean_exit:
                dist.barrier()  # rank 0 may still be writing the checkpoint: tearing gloo down under it aborts
            dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
