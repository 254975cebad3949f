"""
Reproduce the paper's findings (arXiv 2605.06548) at small scale: one command per study (studies.py),
one table with the paper's numbers beside ours.

    python repro.py list                              # the studies and what each costs on a CPU
    python repro.py cfg                               # -> results/cfg.json, cfg.md (+ cfg.png with matplotlib)
    python repro.py block_size --seeds=2 --judge=ar   # two training seeds; the AR baseline scores the text too
    python repro.py all --quick                       # every study at a toy size in seconds (what the tests run)
    python repro.py summary                           # one table over every study finished so far

Each setting names a training run (train.py, in-process, into results/runs/) and a measurement on its
checkpoint (eval.py quality or recon, into results/evals/); finished ones are reused and an interrupted
run is continued. Studies share runs: `base` is `python train.py`, and its stage-1 VAE starts the other
stage-2 runs. The paper scores benchmarks (§4), near zero for a tiny byte-level model; we score the share
of generated words that are real words of the training text, per held-out prompt, paired with the study's
reference row (studies.verdict: does our 95% interval agree with the direction of the paper's numbers?).
"""
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
from common import ArgumentParser, UserError, check_resume, run_main
from config import RESUME_FREE, build_configs
from studies import BPB_MARGIN, MARGIN, ROBUST_TOL, RUNS, STUDIES, TIE, compare_with_paper, mean_ci

# --quick: a toy model and a few prompts, so a study runs in seconds (tests use it)
QUICK_TRAIN = ("--vae.width=32 --vae.n_head=2 --vae.n_enc_layer=1 --vae.n_dec_layer=1 --dit.width=32 --dit.n_head=2 "
               "--dit.n_layer=1 --ar.width=32 --ar.n_head=2 --ar.n_layer=1 --seq_len=64 --batch_size=4 "
               "--warmup_iters=1 --eval_windows=4 --eval_interval=100 --log_interval=100").split()
QUICK_ITERS = "--vae_iters=3 --joint_iters=3 --ar_iters=3".split()  # after the run's own options: they win
QUICK_QUALITY = dict(prompts=4, new_tokens=8, prompt_chars=24)  # eval.py quality's sizes (recon: --limit=4)
SAMPLER_DEFAULTS = dict(cfg=7, steps=16, first_block="clean")  # eval.py quality's own


def path(args, *parts):
    """A path under the results folder, its folder made."""
    p = os.path.join(args.out, *parts)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    return p


def write(p, text):
    with open(p, "w") as f:
        f.write(text)


# ----------------------------------------------------------------------------- running

def run_dir(args, name, seed):
    return path(args, "runs", f"{name}_s{seed}" if seed else name, "")


def lineage(name):  # run `name` and every run it starts from ("@run" in RUNS)
    return {name}.union(*(lineage(a[1:]) for a in RUNS[name] if a.startswith("@") and a[1:] in RUNS))


def dataset_argv(args, name):  # the GPT-2 run names its own dataset
    return [f"--dataset={args.dataset}"] if args.dataset and "@gpt2_data" not in RUNS[name] else []


def train_argv(args, name, seed):
    """train.py's arguments for run `name` with seed index `seed`, and its out_dir."""
    out = run_dir(args, name, seed)
    argv = [f"--config={args.config}", f"--out_dir={out}", f"--seed={1337 + seed}"] + dataset_argv(args, name)
    for a in RUNS[name]:
        if a == "@gpt2_data":
            a = f"--dataset={args.gpt2_dataset}"
        elif a.startswith("@"):  # start from another run's stage-1 VAE (base: the one it kept as vae.pt)
            a = f"--init={os.path.join(run_dir(args, a[1:], seed), 'vae.pt' if a[1:] == 'base' else 'ckpt.pt')}"
        argv.append(a)
    if args.quick:
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


def ensure_run(args, name, seed=0):
    """The checkpoint of a finished run: reused, continued (--resume) or trained here."""
    argv, out = train_argv(args, name, seed)
    ckpt, meta_path = os.path.join(out, "ckpt.pt"), os.path.join(out, "repro.json")
    started = any(os.path.isfile(os.path.join(out, f)) for f in ("ckpt.pt", "vae.pt"))
    meta = json.load(open(meta_path)) if started and os.path.isfile(meta_path) else None
    if meta is not None and meta["argv"] != argv:
        raise UserError(f"{out} was trained with other options ({' '.join(meta['argv'])}); "
                        f"move it away or pick another --out")
    done = finished(ckpt)
    if done is not None:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            cfgs = build_configs(argv)
        try:  # a finished run is reused only if it is this very run (whoever trained it)
            check_resume(done, cfgs, RESUME_FREE | {"init"})
        except UserError as e:
            raise UserError(f"{out} holds another run: {e}; move it away or pick another --out") from None
        return ckpt
    if started and meta is None:
        raise UserError(f"{out} holds a run that repro.py did not start; move it away or pick another --out")
    for dep in sorted(lineage(name) - {name}):
        ensure_run(args, dep, seed)
    if not started:  # measurements of an earlier run under this name are stale
        shutil.rmtree(path(args, "evals", os.path.basename(os.path.normpath(out)), ""), ignore_errors=True)
    print(f"[train] {name} (seed {seed}){' resumed' if started else ''}: python train.py {' '.join(argv)}", flush=True)
    meta = meta or dict(argv=argv, seconds=0.0)
    write(meta_path, json.dumps(meta))
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
            write(meta_path, json.dumps(meta))
    if finished(ckpt) is None:
        raise UserError(f"run {name} stopped before its end (interrupted?); run the study again to continue it")
    print(f"[train] {name} done in {meta['seconds'] / 60:.1f} min", flush=True)
    return ckpt


def measure(args, study, s, seed):
    """eval.py's result for one setting and seed: quality (words per prompt) or recon (robustness)."""
    ckpt = ensure_run(args, s.run, seed if study.trains else 0)  # sampling studies: one checkpoint, sampler seeds
    judge = args.judge if study.measure == "quality" else ""
    if study.measure == "robust":
        argv = ["recon", f"--limit={4 if args.quick else 64}", f"--seed={seed}"]
    else:
        sizes = QUICK_QUALITY if args.quick else dict(prompts=args.prompts, new_tokens=80, prompt_chars=48)
        argv = ["quality", f"--seed={seed}"] + [f"--{k}={v}" for k, v in sizes.items()]
        argv += [f"--{k}={v}" for k, v in s.opts.items() if SAMPLER_DEFAULTS.get(k) != v]  # defaults: one measurement
        argv += [f"--judge={judge}"] if judge else []
    argv += dataset_argv(args, s.run)
    key = "_".join(x.lstrip("-").replace("=", "").replace("/", "-").replace(":", "-") for x in argv
                   if not x.startswith("--judge"))
    out = path(args, "evals", os.path.basename(os.path.dirname(ckpt)), key + ".json")
    if os.path.isfile(out):  # measured with another judge (or none): measure again; a copy is the same judge
        had = json.load(open(out)).get("settings", {}).get("judge") or ""
        if had != judge and not (had and judge and os.path.isfile(had) and filecmp.cmp(had, judge, shallow=False)):
            os.remove(out)
    if not os.path.isfile(out):
        print(f"[eval] {s.label} (seed {seed}): python eval.py {' '.join(argv)} --ckpt={ckpt}", flush=True)
        with open(out + ".log", "w") as log, contextlib.redirect_stdout(log):
            evaluate.main(argv + [f"--ckpt={ckpt}", f"--out={out}.part"])
        os.replace(out + ".part", out)  # only a finished measurement counts as one
    return dict(json.load(open(out)), path=out)


# ----------------------------------------------------------------------------- analysis

def analyse(args, name, study):
    """A study's result: each row's mean over the prompts (windows) with its 95% interval, compared with
    the paper (studies.compare_with_paper), and the wall time its runs and measurements took."""
    t0, seeds = time.time(), range(args.seeds)
    vals, bpb, extra, evals = {}, {}, {}, {}
    for s in study.settings:
        rs = [measure(args, study, s, k) for k in seeds]
        if study.measure == "robust":  # per held-out window
            units = [r["robustness_windows"][f"{s.opts['t']:g}"] for r in rs]
            extra[s.label] = dict(token_acc=sum(r["token_acc"] for r in rs) / len(rs))
        else:  # per prompt; no word at all: nothing real written
            units = [[smp["scores"]["word_valid"] if smp["scores"]["words"] else 0.0 for smp in r["samples"]] for r in rs]
            bits = [sum(smp["scores"].get("bits", 0.0) for smp in r["samples"]) for r in rs]
            nbytes = [sum(smp["scores"].get("bytes", 0) for smp in r["samples"]) for r in rs]
            extra[s.label] = dict(judge_bpb=sum(bits) / sum(nbytes) if args.judge and sum(nbytes) else None,
                                  words_true=sum(r["word_valid_true"] for r in rs) / len(rs))
            if args.judge:  # each prompt's judge bits per byte, its mean over the seeds
                per = [[smp["scores"]["bits"] / max(smp["scores"]["bytes"], 1) for smp in r["samples"]] for r in rs]
                bpb[s.label] = [sum(u) / len(u) for u in zip(*per)]
        evals.update({r["path"]: r["wall_seconds"] for r in rs})  # rows may share a measurement
        vals[s.label] = [sum(u) / len(u) for u in zip(*units)]  # the same prompts (windows) under every seed
    rows = []
    for s in study.settings:
        m, lo, hi = mean_ci(vals[s.label])
        rows.append(dict(label=s.label, run=s.run, opts=s.opts, paper=s.paper, note=s.note, x=s.x, ours=m,
                         ci=[lo, hi], n=len(vals[s.label]), **extra[s.label], **compare_with_paper(study, s, vals, bpb)))
    # wall time: the runs (each once, with the runs they start from; untimed: reused from elsewhere), the measurements
    runs = {(n, k) for s in study.settings for k in (seeds if study.trains else [0]) for n in lineage(s.run)}
    metas = [(n, os.path.join(run_dir(args, n, k), "repro.json")) for n, k in runs]
    seconds = sum(json.load(open(m))["seconds"] for _, m in metas if os.path.isfile(m)) + sum(evals.values())
    untimed = sorted({n for n, m in metas if not os.path.isfile(m)})
    return dict(study=name, title=study.title, where=study.where, paper_unit=study.paper_unit, measure=study.measure,
                config=args.config, quick=args.quick, seeds=args.seeds, judge=args.judge,
                prompts=None if study.measure == "robust" else (QUICK_QUALITY["prompts"] if args.quick else args.prompts),
                cpu_seconds=seconds, untimed_runs=untimed, rows=rows,
                command="python repro.py " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("repro.py") else None,
                wall_seconds_this_call=time.time() - t0)


# ----------------------------------------------------------------------------- reports

def fmt(v, f=".3f"):
    return "-" if v is None else format(v, f)


def with_ci(m, ci, f=".3f"):
    return f"{m:{f}} [{ci[0]:{f}}, {ci[1]:{f}}]"


def markdown(res):
    robust = res["measure"] == "robust"
    prompts = f", {res['prompts']} prompts" if res["prompts"] else ""
    untimed = f"; not timed here: {', '.join(res['untimed_runs'])}" if res["untimed_runs"] else ""
    lines = [f"## {res['study']}: {res['title']}", "",
             f"Paper: {res['where']} ({res['paper_unit']}). Ours: {'token accuracy' if robust else 'words valid'}, "
             f"config `{res['config']}`{' (--quick: toy size, numbers mean nothing)' if res['quick'] else ''}, "
             f"{res['seeds']} seed(s){prompts}; {res['cpu_seconds'] / 60:.1f} min of wall time on the CPU in all "
             f"(training runs shared with other studies included{untimed}).", ""]
    if robust:
        lines += [f"| setting | paper | ours | 95% CI | verdict (within +-{ROBUST_TOL:.2f}) |", "|---" * 5 + "|"]
        lines += [f"| {r['label']} | {fmt(r['paper'], '.2f')} | {r['ours']:.3f} | [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] "
                  f"| {r['verdict']} |" for r in res["rows"]]
        return "\n".join(lines) + "\n"
    judged = any("bpb_diff" in r for r in res["rows"])
    lines += ["| setting | paper | words valid [95% CI] | vs | paper says | ours: difference [95% CI] | verdict |"
              + (" judge bpb | bpb difference [95% CI] | verdict (bpb) |" if judged else ""),
              "|---" * (10 if judged else 7) + "|"]
    for r in res["rows"]:
        paper = fmt(r["paper"], ".1f") + (f" ({r['note']})" if r["note"] else "")
        vs = (f"{r['ref']} | {r['paper_direction'] or '-'} | {with_ci(r['diff'], r['diff_ci'], '+.3f')}"
              if "diff" in r else "- | - | -")
        line = f"| {r['label']} | {paper} | {with_ci(r['ours'], r['ci'])} | {vs} | {r['verdict']} |"
        if judged:
            bpb = f"{with_ci(r['bpb_diff'], r['bpb_diff_ci'], '+.2f')} | {r['bpb_verdict']}" if "bpb_diff" in r else "- | -"
            line += f" {fmt(r['judge_bpb'], '.2f')} | {bpb} |"
        lines.append(line)
    lines += ["", f"Intervals: 95% t-intervals over the prompts (each prompt's mean over the seeds); they cover the "
              f"choice of prompts and the sampler's noise, not the variation between training seeds unless "
              f"--seeds > 1. Verdicts: paper '<' / '>' (paper numbers {TIE:g} point or more apart) agree when the "
              f"whole interval of our paired difference has that sign and disagree when it has the other; '~' "
              f"agrees when it lies within +-{MARGIN:g}; anything else is inconclusive. The judge's bits per byte "
              f"(an AR model scoring the text; lower is better) get the same test, ties within +-{BPB_MARGIN:g}."]
    return "\n".join(lines) + "\n"


def plot(res, png):
    """Ours (with 95% intervals) beside the paper's numbers, one line per run for robustness."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    plt.switch_backend("Agg")
    study, robust = STUDIES[res["study"]], res["measure"] == "robust"
    cat = study.xscale == "cat"
    fig, ax = plt.subplots(figsize=(6, 3.6))
    series = {}
    for r in res["rows"]:
        series.setdefault(r["run"] if robust else "ours", []).append(r)
    for name, rows in series.items():
        ax.errorbar([r["x"] for r in rows], [r["ours"] for r in rows], fmt="o" if cat else "o-", label=name,
                    yerr=[[r["ours"] - r["ci"][0] for r in rows], [r["ci"][1] - r["ours"] for r in rows]])
    paper = sorted({(r["x"], r["paper"]) for r in res["rows"] if r["paper"] is not None})
    if paper:
        other = ax if robust else ax.twinx()
        other.plot(*zip(*paper), "s" if cat else "s--", color="gray", label="paper")
        other.set_ylabel(f"paper: {res['paper_unit']}")
    ax.set_ylabel("token accuracy" if robust else "words valid (ours)")
    ax.set_xlabel(study.xlabel)
    if cat:
        ax.set_xticks([r["x"] for r in res["rows"]], [r["label"] for r in res["rows"]], rotation=30, ha="right",
                      fontsize=7)
    elif study.xscale == "log":
        ax.set_xscale("log", base=2)
    if robust:
        ax.legend(fontsize=8)
    ax.set_title(f"{res['study']}: {res['title']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def run_study(args, name):
    res, out = analyse(args, name, STUDIES[name]), path(args, name)
    md = markdown(res)
    write(out + ".json", json.dumps(res, indent=2))
    write(out + ".md", md)
    print(md)
    print(f"wrote {out}.json, {out}.md" + (f", {out}.png" if plot(res, out + ".png") else " (no plot: matplotlib absent)"))


def summary(args):
    """One table over every finished study: setting, paper, ours, verdict."""
    lines = ["| study | setting | paper | ours [95% CI] | verdict |", "|---" * 5 + "|"]
    for name in STUDIES:
        p = os.path.join(args.out, f"{name}.json")
        if not os.path.isfile(p):
            lines.append(f"| {name} | (not run yet: `python repro.py {name}`) | | | |")
            continue
        res = json.load(open(p))
        lines += [f"| {name} | {r['label']} | {fmt(r['paper'], '.2f' if res['measure'] == 'robust' else '.1f')} | "
                  f"{with_ci(r['ours'], r['ci'])} | {r['verdict']} |" for r in res["rows"]]
    text = "\n".join(lines) + "\n"
    write(path(args, "SUMMARY.md"), text)
    print(text)


def main(argv=None):
    ap = ArgumentParser(description="Reproduce the paper's findings at small scale, one study per command.")
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
    args.out = os.path.normpath(args.out or ("results/quick" if args.quick else "results"))
    if args.judge == "ar" and args.study not in ("list", "summary"):
        args.judge = ensure_run(args, "ar")  # the AR baseline (train.py --model=ar), trained once and reused
    if args.judge and not os.path.isfile(args.judge):
        raise UserError(f"--judge {args.judge}: no such checkpoint")
    if args.study == "list":
        for name, st in STUDIES.items():
            print(f"{name:12s} {st.title} [{st.where}]: {len(st.settings)} settings, CPU {st.cpu}")
        return
    if args.study == "summary":
        return summary(args)
    for name in list(STUDIES) if args.study == "all" else [args.study]:
        if name not in STUDIES:
            raise UserError(f"unknown study {name!r}; `python repro.py list` names them")
        run_study(args, name)
    if args.study == "all":
        summary(args)


if __name__ == "__main__":
    run_main(main)
