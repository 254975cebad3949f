"""
Where a model is specified and made: from presets and --key=value overrides (build_configs: train.py's
options, and `eval.py speed --random_init`'s), or from a checkpoint (load_model). Imported, not run.
"""
import os
from dataclasses import asdict, dataclass

import released
from ar import ARConfig, ARLM
from cola import Cola
from common import UserError, load_checkpoint, parse_overrides
from data.tokenizer import get_tokenizer
from dit import DiTConfig
from flow import FlowConfig
from vae import VAEConfig


@dataclass
class TrainConfig:
    """A run's own options (its model's are VAEConfig, DiTConfig, FlowConfig, ARConfig); --key=value sets them."""
    model: str = "cola"         # "cola", or "ar": the autoregressive baseline (ar.py), same data and trainer
    stage: str = "all"          # cola: "vae" (stage 1), "joint" (stage 2), "all" (1 then 2 into one out_dir)
    config: str = "tiny"        # preset: tiny | small | paper (applied before other overrides)
    dataset: str = "austen_bytes"  # data/NAME prepared by data/prepare.py, or a path
    out_dir: str = "out"
    init: str = ""              # where stage 2 (--stage=joint) starts: a stage-1 checkpoint, "scratch" (a fresh VAE), or
                                # the released checkpoint's directory (its VAE and DiT, and their architecture)
    resume: bool = False        # continue exactly from out_dir/ckpt.pt
    overwrite: bool = False     # start afresh in an out_dir that already holds a run (replaces it)
    seq_len: int = 128          # tokens per training window
    batch_size: int = 16        # global batch in sequences (the invariant under DDP / accumulation)
    micro_batch: int = 0        # sequences per forward per process; 0 = batch_size / world_size
    vae_iters: int = 100        # stage-1 steps (held-out reconstruction passes 99% before step 100)
    joint_iters: int = 300      # stage-2 steps
    ar_iters: int = 600         # AR baseline steps: ~ the training FLOPs of the default Cola run
    ar_lr: float = 2e-3         # the AR baseline's peak learning rate (tiny: 2e-3 beat 3e-3, RESULTS.md)
    max_iters: int = 0          # if > 0, overrides vae_iters / joint_iters for the stage(s) run
    lr: float = 3e-3            # peak learning rate of Cola (DiT; VAE in stage 1); tiny: 3e-3 beat 2e-3 (RESULTS.md)
    min_lr: float = 1e-4        # end of the cosine decay
    warmup_iters: int = 50
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    vae_lr_ratio: float = 0.0   # stage 2: VAE lr = ratio x lr; 0 freezes it (tiny; small/paper: 1.0, RESULTS.md)
    lambda_vae: float = 1.0     # stage 2 loss weights (paper §3.2.2, eq. 3.18; cola.Cola.forward)
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


# the option groups of a run: train options by name (--lr), the others with their prefix (--vae.beta)
PARTS = dict(train=TrainConfig, vae=VAEConfig, dit=DiTConfig, flow=FlowConfig, ar=ARConfig)

PRESETS = {
    "tiny": {},  # the dataclass defaults: byte latents, DiT block size 1, frozen VAE in stage 2 (RESULTS.md)
    "small": dict(train=dict(dataset="austen_gpt2", seq_len=512, batch_size=64, lr=6e-4, ar_lr=6e-4, min_lr=6e-5, vae_lr_ratio=1.0,
                             vae_iters=5000, joint_iters=20000, warmup_iters=500, eval_interval=500, ckpt_interval=1000),
                  vae=dict(tokenizer="gpt2", n_enc_layer=4, n_dec_layer=4, width=512, n_head=8, ffn_dim=2048),
                  dit=dict(n_layer=12, width=768, n_head=12, block_size=16), ar=dict(n_layer=20, width=768, n_head=12)),
    # the released 2.3B model's sizes (arXiv 2605.06548 Table 9; its config.json): 1,829,875,728 DiT and, with OLMo 2's
    # 100,278 tokens, 501,871,574 VAE parameters. Block sizes are the paper's (causal VAE, DiT 16), not the release's 4 and 4
    "paper": dict(train=dict(dataset="austen_gpt2", seq_len=512, batch_size=1408, lr=1.5e-4, ar_lr=1.5e-4, min_lr=1e-5, vae_lr_ratio=1.0,
                             vae_iters=20000, joint_iters=100000, warmup_iters=2000, eval_interval=1000),
                  vae=dict(tokenizer="gpt2", n_enc_layer=4, n_dec_layer=4, width=1536, n_head=12, ffn_dim=6144),
                  dit=dict(n_layer=24, width=2048, n_head=16, block_size=16),
                  ar=dict(n_layer=40, width=2048, n_head=16)),
}
CHOICES = {"stage": ("vae", "joint", "all"), "model": ("cola", "ar"), "dit.attn": ("sdpa", "flex"),
           "flow.t_dist": ("logit_normal", "uniform")}
# options that may differ on --resume without changing the training itself
RESUME_FREE = {"resume", "overwrite", "out_dir", "eval_interval", "log_interval", "ckpt_interval", "device", "compile",
               "stage", "stop_after", "dit.attn"}


def build_configs(argv):
    """The configs of a run from argv: the --config preset, then the --key=value overrides, checked;
    {"train", "vae", "dit", "flow"} for Cola, {"train", "ar"} for the AR baseline."""
    cfgs = {part: make() for part, make in PARTS.items()}
    preset = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "tiny")
    if preset not in PRESETS:
        raise UserError(f"unknown --config={preset}; choose from {', '.join(PRESETS)}")
    for part, values in PRESETS[preset].items():
        for k, v in values.items():
            setattr(cfgs[part], k, v)
    parse_overrides(argv, {("" if k == "train" else k): v for k, v in cfgs.items()},
                    verbose=int(os.environ.get("RANK", 0)) == 0)
    tc = cfgs["train"]
    for key, choices in CHOICES.items():
        part, _, name = key.rpartition(".")
        if (value := getattr(cfgs[part or "train"], name)) not in choices:
            raise UserError(f"--{key} must be {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}")
    for name in ("eval_interval", "log_interval", "ckpt_interval", "batch_size", "seq_len", "eval_windows"):
        if getattr(tc, name) < 1:
            raise UserError(f"--{name} must be >= 1")
    given = {a[2:].split("=", 1)[0] for a in argv}
    if os.path.isdir(tc.init):  # stage 2 from the released checkpoint: its architecture, the options' training
        for part, released_cfg in zip(("vae", "dit"), released.read_configs(tc.init)):
            for name in released.ARCH[part]:
                if f"{part}.{name}" in given:
                    raise UserError(f"--{part}.{name} cannot be set: --init={tc.init} fixes the architecture")
                setattr(cfgs[part], name, getattr(released_cfg, name))
    for part in ("vae", "dit", "ar"):
        if cfgs[part].width % cfgs[part].n_head or (cfgs[part].width // cfgs[part].n_head) % 2:
            raise UserError(f"--{part}.width must be a multiple of 2 x n_head (even head size for RoPE)")
    if cfgs["dit"].rope_dim % 2 or cfgs["dit"].rope_dim > cfgs["dit"].width // cfgs["dit"].n_head:  # 0: the default
        raise UserError("--dit.rope_dim must be even and at most the head size, width / n_head")
    if cfgs["dit"].patch_size < 1 or tc.seq_len % cfgs["dit"].patch_size:
        raise UserError("--dit.patch_size must be >= 1 and divide --seq_len")
    if cfgs["vae"].block_size < 1 or cfgs["vae"].ffn_dim % 2:
        raise UserError("--vae.block_size must be >= 1 and --vae.ffn_dim even")
    get_tokenizer(cfgs["vae"].tokenizer)  # an unknown name or a bad tokenizer.json: a UserError
    for key, why in (("dit.latent_dim", "it follows --vae.latent_dim"), ("ar.tokenizer", "it follows --vae.tokenizer")):
        if key in given:
            raise UserError(f"--{key} cannot be set: {why}")
    if tc.resume and tc.overwrite:
        raise UserError("--resume continues the run in out_dir, --overwrite replaces it: choose one")
    if "init" in given and tc.stage != "joint":
        raise UserError("--init is for --stage=joint (--stage=all trains its own stage 1)")
    cfgs["dit"].latent_dim = cfgs["vae"].latent_dim  # the prior models the VAE's latents
    cfgs["ar"].tokenizer = cfgs["vae"].tokenizer     # one tokenizer per preset / dataset
    return dict(train=tc, ar=cfgs["ar"]) if tc.model == "ar" else {k: v for k, v in cfgs.items() if k != "ar"}


def load_model(path, device="cpu"):
    """The model of a train.py checkpoint, in eval mode on device: (cola.Cola or ar.ARLM, checkpoint).
    Both offer generate, score and diagnostics; a stage-1 Cola checkpoint has no prior (dit None).
    A directory is the released checkpoint (cola.Cola.from_pretrained), with a checkpoint-like record."""
    if os.path.isdir(path):
        model = Cola.from_pretrained(path)
        # no context in the release (its inference truncates nothing): 2048 tokens hold the benchmarks' prompts
        cfgs = dict(vae=model.vae.cfg, dit=model.dit.cfg, flow=FlowConfig(), train=TrainConfig(init=path, seq_len=2048))
        return model.to(device).eval(), dict(config={k: asdict(v) for k, v in cfgs.items()}, stage="released", step=0)
    ckpt = load_checkpoint(path)
    if "config" not in ckpt or not ({"vae", "ar"} & set(ckpt)):
        raise UserError(f"{path} is not a cola checkpoint (no model weights / configs in it)")
    model = (ARLM if "ar" in ckpt else Cola).from_checkpoint(ckpt)
    return model.to(device).eval(), ckpt


def random_model(options, device):
    """A model with fresh weights from train.py's options (preset and overrides), and a checkpoint-like record
    of them: the DiT's zero-initialised layers are all that differs from a trained model's compute."""
    cfgs = build_configs(options)
    model = ARLM(cfgs["ar"]) if cfgs["train"].model == "ar" else Cola.build(cfgs, "joint")
    ckpt = dict(config={k: asdict(v) for k, v in cfgs.items()}, stage="random_init", step=0)
    return model.to(device).eval(), ckpt
