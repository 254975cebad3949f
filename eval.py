"""
Evaluate a checkpoint of train.py (Cola DLM, or the AR baseline where a subcommand applies). Every
subcommand prints its result and, with --out, writes it as JSON.

    python eval.py recon --ckpt=out/ckpt.pt [--out=recon.json]   # VAE: token/masked accuracy, logSNR, noise robustness
    python eval.py fm    --ckpt=out/ckpt.pt [--out=fm.json]      # prior: held-out flow-matching loss vs a Gaussian baseline
    python eval.py nll   --ckpt=out/ckpt.pt [--samples=K]        # ELBO / IWAE bound (AR: exact): NLL per token, PPL, bits per byte
    python eval.py speed --ckpt=out/ckpt.pt [--out=speed.json]   # sampler throughput, latency, KV-cache speedup
    python eval.py bench --ckpt=out/ckpt.pt --task=cloze --data=data/benchmarks/cloze.jsonl [--protocol=rank]
    python eval.py all   --ckpt=out/ckpt.pt                      # everything above with a small budget

Held-out data is the validation split of the dataset the checkpoint was trained on (fixed windows).
Runs on CPU, CUDA or MPS (--device); --limit N caps the number of held-out windows.
"""
import argparse
import json
import math
import os
import time

import torch
from tqdm import tqdm

from cola import Cola
from common import UserError, autocast, load_model, pick_device, run_main
from data import benchmarks as bm
from data.loader import resolve_data_dir, val_windows
from flow import FlowConfig, fm_by_t, fm_loss, interpolate, sample_t


def held_out(ckpt, limit, device):
    """Fixed windows of the validation split of the checkpoint's dataset: (limit, seq_len)."""
    tc = ckpt["config"]["train"]
    return val_windows(resolve_data_dir(tc["dataset"]), tc["seq_len"], limit).to(device)


def batches(x, size):
    return [x[i:i + size] for i in range(0, len(x), size)]


# ----------------------------------------------------------------------------- recon

ROBUST_T = (0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6)
PAPER_ROBUST = {0.1: 1.00, 0.15: 1.00, 0.3: 0.79, 0.4: 0.44, 0.5: 0.20}  # arXiv 2605.06548 §5.4, Fig. 13


@torch.no_grad()
def recon(model, x, batch_size=16, seed=0):
    """Reconstruction diagnostics, plus token accuracy after noising the posterior-mean latents along
    the flow path z_t = (1 - t) mu + t eps (the paper's latent-noise robustness)."""
    vae, device = model.vae, x.device
    torch.manual_seed(seed)
    sums, robust = {}, {t: 0.0 for t in ROBUST_T}
    for xb in batches(x, batch_size):
        with autocast(device):
            mu, logvar = vae.encode(xb)
            d = vae.diagnostics(xb, (mu, logvar))
            for t in ROBUST_T:
                zt = interpolate(mu, torch.randn_like(mu), torch.full(mu.shape[:2], t, device=device))
                robust[t] += (vae.decode(zt)[0].argmax(-1) == xb).float().mean().item() * len(xb)
        for k, v in d.items():
            sums[k] = sums.get(k, 0.0) + v * len(xb)
    r = {k: v / len(x) for k, v in sums.items()}
    r.update(robustness={f"{t:g}": v / len(x) for t, v in robust.items()}, windows=len(x), tokens=x.numel())
    print(f"token_acc {r['token_acc']:.4f} | masked_acc {r['masked_acc']:.4f} | logSNR {r['logsnr']:.2f} | "
          f"sigma {r['sigma']:.4f} | KL {r['kl']:.2f} nats/token | {r['tokens']} held-out tokens")
    print("latent-noise robustness (token accuracy after z_t = (1-t) mu + t eps):\n   t    ours   paper")
    for t, acc in r["robustness"].items():
        paper = PAPER_ROBUST.get(float(t))
        print(f"  {t:>4}  {acc:.3f}  {'' if paper is None else f'{paper:.2f}'}")
    return r


# ----------------------------------------------------------------------------- fm

def gauss_baseline(s2, t):
    """Per-channel FM loss of the best predictor for structureless latents N(m, s2) with no history:
    Var(v) - Cov(v, z_t)^2 / Var(z_t), with v = eps - z0, z_t = (1-t) z0 + t eps. s2 (C,), t (N,) -> (N,)."""
    t = t[:, None]
    return (1 + s2 - (t - (1 - t) * s2) ** 2 / ((1 - t) ** 2 * s2 + t ** 2)).mean(-1)


@torch.no_grad()
def fm(model, x, batch_size=16, seed=0, repeats=4):
    """Held-out FM loss per channel (training t distribution, no prompt-boundary pinning), per t-bin,
    next to the Gaussian baseline fm_loss_gauss computed from the measured per-channel variance."""
    torch.manual_seed(seed)
    cfg = FlowConfig(**{**model.flow_cfg.__dict__, "p_prompt_block": 0.0})
    ts, losses, zs = [], [], []
    for _ in range(repeats):  # several t / noise draws per window
        for xb in batches(x, batch_size):
            with autocast(x.device):
                z = model.vae.sample(*model.vae.encode(xb))  # what the prior models: posterior samples
                _, st = fm_loss(model.dit, z, cfg)
            ts.append(st["t"].flatten().float().cpu()); losses.append(st["per_token"].flatten().float().cpu())
            zs.append(z.flatten(0, 1).float().cpu())
    t, loss = torch.cat(ts), torch.cat(losses)
    s2 = torch.cat(zs).var(0)  # (C,) per-channel variance of the latents
    r = dict(fm_loss=loss.mean().item(), fm_loss_gauss=gauss_baseline(s2, sample_t((200_000,), cfg)).mean().item())
    r.update(ratio=r["fm_loss"] / r["fm_loss_gauss"], bins=fm_by_t(t, loss),
             bins_gauss=fm_by_t(t, gauss_baseline(s2, t)),  # at the same t draws, for the per-bin comparison
             latent_var=s2.tolist(), t_dist=f"{cfg.t_dist}(loc={cfg.t_loc}, scale={cfg.t_scale})", tokens=len(t))
    print(f"held-out FM loss {r['fm_loss']:.4f} per channel | Gaussian baseline {r['fm_loss_gauss']:.4f} | "
          f"ratio {r['ratio']:.3f} | t ~ {r['t_dist']} | {r['tokens']} tokens\n    t bin     ours   gauss  ratio")
    for k, v in r["bins"].items():
        print(f"  {k}  {v:.4f}  {r['bins_gauss'][k]:.4f}  {v / r['bins_gauss'][k]:.3f}")
    return r


# ----------------------------------------------------------------------------- nll

@torch.no_grad()
def nll(model, x, samples=1, ode_steps=32, batch_size=8, seed=0):
    """Cola: the ELBO (samples > 1: IWAE) bound on held-out windows (arXiv 2605.06548 §3.1.1, App. A).
    AR: the exact NLL of tokens 2..L of each window. Nats per token, PPL, bits per UTF-8 byte (the axis
    both share)."""
    torch.manual_seed(seed)
    bound = isinstance(model, Cola)
    elbo = iwae = 0.0
    parts = {}
    for xb in tqdm(batches(x, batch_size), desc="nll", leave=False):
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
    if not bound:
        print(f"NLL {r['nll']:.4f} nats/token (exact, AR) | PPL {r['ppl']:.3f} | {r['bpb']:.4f} bits/byte | "
              f"{r['params'] / 1e6:.2f}M params | {r['tokens']} tokens")
        return r
    r.update(nll_elbo=-elbo / n_tok, nll_iwae=-iwae / n_tok if samples > 1 else None,
             recon_nats=-parts["log_px"] / n_tok, prior_nats=-parts["log_pz"] / n_tok,
             entropy_nats=-parts["log_q"] / n_tok, samples=samples, ode_steps=ode_steps,
             note="upper bound on the NLL (ELBO/IWAE; CNF prior density by midpoint steps and a Hutchinson "
                  "trace); held-out windows, whose first block has no history")
    print(f"NLL <= {r['nll']:.4f} nats/token ({'IWAE' if samples > 1 else 'ELBO'}, K={samples}, {ode_steps} ODE steps) "
          f"| PPL <= {r['ppl']:.3f} | {r['bpb']:.4f} bits/byte | {r['params'] / 1e6:.2f}M params | {n_tok} tokens")
    print(f"  terms per token: -log p(x|z) {r['recon_nats']:.4f} | -log p(z) {r['prior_nats']:.4f} | "
          f"log q(z|x) {-r['entropy_nats']:.4f}")
    return r


# ----------------------------------------------------------------------------- bench

def wilson(k, n, z=1.96):
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return [0.0, 1.0]
    p, d = k / n, 1 + z * z / n
    c, h = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [max(0.0, c - h), min(1.0, c + h)]


def fit_context(ids, room):
    """Keep the last `room` tokens: few-shot prompts are left-truncated to the model's context."""
    return ids[-room:] if room > 0 else []


def bench(model, context, task, items, protocol="generate", limit=None, steps=16, cfg_scale=7.0,
          max_new_tokens=32, batch_size=16, ode_steps=8, seed=0):
    """The paper's few-shot generative protocol (greedy, <= 32 new tokens, cut at the first newline,
    matched to the option text; data/benchmarks.py), or ranking choices by log-likelihood."""
    tok = model.tok
    shots, todo = items[:bm.SHOTS[task]], items[bm.SHOTS[task]:]  # shots are never evaluated
    todo = todo[:limit] if limit else todo
    prompts = [tok.encode(bm.build_prompt(task, it, shots)) for it in todo]
    room = context - max_new_tokens if protocol == "generate" else context
    truncated, correct, examples = 0, [], []
    if protocol == "generate":
        for i in tqdm(range(0, len(todo), batch_size), desc=task, leave=False):
            chunk = [fit_context(p, room) for p in prompts[i:i + batch_size]]
            truncated += sum(len(p) > room for p in prompts[i:i + batch_size])
            outs = model.generate(chunk, max_new_tokens, steps=steps, cfg_scale=cfg_scale, seed=seed)
            for it, o in zip(todo[i:i + batch_size], outs):
                text = tok.decode(o)
                correct.append(bm.is_correct(task, it, text))
                if len(examples) < 5:
                    examples.append(dict(answer=it["answer"], generated=text))
    else:  # rank: log p(choice | prompt) = log p(prompt + choice) - log p(prompt); for Cola both are ELBOs
        # (an approximation, not a bound) evaluated with common random numbers
        if not bm.is_multiple_choice(task):
            raise UserError(f"--protocol=rank needs a multiple-choice task, not {task}")
        dev = next(model.parameters()).device
        for it, p in tqdm(list(zip(todo, prompts)), desc=task, leave=False):
            scores, base = [], {}  # base: log p(prompt) per truncation, computed once
            for c in it["choices"]:
                full = p + tok.encode(" " + c)
                cut = max(0, len(full) - room)  # drop the same prompt prefix from both sequences
                truncated += cut > 0
                if cut not in base:
                    torch.manual_seed(seed)
                    base[cut] = model.score(torch.tensor([p[cut:]], device=dev), ode_steps=ode_steps)
                torch.manual_seed(seed)
                scores.append((model.score(torch.tensor([full[cut:]], device=dev), ode_steps=ode_steps) - base[cut]).item())
            correct.append(it["choices"][max(range(len(scores)), key=scores.__getitem__)] == it["answer"])
    k, n = sum(correct), len(correct)
    chance = sum(1 / len(it["choices"]) for it in todo) / max(n, 1) if bm.is_multiple_choice(task) else 0.0
    r = dict(task=task, protocol=protocol, accuracy=k / max(n, 1), n=n, correct=k, chance=chance, ci95=wilson(k, n),
             shots=len(shots), truncated_prompts=truncated, context=context, steps=steps, cfg=cfg_scale,
             examples=examples)
    print(f"{task} ({protocol}, {len(shots)}-shot): accuracy {r['accuracy']:.3f} [{r['ci95'][0]:.3f}, "
          f"{r['ci95'][1]:.3f}] on {n} items | chance {chance:.3f} | {truncated} sequences left-truncated to the "
          f"{context}-token context")
    for e in examples:
        print(f"  gold {e['answer']!r:20.20} generated {e['generated'][:60]!r}")
    return r


def load_bench_items(task, path):
    if task not in bm.TASKS:
        raise UserError(f"unknown --task {task!r}; choose from {', '.join(bm.TASKS)}")
    if not os.path.isfile(path):
        raise UserError(f"--data file not found: {path} (build it with `python data/benchmarks.py`)")
    return bm.load_items(path, task)


# ----------------------------------------------------------------------------- speed

def time_generate(model, prompt, batch, new_tokens, steps, cfg_scale, use_cache=True):
    """Seconds to generate new_tokens for `batch` copies of prompt (never stopping early)."""
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = model.generate([prompt] * batch, new_tokens, steps=steps, cfg_scale=cfg_scale, use_cache=use_cache,
                         stop_at_eot=False)
    sync()
    assert all(len(o) == new_tokens for o in out)
    return time.perf_counter() - t0


@torch.no_grad()
def speed(model, x, quick=False):
    """Sampler tokens/s and latency per block over a grid, and (Cola) the KV-cache speedup measured
    side by side: the same sampler recomputing the whole history at every step."""
    cola = isinstance(model, Cola)
    prompt = x[0, :20].tolist()  # 20 prompt tokens: one full block in the cache, the tail repainted
    bs, unit = model.block_size, "block" if cola else "token"
    grid = [(b, n, s, w) for b in (1, 8) for n in (64, 256) for s in ((8, 16) if cola else (0,))
            for w in ((7.0, 1.0) if cola else (1.0,))]
    if quick:
        grid = [(1, 32, 4, 7.0), (2, 32, 4, 1.0)]
    time_generate(model, prompt, 1, 16, 2, 7.0)  # warm-up
    rows = []
    for b, n, s, w in grid:
        dt = time_generate(model, prompt, b, n, s, w)
        rows.append(dict(batch=b, new_tokens=n, steps=s, cfg=w, seconds=dt, tok_s=b * n / dt,
                         block_ms=1000 * dt / math.ceil((len(prompt) % bs + n) / bs)))
        print(f"  batch {b} | {n:3d} tokens | steps {s:2d} | cfg {w:g} | {rows[-1]['tok_s']:8.1f} tok/s | "
              f"{rows[-1]['block_ms']:7.1f} ms/{unit}", flush=True)
    r = dict(device=str(x.device), threads=torch.get_num_threads(), rows=rows)
    if cola:
        n = 64 if quick else 256
        cached, free = (time_generate(model, prompt, 1, n, 16, 7.0, use_cache=c) for c in (True, False))
        r.update(cache_speedup=free / cached, cache_speedup_setting=f"batch 1, {n} new tokens, 16 steps, cfg 7",
                 cached_seconds=cached, cache_free_seconds=free)
        print(f"cache_speedup {free / cached:.2f}x ({r['cache_speedup_setting']}: cache-free {free:.2f} s vs cached "
              f"{cached:.2f} s) on {x.device}")
    return r


# ----------------------------------------------------------------------------- command line

def run_all(args, model, ckpt, device):
    """Every metric with a small budget (a quick report, not a final number)."""
    x = held_out(ckpt, min(args.limit, 32), device)
    r = {}
    if isinstance(model, Cola):
        r["recon"] = recon(model, x, seed=args.seed)
        r["fm"] = fm(model, x, seed=args.seed)
    r["nll"] = nll(model, x[:8], samples=1, ode_steps=16, seed=args.seed)
    cloze = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "benchmarks", "cloze.jsonl")
    if os.path.isfile(cloze):
        r["bench_cloze"] = bench(model, ckpt["config"]["train"]["seq_len"], "cloze", load_bench_items("cloze", cloze),
                                 limit=min(args.limit, 50), steps=args.steps, cfg_scale=args.cfg, seed=args.seed)
    else:
        print(f"(no {cloze}: run `python data/benchmarks.py --tasks=cloze` for the in-domain cloze task)")
    r["speed"] = speed(model, x, quick=True)
    return r


def parse_args(argv):
    ap = argparse.ArgumentParser(description="Evaluate a Cola DLM (or AR baseline) checkpoint.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, help_ in [("recon", "VAE reconstruction and latent-noise robustness"),
                        ("fm", "held-out flow-matching loss vs the Gaussian baseline"),
                        ("nll", "likelihood bound: NLL per token, PPL, bits per byte"),
                        ("speed", "sampler throughput and KV-cache speedup"),
                        ("bench", "few-shot benchmark (generative protocol, or --protocol=rank)"),
                        ("all", "everything with a small budget")]:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--ckpt", required=True)
        p.add_argument("--out", default=None, help="write the results as JSON here")
        p.add_argument("--limit", type=int, default=64, help="held-out windows (bench: items) to use")
        p.add_argument("--device", default="auto")
        p.add_argument("--seed", type=int, default=0)
        if name == "speed":
            p.add_argument("--quick", action="store_true", help="a small grid (smoke test)")
        if name == "nll":
            p.add_argument("--samples", type=int, default=1, help="K posterior samples (K > 1: IWAE bound)")
            p.add_argument("--ode_steps", type=int, default=32, help="midpoint steps of the CNF density")
        if name == "bench":
            p.add_argument("--task", required=True)
            p.add_argument("--data", required=True, help="JSONL items (data/benchmarks.py builds them)")
            p.add_argument("--protocol", choices=("generate", "rank"), default="generate")
        if name in ("bench", "all"):
            p.add_argument("--steps", type=int, default=16)
            p.add_argument("--cfg", type=float, default=7.0)
    args = ap.parse_args(argv)
    if args.limit < 1:
        ap.error("--limit must be >= 1")
    if args.cmd == "nll" and (args.samples < 1 or args.ode_steps < 1):
        ap.error("--samples and --ode_steps must be >= 1")
    if args.cmd in ("bench", "all") and (args.steps < 1 or args.cfg < 0):
        ap.error("--steps must be >= 1 and --cfg >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    model, ckpt = load_model(args.ckpt, device)
    if not isinstance(model, Cola) and args.cmd in ("recon", "fm"):
        raise UserError(f"{args.ckpt} is an AR baseline: `{args.cmd}` needs a Cola checkpoint")
    if args.cmd != "recon" and not model.can_generate:
        raise UserError(f"{args.ckpt} holds only a VAE; `{args.cmd}` needs a stage-2 checkpoint")
    t0 = time.time()
    torch.manual_seed(args.seed)
    if args.cmd == "recon":
        result = recon(model, held_out(ckpt, args.limit, device), seed=args.seed)
    elif args.cmd == "fm":
        result = fm(model, held_out(ckpt, args.limit, device), seed=args.seed)
    elif args.cmd == "nll":
        result = nll(model, held_out(ckpt, args.limit, device), args.samples, args.ode_steps, seed=args.seed)
    elif args.cmd == "speed":
        result = speed(model, held_out(ckpt, 1, device), quick=args.quick)
    elif args.cmd == "bench":
        result = bench(model, ckpt["config"]["train"]["seq_len"], args.task, load_bench_items(args.task, args.data),
                       args.protocol, args.limit, args.steps, args.cfg, seed=args.seed)
    else:
        result = run_all(args, model, ckpt, device)
    result.update(ckpt=args.ckpt, step=ckpt.get("step"), stage=ckpt.get("stage"), device=str(device),
                  wall_seconds=time.time() - t0)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    run_main(main)
