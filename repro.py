"""
Reproduce the paper's findings (arXiv 2605.06548) at small scale: one command per study (studies.py),
one table with the paper's numbers beside ours.

    python repro.py list                          # the studies and what each costs on a CPU
    python repro.py cfg                           # -> results/cfg.json, results/cfg.md (+ cfg.png with matplotlib)
    python repro.py block_size --seeds=2 --judge=ar   # a second seed; the AR baseline scores the text too
    python repro.py steps --quick                 # every study at a toy size in seconds (what the tests run)
    python repro.py summary                       # one table over every study finished so far

Each setting of a study names a training run (train.py, in-process, into results/runs/NAME) and a
measurement on its checkpoint (eval.py quality or recon, into results/evals/). Finished runs and
measurements are reused and an interrupted run is continued (--resume): an interrupted study goes on
where it stopped, a finished one only re-reports. Studies share runs: `base` is the default
`python train.py` run, and its stage-1 VAE starts the other stage-2 runs.

What is measured: the paper scores generation on benchmarks (§4), where a tiny byte-level model scores
near zero; we score generated text as eval.py quality does, by the share of generated words that are
real words of the training text ("words"), per held-out prompt. Each row is compared with the study's
reference on the same prompts (paired); studies.verdict says whether our 95% interval agrees with the
direction of the paper's numbers.
"""
import argparse
import contextlib
import filecmp
import json
import os
import shutil
import signal
import sys
import time

import torch

import eval as evaluate
import train
from common import UserError, check_resume, run_main
from config import RESUME_FREE, build_configs
from studies import BPB_MARGIN, MARGIN, ROBUST_TOL, RUNS, STUDIES, TIE, compare_with_paper, mean_ci

# --quick: a toy model and a few prompts, so a study runs in seconds (tests use it)
QUICK_TRAIN = ["--vae.width=32", "--vae.n_head=2", "--vae.n_enc_layer=1", "--vae.n_dec_layer=1", "--dit.width=32",
               "--dit.n_head=2", "--dit.n_layer=1", "--ar.width=32", "--ar.n_head=2", "--ar.n_layer=1",
               "--seq_len=64", "--batch_size=4", "--warmup_iters=1", "--eval_windows=4", "--eval_interval=100",
               "--log_interval=100"]
QUICK_ITERS = ["--vae_iters=3", "--joint_iters=3", "--ar_iters=3"]  # after the run's own options: they win
QUICK_EVAL = dict(prompts=4, new_tokens=8, prompt_chars=24, limit=4)
SAMPLER_DEFAULTS = dict(cfg=7, steps=16, first_block="clean")  # eval.py quality's own


# ----------------------------------------------------------------------------- running

class Ctx:
    def __init__(self, args):
        self.args, self.out = args, os.path.normpath(args.out or ("results/quick" if args.quick else "results"))

    def path(self, *parts):
        p = os.path.join(self.out, *parts)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p


def run_dir(ctx, name, seed):
    return ctx.path("runs", f"{name}_s{seed}" if seed else name, "")


def depends_on(name):
    return [a[1:] for a in RUNS[name] if a.startswith("@") and a[1:] in RUNS]


def train_argv(ctx, name, seed):
    """train.py's arguments for run `name` with seed index `seed`, and its out_dir."""
    out = run_dir(ctx, name, seed)
    argv = [f"--config={ctx.args.config}", f"--out_dir={out}", f"--seed={1337 + seed}"]
    if ctx.args.dataset and "@gpt2_data" not in RUNS[name]:
        argv.append(f"--dataset={ctx.args.dataset}")
    for a in RUNS[name]:
        if a == "@gpt2_data":
            a = f"--dataset={ctx.args.gpt2_dataset}"
        elif a.startswith("@"):  # start from another run's stage-1 VAE (base: the one it kept as vae.pt)
            a = f"--init_vae={os.path.join(run_dir(ctx, a[1:], seed), 'vae.pt' if a[1:] == 'base' else 'ckpt.pt')}"
        argv.append(a)
    if ctx.args.quick:
        argv = argv[:1] + QUICK_TRAIN + argv[1:] + QUICK_ITERS
    return argv, out


def finished(ckpt_path):
    """The train.py checkpoint at ckpt_path if it is the end of its run (loaded lazily), else None."""
    if not os.path.isfile(ckpt_path):
        return None
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    tc = ck["config"]["train"]
    want = tc["max_iters"] or {"vae": tc["vae_iters"], "joint": tc["joint_iters"], "ar": tc["ar_iters"]}[ck["stage"]]
    final = ck["stage"] == ("ar" if tc["model"] == "ar" else "vae" if tc["stage"] == "vae" else "joint")
    return ck if final and ck["step"] >= want else None


def ensure_run(ctx, name, seed=0):
    """The checkpoint of a finished run: reused, continued (--resume) or trained here."""
    argv, out = train_argv(ctx, name, seed)
    ckpt, meta_path = os.path.join(out, "ckpt.pt"), os.path.join(out, "repro.json")
    meta = json.load(open(meta_path)) if os.path.isfile(meta_path) else None
    started = any(os.path.isfile(os.path.join(out, f)) for f in ("ckpt.pt", "vae.pt"))
    if not started:
        meta = None  # nothing trained yet: start afresh
    elif meta is not None and meta["argv"] != argv:
        raise UserError(f"{out} was trained with other options ({' '.join(meta['argv'])}); "
                        f"move it away or pick another --out")
    done = finished(ckpt)
    if done is not None:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            cfgs = build_configs(argv)
        try:  # a finished run is reused only if it is this very run (whoever trained it)
            check_resume(done, cfgs, RESUME_FREE | {"init_vae"})
        except UserError as e:
            raise UserError(f"{out} holds another run: {e}; move it away or pick another --out") from None
        return ckpt
    if started and meta is None:
        raise UserError(f"{out} holds a run that repro.py did not start; move it away or pick another --out")
    for dep in depends_on(name):
        ensure_run(ctx, dep, seed)
    if not started:  # measurements of an earlier run under this name are stale
        shutil.rmtree(ctx.path("evals", os.path.basename(os.path.normpath(out)), ""), ignore_errors=True)
    print(f"[train] {name} (seed {seed}){' resumed' if started else ''}: python train.py {' '.join(argv)}", flush=True)
    meta = meta or dict(argv=argv, seconds=0.0)
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    t0, saved = time.time(), {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with open(os.path.join(out, "train.log"), "a") as log, contextlib.redirect_stdout(log):
        try:
            train.main(argv + (["--resume"] if started else []))
        except SystemExit as e:  # SIGINT / SIGTERM: train.py saved a checkpoint (reported below); else an error
            if e.code:
                raise
        finally:
            for s, h in saved.items():  # train.py made them 'checkpoint and stop'; this process's own again
                signal.signal(s, h)
            meta["seconds"] += time.time() - t0
            with open(meta_path, "w") as f:
                json.dump(meta, f)
    if finished(ckpt) is None:
        raise UserError(f"run {name} stopped before its end (interrupted?); run the study again to continue it")
    print(f"[train] {name} done in {meta['seconds'] / 60:.1f} min", flush=True)
    return ckpt


def run_seconds(ctx, runs):
    """Training seconds of the (run, seed) pairs `runs` and of the runs they start from, each counted once,
    and the names of those repro.py did not time (reused from elsewhere)."""
    todo, seen, seconds, untimed = list(runs), set(), 0.0, set()
    while todo:
        name, seed = todo.pop()
        if (name, seed) in seen:
            continue
        seen.add((name, seed))
        meta_path = os.path.join(run_dir(ctx, name, seed), "repro.json")
        if os.path.isfile(meta_path):
            seconds += json.load(open(meta_path))["seconds"]
        else:
            untimed.add(name)
        todo += [(dep, seed) for dep in depends_on(name)]
    return seconds, untimed


def measure(ctx, study, s, seed):
    """eval.py's result for one setting and seed: quality (words per prompt) or recon (robustness)."""
    ckpt = ensure_run(ctx, s.run, seed if study.trains else 0)  # sampling studies: one checkpoint, sampler seeds
    a = ctx.args
    if study.measure == "robust":
        argv = ["recon", f"--limit={QUICK_EVAL['limit'] if a.quick else 64}", f"--seed={seed}"]
    else:
        n = dict(prompts=a.prompts, new_tokens=80, prompt_chars=48) if not a.quick else \
            {k: v for k, v in QUICK_EVAL.items() if k != "limit"}
        argv = ["quality", f"--seed={seed}"] + [f"--{k}={v}" for k, v in n.items()]
        argv += [f"--{k}={v}" for k, v in s.opts.items() if SAMPLER_DEFAULTS.get(k) != v]  # defaults: one measurement
        argv += [f"--judge={a.judge}"] if a.judge else []
    if a.dataset and "@gpt2_data" not in RUNS[s.run]:
        argv.append(f"--dataset={a.dataset}")
    key = "_".join(x.lstrip("-").replace("=", "").replace("/", "-").replace(":", "-") for x in argv
                   if not x.startswith("--judge"))
    out = ctx.path("evals", os.path.basename(os.path.dirname(ckpt)), key + ".json")
    if os.path.isfile(out) and not same_judge(json.load(open(out)).get("settings", {}).get("judge") or "",
                                              a.judge if study.measure == "quality" else ""):
        os.remove(out)  # measured with another judge (or none): measure again
    if not os.path.isfile(out):
        print(f"[eval] {s.label} (seed {seed}): python eval.py {' '.join(argv)} --ckpt={ckpt}", flush=True)
        with open(out + ".log", "w") as log, contextlib.redirect_stdout(log):
            evaluate.main(argv + [f"--ckpt={ckpt}", f"--out={out}.part"])
        os.replace(out + ".part", out)  # only a finished measurement counts as one
    res = json.load(open(out))
    res["path"] = out
    return res


def same_judge(a, b):
    """Whether two judge checkpoints are one: the same path, or files with the same bytes."""
    return a == b or (bool(a) and bool(b) and os.path.isfile(a) and os.path.isfile(b) and filecmp.cmp(a, b, shallow=False))


def per_unit(study, s, r):
    """The per-prompt (quality) or per-window (robustness) values of one measurement."""
    if study.measure == "robust":
        return r["robustness_windows"][f"{s.opts['t']:g}"]
    # no word at all: nothing real written
    return [smp["scores"]["word_valid"] if smp["scores"]["words"] else 0.0 for smp in r["samples"]]


# ----------------------------------------------------------------------------- analysis

def analyse(ctx, name, study):
    """A study's result: each row's mean over the prompts (windows) with its 95% interval, compared with
    the paper (studies.compare_with_paper), and the wall time its runs and measurements took."""
    seeds = range(ctx.args.seeds)
    vals, bpb, extra = {}, {}, {}
    for s in study.settings:
        rs = [measure(ctx, study, s, k) for k in seeds]
        units = [per_unit(study, s, r) for r in rs]  # the same prompts (windows) under every seed
        vals[s.label] = [sum(u) / len(u) for u in zip(*units)]  # each prompt's mean over the seeds
        if study.measure == "quality":
            bits = [sum(smp["scores"].get("bits", 0.0) for smp in r["samples"]) for r in rs]
            nbytes = [sum(smp["scores"].get("bytes", 0) for smp in r["samples"]) for r in rs]
            extra[s.label] = dict(judge_bpb=sum(bits) / sum(nbytes) if ctx.args.judge and sum(nbytes) else None,
                                  words_true=sum(r["word_valid_true"] for r in rs) / len(rs),
                                  evals={r["path"]: r["wall_seconds"] for r in rs})
            if ctx.args.judge:  # each prompt's judge bits per byte, its mean over the seeds
                per = [[smp["scores"]["bits"] / max(smp["scores"]["bytes"], 1) for smp in r["samples"]] for r in rs]
                bpb[s.label] = [sum(u) / len(u) for u in zip(*per)]
        else:
            extra[s.label] = dict(token_acc=sum(r["token_acc"] for r in rs) / len(rs),
                                  evals={r["path"]: r["wall_seconds"] for r in rs})
    rows = []
    for s in study.settings:
        m, lo, hi = mean_ci(vals[s.label])
        rows.append(dict(label=s.label, run=s.run, opts=s.opts, paper=s.paper, note=s.note, x=s.x, ours=m,
                         ci=[lo, hi], n=len(vals[s.label]), **extra[s.label], **compare_with_paper(study, s, vals, bpb)))
    seconds, untimed = run_seconds(ctx, {(s.run, k) for s in study.settings for k in (seeds if study.trains else [0])})
    evals = {p: sec for r in rows for p, sec in r.pop("evals").items()}  # rows may share a measurement
    seconds += sum(evals.values())
    return dict(study=name, title=study.title, where=study.where, paper_unit=study.paper_unit, measure=study.measure,
                config=ctx.args.config, quick=ctx.args.quick, seeds=ctx.args.seeds, judge=ctx.args.judge,
                prompts=None if study.measure == "robust" else (QUICK_EVAL["prompts"] if ctx.args.quick else ctx.args.prompts),
                cpu_seconds=seconds, untimed_runs=sorted(untimed), rows=rows,
                command="python repro.py " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("repro.py") else None)


# ----------------------------------------------------------------------------- reports

def fmt(v, f=".3f"):
    return "-" if v is None else format(v, f)


def markdown(res):
    ours = "token accuracy" if res["measure"] == "robust" else "words valid"
    lines = [f"## {res['study']}: {res['title']}", "",
             f"Paper: {res['where']} ({res['paper_unit']}). Ours: {ours}, config `{res['config']}`"
             f"{' (--quick: toy size, numbers mean nothing)' if res['quick'] else ''}, {res['seeds']} seed(s)"
             + (f", {res['prompts']} prompts" if res["prompts"] else "")
             + f"; {res['cpu_seconds'] / 60:.1f} min of wall time on the CPU in all (training runs shared with "
             f"other studies included"
             + (f"; not timed here: {', '.join(res['untimed_runs'])}" if res["untimed_runs"] else "") + ").", ""]
    if res["measure"] == "robust":
        lines += [f"| setting | paper | ours | 95% CI | verdict (within +-{ROBUST_TOL:.2f}) |", "|---|---|---|---|---|"]
        for r in res["rows"]:
            lines.append(f"| {r['label']} | {fmt(r['paper'], '.2f')} | {r['ours']:.3f} | "
                         f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] | {r['verdict']} |")
        return "\n".join(lines) + "\n"
    judged = any("bpb_diff" in r for r in res["rows"])
    lines += ["| setting | paper | words valid [95% CI] | vs | paper says | ours: difference [95% CI] | verdict |"
              + (" judge bpb | bpb difference [95% CI] | verdict (bpb) |" if judged else ""),
              "|---|---|---|---|---|---|---|" + ("---|---|---|" if judged else "")]
    for r in res["rows"]:
        paper = fmt(r["paper"], ".1f") + (f" ({r['note']})" if r["note"] else "")
        cmp_ = (f"{r['ref']} | {r['paper_direction'] or '-'} | {r['diff']:+.3f} [{r['diff_ci'][0]:+.3f}, "
                f"{r['diff_ci'][1]:+.3f}]") if "diff" in r else "- | - | -"
        line = f"| {r['label']} | {paper} | {r['ours']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] | {cmp_} | {r['verdict']} |"
        if judged:
            line += f" {fmt(r['judge_bpb'], '.2f')} | " + (
                f"{r['bpb_diff']:+.2f} [{r['bpb_diff_ci'][0]:+.2f}, {r['bpb_diff_ci'][1]:+.2f}] | {r['bpb_verdict']} |"
                if "bpb_diff" in r else "- | - |")
        lines.append(line)
    lines += ["", f"Intervals: 95% t-intervals over the prompts (each prompt's mean over the seeds); they cover the "
              f"choice of prompts and the sampler's noise, not the variation between training seeds unless "
              f"--seeds > 1. Verdicts: paper '<' / '>' (paper numbers {TIE:g} point or more apart) agree when the "
              f"whole interval of our paired difference has that sign and disagree when it has the other; '~' "
              f"agrees when it lies within +-{MARGIN:g}; anything else is inconclusive. The judge's bits per byte "
              f"(an AR model scoring the text; lower is better) get the same test, ties within +-{BPB_MARGIN:g}."]
    return "\n".join(lines) + "\n"


def plot(res, path):
    """Ours (with 95% intervals) beside the paper's numbers, one line per run for robustness."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    study = STUDIES[res["study"]]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    series = {}
    for r in res["rows"]:
        series.setdefault(r["run"] if res["measure"] == "robust" else "ours", []).append(r)
    for name, rows in series.items():
        ax.errorbar([r["x"] for r in rows], [r["ours"] for r in rows], fmt="o" if study.xscale == "cat" else "o-", label=name,
                    yerr=[[r["ours"] - r["ci"][0] for r in rows], [r["ci"][1] - r["ours"] for r in rows]])
    paper = sorted({(r["x"], r["paper"]) for r in res["rows"] if r["paper"] is not None})
    if paper:
        other = ax if res["measure"] == "robust" else ax.twinx()
        other.plot(*zip(*paper), "s" if study.xscale == "cat" else "s--", color="gray", label="paper")
        other.set_ylabel(f"paper: {res['paper_unit']}")
    ax.set_ylabel("token accuracy" if res["measure"] == "robust" else "words valid (ours)")
    ax.set_xlabel(study.xlabel)
    if study.xscale == "cat":
        ax.set_xticks([r["x"] for r in res["rows"]], [r["label"] for r in res["rows"]], rotation=30, ha="right",
                      fontsize=7)
    elif study.xscale == "log":
        ax.set_xscale("log", base=2)
    if res["measure"] == "robust":
        ax.legend(fontsize=8)
    ax.set_title(f"{res['study']}: {res['title']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_study(ctx, name):
    t0 = time.time()
    res = analyse(ctx, name, STUDIES[name])
    res["wall_seconds_this_call"] = time.time() - t0
    md = markdown(res)
    for ext, text in (("json", json.dumps(res, indent=2)), ("md", md)):
        with open(ctx.path(f"{name}.{ext}"), "w") as f:
            f.write(text)
    print(md)
    print(f"wrote {ctx.path(name + '.json')}, {ctx.path(name + '.md')}"
          + (f", {ctx.path(name + '.png')}" if plot(res, ctx.path(name + ".png")) else " (no plot: matplotlib absent)"))
    return res


def summary(ctx):
    """One table over every finished study: setting, paper, ours, verdict."""
    lines = ["| study | setting | paper | ours [95% CI] | verdict |", "|---|---|---|---|---|"]
    for name in STUDIES:
        p = os.path.join(ctx.out, f"{name}.json")
        if not os.path.isfile(p):
            lines.append(f"| {name} | (not run yet: `python repro.py {name}`) | | | |")
            continue
        res = json.load(open(p))
        for r in res["rows"]:
            lines.append(f"| {name} | {r['label']} | {fmt(r['paper'], '.2f' if res['measure'] == 'robust' else '.1f')} | "
                         f"{r['ours']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] | {r['verdict']} |")
    text = "\n".join(lines) + "\n"
    with open(ctx.path("SUMMARY.md"), "w") as f:
        f.write(text)
    print(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Reproduce the paper's findings at small scale, one study per command.")
    ap.add_argument("study", help="a study name, `all`, `list` or `summary`")
    ap.add_argument("--config", default="tiny", help="train.py preset of every run")
    ap.add_argument("--seeds", type=int, default=1, help="training seeds (sampling studies: sampler seeds)")
    ap.add_argument("--prompts", type=int, default=48, help="held-out prompts per measurement")
    ap.add_argument("--judge", default="", help="an AR checkpoint (train.py --model=ar) to score the text with its "
                                                "bits per byte; `ar`: train.py's AR baseline, trained here once")
    ap.add_argument("--dataset", default="", help="a prepared dataset for every run (default: the preset's)")
    ap.add_argument("--gpt2_dataset", default="austen_gpt2", help="the GPT-2-token dataset of the robustness study")
    ap.add_argument("--out", default="", help="results folder (default results, or results/quick with --quick)")
    ap.add_argument("--quick", action="store_true", help="a toy size, seconds per study: checks the machinery only")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.prompts < 2:
        ap.error("--seeds must be >= 1 and --prompts >= 2")
    ctx = Ctx(args)
    if args.judge == "ar" and args.study not in ("list", "summary"):
        args.judge = ensure_run(ctx, "ar")  # the AR baseline (train.py --model=ar), trained once and reused
    if args.judge and not os.path.isfile(args.judge):
        raise UserError(f"--judge {args.judge}: no such checkpoint")
    if args.study == "list":
        for name, st in STUDIES.items():
            print(f"{name:12s} {st.title} [{st.where}]: {len(st.settings)} settings, CPU {st.cpu}")
        return
    if args.study == "summary":
        return summary(ctx)
    for name in list(STUDIES) if args.study == "all" else [args.study]:
        if name not in STUDIES:
            raise UserError(f"unknown study {name!r}; `python repro.py list` names them")
        run_study(ctx, name)
    if args.study == "all":
        summary(ctx)


if __name__ == "__main__":
    run_main(main)
