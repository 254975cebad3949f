"""
Evaluate a Cola DLM checkpoint. Every subcommand prints a table and, with --out, writes JSON.

    python eval.py recon --ckpt=out/ckpt.pt [--out=recon.json]   # VAE: token/masked accuracy, logSNR, noise robustness
    python eval.py fm    --ckpt=out/ckpt.pt [--out=fm.json]      # prior: held-out flow-matching loss vs a Gaussian baseline
    python eval.py nll   --ckpt=out/ckpt.pt [--samples=K]        # ELBO / IWAE bound: NLL per token, PPL, bits per byte
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
import torch.nn.functional as F
from tqdm import tqdm

from common import UserError, autocast, load_models, pick_device, run_main
from data.loader import resolve_data_dir, val_windows
from data.tokenizer import get_tokenizer
from flow import FlowConfig, fm_by_t, fm_loss, interpolate, prior_logp, sample_t


def held_out(ckpt, limit, device):
    tc = ckpt["config"]["train"]
    try:
        data_dir = resolve_data_dir(tc["dataset"])
    except FileNotFoundError as e:
        raise UserError(str(e))
    return val_windows(data_dir, tc["seq_len"], limit).to(device)


def batches(x, size):
    return [x[i:i + size] for i in range(0, len(x), size)]


# ----------------------------------------------------------------------------- recon

ROBUST_T = (0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6)
PAPER_ROBUST = {0.1: 1.00, 0.15: 1.00, 0.3: 0.79, 0.4: 0.44, 0.5: 0.20}  # SPEC §3


@torch.no_grad()
def eval_recon(vae, x, device, batch_size=16, seed=0):
    """Reconstruction diagnostics, plus token accuracy after noising the posterior-mean latents
    along the flow path z_t = (1 - t) mu + t eps (the paper's latent-noise robustness)."""
    torch.manual_seed(seed)
    sums, n = {}, 0
    robust = {t: 0.0 for t in ROBUST_T}
    for xb in batches(x, batch_size):
        with autocast(device):
            mu, logvar = vae.encode(xb)
            d = vae.diagnostics(xb, (mu, logvar))
            for t in ROBUST_T:
                zt = interpolate(mu, torch.randn_like(mu), torch.full(mu.shape[:2], t, device=mu.device))
                robust[t] += (vae.decode(zt)[0].argmax(-1) == xb).float().mean().item() * len(xb)
        for k, v in d.items():
            sums[k] = sums.get(k, 0.0) + v * len(xb)
        n += len(xb)
    out = {k: v / n for k, v in sums.items()}
    out["robustness"] = {f"{t:g}": v / n for t, v in robust.items()}
    out["windows"], out["tokens"] = n, n * x.shape[1]
    return out


def report_recon(r):
    print(f"token_acc {r['token_acc']:.4f} | masked_acc {r['masked_acc']:.4f} | logSNR {r['logsnr']:.2f} | "
          f"sigma {r['sigma']:.4f} | KL {r['kl']:.2f} nats/token | {r['tokens']} held-out tokens")
    print("latent-noise robustness (token accuracy after z_t = (1-t) mu + t eps):")
    print("   t    ours   paper")
    for t, acc in r["robustness"].items():
        paper = PAPER_ROBUST.get(float(t))
        print(f"  {t:>4}  {acc:.3f}  {'' if paper is None else f'{paper:.2f}'}")


# ----------------------------------------------------------------------------- fm

def gauss_baseline(s2, t):
    """Per-channel FM loss of the best predictor for structureless latents N(m, s2) with no history:
    Var(v) - Cov(v, z_t)^2 / Var(z_t), with v = eps - z0, z_t = (1-t) z0 + t eps. s2 (C,), t (N,) -> (N,)."""
    t = t[:, None]
    return (1 + s2 - (t - (1 - t) * s2) ** 2 / ((1 - t) ** 2 * s2 + t ** 2)).mean(-1)


@torch.no_grad()
def eval_fm(vae, dit, flow_cfg, x, device, batch_size=16, seed=0, repeats=4):
    """Held-out FM loss per channel (training t distribution, no prompt-boundary pinning), per t-bin,
    next to the Gaussian baseline fm_loss_gauss computed from the measured per-channel variance."""
    torch.manual_seed(seed)
    cfg = FlowConfig(**{**flow_cfg.__dict__, "p_prompt_block": 0.0})
    ts, losses, zs = [], [], []
    for _ in range(repeats):  # several t / noise draws per window
        for xb in batches(x, batch_size):
            with autocast(device):
                mu, logvar = vae.encode(xb)
                z = vae.sample(mu, logvar)  # what the prior models: posterior samples
                _, st = fm_loss(dit, z, cfg)
            ts.append(st["t"].flatten().float().cpu()); losses.append(st["per_token"].flatten().float().cpu())
            zs.append(z.flatten(0, 1).float().cpu())
    t, loss = torch.cat(ts), torch.cat(losses)
    s2 = torch.cat(zs).var(0)  # (C,) per-channel variance of the latents
    t_ref = sample_t((200_000,), cfg)
    base = gauss_baseline(s2, t)  # at the same t draws, for the per-bin comparison
    out = dict(fm_loss=loss.mean().item(), fm_loss_gauss=gauss_baseline(s2, t_ref).mean().item())
    out["ratio"] = out["fm_loss"] / out["fm_loss_gauss"]
    out["bins"] = fm_by_t(t, loss)
    out["bins_gauss"] = fm_by_t(t, base)
    out["latent_var"] = s2.tolist()
    out["t_dist"] = f"{cfg.t_dist}(loc={cfg.t_loc}, scale={cfg.t_scale})"
    out["tokens"] = len(t)
    return out


def report_fm(r):
    print(f"held-out FM loss {r['fm_loss']:.4f} per channel | Gaussian baseline {r['fm_loss_gauss']:.4f} | "
          f"ratio {r['ratio']:.3f} | t ~ {r['t_dist']} | {r['tokens']} tokens")
    print("    t bin     ours   gauss  ratio")
    for k, v in r["bins"].items():
        g = r["bins_gauss"][k]
        print(f"  {k}  {v:.4f}  {g:.4f}  {v / g:.3f}")


# ----------------------------------------------------------------------------- nll

@torch.no_grad()
def log_weights(vae, dit, x, samples=1, ode_steps=32):
    """Importance log-weights w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x), z_k ~ q(z|x): (K, B),
    with each term's per-sequence value (averaged over k) for the report."""
    B, L = x.shape
    mu, logvar = vae.encode(x)
    ws, parts = [], {"log_px": 0.0, "log_pz": 0.0, "log_q": 0.0}
    for _ in range(samples):
        z = vae.sample(mu, logvar)
        log_px = -F.cross_entropy(vae.decode(z)[0].flatten(0, 1).float(), x.flatten(), reduction="none").view(B, L).sum(1)
        log_q = (-0.5 * ((z - mu).pow(2) / logvar.exp() + logvar + math.log(2 * math.pi))).flatten(1).sum(1)
        log_pz = prior_logp(dit, z, ode_steps)
        ws.append(log_px + log_pz - log_q)
        for k, v in (("log_px", log_px), ("log_pz", log_pz), ("log_q", log_q)):
            parts[k] = parts[k] + v / samples
    return torch.stack(ws), parts


def eval_nll(models, x, samples=1, ode_steps=32, batch_size=8, seed=0):
    """Cola: ELBO (samples > 1: IWAE) bound on held-out windows. AR: the exact NLL of tokens 2..L of
    each window. Nats per token, PPL, bits per UTF-8 byte (the axis both models share)."""
    torch.manual_seed(seed)
    ar = models.get("ar")
    tok = get_tokenizer(model_cfg(models).tokenizer)
    elbo = iwae = 0.0
    parts = {}
    for xb in tqdm(batches(x, batch_size), desc="nll", leave=False):
        if ar is not None:
            elbo += ar.score(xb).sum().item()
            continue
        w, p = log_weights(models["vae"], models["dit"], xb, samples, ode_steps)
        elbo += w.mean(0).sum().item()
        iwae += (torch.logsumexp(w, 0) - math.log(samples)).sum().item()
        for k, v in p.items():
            parts[k] = parts.get(k, 0.0) + v.sum().item()
    scored = x[:, 1:] if ar is not None else x  # the AR model is given each window's first token
    n_tok = scored.numel()
    n_bytes = sum(len(tok.enc.decode_bytes([t for t in row.tolist() if t < tok.eot])) for row in scored)
    nll = -(iwae if samples > 1 and ar is None else elbo)
    params = sum(p.numel() for m in models.values() if m is not None for p in m.parameters())
    out = dict(nll=nll / n_tok, ppl=math.exp(nll / n_tok), bpb=nll / n_bytes / math.log(2), params=params,
               tokens=n_tok, bytes=n_bytes, exact=ar is not None)
    if ar is None:
        out.update(nll_elbo=-elbo / n_tok, nll_iwae=-iwae / n_tok if samples > 1 else None,
                   recon_nats=-parts["log_px"] / n_tok, prior_nats=-parts["log_pz"] / n_tok,
                   entropy_nats=-parts["log_q"] / n_tok, samples=samples, ode_steps=ode_steps,
                   note="upper bound on the NLL (ELBO/IWAE; CNF prior density by midpoint steps and a Hutchinson "
                        "trace); held-out windows, whose first block has no history")
    return out


def model_cfg(models):
    return (models.get("ar") or models["vae"]).cfg


def report_nll(r):
    if r["exact"]:
        print(f"NLL {r['nll']:.4f} nats/token (exact, AR) | PPL {r['ppl']:.3f} | {r['bpb']:.4f} bits/byte | "
              f"{r['params'] / 1e6:.2f}M params | {r['tokens']} tokens")
        return
    bound = "IWAE" if r["samples"] > 1 else "ELBO"
    print(f"NLL <= {r['nll']:.4f} nats/token ({bound}, K={r['samples']}, {r['ode_steps']} ODE steps) | "
          f"PPL <= {r['ppl']:.3f} | {r['bpb']:.4f} bits/byte | {r['params'] / 1e6:.2f}M params | {r['tokens']} tokens")
    print(f"  terms per token: -log p(x|z) {r['recon_nats']:.4f} | -log p(z) {r['prior_nats']:.4f} | "
          f"log q(z|x) {-r['entropy_nats']:.4f}")


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


@torch.no_grad()
def score(models, x, ode_steps):
    """log p(x) per sequence: exact for AR, the ELBO for Cola."""
    if "ar" in models:
        return models["ar"].score(x)
    return log_weights(models["vae"], models["dit"], x, ode_steps=ode_steps)[0][0]


def eval_bench(models, context, task, items, protocol="generate", limit=None, steps=16, cfg_scale=7.0,
               max_new_tokens=32, batch_size=16, ode_steps=8, seed=0):
    """The paper's few-shot generative protocol (SPEC §4), or ranking choices by log-likelihood."""
    from data import benchmarks as bm
    from sample import generate_any
    tok = get_tokenizer(model_cfg(models).tokenizer)
    shots, todo = items[:bm.SHOTS[task]], items[bm.SHOTS[task]:]  # shots are never evaluated
    todo = todo[:limit] if limit else todo
    prompts = [tok.encode(bm.build_prompt(task, it, shots)) for it in todo]
    room = context - max_new_tokens if protocol == "generate" else context
    truncated = 0
    correct, examples = [], []
    if protocol == "generate":
        for i in tqdm(range(0, len(todo), batch_size), desc=task, leave=False):
            chunk = [fit_context(p, room) for p in prompts[i:i + batch_size]]
            truncated += sum(len(p) > room for p in prompts[i:i + batch_size])
            outs = generate_any(models, chunk, max_new_tokens, steps, cfg_scale, seed=seed)
            for it, o in zip(todo[i:i + batch_size], outs):
                text = tok.decode(o)
                correct.append(bm.is_correct(task, it, text))
                if len(examples) < 5:
                    examples.append(dict(answer=it["answer"], generated=text))
    else:  # rank: log p(choice | prompt) = log p(prompt + choice) - log p(prompt); for Cola both are ELBOs
        # (an approximation, not a bound) evaluated with common random numbers
        if not bm.is_multiple_choice(task):
            raise UserError(f"--protocol=rank needs a multiple-choice task, not {task}")
        dev = next(next(iter(models.values())).parameters()).device
        for it, p in tqdm(list(zip(todo, prompts)), desc=task, leave=False):
            scores, base = [], {}  # base: log p(prompt) per truncation, computed once
            for c in it["choices"]:
                full = p + tok.encode(" " + c)
                cut = max(0, len(full) - room)  # drop the same prompt prefix from both sequences
                truncated += cut > 0
                if cut not in base:
                    torch.manual_seed(seed)
                    base[cut] = score(models, torch.tensor([p[cut:]], device=dev), ode_steps)
                torch.manual_seed(seed)
                scores.append((score(models, torch.tensor([full[cut:]], device=dev), ode_steps) - base[cut]).item())
            correct.append(it["choices"][max(range(len(scores)), key=scores.__getitem__)] == it["answer"])
    k, n = sum(correct), len(correct)
    chance = sum(1 / len(it["choices"]) for it in todo) / max(n, 1) if bm.is_multiple_choice(task) else 0.0
    return dict(task=task, protocol=protocol, accuracy=k / max(n, 1), n=n, correct=k, chance=chance,
                ci95=wilson(k, n), shots=len(shots), truncated_prompts=truncated, context=context,
                steps=steps, cfg=cfg_scale, examples=examples)


def report_bench(r):
    lo, hi = r["ci95"]
    print(f"{r['task']} ({r['protocol']}, {r['shots']}-shot): accuracy {r['accuracy']:.3f} "
          f"[{lo:.3f}, {hi:.3f}] on {r['n']} items | chance {r['chance']:.3f} | "
          f"{r['truncated_prompts']} sequences left-truncated to the {r['context']}-token context")
    for e in r["examples"]:
        print(f"  gold {e['answer']!r:20.20} generated {e['generated'][:60]!r}")


# ----------------------------------------------------------------------------- speed

def time_generate(models, prompt, batch, new_tokens, steps, cfg_scale, use_cache, device):
    from sample import generate_any
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = generate_any(models, [prompt] * batch, new_tokens, steps, cfg_scale, use_cache=use_cache, stop_at_eot=False)
    sync()
    assert all(len(o) == new_tokens for o in out)
    return time.perf_counter() - t0


@torch.no_grad()
def eval_speed(models, x, device, quick=False):
    """Sampler tokens/s and per-block latency over a grid, and (Cola) the KV-cache speedup measured
    side by side: the same sampler recomputing the whole history at every step."""
    ar = "ar" in models
    prompt = x[0, :20].tolist()  # 20 prompt tokens: one full block in the cache, the tail repainted
    bs = 1 if ar else models["dit"].cfg.block_size
    grid = [(b, n, s, w) for b in (1, 8) for n in (64, 256) for s in ((0,) if ar else (8, 16))
            for w in ((1.0,) if ar else (7.0, 1.0))]
    if quick:
        grid = [(1, 32, 4, 7.0), (2, 32, 4, 1.0)]
    time_generate(models, prompt, 1, 16, 2, 7.0, True, device)  # warm-up
    rows = []
    for b, n, s, w in grid:
        dt = time_generate(models, prompt, b, n, s, w, True, device)
        rows.append(dict(batch=b, new_tokens=n, steps=s, cfg=w, seconds=dt, tok_s=b * n / dt,
                         block_ms=1000 * dt / math.ceil((len(prompt) % bs + n) / bs)))
        print(f"  batch {b} | {n:3d} tokens | steps {s:2d} | cfg {w:g} | {rows[-1]['tok_s']:8.1f} tok/s | "
              f"{rows[-1]['block_ms']:7.1f} ms/{'token' if ar else 'block'}", flush=True)
    out = dict(device=str(device), threads=torch.get_num_threads(), rows=rows)
    if not ar:
        n = 64 if quick else 256
        cached = time_generate(models, prompt, 1, n, 16, 7.0, True, device)
        free = time_generate(models, prompt, 1, n, 16, 7.0, False, device)
        out.update(cache_speedup=free / cached, cache_speedup_setting=f"batch 1, {n} new tokens, 16 steps, cfg 7",
                   cached_seconds=cached, cache_free_seconds=free)
    return out


def report_speed(r):
    if "cache_speedup" not in r:
        return
    print(f"cache_speedup {r['cache_speedup']:.2f}x ({r['cache_speedup_setting']}: cache-free "
          f"{r['cache_free_seconds']:.2f} s vs cached {r['cached_seconds']:.2f} s) on {r['device']}")


# ----------------------------------------------------------------------------- command line

def run_bench(args, models, ckpt):
    from data import benchmarks as bm
    if args.task not in bm.TASKS:
        raise UserError(f"unknown --task {args.task!r}; choose from {', '.join(bm.TASKS)}")
    if not os.path.isfile(args.data):
        raise UserError(f"--data file not found: {args.data} (build it with `python data/benchmarks.py`)")
    try:
        items = bm.load_items(args.data, args.task)
    except bm.ItemError as e:
        raise UserError(str(e))
    return eval_bench(models, ckpt["config"]["train"]["seq_len"], args.task, items, args.protocol, args.limit,
                      args.steps, args.cfg, seed=args.seed)


def run_all(args, models, ckpt, device):
    """Every metric with a small budget (a quick report, not a final number)."""
    x = held_out(ckpt, min(args.limit, 32), device)
    out = {}
    if "ar" not in models:
        out["recon"] = eval_recon(models["vae"], x, device, seed=args.seed)
        report_recon(out["recon"])
        out["fm"] = eval_fm(models["vae"], models["dit"], FlowConfig(**ckpt["config"]["flow"]), x, device, seed=args.seed)
        report_fm(out["fm"])
    out["nll"] = eval_nll(models, x[:8], samples=1, ode_steps=16, seed=args.seed)
    report_nll(out["nll"])
    cloze = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "benchmarks", "cloze.jsonl")
    if os.path.isfile(cloze):
        args.task, args.data, args.protocol, args.limit = "cloze", cloze, "generate", min(args.limit, 50)
        out["bench_cloze"] = run_bench(args, models, ckpt)
        report_bench(out["bench_cloze"])
    else:
        print(f"(no {cloze}: run `python data/benchmarks.py --tasks=cloze` for the in-domain cloze task)")
    out["speed"] = eval_speed(models, x, device, quick=True)
    report_speed(out["speed"])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="Evaluate a Cola DLM checkpoint.")
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
    device = pick_device(args.device)
    models, ckpt = load_models(args.ckpt, device)
    vae, dit = models.get("vae"), models.get("dit")
    if "ar" in models and args.cmd in ("recon", "fm"):
        raise UserError(f"{args.ckpt} is an AR baseline: `{args.cmd}` needs a Cola checkpoint")
    if "ar" not in models and args.cmd != "recon" and dit is None:
        raise UserError(f"{args.ckpt} holds only a VAE; `{args.cmd}` needs a stage-2 checkpoint")
    t0 = time.time()
    torch.manual_seed(args.seed)
    if args.cmd == "recon":
        result = eval_recon(vae, held_out(ckpt, args.limit, device), device, seed=args.seed)
        report_recon(result)
    elif args.cmd == "fm":
        result = eval_fm(vae, dit, FlowConfig(**ckpt["config"]["flow"]), held_out(ckpt, args.limit, device), device,
                         seed=args.seed)
        report_fm(result)
    elif args.cmd == "nll":
        result = eval_nll(models, held_out(ckpt, args.limit, device), args.samples, args.ode_steps, seed=args.seed)
        report_nll(result)
    elif args.cmd == "speed":
        result = eval_speed(models, held_out(ckpt, 1, device), device, quick=args.quick)
        report_speed(result)
    elif args.cmd == "bench":
        result = run_bench(args, models, ckpt)
        report_bench(result)
    else:
        result = run_all(args, models, ckpt, device)
    result.update(ckpt=args.ckpt, step=ckpt.get("step"), stage=ckpt.get("stage"), device=str(device),
                  wall_seconds=time.time() - t0)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    run_main(main)
