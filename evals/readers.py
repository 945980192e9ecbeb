"""
The benchmarks' files as released, read into records: the plain dicts evals/metrics.py scores and evals/run.py
asks a model about. A file is recognised by its content, not its name (docs/evaluation.md: where to get each);
evals/open_formats.py (VQA, captions, POPE) and evals/choice_formats.py (multiple choice) read each format.

Bad input is a BadSample naming the file and the record: a missing image, a question without annotations, a
malformed TSV row or JSON line, a record without the fields its format needs or with a field of the wrong type,
a file that is not UTF-8 or JSON nested too deeply to parse, an image name that leaves the image folder
(absolute, or `..`). Benchmark files are downloaded like training data and read as untrusted input too.
Predictions are matched to records by id, or, for files without ids (POPE's answer files), by line order.
"""
from pathlib import Path

from evals import choice_formats as mc
from evals import open_formats as oa
from evals.choice import CIRCULAR, is_rotation_id, rotate
from evals.files import named, read_json
from errors import BadSample, short

KINDS = {"vqa-questions": "vqa", "vqa-annotations": "vqa", "textvqa": "vqa", "textvqa-ocr": "vqa", "vizwiz": "vqa",
         "karpathy": "caption", "coco-captions": "caption", "textcaps": "caption", "pope": "pope",
         "mmbench": "choice", "seed": "choice", "scienceqa": "choice", "ai2d": "choice"}
ID_KEYS = ("question_id", "image_id", "index", "image", "id")  # a prediction's id: the challenges' own keys
ANSWER_KEYS = ("answer", "caption", "text", "prediction")
ID_LISTS = (".txt", ".csv")  # AI2D's test image ids

# -----------------------------------------------------------------------------
# which format


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
        if "ocr_tokens" in first(doc.get("data")) and "question" not in first(doc.get("data")):
            return "textvqa-ocr", doc  # TextVQA_Rosetta_OCR_v0.2_*.json
        if "answers" in first(doc.get("data")) or "question_tokens" in first(doc.get("data")):
            return "textvqa", doc
        if doc and all(isinstance(v, dict) and "choices" in v for v in list(doc.values())[:5]):
            return "scienceqa", doc
    raise BadSample(str(path), "not a benchmark file this evaluator knows (docs/evaluation.md lists them)",
                    "unknown format")

# -----------------------------------------------------------------------------
# the entry points: a benchmark's files -> records; a prediction file -> answers


def load(paths, images=None, split="test"):
    """(format, records) of one benchmark's files. `images`: the image folder (None: do not look for images).
    `split`: the Karpathy or ScienceQA split to read. A .txt file among AI2D's paths lists the image ids to keep."""
    where = ", ".join(map(str, paths))
    with named(where):  # a top level of the wrong shape ({"questions": 5}) names the files
        fmt, records = read_files(paths, images, split)
    for r in records:
        for field, many in TEXTS[KINDS[fmt]]:
            if field in r and not is_text(r[field], many):
                raise BadSample(f"{where}: record {short(r.get('id'))}", f"{field} must be "
                                f"{'a list of strings' if many else 'a string'}, not {short(r[field])}", "bad record")
    return fmt, records


TEXTS = {"vqa": [("question", False), ("answers", True)], "caption": [("captions", True)],
         "pope": [("question", False)], "choice": [("question", False), ("options", True)]}  # (field, a list?)


def is_text(value, many):
    """A string; or, for `many`, None (no annotations) or a list (or dict) of strings. Checked once here, so
    that a number where a question or an answer belongs is named by file and record, not met as a TypeError
    in the metrics."""
    if not many:
        return isinstance(value, str)
    values = list(value.values()) if isinstance(value, dict) else value
    return value is None or (isinstance(values, list) and all(isinstance(v, str) for v in values))


def read_files(paths, images, split):
    lists = [p for p in paths if Path(p).suffix.lower() in ID_LISTS]
    found = [(p, *sniff(p)) for p in paths if p not in lists]
    if any(f == "vqa-questions" for _, f, _ in found):
        annotations = [oa.vqa_annotations(p, d) for p, f, d in found if f == "vqa-annotations"]
        merged = {k: v for a in annotations for k, v in a.items()} if annotations else None
        return "vqa-questions", [r for p, f, d in found if f == "vqa-questions"
                                 for r in oa.vqa_questions(p, d, images, merged)]
    ocr = [(p, d) for p, f, d in found if f == "textvqa-ocr"]
    found = [x for x in found if x[1] != "textvqa-ocr"]
    if len(found) != 1 or (ocr and found[0][1] != "textvqa"):
        names = ", ".join(f"{p} ({f})" for p, f, _ in found) or ", ".join(map(str, paths))
        raise BadSample(names, "expected one benchmark file, VQA questions + annotations, or TextVQA + its OCR "
                        "file", "files")
    path, fmt, doc = found[0]
    if fmt == "vqa-annotations":
        return fmt, [{"id": k, **oa.vqa_answers(v)} for k, v in oa.vqa_annotations(path, doc).items()]
    if fmt == "textvqa":
        return fmt, oa.textvqa(path, doc, images, [oa.ocr_tokens(p, d) for p, d in ocr])
    if fmt == "ai2d":
        return fmt, mc.ai2d(doc, images is not None, image_ids(lists) if lists else None)
    if fmt == "mmbench":
        return fmt, mc.mmbench(path, images)
    if fmt in ("karpathy", "scienceqa"):
        return fmt, {"karpathy": oa.karpathy, "scienceqa": mc.scienceqa}[fmt](path, doc, images, split)
    readers = {"vizwiz": oa.vizwiz, "coco-captions": oa.coco_captions, "textcaps": oa.textcaps, "pope": oa.pope,
               "seed": mc.seed}
    return fmt, readers[fmt](path, doc, images)


def image_ids(paths):
    """AI2D's image ids from lists of them (ai2d_test_ids.csv: one id a line; or any text split on commas and
    white space), without extensions: '4.png' -> '4'."""
    with named(", ".join(map(str, paths))):
        return {w.split(".")[0] for f in paths for w in Path(f).read_text().replace(",", " ").split()}


def has_answers(kind, records):
    """Do the files hold what scoring needs (test-dev and MMBench's test split do not)?"""
    field = {"vqa": "answers", "caption": "captions", "pope": "label", "choice": "answer"}[kind]
    return all(r.get(field) is not None for r in records)


def read_predictions(path):
    """{str(id): answer} from a JSON list or JSON lines in the challenges' formats: [{"question_id", "answer"}],
    [{"image_id", "caption"}], [{"index" or "question_id", "answer"}], VizWiz's [{"image", "answer"}]; a
    line {"run": ...} (eval.py run's header) is skipped. A file whose rows have no id at all (POPE's answer
    files, {"question", "answer"} a line) gives a list, matched to the references by line order. An answer
    null is an empty answer."""
    rows = read_json(path)
    rows = [rows] if isinstance(rows, dict) else rows  # JSON lines of one line
    if not isinstance(rows, list):
        raise BadSample(str(path), "predictions must be a JSON list (or JSON lines) of objects", "bad predictions")
    rows = [r for r in rows if not (isinstance(r, dict) and "run" in r)]
    ordered = not any(isinstance(r, dict) and any(k in r for k in ID_KEYS) for r in rows)
    out = [] if ordered else {}
    for n, row in enumerate(rows):
        where = f"{path}: prediction {n}"
        key = next((k for k in ID_KEYS if isinstance(row, dict) and k in row), None)
        said = next((k for k in ANSWER_KEYS if isinstance(row, dict) and k in row), None)
        if said is None or (key is None and not ordered):
            raise BadSample(where, f"needs an id ({' / '.join(ID_KEYS)}) and an answer ({' / '.join(ANSWER_KEYS)})",
                            "bad prediction")
        text = "" if row[said] is None else str(row[said])
        if ordered:
            out.append((row.get("question"), text))
        elif str(row[key]) in out:
            raise BadSample(where, f"a second prediction for {key} {row[key]}", "duplicate prediction")
        else:
            out[str(row[key])] = text
    return out


def by_line(records, answers, where, partial):
    """{str(id): answer} of answers given in the references' order (POPE), each question checked when given."""
    if len(answers) != len(records) and not (partial and len(answers) < len(records)):
        raise BadSample(str(where), f"{len(answers)} answers by line for {len(records)} questions: answer them all "
                        "in the question file's order (or --partial for the first ones)", "missing prediction")
    for n, ((question, _), r) in enumerate(zip(answers, records), 1):
        if question is not None and str(question).strip().lower() != str(r.get("question", "")).strip().lower():
            raise BadSample(f"{where}:{n}", f"question {short(question)} is not line {n}'s of the references "
                            f"({short(r.get('question'))}): answers must follow the question file's order",
                            "order")
    return {str(r["id"]): text for (_, text), r in zip(answers, records)}


def match(records, answers, where, partial=False):
    """The records the answers cover, and the answers by id. An answer to no record is an error; so is a
    record without an answer, unless `partial` (then the count is returned, to be reported); with circular
    rotations, a question is scored only with all of its rotations. -> (records, answers, missing)."""
    if isinstance(answers, list):
        answers = by_line(records, answers, where, partial)
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
    if any(is_rotation_id(i) for i in ids):  # circular: a question missing any rotation is left out whole
        gone = {int(i) % CIRCULAR for i in missing}
        kept = [r for r in records if int(r["id"]) % CIRCULAR not in gone]
        return kept, answers, len(records) - len(kept)
    return [r for r in records if str(r["id"]) in answers], answers, len(missing)


def with_rotations(records, answers=None):
    """Every rotation of every multiple-choice record (MMBench's circular evaluation), with `answers`: only
    when they hold rotations (ids of 1,000,000 and up) that the records lack."""
    if answers is not None and not any(is_rotation_id(i) for i in answers):
        return records
    ids = {str(r["id"]) for r in records}
    if answers is not None and all(i in ids for i in answers):
        return records  # the file holds its rotations already, as MMBench's own TSVs do
    return [rotate(r, k) for r in records for k in range(len(r["options"]))]
