"""
A model on a benchmark: batched answers (greedy, or beam search), written as they come, scored when the files
hold answers.

- `answer` is the one generation loop (the toy suite's too): prompts of one shape (image count, answer
  budget) are batched, shortest first, and generated with the KV cache, greedily or by beam search (3 beams,
  no length normalisation: OpenFlamingo's evaluation, the paper's few-shot protocol); generation stops at the
  model's stop ids and at `<|endofchunk|>`, the end of an interleaved chunk.
- The predictions file is JSON lines: a header {"run": {task, checkpoint, data, prompt, shots, ...}}, then one
  line per answer in the challenge's own format ({"question_id", "answer"}, {"image_id", "caption"},
  {"index", "answer"}, VizWiz's {"image", "answer"}) plus the raw generated text. Each batch is appended and
  flushed, so an interrupted run loses at most one batch: a rerun with the same file answers only what is
  missing (a line cut by a kill is dropped). A file whose header differs (another checkpoint, task, prompt
  or shots) is refused rather than mixed in. `eval.py score` reads the file as it is.
- The result: the metrics of evals/metrics.py as a markdown row like the paper's tables (percentages;
  CIDEr-D x 100) and JSON.

References: the VQA challenge's and COCO caption challenge's results formats (visualqa.org, cocodataset.org);
OpenFlamingo's evaluate.py, whose loop this follows (batches of prompts, post-processed answers).
"""
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoint
import generate
import weights
from evals import metrics, prompts, readers, rices
from errors import BadSample
from images import Images, load_image
from model import XGenMM
from tokenizer import END_CHUNK

# task -> the formats it reads (evals/readers.py); docs/evaluation.md tells where to get each
TASKS = {"coco": ("karpathy", "coco-captions"), "nocaps": ("coco-captions",), "textcaps": ("textcaps",),
         "vqav2": ("vqa-questions",), "okvqa": ("vqa-questions",), "textvqa": ("textvqa",), "vizwiz": ("vizwiz",),
         "pope": ("pope",), "mmbench": ("mmbench",), "seed": ("seed", "mmbench"),
         "scienceqa": ("scienceqa", "mmbench"), "ai2d": ("ai2d", "mmbench")}
ID_KEY = {"vizwiz": "image", "karpathy": "image_id", "coco-captions": "image_id", "textcaps": "image_id",
          "mmbench": "index"}  # the challenge's key for each format's id; else question_id


def load_model(path, device="cpu", dtype=None):
    """A checkpoint (or run directory, or cached Hub id) with its tokenizer, in float32 on a CPU and bfloat16 on a
    GPU by default (training saves fp32 weights: a GPU would otherwise evaluate in fp32)."""
    dtype = getattr(torch, dtype or ("float32" if str(device) == "cpu" else "bfloat16"))
    path = checkpoint.resolve(path)
    m = XGenMM.from_pretrained(path, dtype=dtype, device=device).eval()
    if m.tokenizer is None:
        raise weights.CheckpointError(f"{path} has no tokenizer files")
    return m, path


def answer(m, queries, batch_size, device="cpu", open_image=load_image, done=None, progress=True, num_beams=1,
           length_penalty=0.0):
    """Set q.raw (the decoded new text) and q.answer (stripped) of every query; `done(batch)` after each batch.
    Greedy, or beam search with `num_beams` > 1 (generate.beam_search)."""
    stop = m.stop_ids + [m.tokenizer.token_to_id(END_CHUNK)]
    groups = {}
    for q in queries:
        groups.setdefault((len(q.images), q.max_new), []).append(q)
    bar = tqdm(total=len(queries), desc="eval", unit="answer", disable=not progress, file=sys.stderr)
    for (_, max_new), group in sorted(groups.items()):
        encoded = sorted(((m.tokenizer.encode(q.prompt), q) for q in group), key=lambda p: len(p[0]))
        for i in range(0, len(encoded), batch_size):
            chunk = encoded[i:i + batch_size]
            images = [pictures(q, open_image) for _, q in chunk]
            pixels = Images.from_pil(images, m.config).to(device) if any(images) else None
            out = (m.generate([ids for ids, _ in chunk], pixels, max_new_tokens=max_new, stop_ids=stop)
                   if num_beams == 1 else beams(m, [ids for ids, _ in chunk], pixels, max_new, stop, num_beams,
                                                length_penalty))
            for (_, q), row in zip(chunk, out.tolist()):
                q.raw = m.tokenizer.decode(row, skip_special_tokens=True)
                q.answer = q.raw.strip()
            if done is not None:
                done([q for _, q in chunk])
            bar.update(len(chunk))
    bar.close()

def beams(m, prompts, pixels, max_new, stop, num_beams, length_penalty):
    """The best beam of each prompt (the paper's decoding for its few-shot benchmarks)."""
    ids, mask, images = m.encode_batch(prompts, pixels, padding_side="left")
    embeds = m.embed(ids, images)
    return generate.beam_search(m.lang_model, embeds, mask.to(embeds.device), max_new, num_beams, length_penalty,
                                stop_ids=stop, pad_id=m.config.text.pad_token_id)[0]


def pictures(q, open_image):
    try:
        return [open_image(p) for p in q.images]
    except BadSample as e:  # name the record the image belongs to
        raise BadSample(f"record {q.id}", str(e), e.reason) from None

# -----------------------------------------------------------------------------
# the predictions file


def resume(path, header):
    """{str(id): line} already answered in `path` under the same header; a new file (header only) otherwise."""
    path = Path(path)
    with readers.named(path):  # a file that is not predictions (not UTF-8, not JSON objects): one line, exit 2
        lines = path.read_text().splitlines() if path.is_file() else []
        if not "".join(lines).strip():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"run": header}) + "\n")
            return {}
        try:
            rows = [json.loads(x) for x in lines]
        except json.JSONDecodeError:
            rows = [json.loads(x) for x in lines[:-1]]  # the last line, cut by a kill mid-write, is asked again
            path.write_text("".join(x + "\n" for x in lines[:-1]))
        if not all(isinstance(r, dict) for r in rows):
            raise BadSample(str(path), "holds lines that are not JSON objects: not a predictions file", "bad json")
    if not rows or rows[0].get("run") != header:
        old = rows[0]["run"] if rows and isinstance(rows[0].get("run"), dict) else {}
        diff = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in header.items() if old.get(k) != v)
        raise BadSample(str(path), f"holds another run's predictions ({diff or 'no header'}); pass another "
                        "--predictions or delete it", "other run")
    with readers.named(path):  # a line without an id
        return {str(next(r[k] for k in readers.ID_KEYS if k in r)): r for r in rows[1:]}


def write(f, fmt, kind, batch):
    """Append a batch of answers in the challenge's format, and flush: what is written survives a kill."""
    key, said = ID_KEY.get(fmt, "question_id"), "caption" if kind == "caption" else "answer"
    for q in batch:
        f.write(json.dumps({key: q.id, said: q.answer, "raw": q.raw}) + "\n")
    f.flush()

# -----------------------------------------------------------------------------
# a benchmark run


def records_for(args):
    """(format, kind, records, demonstration pool) of the run's files, as the flags ask."""
    images = args.images or Path(args.data[0]).parent
    fmt, records = readers.load(args.data, images)
    if fmt not in TASKS[args.task]:
        raise BadSample(" ".join(map(str, args.data)), f"a {fmt} file; task {args.task} reads "
                        f"{' or '.join(TASKS[args.task])} (docs/evaluation.md)", "wrong task")
    kind = readers.KINDS[fmt]
    records = records[:args.limit] if args.limit else records
    if args.circular:
        records = readers.with_rotations(records)
    pool, where = [], " ".join(map(str, args.demos or args.data))
    if args.demos:
        found, pool = readers.load(args.demos, args.demo_images or Path(args.demos[0]).parent, split="train")
        if readers.KINDS[found] != kind:
            raise BadSample(where, f"demonstrations from a {found} file for a {fmt} benchmark", "wrong demos")
    elif fmt in ("karpathy", "scienceqa") and (args.shots or args.prompt == "plain"):
        pool = readers.load(args.data, images, split="train")[1]  # the same file's training split
    if not readers.has_answers(kind, pool):
        raise BadSample(where, "the demonstrations have no answers (VQA: pass the annotations file too)", "no answers")
    return fmt, kind, records, pool


def queries_for(m, args, path, kind, records, pool):
    """Each record's prompt: demonstrations drawn from the query set, or by RICES from the whole pool."""
    if not args.rices:
        pool = prompts.query_set(pool, args.seed, args.query_set_size)
        return [prompts.build(r, kind, args.prompt, args.shots, pool, args.seed, args.task, args.ocr_tokens)
                for r in records]
    k = prompts.how_many(args.shots, args.prompt, pool)
    chosen = rices.choose(m, records, pool, k, path, args.rices_cache)
    return [prompts.build(r, kind, args.prompt, args.shots, task=args.task, ocr=args.ocr_tokens,
                          chosen=chosen[str(r["id"])]) for r in records]


def run_benchmark(m, args, path):
    """Answer every record (resuming from args.predictions), then score: (metrics or None, format, count)."""
    fmt, kind, records, pool = records_for(args)
    queries = queries_for(m, args, path, kind, records, pool)
    for q in queries:
        q.max_new = args.max_new_tokens or q.max_new
    header = {"task": args.task, "checkpoint": str(path), "data": [str(Path(p).resolve()) for p in args.data],
              "prompt": args.prompt, "shots": args.shots, "seed": args.seed, "query_set_size": args.query_set_size,
              "ocr_tokens": args.ocr_tokens, "circular": args.circular, "max_new_tokens": args.max_new_tokens,
              "num_beams": args.num_beams, "length_penalty": args.length_penalty, "rices": args.rices}
    done = resume(args.predictions, header)
    todo = [q for q in queries if str(q.id) not in done]
    print(f"{len(records)} records, {len(done)} answered before, {len(todo)} to answer -> {args.predictions}",
          file=sys.stderr)

    with open(args.predictions, "a") as f:
        def finish(batch):  # each batch: the answer read back from the text, then onto the disk
            for q in batch:
                q.answer = prompts.read_answer(q.raw, kind, args.prompt)
            write(f, fmt, kind, batch)

        answer(m, todo, args.batch_size, args.device, done=finish, progress=not args.quiet, num_beams=args.num_beams,
               length_penalty=args.length_penalty)
    answers = {i: r.get("caption", r.get("answer")) for i, r in done.items()}
    answers.update({str(q.id): q.answer for q in todo})
    if not readers.has_answers(kind, records):
        return None, fmt, len(records)
    return metrics.score(kind, records, answers, args.metric), fmt, len(records)


def table(name, task, shots, results):
    """A markdown row like the paper's tables: every top-level number x 100, one decimal."""
    cols = [k for k, v in results.items() if isinstance(v, float)]
    head = "| | task | shots | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 3)
    row = f"\n| {name} | {task} | {shots} | " + " | ".join(f"{100 * results[c]:.1f}" for c in cols) + " |"
    return head + row + (f"\nscored as {results['metric']}" if results.get("metric") else "")


def average(runs):
    """The mean of each top-level number over trials (OpenFlamingo reports the mean of its trials), with each
    trial's value under "trials"."""
    numbers = [k for k, v in runs[0].items() if isinstance(v, float)]
    return {**runs[0], **{k: sum(r[k] for r in runs) / len(runs) for k in numbers},
            "trials": {k: [r[k] for r in runs] for k in numbers}}

