r"""
Ask an xGen-MM checkpoint about images from the command line: one question, or a multi-turn chat.

    python sample.py --checkpoint Salesforce/xgen-mm-phi3-mini-instruct-r-v1.5 --image cat.jpg \
        --prompt "What is in this picture?"
    python sample.py --checkpoint path/to/xgenmm --image a.jpg --image b.jpg \
        --prompt "What does <image> have that <image> lacks?"
    python sample.py --checkpoint path/to/xgenmm --image cat.jpg       # chat: /image PATH, /reset, /quit
    python sample.py --checkpoint path/to/xgenmm --image cat.jpg --prompt "Describe it." \
        --device cuda --dtype bfloat16 --compile

- stdout carries the answer only, streamed as it is generated and ended by a newline; the load time and
  the speed go to stderr, so `answer=$(python sample.py ...)` captures just the text.
- Each image goes where the prompt has an `<image>` marker; a prompt without markers gets one
  "<image>\n" per image in front of it (as in the release's examples).
- The prompt is wrapped in Phi-3's chat template with the release's system prompt (`--system` replaces
  it, `--system ""` drops it); `--raw` sends the text exactly as written instead.
- Chat mode (no `--prompt`) keeps the conversation and its images, and re-runs all of it each turn:
  simple and exact, at the cost of a fresh prefill (and vision encoding) per turn.
- Bad input (an unreadable image, a marker count that does not match the images, a prompt that does not
  fit the context, an unknown checkpoint) is one line on stderr and exit status 2.
"""
import argparse
import sys
import time

import torch

import checkpoint
import weights
from errors import fail
from generate import decode_layout
from images import load_image
from model import XGenMM
from tokenizer import DEFAULT_SYSTEM, chat_prompt, place_images

# -----------------------------------------------------------------------------
# command line


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="an xGen-MM directory (config.json, *.safetensors, tokenizer files), a training run's "
                        "directory (its newest checkpoint), or a Hub id such as "
                        "Salesforce/xgen-mm-phi3-mini-instruct-r-v1.5 already in the local HF cache")
    g.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image file; repeat for several, in the order of the prompt's <image> markers")
    g.add_argument("--prompt", default=None, metavar="TEXT",
                   help="the question; without it, an interactive chat on stdin starts")
    g.add_argument("--system", default=None, metavar="TEXT",
                   help='the system prompt (default: the release\'s helpful-assistant one; "" for none)')
    g.add_argument("--raw", action=argparse.BooleanOptionalAction, default=False,
                   help="encode --prompt as written, without the chat template (the image markers still apply)")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="most tokens to generate per answer (default: 256)")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0 = greedy, the likeliest token each step (default); higher = more random")
    g.add_argument("--top-k", type=int, default=None, metavar="K", help="sample only from the k likeliest tokens")
    g.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="sample only from the likeliest tokens that together hold probability P")
    g.add_argument("--seed", type=int, default=None, metavar="N",
                   help="seed the sampler, so a sampled answer repeats (default: a different one each run)")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weight dtype (default: float32 on cpu, bfloat16 on cuda)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="run the decode step through torch.compile (pays off on long answers, mostly on GPU)")
    return p


def check_args(args):
    if args.raw and args.prompt is None:
        fail("sample.py", "--raw needs --prompt (the chat mode always uses the chat template)")
    if args.max_new_tokens < 1:
        fail("sample.py", f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0 or (args.top_p is not None and not 0 < args.top_p <= 1) or (args.top_k or 1) < 1:
        fail("sample.py", "--temperature must be >= 0, --top-p in (0, 1], --top-k >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail("sample.py", f"--device {args.device}: CUDA is not available here")

# -----------------------------------------------------------------------------
# model and prompts


def load(args):
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    t0 = time.perf_counter()
    try:
        model = XGenMM.from_pretrained(checkpoint.resolve(args.checkpoint), dtype=dtype, device=args.device)
    except weights.CheckpointError as e:  # no such path or cached Hub id, not a checkpoint, not xGen-MM
        fail("sample.py", str(e))
    except (ValueError, OSError) as e:  # e.g. a config.json that is not JSON
        fail("sample.py", f"{args.checkpoint}: cannot load the checkpoint ({type(e).__name__}: {e})")
    if model.tokenizer is None:
        fail("sample.py", f"{args.checkpoint}: no tokenizer files (tokenizer.model, tokenizer_config.json) to "
             "encode the prompt")
    if args.device == "cpu" and dtype == "float32":
        # Column-major weights: faster batch-1 matrix-vector products on CPU, in fp32 only. In bf16 or fp16
        # the CPU kernels take a slow path for transposed weights (about 36x slower per decode step).
        decode_layout(model.lang_model)
    print(f"loaded {args.checkpoint} ({dtype}, {args.device}) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return model


# -----------------------------------------------------------------------------
# generation, streamed


class Stream:
    """generate's callback: prints the reply as it grows, up to (not including) the first stop token.

    It decodes the whole reply so far and prints what is new, so SentencePiece spaces come out right. It
    waits while the reply ends in byte tokens: they decode as one UTF-8 run, which may still miss bytes of
    a character or turn out invalid (then every byte of the run is U+FFFD); added tokens (skipped when
    special) may sit inside such a run. The text up to a plain SentencePiece piece is final.
    """

    def __init__(self, tokenizer, stop_ids):
        self.tok, self.stop = tokenizer, set(stop_ids)
        self.ids, self.shown, self.stopped = [], "", False
        self.times = [time.perf_counter()]  # start, then one per step

    def __call__(self, step):  # step: this step's tokens, (1,)
        self.times.append(time.perf_counter())
        token = int(step[0])
        self.stopped = self.stopped or token in self.stop
        if self.stopped:
            return
        self.ids.append(token)
        if token not in self.tok.added and not self.tok.is_byte(token):
            self.show()

    def show(self, end=""):
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        sys.stdout.write(text[len(self.shown):] + end)
        sys.stdout.flush()
        self.shown = text
        return text

    def speed(self, warmup=0):  # the first token waits for the prefill; the rest are the decode speed
        t, n = self.times, len(self.times) - 1
        a = 1 + warmup if n > 2 + warmup else 1  # a compiled step compiles, then records, in its first calls
        rate = f", then {(n - a) / (t[-1] - t[a]):.1f} tok/s" if n > a and t[-1] > t[a] else ""
        return f"[{n} tokens; first after {t[1] - t[0]:.2f}s{rate}]" if n else "[no tokens]"


def answer(model, text, images, args, generator):
    """Generate and stream the reply to the full prompt `text` with its images; returns the reply."""
    stream = Stream(model.tokenizer, model.stop_ids)
    model.generate([model.tokenizer.encode(text)], [images] if images else None, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator,
                   callback=stream, compile=args.compile)
    reply = stream.show(end="\n")
    print(stream.speed(warmup=2 if args.compile else 0), file=sys.stderr)
    return reply


def one_shot(model, args, images, generator):
    try:
        text = place_images(args.prompt, len(images))
        answer(model, text if args.raw else chat_prompt([text], args.system), images, args, generator)
    except ValueError as e:  # marker count, prompt too long for the context
        fail("sample.py", str(e))


def chat(model, args, images, generator):
    """Multi-turn chat on stdin: the --image images go with the first user turn."""
    print("chat: type a message; /image PATH attaches an image to your next message, /reset starts over "
          "(with the --image images again), /quit or EOF leaves", file=sys.stderr)
    turns, seen, pending = [], [], list(images)  # seen: the images of the turns so far, in order
    while (line := read_line()) is not None:
        command, _, rest = line.strip().partition(" ")
        if command == "/quit":
            break
        if command == "/reset":
            turns, seen, pending = [], [], list(images)
            print("(conversation cleared)", file=sys.stderr)
            continue
        if command == "/image":
            try:
                pending.append(load_image(rest.strip()))
                print(f"({len(pending)} image(s) attached to your next message)", file=sys.stderr)
            except ValueError as e:
                print(f"sample.py: {e}", file=sys.stderr)
            continue
        if not line.strip():
            continue
        try:
            user = place_images(line, len(pending))
            reply = answer(model, chat_prompt(turns + [user], args.system), seen + pending, args, generator)
        except ValueError as e:  # the turn is dropped; its images stay attached for the next try
            print(f"sample.py: {e}" + ("; /reset starts over" if "positions" in str(e) else ""), file=sys.stderr)
            continue
        turns, seen, pending = turns + [user, reply], seen + pending, []


def read_line():
    """The next line of input, or None at EOF; a prompt sign only when a person is typing."""
    try:
        return input("> " if sys.stdin.isatty() else "")
    except EOFError:
        return None


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.system is None:
        args.system = DEFAULT_SYSTEM
    check_args(args)
    try:
        images = [load_image(p) for p in args.image]
    except ValueError as e:  # names the file: missing or not an image
        fail("sample.py", str(e))
    model = load(args)
    generator = None if args.seed is None else torch.Generator(args.device).manual_seed(args.seed)
    if args.prompt is not None:
        one_shot(model, args, images, generator)
    else:
        chat(model, args, images, generator)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C ends a run or a chat without a traceback
        raise SystemExit(130)
