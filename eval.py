"""
Score an xGen-MM checkpoint: on the toy world's held-out test splits (what each training stage taught,
measured), or on the paper's public benchmarks in their official files (docs/evaluation.md).

    python eval.py --checkpoint out/sft --data data/toy                     # the toy suite: a markdown table
    python eval.py --checkpoint out/pretrain --prompt plain --json out/pretrain/eval.json
    python eval.py --summarize out/toy                                      # toy/run_toy.sh's stages x metrics
    python eval.py run --checkpoint CKPT --task vqav2 --data QUESTIONS.json ANNOTATIONS.json --images val2014
    python eval.py score --task vqa --predictions answers.json --references ANNOTATIONS.json

`run` and `score` take --help of their own; evals/ holds the readers of the official files, the official
metrics and the paper's prompts. The benchmarks (`run --task`): coco, nocaps, textcaps (CIDEr-D, BLEU-4);
vqav2, okvqa, textvqa, vizwiz (VQA accuracy); pope (accuracy, precision, recall, F1, yes ratio); mmbench,
seed, scienceqa, ai2d (multiple choice, circular for MMBench). The toy suite is below:

Every answer is generated (greedy, batched, with the KV cache) from the same prompt a user would type, then
scored by the plain functions of toy/tasks.py; nothing looks at the model's logits.

- `--prompt chat` (SFT and later stages) asks in Phi-3's chat format with the default system prompt, as the
  SFT data is rendered. `--prompt plain` (a pretrained-only checkpoint, which has never seen a chat) asks as
  the interleaved pretraining documents read: `<image>Q: {question} A:`, and a caption is what follows a
  bare `<image>`.
- Few-shot: 0, 4 or 8 solved examples of the same task (image, question, answer) before the query, in the
  interleaved document format, whatever --prompt says: in-context learning is what interleaved pretraining
  is for (paper section 3).

Metrics (fractions in [0, 1], one per test split; toy/tasks.py defines each): caption_f1 and
caption_hallucination (captions), vqa, counting, ocr, ocr_small (small text), grounding (IoU >= 0.5),
multi_image, pope and hallucination (absent shapes affirmed), refusal_unsafe and false_refusal (safety),
fewshot_0/4/8 (K in-context examples), arithmetic (text only). --json also writes each figure's 95% interval
and its number of items.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import weights
from errors import fail
from evals import cli
from evals.run import answer, load_model
from formats import image_ref
from images import load_image
from tokenizer import DEFAULT_SYSTEM
from toy import tasks

# -----------------------------------------------------------------------------
# the toy suite: batched generation (evals/run.py), scored by toy/tasks.py


def evaluate(m, data, splits=tasks.SPLITS, style="chat", system=DEFAULT_SYSTEM, limit=None, batch_size=64,
             device="cpu", progress=True, predictions=None):
    """metric -> value for the model on the toy world at `data` (the folder holding test/ and the images)."""
    return tasks.score(answered(m, data, splits, style, system, limit, batch_size, device, progress, predictions))


def answered(m, data, splits=tasks.SPLITS, style="chat", system=DEFAULT_SYSTEM, limit=None, batch_size=64,
             device="cpu", progress=True, predictions=None):
    """The toy suite's items, answered (and written to `predictions` as JSONL)."""
    items = [it for split in splits
             for it in tasks.items_for(split, tasks.load_split(data, split, limit), style, system)]
    answer(m, items, batch_size, device, progress=progress,  # the test records' image paths stay inside `data`
           open_image=lambda p: load_image(image_ref(p, data, "test image")))
    if predictions:
        with open(predictions, "w") as f:
            for it in items:
                f.write(json.dumps({"id": it.record["id"], "metric": it.metric, "prompt": it.prompt,
                                    "images": it.images, "answer": it.answer, "reference": it.record.get("answer"),
                                    "right": tasks.judge(it)}) + "\n")
    return items


def main(argv=None):
    """The toy suite; `run` and `score` as a first argument are the benchmark commands (evals/cli.py)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["score"]:
        return cli.score_main(argv[1:])
    if argv[:1] == ["run"]:
        return cli.run_main(argv[1:], toy=toy_main)
    return toy_main(argv)


def toy_main(argv):
    p = argparse.ArgumentParser(usage="%(prog)s [-h] --checkpoint CKPT [--data WORLD] [options]\n"
                                "       %(prog)s run --checkpoint CKPT --task TASK --data PATH [...]   (--help)\n"
                                "       %(prog)s score --task KIND --predictions P --references R   (--help)",
                                description=__doc__.split("\n\n")[0].strip(),
                                epilog="\n".join(__doc__.split("\n")[3:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="an xGen-MM checkpoint, or a run directory (its newest)")
    p.add_argument("--summarize", metavar="RUN", help="instead: collect RUN/eval/<stage>.json into RUN/results.json "
                   "and RUN/results.md (what toy/run_toy.sh prints at the end)")
    p.add_argument("--suite", default="toy", choices=["toy"], help="the toy suite (the public benchmarks: `eval.py run`)")
    p.add_argument("--data", default="data/toy", help="the toy world folder (holds test/, default: data/toy)")
    p.add_argument("--splits", nargs="+", default=list(tasks.SPLITS), choices=tasks.SPLITS, help="test splits to run")
    p.add_argument("--prompt", default="chat", choices=["chat", "plain"],
                   help="chat: Phi-3 chat format (SFT and later); plain: `<image>Q: ... A:` (pretrained only)")
    p.add_argument("--limit", type=int, default=None, help="first N records of each split (0: all)")
    p.add_argument("--system", default=DEFAULT_SYSTEM, metavar="TEXT",
                   help="chat prompts' system prompt, as the model was trained (default: the release's; \"\" for none)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generate call")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weight dtype (default: float32 on a CPU, bfloat16 on a GPU, whatever the checkpoint holds)")
    p.add_argument("--json", help="write {metrics, checkpoint, seconds, ...} here")
    p.add_argument("--predictions", help="write every prompt, answer and reference here (JSONL)")
    p.add_argument("--name", help="row name in the table (default: the checkpoint path)")
    args = p.parse_args(argv)
    if args.summarize:
        return tasks.summarize(args.summarize)
    if not args.checkpoint:
        p.error("--checkpoint (or --summarize) is required")

    t0 = time.time()
    try:
        m, path = load_model(args.checkpoint, args.device, args.dtype)
    except weights.CheckpointError as e:
        fail("eval.py", e)
    try:
        items = answered(m, args.data, args.splits, args.prompt, args.system, args.limit, args.batch_size,
                         args.device, predictions=args.predictions)
        metrics = tasks.score(items)
    except (ValueError, OSError) as e:  # a test split or an image that cannot be read (BadSample names it)
        fail("eval.py", e)
    seconds = round(time.time() - t0, 1)
    print(tasks.table([(args.name or str(args.checkpoint), metrics)]))
    print(f"{seconds} s, {args.prompt} prompts, {path}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"metrics": metrics, "intervals": tasks.intervals(items),
                                               "checkpoint": str(path), "prompt": args.prompt,
                                               "seconds": seconds, "limit": args.limit}, indent=1) + "\n")
    return metrics


if __name__ == "__main__":
    main()
