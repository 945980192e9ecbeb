"""
eval.py's two benchmark commands: `score` (a prediction file against the official references, no model) and
`run` (a checkpoint on a benchmark's files). eval.py dispatches here; docs/evaluation.md is the user's guide.

    python eval.py score --task vqa --predictions answers.json --references v2_mscoco_val2014_annotations.json
    python eval.py run --checkpoint CKPT --task coco --data dataset_coco.json --images coco2014 --prompt plain --shots 4

Bad input (a missing image, a question without annotations, a malformed row, predictions that miss some
questions) ends with one line `eval.py: error: FILE: RECORD: what is wrong` and exit status 2, as sample.py's
errors do; --help texts name the official files each flag takes.
"""
import argparse
import json
import time
from pathlib import Path

import weights
from errors import BadSample, fail
from evals import metrics, readers
from evals.run import TASKS, average, load_model, run_benchmark, table
from evals.vqa import RULES

KIND_CHOICES = ("vqa", "caption", "pope", "choice")


def dump(path, obj):
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=1) + "\n")

# -----------------------------------------------------------------------------
# score


def score_parser():
    p = argparse.ArgumentParser(prog="eval.py score", description="Score predictions against a benchmark's "
                                "official references with its official metric; prints the metrics as JSON.")
    p.add_argument("--task", required=True, choices=KIND_CHOICES, help="vqa: VQA accuracy (VQAv2, OK-VQA, TextVQA, "
                   "VizWiz); caption: CIDEr-D and BLEU-4 (COCO Karpathy, NoCaps, TextCaps); pope: accuracy, "
                   "precision, recall, F1, yes ratio; choice: option-letter accuracy (+ circular, MMBench)")
    p.add_argument("--predictions", required=True, metavar="P", help="JSON list or JSON lines: [{question_id, "
                   "answer}], [{image_id, caption}], [{index or question_id, answer}], VizWiz's [{image, answer}], "
                   "or what `eval.py run` wrote")
    p.add_argument("--references", required=True, nargs="+", metavar="R", help="the official annotation file(s): "
                   "VQAv2/OK-VQA annotations, TextVQA or VizWiz JSON, Karpathy/COCO/TextCaps captions, a POPE "
                   "question file, an MMBench-layout TSV, SEED-Bench or ScienceQA JSON, the AI2D folder")
    p.add_argument("--metric", choices=RULES, help="VQA accuracy rule (evals/vqa.py); default: the benchmark's own "
                   "evaluator: okvqa for OK-VQA, openflamingo for VQAv2 (the paper's few-shot protocol; vqa-api: the "
                   "VQA server's), textvqa for TextVQA, vizwiz for VizWiz")
    p.add_argument("--split", default="test", help="Karpathy / ScienceQA split of the references (default: test)")
    p.add_argument("--partial", action="store_true", help="score only the questions that have a prediction "
                   "(default: an error); the count left out is reported")
    p.add_argument("--json", help="also write the metrics here")
    return p


def score_main(argv):
    args = score_parser().parse_args(argv)
    try:
        fmt, records = readers.load(args.references, split=args.split)
        if readers.KINDS[fmt] != args.task:
            fail("eval.py", f"{args.references[0]}: a {fmt} file holds {readers.KINDS[fmt]} references, not {args.task}")
        if not readers.has_answers(args.task, records):
            fail("eval.py", f"{args.references[0]}: the references hold no answers to score against (a test split?)")
        answers = readers.read_predictions(args.predictions)
        if args.task == "choice":
            records = readers.with_rotations(records, answers)
        records, answers, missing = readers.match(records, answers, args.predictions, args.partial)
        results = {**metrics.score(args.task, records, answers, args.metric), "missing": missing, "format": fmt}
    except (BadSample, OSError) as e:
        fail("eval.py", e)
    print(json.dumps(results, indent=1))
    dump(args.json, results)
    return results

# -----------------------------------------------------------------------------
# run


def run_parser():
    p = argparse.ArgumentParser(prog="eval.py run", description="Run a checkpoint on a benchmark in its official "
                                "files: batched greedy answers written as they come (a rerun resumes), then the "
                                "official metric as a markdown row and JSON.")
    p.add_argument("--checkpoint", required=True, help="an xGen-MM checkpoint, a run directory, or a cached Hub id")
    p.add_argument("--task", required=True, choices=list(TASKS) + ["toy"], help="the benchmark (docs/evaluation.md "
                   "lists the files each reads); toy: the toy world's suite, as `eval.py --data`")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, nargs="+", metavar="PATH", help="the benchmark's official files "
                   "(VQAv2/OK-VQA: questions and annotations; without annotations: predictions only)")
    g.add_argument("--images", help="the image folder (default: the first data file's folder)")
    g.add_argument("--limit", type=int, help="the first N records only")
    g.add_argument("--circular", action="store_true", help="multiple choice: ask every rotation of the options "
                   "(MMBench's circular evaluation) when the file does not hold them already")
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", default="chat", choices=["chat", "plain"], help="chat: Phi-3's chat template "
                   "(instruction-tuned checkpoints); plain: the paper's interleaved few-shot documents (pretrained)")
    g.add_argument("--shots", type=int, default=0, help="demonstrations per question (the paper: 0, 4, 8); a plain "
                   "0-shot prompt still shows 2 text-only ones when a training split is given")
    g.add_argument("--demos", nargs="+", metavar="PATH", help="the training split's files, demonstrations are "
                   "drawn from (Karpathy and ScienceQA: the same file's train split by default)")
    g.add_argument("--demo-images", help="their image folder (default: the first demo file's folder)")
    g.add_argument("--seed", type=int, default=42, help="seeds the query set and each question's draw")
    g.add_argument("--query-set-size", type=int, default=2048, help="training records demonstrations come from")
    g.add_argument("--rices", action="store_true", help="choose each record's demonstrations by image similarity "
                   "(RICES, with the model's own ViT) from the whole training split, instead of at random")
    g.add_argument("--rices-cache", default="out/eval/rices", help="where the training split's image features "
                   "are cached (default: out/eval/rices)")
    g.add_argument("--trials", type=int, default=1, help="run with seeds seed, seed+1, ... and report the mean "
                   "(OpenFlamingo's --num_trials); each trial has its own predictions file")
    g.add_argument("--ocr-tokens", action="store_true", help="TextVQA: list the OCR tokens in the question (pass "
                   "the Rosetta OCR file, TextVQA_Rosetta_OCR_v0.2_val.json, with --data)")
    g.add_argument("--metric", choices=RULES, help="VQA accuracy rule (default: the benchmark's own evaluator; "
                   "`eval.py score --help`)")
    g = p.add_argument_group("running")
    g.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    g.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (the paper's "
                   "few-shot results: 3); 1: greedy")
    g.add_argument("--length-penalty", type=float, default=0.0, help="beam scores are divided by length ** this "
                   "(OpenFlamingo's evaluation: 0, no normalisation; transformers' default: 1)")
    g.add_argument("--max-new-tokens", type=int, help="answer budget (default: plain 5, captions 20; chat 8, "
                   "short answers 16, captions 60)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", help="e.g. bfloat16 (default: the checkpoint's, float32 on the CPU)")
    g.add_argument("--predictions", help="the JSON-lines answers, resumed if present (default: "
                   "out/eval/<task>-<prompt>-<shots>shot.jsonl)")
    g.add_argument("--json", help="write {metrics, task, checkpoint, ...} here")
    g.add_argument("--name", help="row name in the table (default: the checkpoint path)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run_main(argv, toy):
    """`toy(argv)` is eval.py's toy evaluator, which `--task toy` hands over to."""
    args = run_parser().parse_args(argv)
    if args.task == "toy":
        flags = [("--checkpoint", args.checkpoint), ("--data", args.data[0]), ("--prompt", args.prompt),
                 ("--limit", args.limit), ("--batch-size", args.batch_size), ("--device", args.device),
                 ("--dtype", args.dtype), ("--json", args.json), ("--predictions", args.predictions),
                 ("--name", args.name)]
        return toy([str(x) for k, v in flags if v is not None for x in (k, v)])
    base = args.predictions or f"out/eval/{args.task}-{args.prompt}-{args.shots}shot.jsonl"
    seeds, runs, t0 = [args.seed + t for t in range(args.trials)], [], time.time()
    try:
        m, path = load_model(args.checkpoint, args.device, args.dtype)
        for args.seed in seeds:  # OpenFlamingo's trials: the same run with another draw of demonstrations
            args.predictions = base if len(seeds) == 1 else base.replace(".jsonl", "") + f"-seed{args.seed}.jsonl"
            runs.append(run_benchmark(m, args, path))
    except (BadSample, weights.CheckpointError, ValueError, OSError) as e:
        fail("eval.py", e)
    seconds, (results, fmt, n) = round(time.time() - t0, 1), runs[0]
    if results is None:
        print(f"{n} answers in {args.predictions}; the files hold no answers to score them against")
    else:
        results = average([r for r, _, _ in runs]) if len(runs) > 1 else results
        print(table(args.name or str(args.checkpoint), args.task, args.shots, results))
    print(f"{seconds} s, {args.prompt} prompts, {args.shots} shots, seeds {seeds}, {path}")
    dump(args.json, {"metrics": results, "task": args.task, "format": fmt, "checkpoint": str(path),
                     "prompt": args.prompt, "shots": args.shots, "seeds": seeds, "limit": args.limit,
                     "predictions": args.predictions, "seconds": seconds})
    return results
