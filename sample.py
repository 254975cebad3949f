"""
Generate text from a checkpoint of train.py: Cola DLM, or the AR baseline (--model=ar).

    python sample.py --ckpt=out/ckpt.pt --prompt="It is a truth universally acknowledged"
    python sample.py --ckpt=out/ckpt.pt --prompt="" --num_samples=4 --temperature=0.8
    python sample.py --ckpt=out/ckpt.pt --prompts_file=prompts.txt --steps=8 --cfg=5
    python sample.py --ckpt=cola_dlm/ --prompt="Question: ..."   # the released checkpoint (released.py)

A thin command line over the model's own generate(): cola.Cola.generate samples block after block
(guided Euler steps, the prompt's tail pinned: arXiv 2605.06548 §3.2.3; --steps, --cfg), ar.ARLM.generate
token by token. One prompt streams its text as blocks are decoded. CPU, CUDA or MPS (--device), fp32 or
bf16 (--dtype), each step eager or one compiled graph (--compile). `eval.py speed` times the sampler.
"""
import argparse
from dataclasses import asdict

from common import DTYPES, ArgumentParser, UserError, autocast, cast_for, pick_device, run_main
from config import load_model
from layers import Sampling


class Streamer:
    """Prints one sample's text as its blocks are decoded (holding back a cut multi-byte character)."""

    def __init__(self, tok):
        self.tok, self.shown = tok, ""

    def __call__(self, i, ids):
        text = self.tok.decode(ids).rstrip("\ufffd")
        print(text[len(self.shown):], end="", flush=True)
        self.shown = text


def main(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="checkpoint written by train.py, or the released checkpoint's directory")
    ap.add_argument("--prompt", default=None, help='prompt text ("" = unconditional)')
    ap.add_argument("--prompts_file", default=None, help="one prompt per line (\\n inside a prompt: write \\\\n)")
    ap.add_argument("--max_new_tokens", type=int, default=128,
                    help="default 128; past the training context the oldest blocks leave the window")
    ap.add_argument("--steps", type=int, default=16, help="Euler steps per block (Cola)")
    ap.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale w, 1 = off (Cola)")
    ap.add_argument("--first_block", default="clean", help="how the prompt's tail enters the first block (Cola): "
                                                           "clean (the paper's), repaint[:R[:M]], left_pad, right_pad")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding")
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--repetition_penalty", type=float, default=1.1, help="> 1 shrinks the logits of ids already "
                                                                          "generated (the released sampler's 1.1); 1 = off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num_samples", type=int, default=1, help="samples per prompt")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bf16 on CUDA, fp32 elsewhere")
    ap.add_argument("--compile", action="store_true", help="each sampler step (Cola: an Euler step; AR: a token) "
                                                           "as one compiled graph (compiling takes seconds to a minute)")
    args = ap.parse_args(argv)
    if args.num_samples < 1 or args.max_new_tokens < 0:
        ap.error("--num_samples must be >= 1 and --max_new_tokens >= 0")
    try:
        sampler = Sampling(steps=args.steps, cfg_scale=args.cfg, first_block=args.first_block, seed=args.seed,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           repetition_penalty=args.repetition_penalty).check()
    except ValueError as e:
        ap.error(str(e))
    if args.prompt is None and args.prompts_file is None:
        ap.error("give --prompt or --prompts_file")
    device = pick_device(args.device)
    model, ckpt = load_model(args.ckpt, device)
    if not model.can_generate:
        raise UserError(f"{args.ckpt} holds only a VAE (stage 1); sampling needs a stage-2 checkpoint")
    model, tok = cast_for(model, device, args.dtype), model.tok
    context = ckpt["config"]["train"]["seq_len"]  # past it, a sliding window (Cola.generate, ARLM.generate)
    if context < 2 * model.block_size:
        raise UserError(f"the model's context ({context} tokens) holds less than two blocks of {model.block_size}")
    texts = [args.prompt] if args.prompt is not None else []
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                texts += [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --prompts_file: {e}")
    if not texts:
        raise UserError(f"no prompts in {args.prompts_file}")
    prompts = [tok.encode(text) for text in texts for _ in range(args.num_samples)]
    stream = Streamer(tok) if len(prompts) == 1 else None
    if stream:
        print(texts[0], end="", flush=True)
    with autocast(device, args.dtype):
        outs = model.generate(prompts, args.max_new_tokens, window=context, on_block=stream, compile=args.compile,
                              **asdict(sampler))
    if stream:
        print()
        return
    for n, (p, o) in enumerate(zip(prompts, outs)):
        print(f"--- sample {n}")
        print(tok.decode(p) + tok.decode(o))


if __name__ == "__main__":
    run_main(main)
