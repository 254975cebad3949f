"""
The studies of repro.py: the paper's findings (arXiv 2605.06548) as small grids of settings beside the
paper's numbers, the training runs the settings name, and the rule that says whether ours agrees with
the paper (verdict, on a paired 95% interval). A module: `python repro.py list` names the studies.
"""
import math
from dataclasses import dataclass, field

import eval as evaluate


@dataclass
class Setting:
    label: str                 # the row's name
    run: str                   # the training run (key of RUNS)
    opts: dict = field(default_factory=dict)  # eval.py options of the measurement (quality: cfg, steps, ...)
    paper: float = None        # the paper's number for this setting
    x: float = None            # where the row sits on the plot's x axis
    ref: str = None            # compare with this row (default: the study's reference)
    expect: str = None         # the paper's direction vs the reference when not given by numbers: < > ~
    note: str = ""


@dataclass
class Study:
    title: str
    where: str                 # where the finding lives in the paper
    paper_unit: str
    settings: list
    reference: str = None      # label of the row the others are compared with
    measure: str = "quality"   # quality: words valid per prompt; robust: token accuracy per held-out window
    trains: bool = False       # seeds are training seeds (else: sampler seeds on one checkpoint)
    cpu: str = ""              # measured wall time at tiny on our 2-core CPU (README); base: 9 min
    xlabel: str = ""
    xscale: str = "linear"     # of the plot: linear, log or cat (the rows' labels as ticks)


# Training runs: train.py arguments on top of --config (the study's seeds add --seed). Stage-2 runs
# start from the stage-1 VAE of `base` (or of their own stage-1 run) with --stage=joint --init.
RUNS = {
    "base": [],  # python train.py: stage 1 (out_dir/vae.pt) then stage 2, block 1, frozen VAE
    "ar": ["--model=ar"],
    **{f"block{b}": ["--stage=joint", "@base", f"--dit.block_size={b}"] for b in (4, 16, 64)},
    # 4 bytes per DiT token: a block of 4 bytes at a quarter of the DiT's FLOPs per step, so 4x the steps
    "patch4": ["--stage=joint", "@base", "--dit.patch_size=4", "--joint_iters=1200"],
    **{f"loc{v:g}": ["--stage=joint", "@base", f"--flow.t_loc={v}"] for v in (0.5, 0.8, 1.1, 1.7)},
    "uniform_t": ["--stage=joint", "@base", "--flow.t_dist=uniform"],
    "joint1": ["--stage=joint", "@base", "--vae_lr_ratio=1"],
    "joint0.01": ["--stage=joint", "@base", "--vae_lr_ratio=0.01"],
    "scratch": ["--stage=joint", "--init=scratch", "--vae_lr_ratio=1", "--lambda_ref=0"],  # no stage 1 to refer to
    "vae_nomask": ["--stage=vae", "--vae.lambda_mask=0"],
    "nomask_joint1": ["--stage=joint", "@vae_nomask", "--vae_lr_ratio=1", "--vae.lambda_mask=0"],
    "nomask_joint0.01": ["--stage=joint", "@vae_nomask", "--vae_lr_ratio=0.01", "--vae.lambda_mask=0"],
    "vae_d64": ["--stage=vae", "--vae.latent_dim=64"],
    **{f"d64_loc{v:g}": ["--stage=joint", "@vae_d64", "--vae.latent_dim=64", f"--flow.t_loc={v}"] for v in (1.0, 1.7)},
    "vae_gpt2": ["--stage=vae", "--vae.tokenizer=gpt2", "@gpt2_data", "--vae_iters=300"],
}

PAPER_CFG = {0: 0.2, 1: 13.7, 3: 26.0, 5: 29.8, 7: 31.3, 10: 29.3, 20: 17.6}
PAPER_STEPS = {1: 9.0, 2: None, 4: 22.1, 8: 28.1, 16: 31.3, 32: 32.2}
PAPER_ROBUST = {t: evaluate.PAPER_ROBUST.get(t) for t in evaluate.ROBUST_T}  # None: not in the paper

STUDIES = {
    "cfg": Study("CFG is essential: guidance scale w", "Fig. 9, §4.4.2", "4-task avg %", [
        Setting(f"w = {w}", "base", dict(cfg=w), p, x=w) for w, p in PAPER_CFG.items()],
        "w = 7", cpu="7 min + base", xlabel="guidance scale w"),
    "steps": Study("Euler steps per block saturate", "Fig. 9, §4.4.2", "4-task avg %", [
        Setting(f"{s} step{'s' if s > 1 else ''}", "base", dict(steps=s), p, x=s) for s, p in PAPER_STEPS.items()],
        "16 steps", cpu="5 min + base", xlabel="Euler steps per block", xscale="log"),
    "first_block": Study("First-block conditioning: clean repaint wins", "Table 5, §5.2, App. I.1", "task avg %", [
        Setting("clean", "block16", dict(first_block="clean"), 24.6, x=0),
        *[Setting(f"repaint t={r} m={m:g}", "block16", dict(first_block=f"repaint:{r}:{m:g}"), x=x, expect="<",
                  note="paper: 7.5-9.3 over its repaint settings")
          for x, r, m in ((1, 1, 1.0), (2, 1, 0.7), (3, 1, 0.3), (4, 3, 1.0), (5, 3, 0.7), (6, 3, 0.3))],
        *[Setting(f"{side} padding", "block16", dict(first_block=f"{side}_pad"), x=x, expect="<", note="paper: 16.0-16.7")
          for x, side in ((7, "left"), (8, "right"))]],
        "clean", cpu="4 min + block16 (6 min) + base", xlabel="first-block mode", xscale="cat"),
    "block_size": Study("Block size 16 is best", "Fig. 6, §4.4.1", "task avg % (40k steps)", [
        Setting("block 1", "base", {}, 19.3, x=1), Setting("block 4", "block4", {}, None, x=4, expect="<"),
        Setting("block 16", "block16", {}, 22.8, x=16), Setting("block 64", "block64", {}, 14.4, x=64),
        Setting("4 bytes per token", "patch4", {}, None, x=4, note="not in the paper: DiT patch 4, block 1, 1200 steps")],
        "block 16", trains=True, cpu="26 min + base", xlabel="block size (bytes)", xscale="log"),
    "loc": Study("Logit-normal loc = 1 is best at d = 16", "Fig. 8, §4.4.1", "task avg %", [
        Setting("loc 0.5", "loc0.5", {}, 14.4, x=0.5),
        Setting("loc 0.8", "loc0.8", {}, None, x=0.8, expect="<", note="paper: 17.0 at loc 0.9"),
        Setting("loc 1.0", "base", {}, 20.0, x=1.0), Setting("loc 1.1", "loc1.1", {}, 15.3, x=1.1),
        Setting("uniform t", "uniform_t", {}, None, x=1.4, note="not in the paper")],
        "loc 1.0", trains=True, cpu="32 min + base", xlabel="logit-normal loc (uniform t at 1.4)"),
    "vae_regime": Study("Joint VAE training beats a frozen VAE (late); all-from-scratch collapses", "Fig. 3, §4.3",
                        "task avg %", [
        Setting("frozen", "base", {}, 22.2, x=0), Setting("joint x1", "joint1", {}, 24.8, x=1),
        Setting("joint x0.01", "joint0.01", {}, None, x=2, expect="<"),
        Setting("scratch", "scratch", {}, 12.8, x=3)],
        "joint x1", trains=True, cpu="33 min + base", xlabel="VAE regime", xscale="cat"),
    "bert": Study("BERT mask loss helps when the VAE trains at full lr", "Fig. 5, §4.3", "task avg %", [
        Setting("mask, x1", "joint1", {}, 26.4, x=0), Setting("no mask, x1", "nomask_joint1", {}, 24.0, x=1),
        Setting("mask, x0.01", "joint0.01", {}, None, x=2),
        Setting("no mask, x0.01", "nomask_joint0.01", {}, None, x=3, ref="mask, x0.01", note="paper: no number")],
        "mask, x1", trains=True, cpu="19 min + vae_regime's joint runs + base",
        xlabel="stage-1 mask loss, VAE lr ratio", xscale="cat"),
    "robustness": Study("Latent noise robustness of the VAE", "Fig. 13, §5.4", "token accuracy", [
        *[Setting(f"bytes t={t:g}", "base", dict(t=t), p, x=t) for t, p in PAPER_ROBUST.items()],
        *[Setting(f"gpt2 t={t:g}", "vae_gpt2", dict(t=t), p, x=t) for t, p in PAPER_ROBUST.items()]],
        measure="robust", cpu="16 min (the GPT-2 VAE: 15.5) + base", xlabel="noise level t"),
    "latent_dim": Study("The best loc moves with latent size: loc(d) = loc(16) + 0.5 ln(d/16)", "RQ1, Table 2, Fig. 2",
                        "task avg %", [
        Setting("d 16, loc 1.0", "base", {}, None, x=0), Setting("d 16, loc 1.7", "loc1.7", {}, None, x=1, expect="<"),
        Setting("d 64, loc 1.0", "d64_loc1", {}, None, x=2, ref="d 64, loc 1.7", expect="<"),
        Setting("d 64, loc 1.7", "d64_loc1.7", {}, None, x=3, note="the predicted loc at d = 64")],
        "d 16, loc 1.0", trains=True, cpu="22 min + base", xlabel="latent size, loc", xscale="cat"),
}


# ----------------------------------------------------------------------------- does ours agree with the paper?

TIE = 1.0     # paper points: settings closer than this count as a tie in the paper ("~")
MARGIN = 0.02  # our scale (share of words): a difference inside +-MARGIN counts as a tie
ROBUST_TOL = 0.10  # robustness rows compare absolute token accuracies: agree within +-ROBUST_TOL
BPB_MARGIN = 0.1  # judge bits per byte: a difference inside +-BPB_MARGIN counts as a tie


def t975(df):
    """The 97.5% quantile of Student's t with df degrees of freedom (a series approximation: within 0.12
    of the exact value at df = 3, within 0.004 from df = 10)."""
    return 1.96 + 2.37 / df + 2.8 / df ** 2


def mean_ci(v):
    """Mean and 95% t-interval of the mean of v."""
    n = len(v)
    m = sum(v) / n
    if n < 2:
        return m, float("-inf"), float("inf")
    h = t975(n - 1) * math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1) / n)
    return m, m - h, m + h


def paper_direction(s, ref):
    """'<', '>' or '~': how the paper's setting s compares with the reference, or None (no claim)."""
    if s.expect:
        return s.expect
    if s.paper is None or ref is None or ref.paper is None:
        return None
    d = s.paper - ref.paper
    return "~" if abs(d) < TIE else ("<" if d < 0 else ">")


def verdict(direction, lo, hi, margin=MARGIN):
    """agrees / disagrees / inconclusive: our 95% interval [lo, hi] of (row - reference) against the
    paper's direction. '<' agrees when the whole interval is below 0 and disagrees when it is above
    ('>': mirrored); '~' agrees when it lies inside +-margin and disagrees when it lies outside it."""
    if direction == "~":
        return ("agrees" if -margin <= lo and hi <= margin else
                "disagrees" if lo > margin or hi < -margin else "inconclusive")
    if direction == ">":
        lo, hi = -hi, -lo
    return "agrees" if hi < 0 else "disagrees" if lo > 0 else "inconclusive"


def compare_with_paper(study, s, vals, bpb):
    """Row s of a study against the paper -> the row's verdict and, for a row compared with a reference
    row, the paired difference with its 95% interval (and the judge's bits per byte's, if bpb).
    vals, bpb: label -> per-prompt (robustness: per-window) values, the same prompts in every row."""
    if study.measure == "robust":  # absolute token accuracies, the paper's within +-ROBUST_TOL
        _, lo, hi = mean_ci(vals[s.label])
        return dict(verdict="-" if s.paper is None else verdict("~", lo - s.paper, hi - s.paper, ROBUST_TOL))
    ref = {r.label: r for r in study.settings}.get(s.ref or study.reference)
    if ref is None or ref is s:
        return dict(verdict="reference")
    dm, dlo, dhi = mean_ci([a - b for a, b in zip(vals[s.label], vals[ref.label])])  # paired: same prompts, seeds
    direction = paper_direction(s, ref)
    row = dict(ref=ref.label, paper_direction=direction, diff=dm, diff_ci=[dlo, dhi],
               verdict="-" if direction is None else verdict(direction, dlo, dhi))
    if bpb:  # the judge's view: lower bits per byte is better, so the paper's direction holds for -(difference)
        bm, blo, bhi = mean_ci([a - b for a, b in zip(bpb[s.label], bpb[ref.label])])
        row.update(bpb_diff=bm, bpb_diff_ci=[blo, bhi],
                   bpb_verdict="-" if direction is None else verdict(direction, -bhi, -blo, margin=BPB_MARGIN))
    return row
