"""
Score an xGen-MM checkpoint on the toy world's held-out test splits: what each training stage taught, measured.

    python eval.py --checkpoint out/sft --data data/toy                     # a markdown table on stdout
    python eval.py --checkpoint out/pretrain --prompt plain --json out/pretrain/eval.json

Every answer is generated (greedy, batched, with the KV cache) from the same prompt a user would type, then
scored by the plain functions of toy/tasks.py; nothing looks at the model's logits.

- `--prompt chat` (SFT and later stages) asks in Phi-3's chat format with the default system prompt, as the
  SFT data is rendered. `--prompt plain` (a pretrained-only checkpoint, which has never seen a chat) asks as
  the interleaved pretraining documents read: `<image>Q: {question} A:`, and a caption is what follows a
  bare `<image>`.
- Few-shot: 0, 4 or 8 solved examples of the same task (image, question, answer) before the query, in the
  interleaved document format, whatever --prompt says: in-context learning is what interleaved pretraining
  is for (paper section 3).

Metrics (fractions in [0, 1], one per test split; toy/tasks.py defines each): caption_f1 and hallucination
(captions), vqa, counting, ocr, ocr_small (8-pixel text), grounding (IoU >= 0.5), multi_image, refusal_unsafe
and false_refusal (safety), fewshot_0/4/8 (K in-context examples), arithmetic (text only).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoint
import weights
from formats import image_ref
from images import Images, load_image
from model import XGenMM
from tokenizer import DEFAULT_SYSTEM
from toy import tasks

# -----------------------------------------------------------------------------
# the evaluator: batched generation, scored by toy/tasks.py


def answer_all(m, items, root, batch_size, device, progress=True):
    """Fill item.answer for every item: batches of one prompt shape (same image count and answer length)."""
    stop = m.stop_ids + [m.tokenizer.token_to_id("<|endofchunk|>")]
    groups = {}
    for it in items:
        groups.setdefault((len(it.images), it.max_new), []).append(it)
    bar = tqdm(total=len(items), desc="eval", unit="answer", disable=not progress, file=sys.stderr)
    for (_, max_new), group in sorted(groups.items()):
        encoded = sorted(((m.tokenizer.encode(it.prompt), it) for it in group), key=lambda p: len(p[0]))
        for i in range(0, len(encoded), batch_size):
            chunk = encoded[i:i + batch_size]
            images = [[load_image(image_ref(p, root, f"{it.metric} record {it.record.get('id')}")) for p in it.images]
                      for _, it in chunk]
            pixels = Images.from_pil(images, m.config).to(device) if any(images) else None
            out = m.generate([ids for ids, _ in chunk], pixels, max_new_tokens=max_new, stop_ids=stop)
            for (_, it), row in zip(chunk, out.tolist()):
                it.answer = m.tokenizer.decode(row, skip_special_tokens=True).strip()
            bar.update(len(chunk))
    bar.close()


def evaluate(m, data, splits=tasks.SPLITS, style="chat", system=DEFAULT_SYSTEM, limit=None, batch_size=64,
             device="cpu", progress=True, predictions=None):
    """metric -> value for the model on the toy world at `data` (the folder holding test/ and the images)."""
    items = [it for split in splits
             for it in tasks.items_for(split, tasks.load_split(data, split, limit), style, system)]
    answer_all(m, items, Path(data), batch_size, device, progress)
    if predictions:
        with open(predictions, "w") as f:
            for it in items:
                f.write(json.dumps({"id": it.record["id"], "metric": it.metric, "prompt": it.prompt,
                                    "answer": it.answer, "reference": it.record.get("answer")}) + "\n")
    return tasks.score(items)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                epilog="\n".join(__doc__.split("\n")[3:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="an xGen-MM checkpoint, or a run directory (its newest)")
    p.add_argument("--summarize", metavar="RUN", help="instead: collect RUN/eval/<stage>.json into RUN/results.json "
                   "and RUN/results.md (what toy/run_toy.sh prints at the end)")
    p.add_argument("--suite", default="toy", choices=["toy"], help="the benchmark suite (default: toy)")
    p.add_argument("--data", default="data/toy", help="the toy world folder (holds test/, default: data/toy)")
    p.add_argument("--splits", nargs="+", default=list(tasks.SPLITS), choices=tasks.SPLITS, help="test splits to run")
    p.add_argument("--prompt", default="chat", choices=["chat", "plain"],
                   help="chat: Phi-3 chat format (SFT and later); plain: `<image>Q: ... A:` (pretrained only)")
    p.add_argument("--limit", type=int, default=None, help="first N records of each split")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generate call")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the checkpoint's, as float32 on CPU)")
    p.add_argument("--json", help="write {metrics, checkpoint, seconds, ...} here")
    p.add_argument("--predictions", help="write every prompt, answer and reference here (JSONL)")
    p.add_argument("--name", help="row name in the table (default: the checkpoint path)")
    args = p.parse_args(argv)
    if args.summarize:
        return tasks.summarize(args.summarize)
    if not args.checkpoint:
        p.error("--checkpoint (or --summarize) is required")

    t0 = time.time()
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if args.device == "cpu" else None)
    try:
        path = checkpoint.resolve(args.checkpoint)
        m = XGenMM.from_pretrained(path, dtype=dtype, device=args.device).eval()
    except weights.CheckpointError as e:
        p.exit(2, f"eval.py: error: {e}\n")
    if m.tokenizer is None:
        p.exit(2, f"eval.py: error: {path} has no tokenizer files\n")
    try:
        metrics = evaluate(m, args.data, args.splits, args.prompt, limit=args.limit, batch_size=args.batch_size,
                           device=args.device, predictions=args.predictions)
    except (ValueError, OSError) as e:  # a test split or an image that cannot be read (BadSample names it)
        p.exit(2, f"eval.py: error: {e}\n")
    seconds = round(time.time() - t0, 1)
    print(tasks.table([(args.name or str(args.checkpoint), metrics)]))
    print(f"{seconds} s, {args.prompt} prompts, {path}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"metrics": metrics, "checkpoint": str(path), "prompt": args.prompt,
                                               "seconds": seconds, "limit": args.limit}, indent=1) + "\n")
    return metrics


if __name__ == "__main__":
    main()
