"""
Evaluate a checkpoint of train.py (Cola DLM, or the AR baseline where a subcommand applies). Every
subcommand prints its result and, with --out, writes it as JSON.

    python eval.py recon --ckpt=out/ckpt.pt [--out=recon.json]   # VAE: token/masked accuracy, logSNR, noise robustness
    python eval.py fm    --ckpt=out/ckpt.pt [--out=fm.json]      # prior: held-out flow-matching loss vs a Gaussian baseline
    python eval.py nll   --ckpt=out/ckpt.pt [--samples=K]        # ELBO / IWAE bound (AR: exact): NLL per token, PPL, bits per byte
    python eval.py quality --ckpt=out/ckpt.pt --judge=out_ar/ckpt.pt   # generated text: real words, 4-grams, judge bits/byte
    python eval.py speed --ckpt=out/ckpt.pt [--compile]          # sampler throughput, latency, KV-cache speedup
    python eval.py bench --ckpt=out/ckpt.pt --task=cloze --data=data/benchmarks/cloze.jsonl [--protocol=rank]
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

import torch
from tqdm import tqdm

from cola import Cola, parse_first_block
from common import DTYPES, UserError, autocast, cast_for, load_model, pick_device, precision, run_main
from data import benchmarks as bm
from data import quality as tq
from data.loader import load_meta, resolve_data_dir, val_windows
from flow import FlowConfig, fm_by_t, fm_loss, interpolate, sample_t
from sample import SPEED_PROMPT, random_model, speed


def dataset_dir(args, ckpt, model):
    """The prepared dataset to evaluate on: --dataset, or the one the checkpoint was trained on."""
    data_dir = resolve_data_dir(args.dataset or ckpt["config"]["train"]["dataset"])
    if load_meta(data_dir)["tokenizer"] != model.tok.name:
        raise UserError(f"dataset {data_dir} is tokenized with {load_meta(data_dir)['tokenizer']!r}, the model "
                        f"with {model.tok.name!r}")
    return data_dir


def held_out(args, ckpt, model, limit):
    """Fixed windows of the validation split (limit, seq_len), on the model's device."""
    device = next(model.parameters()).device
    return val_windows(dataset_dir(args, ckpt, model), ckpt["config"]["train"]["seq_len"], limit).to(device)


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
    sums, robust = {}, {t: [] for t in ROBUST_T}  # per window
    for xb in batches(x, batch_size):
        mu, logvar = vae.encode(xb)
        d = vae.diagnostics(xb, (mu, logvar))
        for t in ROBUST_T:
            zt = interpolate(mu, torch.randn_like(mu), torch.full(mu.shape[:2], t, device=device))
            robust[t] += (vae.decode(zt).argmax(-1) == xb).float().mean(1).tolist()
        for k, v in d.items():
            sums[k] = sums.get(k, 0.0) + v * len(xb)
    r = {k: v / len(x) for k, v in sums.items()}
    r.update(robustness={f"{t:g}": sum(v) / len(v) for t, v in robust.items()},
             robustness_windows={f"{t:g}": v for t, v in robust.items()}, windows=len(x), tokens=x.numel())
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


def eval_flow_cfg(model):
    """The model's flow settings without the prompt-boundary pinning (held-out losses score every position)."""
    return FlowConfig(**{**model.flow_cfg.__dict__, "p_prompt_block": 0.0})


@torch.no_grad()
def history_gain(model, z, high=0.8, seed=0):
    """What the prior takes from its history: held-out FM loss at high noise (t ~ U(high, 1) per block)
    with the true history, and with another sequence's (z rolled over the batch), under the same t and
    noise. Blocks after the first only (the first has no history). Returns the losses and the relative
    drop (other - true) / other, over all positions and over the first position of every block."""
    B, L, _ = z.shape
    bs = model.dit.cfg.block_size
    t = high + (1 - high) * torch.rand(B, math.ceil(L / bs), generator=torch.Generator().manual_seed(seed))
    cfg = eval_flow_cfg(model)
    losses = []
    for history in (z, z.roll(1, 0)):
        torch.manual_seed(seed)  # the same noise for both
        losses.append(fm_loss(model.dit, z, cfg, t_block=t.to(z.device), history=history)[1]["per_token"])
    pos = torch.arange(L, device=z.device)
    r = {}
    for name, sel in (("", pos >= bs), ("_first", (pos >= bs) & (pos % bs == 0))):
        true, other = (l[:, sel].mean().item() for l in losses)
        r.update({f"fm_high_t{name}": true, f"fm_high_t_other{name}": other, f"fm_history_gain{name}": (other - true) / other})
    return r


@torch.no_grad()
def fm(model, x, batch_size=16, seed=0, repeats=4):
    """Held-out FM loss per channel (training t distribution, no prompt-boundary pinning), per t-bin,
    next to the Gaussian baseline fm_loss_gauss computed from the measured per-channel variance; and
    the history gain at high noise (history_gain)."""
    torch.manual_seed(seed)
    cfg = eval_flow_cfg(model)
    ts, losses, zs = [], [], []
    for _ in range(repeats):  # several t / noise draws per window
        for xb in batches(x, batch_size):
            z = model.vae.sample(*model.vae.encode(xb))  # what the prior models: posterior samples
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
    r.update(history_gain(model, z, seed=seed))
    print(f"held-out FM loss {r['fm_loss']:.4f} per channel | Gaussian baseline {r['fm_loss_gauss']:.4f} | "
          f"ratio {r['ratio']:.3f} | t ~ {r['t_dist']} | {r['tokens']} tokens\n    t bin     ours   gauss  ratio")
    for k, v in r["bins"].items():
        print(f"  {k}  {v:.4f}  {r['bins_gauss'][k]:.4f}  {v / r['bins_gauss'][k]:.3f}")
    print(f"t >= 0.8, true history vs another sequence's: {r['fm_high_t']:.4f} vs {r['fm_high_t_other']:.4f} "
          f"(fm_history_gain {r['fm_history_gain']:.3f}); first position of a block: {r['fm_high_t_first']:.4f} vs "
          f"{r['fm_high_t_other_first']:.4f} (gain {r['fm_history_gain_first']:.3f})")
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

def bench(model, context, args):
    """A few-shot benchmark (data/benchmarks.py: the paper's generative protocol, or --protocol=rank)."""
    if args.task not in bm.TASKS:
        raise UserError(f"unknown --task {args.task!r}; choose from {', '.join(bm.TASKS)}")
    items = bm.load_items(args.data, args.task)
    r = bm.evaluate(model, context, args.task, items, args.protocol, args.limit, args.steps, args.cfg, seed=args.seed)
    lo, hi = r["ci95"]
    print(f"{r['task']} ({r['protocol']}, {r['shots']}-shot): accuracy {r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] on "
          f"{r['n']} items | chance {r['chance']:.3f} | {r['truncated_prompts']} sequences left-truncated to the "
          f"{context}-token context")
    for ex in r["examples"]:
        print(f"  gold {ex['answer']!r:20.20} generated {ex['generated'][:60]!r}")
    return r


# ----------------------------------------------------------------------------- quality

@torch.no_grad()
def judge_bits(judge, context, prompt, cont):
    """(bits, bytes) of the text cont after prompt under an AR judge (its first `context` tokens)."""
    tok = judge.tok
    p, c = tok.encode(prompt) or [tok.eot], tok.encode(cont)
    c = c[:max(0, context - len(p))]
    if not c:
        return 0.0, 0
    x = torch.tensor([p + c], device=next(judge.parameters()).device)
    nats = -judge.token_logprobs(x)[0, len(p) - 1:].sum().item()
    return nats / math.log(2), len(tok.enc.decode_bytes(c))


def quality(model, ckpt, args):
    """Generated text, measured: continuations of held-out prompts, next to the true continuations
    (ceiling) and unigram-sampled tokens (floor). Words found in the training vocabulary, distinct word
    4-grams, byte entropy and, with --judge (an AR checkpoint), the judge's bits per byte (in fp32 under
    any --dtype, so that only the generator changes)."""
    data_dir, tok = dataset_dir(args, ckpt, model), model.tok
    context = ckpt["config"]["train"]["seq_len"]
    if context - args.new_tokens < 1:
        raise UserError(f"--new_tokens={args.new_tokens} leaves no room for a prompt in the {context}-token context")
    pairs = tq.quality_prompts(data_dir, args.prompts, args.prompt_chars, tok, args.new_tokens)
    room = context - args.new_tokens  # prompt tokens that fit; padded prompts must fit with their padding
    if args.first_block.endswith("_pad"):
        room = room // model.block_size * model.block_size
        if room < 1:
            raise UserError(f"--new_tokens={args.new_tokens} leaves no whole block for a padded prompt")
    gens = []
    for i in tqdm(range(0, len(pairs), args.batch_size), desc="quality", leave=False):
        prompts = [tok.encode(p)[-room:] for p, _ in pairs[i:i + args.batch_size]]
        gens += [tok.decode(o) for o in model.generate(prompts, args.new_tokens, steps=args.steps, cfg_scale=args.cfg,
                                                       shift=args.shift, temperature=args.temperature, top_k=args.top_k,
                                                       top_p=args.top_p, seed=args.seed, first_block=args.first_block)]
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
                context = judge_ckpt["config"]["train"]["seq_len"]
                scored = [judge_bits(judge, context, p, c) for (p, _), c in zip(pairs, texts)]
            bits, n_bytes = map(sum, zip(*scored))
            stats[name]["bpb"] = bits / max(n_bytes, 1)
            for s, (b, n) in zip(per_sample[name], scored):
                s.update(bits=b, bytes=n)
    r = dict(gen_bpb=stats["generated"].get("bpb"), gen_bpb_true=stats["true"].get("bpb"),
             gen_bpb_unigram=stats["unigram"].get("bpb"),
             self_judged=bool(args.judge) and os.path.samefile(args.judge, args.ckpt),
             word_valid=stats["generated"]["word_valid"], word_valid_true=stats["true"]["word_valid"],
             word_valid_unigram=stats["unigram"]["word_valid"],
             distinct4=stats["generated"]["distinct4"], distinct4_true=stats["true"]["distinct4"],
             byte_entropy=stats["generated"]["byte_entropy"], byte_entropy_true=stats["true"]["byte_entropy"],
             stats=stats, settings=dict(prompts=len(pairs), new_tokens=args.new_tokens, prompt_chars=args.prompt_chars,
                                        steps=args.steps, cfg=args.cfg, shift=args.shift, temperature=args.temperature,
                                        top_k=args.top_k, top_p=args.top_p, seed=args.seed, judge=args.judge,
                                        first_block=args.first_block,
                                        dataset=data_dir),
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
    x = held_out(args, ckpt, model, min(args.limit, 32))
    r = {}
    if isinstance(model, Cola):
        r["recon"] = recon(model, x, seed=args.seed)
        r["fm"] = fm(model, x, seed=args.seed)
    r["nll"] = nll(model, x[:8], samples=1, ode_steps=16, seed=args.seed)
    cloze = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "benchmarks", "cloze.jsonl")
    if os.path.isfile(cloze):
        args.task, args.data, args.protocol, args.limit = "cloze", cloze, "generate", min(args.limit, 50)
        r["bench_cloze"] = bench(model, ckpt["config"]["train"]["seq_len"], args)
    else:
        print(f"(no {cloze}: run `python data/benchmarks.py --tasks=cloze` for the in-domain cloze task)")
    r["speed"] = speed(model, x[0, :20].tolist(), quick=True)
    return r


COMMANDS = {"recon": "VAE reconstruction and latent-noise robustness",
            "fm": "held-out flow-matching loss vs the Gaussian baseline, and what the prior takes from its history",
            "nll": "likelihood bound: NLL per token, PPL, bits per byte",
            "quality": "generated text: real words, distinct 4-grams, entropy, bits per byte under an AR judge",
            "speed": "sampler throughput and KV-cache speedup",
            "bench": "few-shot benchmark (generative protocol, or --protocol=rank)",
            "all": "everything with a small budget"}


def parse_args(argv):
    ap = argparse.ArgumentParser(description="Evaluate a Cola DLM (or AR baseline) checkpoint.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, help_ in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        p.add_argument("--ckpt", required=name != "speed", help="a checkpoint written by train.py")
        p.add_argument("--out", default=None, help="write the results as JSON here")
        p.add_argument("--limit", type=int, default=64, help="held-out windows (bench: items) to use")
        p.add_argument("--dataset", default=None, help="a prepared dataset (data/NAME or a path) to evaluate on; "
                                                       "default: the checkpoint's own")
        p.add_argument("--device", default="auto")
        p.add_argument("--dtype", default="auto", choices=DTYPES,
                       help="auto: bf16 autocast on CUDA (nll: fp32), fp32 elsewhere; bf16 also pays off on CPUs "
                            "with native bf16 matmuls")
        p.add_argument("--seed", type=int, default=0)
        if name == "speed":
            p.add_argument("--quick", action="store_true", help="a small grid (smoke test)")
            p.add_argument("--compile", action="store_true", help="time the compiled step (sample.py --compile)")
            p.add_argument("--random_init", action="store_true",
                           help="time a model with fresh weights instead of --ckpt, built from train.py's options "
                                "given after it (e.g. --config=small, --dit.block_size=16): any size, no training")
        if name == "nll":
            p.add_argument("--samples", type=int, default=1, help="K posterior samples (K > 1: IWAE bound)")
            p.add_argument("--ode_steps", type=int, default=32, help="midpoint steps of the CNF density")
        if name == "bench":
            p.add_argument("--task", required=True)
            p.add_argument("--data", required=True, help="JSONL items (data/benchmarks.py builds them)")
            p.add_argument("--protocol", choices=("generate", "rank"), default="generate")
        if name in ("bench", "all", "quality"):  # the sampler's options, with sample.py's defaults
            p.add_argument("--steps", type=int, default=16)
            p.add_argument("--cfg", type=float, default=7.0)
        if name == "quality":
            p.add_argument("--judge", default=None, help="an AR checkpoint (train.py --model=ar) that scores the text")
            p.add_argument("--prompts", type=int, default=48, help="held-out prompts")
            p.add_argument("--new_tokens", type=int, default=80, help="tokens generated per prompt")
            p.add_argument("--prompt_chars", type=int, default=48,
                           help="prompt length in characters (cut to whole words; left-truncated to fit the context)")
            p.add_argument("--shift", type=float, default=1.0, help="time shift of the Euler steps (> 1: more at high noise)")
            p.add_argument("--first_block", default="clean",
                           help="clean (the paper's), repaint[:R[:M]], left_pad, right_pad (cola.parse_first_block)")
            p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding")
            p.add_argument("--top_k", type=int, default=0)
            p.add_argument("--top_p", type=float, default=1.0)
            p.add_argument("--batch_size", type=int, default=16, help="prompts per generate call")
    args, model_options = ap.parse_known_args(argv)
    args.model_options = model_options
    if model_options and not (args.cmd == "speed" and args.random_init):
        ap.error(f"unrecognized arguments: {' '.join(model_options)}")
    if args.cmd == "speed" and (args.ckpt is None) == (not args.random_init):
        ap.error("speed needs --ckpt or --random_init (one of them)")
    if args.limit < 1:
        ap.error("--limit must be >= 1")
    if args.cmd == "nll" and (args.samples < 1 or args.ode_steps < 1):
        ap.error("--samples and --ode_steps must be >= 1")
    if args.cmd in ("bench", "all", "quality") and (args.steps < 1 or args.cfg < 0):
        ap.error("--steps must be >= 1 and --cfg >= 0")
    if args.cmd == "quality" and (min(args.prompts, args.new_tokens, args.batch_size, args.prompt_chars) < 1 or args.shift <= 0
                                  or args.temperature < 0
                                  or args.top_k < 0 or not 0 < args.top_p <= 1):
        ap.error("--prompts, --new_tokens, --prompt_chars, --batch_size must be >= 1, --temperature and --top_k >= 0, --top_p in (0, 1]")
    if args.cmd == "quality":
        try:
            parse_first_block(args.first_block)
        except ValueError as e:
            ap.error(str(e))
    if args.cmd == "quality" and args.temperature == 0 and (args.top_k or args.top_p < 1):
        ap.error("--top_k / --top_p apply to sampling: add --temperature > 0 (0 is greedy)")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    model, ckpt = random_model(args.model_options, device) if getattr(args, "random_init", False) \
        else load_model(args.ckpt, device)
    if not isinstance(model, Cola) and args.cmd in ("recon", "fm"):
        raise UserError(f"{args.ckpt} is an AR baseline: `{args.cmd}` needs a Cola checkpoint")
    if args.cmd != "recon" and not model.can_generate:
        raise UserError(f"{args.ckpt} holds only a VAE; `{args.cmd}` needs a stage-2 checkpoint")
    t0 = time.time()
    torch.manual_seed(args.seed)
    context = ckpt["config"]["train"]["seq_len"]
    # one precision for the whole command; a likelihood stays fp32 unless bf16 is asked for by name
    dtype = precision(device, "fp32" if args.cmd == "nll" and args.dtype == "auto" else args.dtype)
    model = cast_for(model, device, dtype)
    with autocast(device, dtype):
        if args.cmd == "recon":
            result = recon(model, held_out(args, ckpt, model, args.limit), seed=args.seed)
        elif args.cmd == "fm":
            result = fm(model, held_out(args, ckpt, model, args.limit), seed=args.seed)
        elif args.cmd == "nll":
            result = nll(model, held_out(args, ckpt, model, args.limit), args.samples, args.ode_steps, seed=args.seed)
        elif args.cmd == "quality":
            result = quality(model, ckpt, args)
        elif args.cmd == "speed":
            fresh = args.random_init  # no dataset to take a held-out prompt from
            prompt = model.tok.encode(SPEED_PROMPT)[:20] if fresh else held_out(args, ckpt, model, 1)[0, :20].tolist()
            result = speed(model, prompt, quick=args.quick, compile=args.compile)
        elif args.cmd == "bench":
            result = bench(model, context, args)
        else:
            result = run_all(args, model, ckpt)
    result.update(ckpt=args.ckpt or "random_init " + " ".join(args.model_options), step=ckpt.get("step"),
                  stage=ckpt.get("stage"), device=str(device), dtype=dtype, wall_seconds=time.time() - t0)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    run_main(main)
