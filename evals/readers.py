"""
The benchmarks' files as released, read into records: the plain dicts evals/metrics.py scores and evals/run.py
asks a model about. A file is recognised by its content, not its name (docs/evaluation.md: where to get each).

    vqa      {"id", "image", "question", "answers": [10 strings] or None (no annotations), "answer_type"}
    caption  {"id", "image", "captions": [strings]}
    pope     {"id", "image", "question", "label": "yes" | "no"}
    choice   {"id", "image", "question", "hint", "options": {"A": text, ...}, "answer": letter, "category"}

- VQAv2 / OK-VQA: a questions file {"data_subtype", "questions": [{"image_id", "question", "question_id"}]}
  and an annotations file {"annotations": [{"question_id", "answers": [{"answer"}] x 10, "answer_type"}]};
  images COCO_{data_subtype}_{image_id:012d}.jpg. Without annotations (test-dev) answers are None.
- TextVQA 0.5.1: {"data": [{"question_id", "question", "image_id", "answers": [10 strings]}]}, images
  {image_id}.jpg; OCR tokens, where a file has them, are kept and used only when asked for.
- VizWiz: [{"image", "question", "answers": [{"answer", "answer_confidence"}], "answer_type", "answerable"}];
  the id is the image name, the challenge's key; "unanswerable" is an answer like any other.
- COCO Karpathy split: {"images": [{"filepath", "filename", "cocoid", "split", "sentences": [{"raw"}]}]}: the
  "test" split is scored and the "train" split is the few-shot pool (as OpenFlamingo's evaluation does).
- NoCaps: the COCO caption format, {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}.
- TextCaps 0.1: {"data": [{"image_id", "image_path", "reference_strs"}]}, one entry per caption of an image.
- POPE: JSON lines {"question_id", "image", "text", "label": "yes" | "no"} over COCO val2014 images.
- MMBench-layout TSV (MMBench, and the AI2D / ScienceQA TSVs in that layout): index, question, hint, A, B,
  C, D (E... where present), answer, category, image as base64; a short image cell naming another row's
  index reuses that row's image (the TSVs of VLMEvalKit store each image once); or an image_path column.
- SEED-Bench: {"questions": [{"question_id", "question", "choice_a".."choice_d", "answer", "data_id",
  "data_type", "question_type_id"}], "question_type": {name: id}}; the image questions, images {data_id}.
- ScienceQA: problems.json {pid: {"question", "choices", "answer": index, "hint", "image", "split"}}; the
  IMG set is the test split's questions with an image, at {split}/{pid}/image.png.
- AI2D: the release's folder, questions/{image}.json {"imageName", "questions": {text: {"answerTexts",
  "correctAnswer", "questionId"}}} and images/; a text file of image ids beside it keeps only those.

Bad input is a BadSample naming the file and the record: a missing image, a question without annotations, a
malformed TSV row or JSON line, a record without the fields its format needs.
References: VQAv2 (arXiv 1612.00837), OK-VQA (1906.00067), TextVQA (1904.08920), VizWiz (1802.08218), COCO
Captions (1504.00325) and the Karpathy split (1412.2306), NoCaps (1812.08658), TextCaps (2003.12462), POPE
(2305.10355), MMBench (2307.06281), SEED-Bench (2307.16125), ScienceQA (2209.09513), AI2D (1603.07396), and
each one's released files (docs/evaluation.md: where to download them).
"""
import base64
import binascii
import csv
import json
import string
import sys
from pathlib import Path

from images import BadSample
from evals.metrics import CIRCULAR, rotate

KINDS = {"vqa-questions": "vqa", "vqa-annotations": "vqa", "textvqa": "vqa", "vizwiz": "vqa",
         "karpathy": "caption", "coco-captions": "caption", "textcaps": "caption", "pope": "pope",
         "mmbench": "choice", "seed": "choice", "scienceqa": "choice", "ai2d": "choice"}
ID_KEYS = ("question_id", "image_id", "index", "image", "id")  # a prediction's id: the challenges' own keys
ANSWER_KEYS = ("answer", "caption", "text", "prediction")

# -----------------------------------------------------------------------------
# files


def read_json(path):
    """A JSON document, or JSON lines (POPE's .json files are JSON lines) as a list."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":
            raise BadSample(str(path), f"not valid JSON ({e})", "bad json") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            if line.strip():
                rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise BadSample(f"{path}:{n}", f"malformed JSON line ({e})", "bad json") from None
    return rows


def sniff(path):
    """(format name, parsed content) of one official file or folder."""
    path = Path(path)
    if not path.exists():
        raise BadSample(str(path), "no such file or folder", "missing file")
    if path.is_dir():
        if (path / "questions").is_dir():
            return "ai2d", path
        raise BadSample(str(path), "a folder, but not AI2D's (no questions/ inside)", "unknown format")
    if path.suffix.lower() == ".tsv":
        with path.open(encoding="utf-8") as f:
            if "index" in f.readline().rstrip("\n").split("\t"):
                return "mmbench", path
    doc = read_json(path)
    if isinstance(doc, dict) and {"label", "text"} <= set(doc):
        doc = [doc]  # a POPE file of one line
    first = lambda rows: rows[0] if isinstance(rows, list) and rows and isinstance(rows[0], dict) else {}
    if isinstance(doc, list):
        row = first(doc)
        if "label" in row and "text" in row:
            return "pope", doc
        if "image" in row and "question" in row:
            return "vizwiz", doc
    elif isinstance(doc, dict):
        if "choice_a" in first(doc.get("questions")):
            return "seed", doc
        if "question_id" in first(doc.get("questions")):
            return "vqa-questions", doc
        if "answers" in first(doc.get("annotations")):
            return "vqa-annotations", doc
        if "caption" in first(doc.get("annotations")):
            return "coco-captions", doc
        if "sentences" in first(doc.get("images")):
            return "karpathy", doc
        if "reference_strs" in first(doc.get("data")):
            return "textcaps", doc
        if "answers" in first(doc.get("data")) or "question_tokens" in first(doc.get("data")):
            return "textvqa", doc
        if doc and all(isinstance(v, dict) and "choices" in v for v in list(doc.values())[:5]):
            return "scienceqa", doc
    raise BadSample(str(path), "not a benchmark file this evaluator knows (docs/evaluation.md lists them)",
                    "unknown format")


def image_at(images, names, where):
    """The first of `names` (paths relative to the `images` folder) that exists; None when images is None
    (scoring needs no images)."""
    if images is None:
        return None
    for name in names:
        if (Path(images) / name).is_file():
            return Path(images) / name
    raise BadSample(where, f"image file {Path(images) / names[0]} does not exist", "missing image")


def need(row, keys, where):
    missing = [k for k in keys if k not in row]
    if missing:
        raise BadSample(where, f"no {', '.join(map(repr, missing))} field", "missing field")
    return [row[k] for k in keys]

# -----------------------------------------------------------------------------
# formats -> records


def vqa_questions(path, doc, images, answers):
    """VQAv2 / OK-VQA questions joined with {question_id: annotation} (None: no annotation file)."""
    subtype = doc.get("data_subtype") or next((s for s in ("train2014", "val2014", "test2015")
                                               if s in Path(path).name), "val2014")
    out = []
    for n, q in enumerate(doc["questions"]):
        where = f"{path}: question {n}"
        qid, image_id, question = need(q, ("question_id", "image_id", "question"), where)
        name = f"COCO_{subtype}_{int(image_id):012d}.jpg"
        if answers is not None and qid not in answers:
            raise BadSample(where, f"question_id {qid} has no annotation in the annotations file", "no annotation")
        ann = answers.get(qid, {}) if answers is not None else {}
        out.append({"id": qid, "image": image_at(images, [name, f"{subtype}/{name}"], where), "question": question,
                    "answers": [a["answer"] for a in ann["answers"]] if ann else None,
                    "answer_type": ann.get("answer_type")})
    return out


def vqa_annotations(path, doc):
    """{question_id: annotation}, each checked for its answers."""
    out = {}
    for n, a in enumerate(doc["annotations"]):
        qid, answers = need(a, ("question_id", "answers"), f"{path}: annotation {n}")
        if not answers or not all(isinstance(x, dict) and "answer" in x for x in answers):
            raise BadSample(f"{path}: annotation {n}", "answers must be a list of {'answer': ...}", "bad answers")
        out[qid] = a
    return out


def textvqa(path, doc, images):
    out = []
    for n, q in enumerate(doc["data"]):
        where = f"{path}: record {n}"
        qid, image_id, question = need(q, ("question_id", "image_id", "question"), where)
        out.append({"id": qid, "question": question, "answers": q.get("answers"), "ocr_tokens": q.get("ocr_tokens"),
                    "image": image_at(images, [f"{image_id}.jpg", f"train_images/{image_id}.jpg",
                                               f"test_images/{image_id}.jpg"], where)})
    return out


def vizwiz(path, doc, images):
    out = []
    for n, q in enumerate(doc):
        where = f"{path}: record {n}"
        image, question = need(q, ("image", "question"), where)
        split = image.split("_")[1] if image.count("_") >= 2 else ""  # VizWiz_val_00000000.jpg
        answers = [a["answer"] for a in q["answers"]] if q.get("answers") else None
        out.append({"id": image, "question": question, "answers": answers, "answer_type": q.get("answer_type"),
                    "image": image_at(images, [image, f"{split}/{image}"], where)})
    return out


def karpathy(path, doc, images, split):
    out = []
    for n, im in enumerate(doc["images"]):
        where = f"{path}: image {n}"
        if im.get("split") != split:
            continue
        filename, sentences = need(im, ("filename", "sentences"), where)
        out.append({"id": im.get("cocoid", filename), "captions": [s["raw"] for s in sentences],
                    "image": image_at(images, [f"{im.get('filepath', '')}/{filename}", filename], where)})
    return out


def coco_captions(path, doc, images):
    captions = {}
    for n, a in enumerate(doc["annotations"]):
        image_id, caption = need(a, ("image_id", "caption"), f"{path}: annotation {n}")
        captions.setdefault(image_id, []).append(caption)
    out = []
    for n, im in enumerate(doc.get("images", [])):
        where = f"{path}: image {n}"
        image_id, name = need(im, ("id", "file_name"), where)
        if image_id not in captions and images is None:
            continue  # scoring: an image without captions has nothing to score against
        out.append({"id": image_id, "captions": captions.get(image_id), "image": image_at(images, [name], where)})
    return out


def textcaps(path, doc, images):
    out, seen = [], set()
    for n, c in enumerate(doc["data"]):
        where = f"{path}: record {n}"
        (image_id,) = need(c, ("image_id",), where)
        if image_id in seen:  # one entry per caption, each carrying all of the image's references
            continue
        seen.add(image_id)
        names = [c.get("image_path", ""), f"{image_id}.jpg", f"train_images/{image_id}.jpg"]
        out.append({"id": image_id, "captions": c.get("reference_strs"), "image": image_at(images, names, where)})
    return out


def pope(path, doc, images):
    out = []
    for n, q in enumerate(doc, 1):
        where = f"{path}:{n}"
        qid, image, text = need(q, ("question_id", "image", "text"), where)
        label = q.get("label")
        if label not in ("yes", "no", None):
            raise BadSample(where, f"label {label!r} is neither 'yes' nor 'no'", "bad label")
        out.append({"id": qid, "question": text, "label": label,
                    "image": image_at(images, [image, f"val2014/{image}"], where)})
    return out


def mmbench(path, images):
    """An MMBench-layout TSV (as pandas writes it: tab-separated, quoted where a cell holds a tab, a quote
    or a newline); images decoded from base64, or read from an image_path column."""
    csv.field_size_limit(sys.maxsize)  # a base64 image is one very long cell
    out, cells = [], {}
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t")
        head = next(rows)
        for row in rows:
            where = f"{path}:{rows.line_num}"
            if len(row) != len(head):
                raise BadSample(where, f"{len(row)} tab-separated fields, the header has {len(head)}", "malformed row")
            r = dict(zip(head, row))
            index, question = need(r, ("index", "question"), where)
            options = {c: r[c] for c in string.ascii_uppercase if r.get(c, "").strip() not in ("", "nan")}
            if len(options) < 2 or (r.get("answer") and r["answer"] not in options):
                raise BadSample(where, f"options {sorted(options)} and answer {r.get('answer')!r} do not fit",
                                "bad options")
            cells[index] = r.get("image", "")
            hint = r.get("hint", "")
            out.append({"id": int(index) if index.lstrip("-").isdigit() else index, "question": question,
                        "hint": "" if hint == "nan" else hint, "options": options, "answer": r.get("answer") or None,
                        "category": r.get("category"), "image": r.get("image_path"), "where": where})
    for r in out:
        where = r.pop("where")
        if r["image"] is not None:
            r["image"] = image_at(images, [r["image"]], where)
        elif images is not None:
            r["image"] = decode_image(cells, str(r["id"]), where)
    return out


def decode_image(cells, index, where):
    cell = cells[index]
    if len(cell) <= 64 and cell in cells and len(cells[cell]) > 64:
        cell = cells[cell]  # a repeated image names the row that holds it
    try:
        return base64.b64decode(cell, validate=True)
    except (binascii.Error, ValueError):
        raise BadSample(where, "the image cell is not base64", "bad image") from None


def seed(path, doc, images):
    names = {v: k for k, v in doc.get("question_type", {}).items()}
    out = []
    for n, q in enumerate(doc["questions"]):
        where = f"{path}: question {n}"
        if q.get("data_type", "image") != "image":
            continue  # the video questions (SEED-Bench's dimensions 10-12)
        qid, question, data_id = need(q, ("question_id", "question", "data_id"), where)
        options = {c.upper(): q[f"choice_{c}"] for c in "abcd" if f"choice_{c}" in q}
        out.append({"id": qid, "question": question, "hint": "", "options": options, "answer": q.get("answer"),
                    "category": names.get(q.get("question_type_id")),
                    "image": image_at(images, [data_id, f"SEED-Bench-image/{data_id}", f"SEED-Bench-image/{data_id}.jpg"],
                                         where)})
    return out


def scienceqa(path, doc, images, split):
    out = []
    for pid, q in doc.items():
        where = f"{path}: problem {pid}"
        if q.get("split") != split or not q.get("image"):
            continue  # ScienceQA-IMG: the split's questions that come with an image
        question, choices, answer = need(q, ("question", "choices", "answer"), where)
        letters = string.ascii_uppercase[:len(choices)]
        out.append({"id": pid, "question": question, "hint": q.get("hint", ""), "options": dict(zip(letters, choices)),
                    "answer": letters[answer] if isinstance(answer, int) else None, "category": q.get("subject"),
                    "image": image_at(images, [f"{split}/{pid}/{q['image']}", f"{pid}/{q['image']}"], where)})
    return out


def ai2d(folder, look, keep=None):
    out = []
    for f in sorted((folder / "questions").glob("*.json")):
        doc = read_json(f)
        name = doc.get("imageName", f.stem)
        if keep is not None and name.split(".")[0] not in keep:
            continue
        for text, q in doc.get("questions", {}).items():
            where = f"{f}: question {text!r}"
            qid, choices, answer = need(q, ("questionId", "answerTexts", "correctAnswer"), where)
            letters = string.ascii_uppercase[:len(choices)]
            out.append({"id": qid, "question": text, "hint": "", "options": dict(zip(letters, choices)),
                        "answer": letters[answer], "image": image_at(folder / "images" if look else None, [name], where)})
    return out

# -----------------------------------------------------------------------------
# the entry points: a benchmark's files -> records; a prediction file -> answers


def load(paths, images=None, split="test"):
    """(format, records) of one benchmark's files. `images`: the image folder (None: do not look for images).
    `split`: the Karpathy or ScienceQA split to read. A .txt file among AI2D's paths lists the image ids to keep."""
    lists = [p for p in paths if Path(p).suffix == ".txt"]
    found = [(p, *sniff(p)) for p in paths if p not in lists]
    if any(f == "vqa-questions" for _, f, _ in found):
        annotations = [vqa_annotations(p, d) for p, f, d in found if f == "vqa-annotations"]
        merged = {k: v for a in annotations for k, v in a.items()} if annotations else None
        return "vqa-questions", [r for p, f, d in found if f == "vqa-questions"
                                 for r in vqa_questions(p, d, images, merged)]
    if len(found) != 1:
        names = ", ".join(f"{p} ({f})" for p, f, _ in found) or ", ".join(map(str, paths))
        raise BadSample(names, "expected one benchmark file, or VQA questions + annotations", "files")
    path, fmt, doc = found[0]
    if fmt == "vqa-annotations":
        return fmt, [{"id": k, "answers": [a["answer"] for a in v["answers"]], "answer_type": v.get("answer_type")}
                     for k, v in vqa_annotations(path, doc).items()]
    if fmt == "ai2d":
        keep = {w.split(".")[0] for f in lists for w in Path(f).read_text().split()} if lists else None
        return fmt, ai2d(doc, images is not None, keep)
    if fmt == "mmbench":
        return fmt, mmbench(path, images)
    readers = {"textvqa": textvqa, "vizwiz": vizwiz, "coco-captions": coco_captions, "textcaps": textcaps,
               "pope": pope, "seed": seed}
    if fmt in ("karpathy", "scienceqa"):
        return fmt, {"karpathy": karpathy, "scienceqa": scienceqa}[fmt](path, doc, images, split)
    return fmt, readers[fmt](path, doc, images)


def has_answers(kind, records):
    """Do the files hold what scoring needs (test-dev and MMBench's test split do not)?"""
    field = {"vqa": "answers", "caption": "captions", "pope": "label", "choice": "answer"}[kind]
    return all(r.get(field) is not None for r in records)


def read_predictions(path):
    """{str(id): answer} from a JSON list or JSON lines in the challenges' formats: [{"question_id", "answer"}],
    [{"image_id", "caption"}], [{"index" or "question_id", "answer"}], VizWiz's [{"image", "answer"}]; a
    line {"run": ...} (eval.py run's header) is skipped."""
    rows = read_json(path)
    rows = [rows] if isinstance(rows, dict) else rows  # JSON lines of one line
    if not isinstance(rows, list):
        raise BadSample(str(path), "predictions must be a JSON list (or JSON lines) of objects", "bad predictions")
    out = {}
    for n, row in enumerate(rows):
        if isinstance(row, dict) and "run" in row:
            continue
        where = f"{path}: prediction {n}"
        key = next((k for k in ID_KEYS if isinstance(row, dict) and k in row), None)
        said = next((k for k in ANSWER_KEYS if isinstance(row, dict) and k in row), None)
        if key is None or said is None:
            raise BadSample(where, f"needs an id ({' / '.join(ID_KEYS)}) and an answer ({' / '.join(ANSWER_KEYS)})",
                            "bad prediction")
        if str(row[key]) in out:
            raise BadSample(where, f"a second prediction for {key} {row[key]}", "duplicate prediction")
        out[str(row[key])] = str(row[said])
    return out


def match(records, answers, where, partial=False):
    """The records the answers cover. An answer to no record is an error; so is a record without an answer,
    unless `partial` (then the count is returned, to be reported). -> (records, missing)."""
    ids = {str(r["id"]) for r in records}
    unknown = [i for i in answers if i not in ids]
    if unknown:
        raise BadSample(str(where), f"{len(unknown)} prediction(s) answer no question of the references "
                        f"(e.g. {', '.join(unknown[:3])}): another split's predictions?", "unknown id")
    missing = [str(r["id"]) for r in records if str(r["id"]) not in answers]
    if missing and not partial:
        raise BadSample(str(where), f"no prediction for {len(missing)} of {len(records)} questions (e.g. "
                        f"{', '.join(missing[:3])}); answer them all, or pass --partial to score the rest and "
                        "report the count", "missing prediction")
    return [r for r in records if str(r["id"]) in answers], len(missing)


def with_rotations(records, answers=None):
    """Every rotation of every multiple-choice record (MMBench's circular evaluation), with `answers`: only
    when they hold rotations (ids of 1,000,000 and up) that the records lack."""
    if answers is not None and not any(i.isdigit() and int(i) >= CIRCULAR for i in answers):
        return records
    ids = {str(r["id"]) for r in records}
    if answers is not None and all(i in ids for i in answers):
        return records  # the file holds its rotations already, as MMBench's own TSVs do
    return [rotate(r, k) for r in records for k in range(len(r["options"]))]
