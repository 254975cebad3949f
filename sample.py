"""
Generate text from a checkpoint of train.py: Cola DLM, or the AR baseline (--model=ar).

    python sample.py --ckpt=out/ckpt.pt --prompt="It is a truth universally acknowledged"
    python sample.py --ckpt=out/ckpt.pt --prompt="" --num_samples=4 --temperature=0.8
    python sample.py --ckpt=out/ckpt.pt --prompts_file=prompts.txt --steps=8 --cfg=5

A thin command line over the model's own generate(): cola.Cola.generate samples block after block
(Euler steps with classifier-free guidance, the prompt's tail pinned by clean-condition repaint,
arXiv 2605.06548 §3.2.3), ar.ARLM.generate token by token; --steps / --cfg apply to Cola only.
One prompt streams its text as blocks are decoded. Runs on CPU, CUDA or MPS (--device), in fp32 or
bf16 (--dtype; default: bf16 autocast on CUDA only), each step eager or compiled into one graph
(--compile; layers.compiled_step: a CUDA graph on GPU).

The sampler's timing lives here too (time_generate, speed, random_model): `eval.py speed` runs it.
"""
import argparse
import math
import time
from dataclasses import asdict

import torch

from ar import ARLM
from cola import Cola, parse_first_block
from common import DTYPES, UserError, autocast, cast_for, load_model, pick_device, run_main


class Streamer:
    """Prints one sample's text as its blocks are decoded (holding back a cut multi-byte character)."""

    def __init__(self, tok):
        self.tok, self.shown = tok, ""

    def __call__(self, i, ids):
        text = self.tok.decode(ids).rstrip("\ufffd")
        print(text[len(self.shown):], end="", flush=True)
        self.shown = text


# ----------------------------------------------------------------------------- speed (eval.py speed)

SPEED_PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"


def time_generate(model, prompt, batch, new_tokens, steps, cfg_scale, use_cache=True, compile=False):
    """Seconds to generate new_tokens for `batch` copies of prompt (never stopping early)."""
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = model.generate([prompt] * batch, new_tokens, steps=steps, cfg_scale=cfg_scale, use_cache=use_cache,
                         stop_at_eot=False, compile=compile)
    sync()
    assert all(len(o) == new_tokens for o in out)
    return time.perf_counter() - t0


@torch.no_grad()
def speed(model, prompt, quick=False, compile=False):
    """Sampler tokens/s and latency per block over a grid, and (Cola) the KV-cache speedup measured
    side by side: the same sampler recomputing the whole history at every step. prompt: token ids
    (20: with block 16, one full block in the cache and the tail pinned in the first block).
    compile: the compiled step (Cola.generate, ARLM.generate); its graphs are specialised to each
    setting's shapes, so every setting first runs once untimed, compiling them."""
    cola = isinstance(model, Cola)
    bs, unit = model.block_size, "block" if cola else "token"
    grid = [(b, n, s, w) for b in (1, 8) for n in (64, 256) for s in ((8, 16) if cola else (0,))
            for w in ((7.0, 1.0) if cola else (1.0,))]
    if quick:
        grid = [(1, 32, 4, 7.0), (2, 32, 4, 1.0)]
    device = next(model.parameters()).device
    dtype = "bf16" if torch.is_autocast_enabled(device.type) else "fp32"
    print(f"sampler speed on {device}, {dtype}, {torch.get_num_threads()} threads" + (", compiled step" * compile))
    time_generate(model, prompt, 1, 16, 2, 7.0)  # warm-up
    rows = []
    for b, n, s, w in grid:
        if compile:  # this setting's graphs, compiled before the clock starts (earlier ones dropped)
            torch.compiler.reset()
            time_generate(model, prompt, b, n, s, w, compile=True)
        dt = time_generate(model, prompt, b, n, s, w, compile=compile)
        rows.append(dict(batch=b, new_tokens=n, steps=s, cfg=w, seconds=dt, tok_s=b * n / dt,
                         block_ms=1000 * dt / math.ceil((len(prompt) % bs + n) / bs)))
        print(f"  batch {b} | {n:3d} tokens | steps {s:2d} | cfg {w:g} | {rows[-1]['tok_s']:8.1f} tok/s | "
              f"{rows[-1]['block_ms']:7.1f} ms/{unit}", flush=True)
    r = dict(device=str(device), dtype=dtype, threads=torch.get_num_threads(), compile=compile, rows=rows)
    if cola:
        n = 64 if quick else 256
        cached, free = (time_generate(model, prompt, 1, n, 16, 7.0, use_cache=c) for c in (True, False))  # eager
        r.update(cache_speedup=free / cached, cache_speedup_setting=f"batch 1, {n} new tokens, 16 steps, cfg 7",
                 cached_seconds=cached, cache_free_seconds=free)
        print(f"cache_speedup {free / cached:.2f}x ({r['cache_speedup_setting']}: cache-free {free:.2f} s vs cached "
              f"{cached:.2f} s)")
    return r


def random_model(options, device):
    """A model with fresh weights, built as train.py would from its options (preset and overrides);
    the DiT's zero-initialised layers are the only thing that differs from a trained model's compute."""
    import train  # train.py's configuration system, nothing of its loop
    cfgs = train.build_configs(options)
    model = ARLM(cfgs["ar"]) if cfgs["train"].model == "ar" else Cola.build(cfgs, "joint")
    ckpt = dict(config={k: asdict(v) for k, v in cfgs.items()}, stage="random_init", step=0)
    return model.to(device).eval(), ckpt


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    ap = argparse.ArgumentParser(description="Generate text with a Cola DLM (or AR baseline) checkpoint.")
    ap.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    ap.add_argument("--prompt", default=None, help='prompt text ("" = unconditional)')
    ap.add_argument("--prompts_file", default=None, help="one prompt per line (\\n inside a prompt: write \\\\n)")
    ap.add_argument("--max_new_tokens", type=int, default=None,
                    help="default 128; any length: past the training context the oldest blocks leave the window")
    ap.add_argument("--steps", type=int, default=16, help="Euler steps per block (Cola)")
    ap.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale w, 1 = off (Cola)")
    ap.add_argument("--shift", type=float, default=1.0, help="time shift of the Euler steps, > 1: more at high noise (Cola)")
    ap.add_argument("--first_block", default="clean",
                    help="how the prompt's tail enters the first block: clean (the paper's), repaint[:R[:M]], "
                         "left_pad, right_pad (Cola; cola.parse_first_block)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding")
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num_samples", type=int, default=1, help="samples per prompt")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=DTYPES,
                    help="auto: bf16 autocast on CUDA, fp32 elsewhere; bf16 also pays off on CPUs with native bf16 "
                         "matmuls (README, 'Sampler speed')")
    ap.add_argument("--compile", action="store_true",
                    help="run each sampler step (Cola: an Euler step; AR: a token) as one compiled graph, a CUDA "
                         "graph on GPU (compiling takes seconds to a minute: worth it for long or many samples)")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    if args.cfg < 0 or args.shift <= 0:
        ap.error("--cfg must be >= 0 and --shift > 0")
    if not 0 < args.top_p <= 1:
        ap.error("--top_p must be in (0, 1]")
    if args.temperature < 0 or args.top_k < 0 or (args.max_new_tokens or 0) < 0 or args.num_samples < 1:
        ap.error("--temperature, --top_k, --max_new_tokens must be >= 0 and --num_samples >= 1")
    if args.temperature == 0 and (args.top_k or args.top_p < 1):
        ap.error("--top_k / --top_p apply to sampling: add --temperature > 0 (0 is greedy)")
    try:
        parse_first_block(args.first_block)
    except ValueError as e:
        ap.error(str(e))
    if args.prompt is None and args.prompts_file is None:
        ap.error("give --prompt or --prompts_file")
    device = pick_device(args.device)
    model, ckpt = load_model(args.ckpt, device)
    model = cast_for(model, device, args.dtype)
    if not model.can_generate:
        raise UserError(f"{args.ckpt} holds only a VAE (stage 1); sampling needs a stage-2 checkpoint")
    tok = model.tok
    texts = [args.prompt] if args.prompt is not None else []
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                texts += [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --prompts_file: {e}")
    if not texts:
        raise UserError(f"no prompts in {args.prompts_file}")
    context = ckpt["config"]["train"]["seq_len"]  # past it, a sliding window (Cola.generate, ARLM.generate)
    if args.max_new_tokens is None:
        args.max_new_tokens = 128
    if context < 2 * model.block_size:
        raise UserError(f"the model's context ({context} tokens) holds less than two blocks of {model.block_size}")
    prompts = [tok.encode(text) for text in texts for _ in range(args.num_samples)]
    torch.manual_seed(args.seed)
    stream = Streamer(tok) if len(prompts) == 1 else None
    if stream:
        print(texts[0], end="", flush=True)
    with autocast(device, args.dtype):
        outs = model.generate(prompts, args.max_new_tokens, steps=args.steps, cfg_scale=args.cfg, shift=args.shift,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              on_block=stream, first_block=args.first_block, window=context, compile=args.compile)
    if stream:
        print()
        return
    for n, (p, o) in enumerate(zip(prompts, outs)):
        print(f"--- sample {n}")
        print(tok.decode(p) + tok.decode(o))


if __name__ == "__main__":
    run_main(main)
