"""
Evaluate a checkpoint of train.py (Cola DLM, or the AR baseline where a subcommand applies). Every
subcommand prints its result and, with --out, writes it as JSON.

    python eval.py recon --ckpt=out/ckpt.pt [--out=recon.json]   # VAE: token/masked accuracy, logSNR, noise robustness
    python eval.py fm    --ckpt=out/ckpt.pt [--out=fm.json]      # prior: held-out flow-matching loss vs a Gaussian baseline
    python eval.py nll   --ckpt=out/ckpt.pt [--samples=K]        # ELBO / IWAE bound (AR: exact): NLL per token, PPL, bits per byte
    python eval.py quality --ckpt=out/ckpt.pt --judge=out_ar/ckpt.pt   # generated text: real words, 4-grams, judge bits/byte
    python eval.py speed --ckpt=out/ckpt.pt [--compile]          # sampler throughput, latency, KV-cache speedup
    python eval.py bench --ckpt=out/ckpt.pt --task=cloze --data=data/benchmarks/cloze.jsonl [--protocol=rank]
    python eval.py rescore --task=mmlu --data=Cola-DLM/eval_output/tasks_default/mmlu.jsonl  # a file's `generate`, no model
    python eval.py all   --ckpt=out/ckpt.pt                      # everything above with a small budget

Held-out data is the validation split of the dataset the checkpoint was trained on (fixed windows),
or of another prepared dataset with --dataset=NAME. Runs on CPU, CUDA or MPS (--device); --limit N
caps the number of held-out windows; --dtype=auto|fp32|bf16 sets the precision (common.autocast).
"""
import argparse
import json
import math
import os
import time
from dataclasses import asdict, replace

import torch
from tqdm import tqdm

from cola import Cola
from common import DTYPES, ArgumentParser, UserError, autocast, cast_for, pick_device, precision, run_main
from config import load_model, random_model
from data import benchmarks as bm
from data import quality as tq
from data.loader import load_meta, resolve_data_dir, val_windows
from flow import fm_by_t, fm_loss, gauss_baseline, history_gain, interpolate, sample_t
from layers import Sampling


def dataset_dir(args, ckpt, model):
    """The prepared dataset to evaluate on: --dataset, or the one the checkpoint was trained on."""
    data_dir = resolve_data_dir(args.dataset or ckpt["config"]["train"]["dataset"])
    if (data_tok := load_meta(data_dir)["tokenizer"]) != model.tok.name:
        raise UserError(f"dataset {data_dir} is tokenized with {data_tok!r}, the model with {model.tok.name!r}")
    return data_dir


def held_out(args, ckpt, model, limit):
    """Fixed windows of the validation split (limit, seq_len), on the model's device."""
    x = val_windows(dataset_dir(args, ckpt, model), ckpt["config"]["train"]["seq_len"], limit)
    return x.to(next(model.parameters()).device)


# ----------------------------------------------------------------------------- recon

ROBUST_T = (0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6)
PAPER_ROBUST = {0.1: 1.00, 0.15: 1.00, 0.3: 0.79, 0.4: 0.44, 0.5: 0.20}  # arXiv 2605.06548 §5.4, Fig. 13


@torch.no_grad()
def recon(model, x, batch_size=16, seed=0):
    """Reconstruction diagnostics, plus token accuracy after noising the posterior-mean latents along
    the flow path z_t = (1 - t) mu + t eps (the paper's latent-noise robustness)."""
    vae = model.vae
    torch.manual_seed(seed)
    sums, robust = {}, {t: [] for t in ROBUST_T}  # per window
    for xb in x.split(batch_size):
        mu, logvar = vae.encode(xb)
        for k, v in vae.diagnostics(xb, (mu, logvar)).items():
            sums[k] = sums.get(k, 0.0) + v * len(xb)
        for t in ROBUST_T:
            zt = interpolate(mu, torch.randn_like(mu), torch.full(mu.shape[:2], t, device=x.device))
            robust[t] += (vae.decode(zt).argmax(-1) == xb).float().mean(1).tolist()
    r = {k: v / len(x) for k, v in sums.items()}
    r.update(robustness={f"{t:g}": sum(v) / len(v) for t, v in robust.items()},
             robustness_windows={f"{t:g}": v for t, v in robust.items()}, windows=len(x), tokens=x.numel())
    print(f"token_acc {r['token_acc']:.4f} | masked_acc {r['masked_acc']:.4f} | logSNR {r['logsnr']:.2f} | "
          f"sigma {r['sigma']:.4f} | KL {r['kl']:.2f} nats/token | {r['tokens']} held-out tokens\n"
          "latent-noise robustness, token accuracy after z_t = (1-t) mu + t eps (the paper's in brackets): "
          + ", ".join(f"t={t} {acc:.3f}" + (f" ({PAPER_ROBUST[float(t)]:.2f})" if float(t) in PAPER_ROBUST else "")
                      for t, acc in r["robustness"].items()))
    return r


# ----------------------------------------------------------------------------- fm

@torch.no_grad()
def fm(model, x, batch_size=16, seed=0, repeats=4):
    """Held-out FM loss per channel (training t distribution, no prompt-boundary pinning), overall and per t
    bin, next to the Gaussian baseline of the measured latent variance; and the history gain (history_gain)."""
    torch.manual_seed(seed)
    cfg, ts, losses, zs = replace(model.flow_cfg, p_prompt_block=0.0), [], [], []
    for _ in range(repeats):  # several t / noise draws per window
        for xb in x.split(batch_size):
            z = model.dit.patchify(model.vae.sample(*model.vae.encode(xb)))  # what the prior models: posterior samples
            _, st = fm_loss(model.dit, z, cfg)
            ts.append(st["t"].flatten().float().cpu()); losses.append(st["per_token"].flatten().float().cpu())
            zs.append(z.float())
    t, loss = torch.cat(ts), torch.cat(losses)
    s2 = torch.cat(zs).flatten(0, 1).var(0).cpu()  # (C,) per-channel variance of the latents
    z = torch.cat(zs[:math.ceil(len(x) / batch_size)])  # (N, L, d): the first draw of every window
    r = dict(fm_loss=loss.mean().item(), fm_loss_gauss=gauss_baseline(s2, sample_t((200_000,), cfg)).mean().item())
    r.update(ratio=r["fm_loss"] / r["fm_loss_gauss"], bins=fm_by_t(t, loss),
             bins_gauss=fm_by_t(t, gauss_baseline(s2, t)),  # at the same t draws, for the per-bin comparison
             latent_var=s2.tolist(), t_dist=f"{cfg.t_dist}(loc={cfg.t_loc}, scale={cfg.t_scale})", tokens=len(t))
    r.update(history_gain(model.dit, model.flow_cfg, z, seed=seed))
    print(f"held-out FM loss {r['fm_loss']:.4f} per channel | Gaussian baseline {r['fm_loss_gauss']:.4f} | "
          f"ratio {r['ratio']:.3f} | t ~ {r['t_dist']} | {r['tokens']} tokens\nper t bin, ours / Gaussian = ratio: "
          + ", ".join(f"{k} {v:.4f} / {r['bins_gauss'][k]:.4f} = {v / r['bins_gauss'][k]:.3f}"
                      for k, v in r["bins"].items()))
    print(f"t >= 0.8, true history vs another sequence's: {r['fm_high_t']:.4f} vs {r['fm_high_t_other']:.4f} "
          f"(fm_history_gain {r['fm_history_gain']:.3f}); first position of a block: {r['fm_high_t_first']:.4f} vs "
          f"{r['fm_high_t_other_first']:.4f} (gain {r['fm_history_gain_first']:.3f})")
    return r


# ----------------------------------------------------------------------------- nll

@torch.no_grad()
def nll(model, x, samples=1, ode_steps=32, batch_size=8, seed=0):
    """Cola: the ELBO (samples > 1: IWAE) bound on held-out windows (arXiv 2605.06548 §3.1.1, App. A). AR: the
    exact NLL of tokens 2..L of each window. Nats per token, PPL, bits per UTF-8 byte (the axis both share)."""
    torch.manual_seed(seed)
    bound, elbo, iwae, parts = isinstance(model, Cola), 0.0, 0.0, {}
    for xb in tqdm(x.split(batch_size), desc="nll", leave=False):
        if not bound:
            elbo += model.score(xb).sum().item()
            continue
        w, p = model.log_weights(xb, samples, ode_steps)
        elbo += w.mean(0).sum().item()
        iwae += (torch.logsumexp(w, 0) - math.log(samples)).sum().item()
        for k, v in p.items():
            parts[k] = parts.get(k, 0.0) + v.sum().item()
    scored = x if bound else x[:, 1:]  # the AR model is given each window's first token
    n_tok, tok = scored.numel(), model.tok
    n_bytes = sum(len(tok.enc.decode_bytes([t for t in row.tolist() if t < tok.eot])) for row in scored)
    total = -(iwae if samples > 1 and bound else elbo)
    r = dict(nll=total / n_tok, ppl=math.exp(total / n_tok), bpb=total / n_bytes / math.log(2),
             params=model.num_params(), tokens=n_tok, bytes=n_bytes, exact=not bound)
    kind, le = ("exact, AR", "") if not bound else (f"{'IWAE' if samples > 1 else 'ELBO'}, K={samples}, "
                                                     f"{ode_steps} ODE steps", "<= ")
    print(f"NLL {le}{r['nll']:.4f} nats/token ({kind}) | PPL {le}{r['ppl']:.3f} | {r['bpb']:.4f} bits/byte | "
          f"{r['params'] / 1e6:.2f}M params | {n_tok} tokens")
    if bound:
        r.update(nll_elbo=-elbo / n_tok, nll_iwae=-iwae / n_tok if samples > 1 else None,
                 recon_nats=-parts["log_px"] / n_tok, prior_nats=-parts["log_pz"] / n_tok,
                 entropy_nats=-parts["log_q"] / n_tok, samples=samples, ode_steps=ode_steps,
                 note="upper bound on the NLL (ELBO/IWAE; CNF prior density by midpoint steps and a Hutchinson "
                      "trace); held-out windows, whose first block has no history")
        print(f"  terms per token: -log p(x|z) {r['recon_nats']:.4f} | -log p(z) {r['prior_nats']:.4f} | "
              f"log q(z|x) {-r['entropy_nats']:.4f}")
    return r


# ----------------------------------------------------------------------------- speed

SPEED_PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"


def time_generate(model, prompt, batch, new_tokens, steps, cfg_scale, use_cache=True, compile=False):
    """Seconds to generate new_tokens for `batch` copies of prompt (never stopping early)."""
    sync = torch.cuda.synchronize if next(model.parameters()).device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = model.generate([prompt] * batch, new_tokens, steps=steps, cfg_scale=cfg_scale, use_cache=use_cache,
                         stop_at_eot=False, compile=compile)
    sync()
    assert all(len(o) == new_tokens for o in out)
    return time.perf_counter() - t0


@torch.no_grad()
def speed(model, prompt, quick=False, compile=False, against=None, steps=(8, 16)):
    """Sampler tokens/s and latency per block over a grid; for Cola also the KV-cache speedup (the same sampler
    recomputing its history at every step). prompt: token ids (20: with block 16, one full block in the cache
    and a pinned tail). compile: the compiled step; each setting first runs once untimed, compiling its graphs.
    against: another model (say, the AR baseline) timed right after each row at the same batch and length,
    its steps and guidance where it has them: the rows' ratio is a side-by-side comparison."""
    cola, bs, device = isinstance(model, Cola), model.block_size, next(model.parameters()).device
    grid = [(b, n, s, w) for b in (1, 8) for n in (64, 256) for s in (steps if cola else (0,))
            for w in ((7.0, 1.0) if cola else (1.0,))] if not quick else [(1, 32, 4, 7.0), (2, 32, 4, 1.0)]
    dtype = "bf16" if torch.is_autocast_enabled(device.type) else "fp32"
    print(f"sampler speed on {device}, {dtype}, {torch.get_num_threads()} threads" + (", compiled step" * compile))
    for m in (model, against) if against is not None else (model,):
        time_generate(m, prompt, 1, 16, 2, 7.0)  # warm-up
    def timed(m, *setting):
        if compile:  # this setting's graphs, compiled before the clock starts (earlier ones dropped)
            torch.compiler.reset()
            time_generate(m, prompt, *setting, compile=True)
        return time_generate(m, prompt, *setting, compile=compile)

    rows = []
    for b, n, s, w in grid:
        dt = timed(model, b, n, s, w)
        rows.append(dict(batch=b, new_tokens=n, steps=s, cfg=w, seconds=dt, tok_s=b * n / dt,
                         block_ms=1000 * dt / math.ceil((len(prompt) % bs + n) / bs)))
        line = (f"  batch {b} | {n:3d} tokens | steps {s:2d} | cfg {w:g} | {rows[-1]['tok_s']:8.1f} tok/s | "
                f"{rows[-1]['block_ms']:7.1f} ms/{'block' if cola else 'token'}")
        if against is not None:
            rows[-1]["against_tok_s"] = b * n / timed(against, b, n, s, w)
            line += f" | against {rows[-1]['against_tok_s']:8.1f} tok/s: {rows[-1]['tok_s'] / rows[-1]['against_tok_s']:.2f}x"
        print(line, flush=True)
    r = dict(device=str(device), dtype=dtype, threads=torch.get_num_threads(), compile=compile, rows=rows)
    if cola:
        n = 64 if quick else 256
        cached, free = (time_generate(model, prompt, 1, n, 16, 7.0, use_cache=c) for c in (True, False))  # eager
        r.update(cache_speedup=free / cached, cache_speedup_setting=f"batch 1, {n} new tokens, 16 steps, cfg 7",
                 cached_seconds=cached, cache_free_seconds=free)
        print(f"cache_speedup {free / cached:.2f}x ({r['cache_speedup_setting']}: cache-free {free:.2f} s, "
              f"cached {cached:.2f} s)")
    return r


# ----------------------------------------------------------------------------- quality

def quality(model, ckpt, args, batch_size=16):
    """Generated text, measured: continuations of held-out prompts next to the true ones (ceiling) and
    unigram-sampled tokens (floor): words in the training vocabulary, distinct word 4-grams, byte entropy,
    and with --judge (an AR checkpoint, in fp32 under any --dtype so only the generator changes) bits/byte."""
    data_dir, tok, context = dataset_dir(args, ckpt, model), model.tok, ckpt["config"]["train"]["seq_len"]
    pad = args.first_block.endswith("_pad")
    room = context - args.new_tokens  # prompt tokens that fit; a padded prompt fits with its padding
    if pad:
        room -= room % model.block_size
    if room < 1:
        raise UserError(f"--new_tokens={args.new_tokens} leaves no room for a{' padded' * pad} prompt in the "
                        f"{context}-token context")
    pairs = tq.quality_prompts(data_dir, args.prompts, args.prompt_chars, tok, args.new_tokens)
    gens = []
    for i in tqdm(range(0, len(pairs), batch_size), desc="quality", leave=False):
        prompts = [tok.encode(p)[-room:] for p, _ in pairs[i:i + batch_size]]
        gens += [tok.decode(o) for o in model.generate(prompts, args.new_tokens, **asdict(args.sampler))]
    rows = {"generated": gens, "true": [c for _, c in pairs],
            "unigram": tq.unigram_texts(data_dir, len(pairs), args.new_tokens, args.seed)}
    vocab = tq.train_vocabulary(data_dir)
    stats = {name: tq.text_stats(texts, vocab) for name, texts in rows.items()}
    per_sample = {name: [tq.text_stats([t], vocab) for t in texts] for name, texts in rows.items()}
    if args.judge:
        judge, judge_ckpt = load_model(args.judge, next(model.parameters()).device)
        if isinstance(judge, Cola):
            raise UserError(f"--judge {args.judge} is a Cola checkpoint; the judge must be an AR one (--model=ar)")
        for name, texts in rows.items():
            with torch.autocast(judge.tok_emb.weight.device.type, enabled=False):  # the yardstick: always fp32
                scored = [judge.continuation_bits(p, c, judge_ckpt["config"]["train"]["seq_len"])
                          for (p, _), c in zip(pairs, texts)]
            bits, n_bytes = map(sum, zip(*scored))
            stats[name]["bpb"] = bits / max(n_bytes, 1)
            for s, (b, n) in zip(per_sample[name], scored):
                s.update(bits=b, bytes=n)
    r = dict(self_judged=bool(args.judge) and os.path.samefile(args.judge, args.ckpt))
    for key, stat, names in (("gen_bpb", "bpb", rows), ("word_valid", "word_valid", rows),
                             ("distinct4", "distinct4", ("generated", "true")),
                             ("byte_entropy", "byte_entropy", ("generated", "true"))):
        r.update({key + ("" if name == "generated" else "_" + name): stats[name].get(stat) for name in names})
    settings = ("new_tokens", "prompt_chars", "steps", "cfg", "shift", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "judge",
                "first_block")
    r.update(stats=stats, settings=dict(prompts=len(pairs), dataset=data_dir, **{k: getattr(args, k) for k in settings}),
             samples=[dict(prompt=p, generated=g, true=c, scores=sc, true_scores=tc)
                      for (p, c), g, sc, tc in zip(pairs, gens, per_sample["generated"], per_sample["true"])])
    fmt = lambda v, f: "-" if v is None else format(v, f)
    print(f"{len(pairs)} held-out prompts, {args.new_tokens} new tokens | judge: {args.judge or '(none)'}"
          f"{' (self-judged)' if r['self_judged'] else ''}\n              word_valid  distinct4  byte_entropy  judge_bpb")
    for name, s in stats.items():
        print(f"  {name:10s}  {fmt(s['word_valid'], '10.3f')}  {fmt(s['distinct4'], '9.3f')}  "
              f"{fmt(s['byte_entropy'], '12.2f')}  {fmt(s.get('bpb'), '9.2f')}")
    for s in r["samples"][:3]:
        print(f"--- {s['prompt']!r}\n  generated: {s['generated']!r}\n  true:      {s['true']!r}")
    return r


# ----------------------------------------------------------------------------- command line

def run_all(args, model, ckpt):
    """Every metric with a small budget (a quick report, not a final number)."""
    x, r = held_out(args, ckpt, model, min(args.limit, 32)), {}
    if isinstance(model, Cola):
        r.update(recon=recon(model, x, seed=args.seed), fm=fm(model, x, seed=args.seed))
    r["nll"] = nll(model, x[:8], samples=1, ode_steps=16, seed=args.seed)
    cloze = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "benchmarks", "cloze.jsonl")
    if os.path.isfile(cloze):
        args.task, args.data, args.protocol, args.limit = "cloze", cloze, "generate", min(args.limit, 50)
        r["bench_cloze"] = bm.bench(model, ckpt["config"]["train"]["seq_len"], args)
    else:
        print(f"(no {cloze}: run `python data/benchmarks.py --tasks=cloze` for the in-domain cloze task)")
    r["speed"] = speed(model, x[0, :20].tolist(), quick=True)
    return r


MODEL = ("recon", "fm", "nll", "quality", "speed", "bench", "all")  # the subcommands that load a model
COMMANDS = MODEL + ("rescore",)  # what each does: the docstring above
SAMPLING = ("bench", "all", "quality")  # the subcommands that generate: the sampler's options, sample.py's defaults
OPTIONS = [  # (the subcommands that take it, flag, argparse keywords); --ckpt is MODEL's but speed's
    (COMMANDS, "--out", dict(help="write the results as JSON here")),
    (MODEL, "--limit", dict(type=int, default=64, help="held-out windows (bench: items) to use")),
    (MODEL, "--dataset", dict(help="a prepared dataset (data/NAME or a path); default: the checkpoint's own")),
    (MODEL, "--device", dict(default="auto")),
    (MODEL, "--dtype", dict(default="auto", choices=DTYPES, help="auto: bf16 autocast on CUDA (nll: fp32), else fp32")),
    (MODEL, "--seed", dict(type=int, default=0)),
    (["speed"], "--quick", dict(action="store_true", help="a small grid (smoke test)")),
    (["speed"], "--compile", dict(action="store_true", help="time the compiled step (sample.py --compile)")),
    (["speed"], "--random_init", dict(action="store_true", help="fresh weights from train.py's options given after it")),
    (["speed"], "--against", dict(help="another checkpoint (e.g. the AR baseline's) timed beside each row")),
    (["speed"], "--steps", dict(type=int, nargs="+", default=[8, 16], help="the grid's Euler steps per block")),
    (["nll"], "--samples", dict(type=int, default=1, help="K posterior samples (K > 1: IWAE bound)")),
    (["nll"], "--ode_steps", dict(type=int, default=32, help="midpoint steps of the CNF density")),
    (["bench", "rescore"], "--task", dict(required=True, help=", ".join(bm.TASKS))),
    (["bench", "rescore"], "--data", dict(required=True, help="JSONL items: data/benchmarks.py's, or the authors'")),
    (["bench"], "--protocol", dict(choices=("generate", "rank"), default="generate")),
    (SAMPLING, "--steps", dict(type=int, default=16, help="Euler steps per block")),
    (SAMPLING, "--cfg", dict(type=float, default=7.0, help="classifier-free guidance scale, 1 = off")),
    (["quality"], "--judge", dict(help="an AR checkpoint (train.py --model=ar) that scores the text")),
    (["quality"], "--prompts", dict(type=int, default=48, help="held-out prompts")),
    (["quality"], "--new_tokens", dict(type=int, default=80, help="tokens generated per prompt")),
    (["quality"], "--prompt_chars", dict(type=int, default=48, help="prompt length in characters (whole words)")),
    (["quality"], "--shift", dict(type=float, default=1.0, help="time shift of the Euler steps")),
    (["quality"], "--first_block", dict(default="clean", help="clean, repaint[:R[:M]], left_pad, right_pad")),
    (["quality"], "--temperature", dict(type=float, default=0.0, help="0 = greedy decoding")),
    (["quality"], "--top_k", dict(type=int, default=0)),
    (["quality"], "--top_p", dict(type=float, default=1.0)),
    (["quality"], "--repetition_penalty", dict(type=float, default=1.1, help="1 = off")),
]
# the least value of each number option (of the subcommands with it); quality's sampler: Sampling.check
AT_LEAST = dict(limit=1, samples=1, ode_steps=1, steps=1, prompts=1, new_tokens=1, prompt_chars=1, cfg=0)


def parse_args(argv):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in COMMANDS:
        p = sub.add_parser(name)
        if name in MODEL:
            p.add_argument("--ckpt", required=name != "speed", help="a checkpoint written by train.py, or the released "
                                                                     "checkpoint's directory")
        for names, flag, kw in OPTIONS:
            if name in names:
                p.add_argument(flag, **kw)
    args, model_options = ap.parse_known_args(argv)
    args.model_options = model_options  # speed --random_init: train.py's options
    if model_options and not (args.cmd == "speed" and args.random_init):
        ap.error(f"unrecognized arguments: {' '.join(model_options)}")
    if args.cmd == "speed" and (args.ckpt is None) == (not args.random_init):
        ap.error("speed needs --ckpt or --random_init (one of them)")
    for key, low in AT_LEAST.items():
        value = getattr(args, key, low)
        if min(value if isinstance(value, list) else [value]) < low:  # speed --steps: a list
            ap.error(f"--{key} must be >= {low}")
    if args.cmd == "quality":
        try:
            args.sampler = Sampling(steps=args.steps, cfg_scale=args.cfg, shift=args.shift, first_block=args.first_block,
                                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                    repetition_penalty=args.repetition_penalty).check()
        except ValueError as e:
            ap.error(str(e))
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.cmd == "rescore":
        return write(bm.rescore(args), args.out)
    device = pick_device(args.device)
    fresh = getattr(args, "random_init", False)  # speed on fresh weights: no dataset to take a prompt from
    model, ckpt = random_model(args.model_options, device) if fresh else load_model(args.ckpt, device)
    against = load_model(args.against, device)[0] if getattr(args, "against", None) else None
    if against is not None and against.tok.name != model.tok.name:
        raise UserError(f"--against={args.against} has another tokenizer: the two must read the same prompt")
    if not isinstance(model, Cola) and args.cmd in ("recon", "fm"):
        raise UserError(f"{args.ckpt} is an AR baseline: `{args.cmd}` needs a Cola checkpoint")
    if args.cmd != "recon" and not model.can_generate:
        raise UserError(f"{args.ckpt} holds only a VAE; `{args.cmd}` needs a stage-2 checkpoint")
    t0 = time.time()
    torch.manual_seed(args.seed)
    # one precision for the whole command; a likelihood stays fp32 unless bf16 is asked for by name
    dtype = precision(device, "fp32" if args.cmd == "nll" and args.dtype == "auto" else args.dtype)
    model = cast_for(model, device, dtype)
    x = lambda limit=args.limit: held_out(args, ckpt, model, limit)
    run = dict(recon=lambda: recon(model, x(), seed=args.seed), fm=lambda: fm(model, x(), seed=args.seed),
               nll=lambda: nll(model, x(), args.samples, args.ode_steps, seed=args.seed),
               speed=lambda: speed(model, model.tok.encode(SPEED_PROMPT)[:20] if fresh else x(1)[0, :20].tolist(),
                                   args.quick, args.compile, None if against is None else cast_for(against, device, dtype),
                                   args.steps),
               bench=lambda: bm.bench(model, ckpt["config"]["train"]["seq_len"], args),
               quality=lambda: quality(model, ckpt, args), all=lambda: run_all(args, model, ckpt))
    with autocast(device, dtype):
        result = run[args.cmd]()
    result.update(ckpt=args.ckpt or "random_init " + " ".join(args.model_options), step=ckpt.get("step"),
                  stage=ckpt.get("stage"), device=str(device), dtype=dtype, wall_seconds=time.time() - t0)
    return write(result, args.out)


def write(result, path):
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    run_main(main)
