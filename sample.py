"""
Generate text with a trained Cola DLM checkpoint (SPEC §1 Inference).

    python sample.py --ckpt=out/ckpt.pt --prompt="It is a truth universally acknowledged"
    python sample.py --ckpt=out/ckpt.pt --prompt="" --num_samples=4 --temperature=0.8
    python sample.py --ckpt=out/ckpt.pt --prompts_file=prompts.txt --steps=8 --cfg=5

Per prompt: encode it (posterior mean); the full prompt blocks prefill the DiT and decoder KV
caches; then, block after block: Gaussian noise -> `steps` Euler steps with classifier-free
guidance (flow.sample_block), the prompt's tail inside the first block pinned clean (repaint) ->
decode the block's tokens with the cached causal decoder -> commit the block's latents to the DiT
cache with t = 0. Stops at <|endoftext|> or max_new_tokens. Runs on CPU, CUDA or MPS (--device). An AR baseline
checkpoint (train.py --model=ar) samples token by token with a KV cache; --steps / --cfg do not apply.
"""
import argparse
import zlib

import torch

from common import UserError, load_models, pick_device, run_main
from data.tokenizer import get_tokenizer
from dit import block_mask
from flow import sample_block
from layers import PAD_POS, cat_kv


def sample_seed(seed, prompt_ids, k):
    """Noise seed of one sample: depends on the prompt and its repeat index, not on the batch."""
    return (seed * 1_000_003 + zlib.crc32(bytes(str(list(prompt_ids)), "ascii")) * 101 + k) % (1 << 62)


def generators(prompts, seed, device):
    """One RNG per sample, so a prompt's output does not depend on what else is in the batch;
    repeats of one prompt get consecutive sub-seeds."""
    counts, gens = {}, []
    for p in prompts:
        k = counts[tuple(p)] = counts.get(tuple(p), -1) + 1
        gens.append(torch.Generator(device).manual_seed(sample_seed(seed, p, k)))
    return gens


def pick_tokens(logits, temperature, top_k, top_p, generators, tok=None):
    """logits (B, L, V) -> token ids (B, L): greedy at temperature 0, else top-k / top-p sampling.
    With tok, only real tokens and <|endoftext|> can be picked (not <|mask|>, <|pad|>, padding ids)."""
    if tok is not None:
        banned = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        banned[tok.eot + 1:] = True  # the specials after eot and the vocabulary padding
        logits = logits.masked_fill(banned, float("-inf"))
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set with mass >= top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.stack([torch.multinomial(p, 1, generator=g).squeeze(-1) for p, g in zip(probs, generators)])


@torch.no_grad()
def generate(vae, dit, prompts, max_new_tokens=64, steps=16, cfg_scale=7.0, temperature=0.0, top_k=0, top_p=1.0,
             seed=0, use_cache=True, on_block=None, trace=None, stop_at_eot=True):
    """Generate continuations for a batch of token-id prompts (lists of ints, any lengths).

    Returns one list of new token ids per prompt (ending before <|endoftext|> if one was produced).
    on_block(i, ids) is called after every block with each sample's new ids so far (for streaming).
    use_cache=False recomputes the whole history at every step (the reference the caches must match).
    trace, if a list, receives (latents, logits) of every block. stop_at_eot=False (benchmarks)
    keeps going to max_new_tokens.
    """
    tok = get_tokenizer(vae.cfg.tokenizer)
    dev = next(vae.parameters()).device
    bs, B = dit.cfg.block_size, len(prompts)
    gens = generators(prompts, seed, dev)
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    n_full = lens // bs  # complete prompt blocks: history
    H = int(n_full.max()) * bs if B else 0
    # prompt latents (encoder mean), right-padded; the causal encoder ignores what comes after
    width = max(1, int(lens.max()))
    x = torch.full((B, width), tok.pad, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        x[i, :len(p)] = torch.tensor(p, dtype=torch.long, device=dev)
    mu, _ = vae.encode(x)  # (B, width, d)
    # history, left-padded to H positions: sample i's full blocks sit at the end, padding at PAD_POS
    hist_pos = torch.full((B, H), PAD_POS, dtype=torch.long, device=dev)
    hist_z = torch.zeros(B, H, mu.shape[-1], device=dev)
    for i in range(B):
        n = int(n_full[i]) * bs
        hist_pos[i, H - n:] = torch.arange(n, device=dev)
        hist_z[i, H - n:] = mu[i, :n]
    dit_cache = dec_cache = None
    if use_cache and H > 0:  # prefill
        clean = torch.zeros(B, H, dtype=torch.bool, device=dev)
        _, dit_cache = dit(hist_z, torch.zeros(B, H, device=dev), hist_pos,
                           block_mask(hist_pos // bs, clean, hist_pos // bs, clean))
        _, dec_cache = vae.decode(hist_z, hist_pos)
    # the first block holds each prompt's tail: those latents are pinned (clean-condition repaint)
    start = n_full * bs  # (B,) first position of the current block
    offs = torch.arange(bs, device=dev)
    keep = offs[None, :] < (lens - start)[:, None]  # (B, bs)
    tail = torch.zeros(B, bs, mu.shape[-1], device=dev)
    for i in range(B):
        n = int(lens[i] - start[i])
        tail[i, :n] = mu[i, int(start[i]):int(lens[i])]
    out = [[] for _ in range(B)]
    done = [max_new_tokens <= 0] * B
    while not all(done):
        pos = start[:, None] + offs  # (B, bs)
        noise = torch.stack([torch.randn(bs, mu.shape[-1], generator=g, device=dev) for g in gens])
        noise = torch.where(keep[..., None], tail, noise)
        if use_cache:
            z = sample_block(dit, noise, pos, keep, past=dit_cache, past_pos=hist_pos, steps=steps, cfg_scale=cfg_scale)
            logits, dec_kv = vae.decode(z, pos, dec_cache, hist_pos)
        else:
            z = sample_block(dit, noise, pos, keep, past_z=hist_z, past_pos=hist_pos, steps=steps, cfg_scale=cfg_scale)
            logits = vae.decode(torch.cat([hist_z, z], 1), torch.cat([hist_pos, pos], 1))[0][:, -bs:]
        if trace is not None:
            trace.append((z.clone(), logits.clone()))
        ids = pick_tokens(logits, temperature, top_k, top_p, gens, tok)  # (B, bs)
        for i in range(B):
            if done[i]:
                continue
            for j in range(bs):
                if keep[i, j]:
                    continue  # a prompt position: the prompt's own token stands
                t = int(ids[i, j])
                if (t == tok.eot and stop_at_eot) or len(out[i]) >= max_new_tokens:
                    done[i] = True
                    break
                out[i].append(t)
            done[i] = done[i] or len(out[i]) >= max_new_tokens
        if on_block is not None:
            for i in range(B):
                on_block(i, out[i])
        if all(done):
            break
        # commit: the finished block joins the history as clean latents (t = 0)
        if use_cache:
            clean = torch.zeros(B, bs, dtype=torch.bool, device=dev)
            k_pos = torch.cat([hist_pos, pos], 1)
            _, kv = dit(z, torch.zeros(B, bs, device=dev), pos,
                        block_mask(pos // bs, clean, k_pos // bs, torch.zeros_like(k_pos, dtype=torch.bool)), dit_cache)
            dit_cache, dec_cache = cat_kv(dit_cache, kv), cat_kv(dec_cache, dec_kv)
        else:  # the cache-free reference keeps the latents themselves
            hist_z = torch.cat([hist_z, z], 1)
        hist_pos = torch.cat([hist_pos, pos], 1)
        start = start + bs
        keep = torch.zeros_like(keep)
    return out


def generate_any(models, prompts, max_new_tokens=64, steps=16, cfg_scale=7.0, temperature=0.0, top_k=0,
                 top_p=1.0, seed=0, on_block=None, stop_at_eot=True, use_cache=True):
    """generate() for a Cola checkpoint's models, or KV-cached sampling for the AR baseline (ar.py)."""
    if "ar" not in models:
        return generate(models["vae"], models["dit"], prompts, max_new_tokens, steps, cfg_scale, temperature, top_k,
                        top_p, seed, use_cache=use_cache, on_block=on_block, stop_at_eot=stop_at_eot)
    dev = next(models["ar"].parameters()).device
    gens, tok = generators(prompts, seed, dev), get_tokenizer(models["ar"].cfg.tokenizer)
    out = models["ar"].generate(prompts, max_new_tokens, lambda lg: pick_tokens(lg, temperature, top_k, top_p, gens, tok),
                                stop_at_eot=stop_at_eot)
    if on_block is not None:
        for i, o in enumerate(out):
            on_block(i, o)
    return out


class Streamer:
    """Prints one sample's text as its blocks are decoded (holding back a cut multi-byte character)."""

    def __init__(self, tok):
        self.tok, self.shown = tok, ""

    def __call__(self, i, ids):
        text = self.tok.decode(ids).rstrip("\ufffd")
        print(text[len(self.shown):], end="", flush=True)
        self.shown = text


def main(argv=None):
    ap = argparse.ArgumentParser(description="Generate text with a Cola DLM checkpoint.")
    ap.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    ap.add_argument("--prompt", default=None, help='prompt text ("" = unconditional)')
    ap.add_argument("--prompts_file", default=None, help="one prompt per line (\\n inside a prompt: write \\\\n)")
    ap.add_argument("--max_new_tokens", type=int, default=None,
                    help="default: 128, or what fits in the model's context after the longest prompt")
    ap.add_argument("--steps", type=int, default=16, help="Euler steps per block")
    ap.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale w (1 = off)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding")
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num_samples", type=int, default=1, help="samples per prompt")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    if args.cfg < 0:
        ap.error("--cfg must be >= 0")
    if not 0 < args.top_p <= 1:
        ap.error("--top_p must be in (0, 1]")
    if args.temperature < 0 or args.top_k < 0 or (args.max_new_tokens or 0) < 0 or args.num_samples < 1:
        ap.error("--temperature, --top_k, --max_new_tokens must be >= 0 and --num_samples >= 1")
    if args.temperature == 0 and (args.top_k or args.top_p < 1):
        ap.error("--top_k / --top_p apply to sampling: add --temperature > 0 (0 is greedy)")
    if args.prompt is None and args.prompts_file is None:
        ap.error("give --prompt or --prompts_file")
    device = pick_device(args.device)
    models, ckpt = load_models(args.ckpt, device)
    if "ar" not in models and models["dit"] is None:
        raise UserError(f"{args.ckpt} holds only a VAE (stage 1); sampling needs a stage-2 checkpoint")
    tok = get_tokenizer(next(m for m in models.values() if m is not None).cfg.tokenizer)
    texts = [args.prompt] if args.prompt is not None else []
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                texts += [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --prompts_file: {e}")
    if not texts:
        raise UserError(f"no prompts in {args.prompts_file}")
    context = ckpt["config"]["train"]["seq_len"]
    if args.max_new_tokens is None:
        args.max_new_tokens = max(0, min(128, context - max(len(tok.encode(t)) for t in texts)))
    prompts = []
    for text in texts:
        ids = tok.encode(text)
        if len(ids) + args.max_new_tokens > context:
            raise UserError(f"prompt of {len(ids)} tokens + max_new_tokens {args.max_new_tokens} exceeds the model's "
                            f"context of {context} tokens (its training seq_len); shorten one of them")
        prompts += [ids] * args.num_samples
    torch.manual_seed(args.seed)
    stream = Streamer(tok) if len(prompts) == 1 else None
    if stream:
        print(texts[0], end="", flush=True)
    outs = generate_any(models, prompts, args.max_new_tokens, args.steps, args.cfg, args.temperature, args.top_k,
                        args.top_p, args.seed, on_block=stream)
    if stream:
        print()
        return
    for n, (p, o) in enumerate(zip(prompts, outs)):
        print(f"--- sample {n}")
        print(tok.decode(p) + tok.decode(o))


if __name__ == "__main__":
    run_main(main)
