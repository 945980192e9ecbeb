"""
The multiple-choice benchmarks' files as released, read into records (evals/readers.py tells them apart):

    choice   {"id", "image", "question", "hint", "options": {"A": text, ...}, "answer": letter, "category"}

- MMBench-layout TSV (MMBench, and the AI2D / ScienceQA TSVs in that layout): index, question, hint, A, B,
  C, D (E... where present), answer, category, image as base64; a short image cell naming another row's
  index reuses that row's image (the TSVs of VLMEvalKit store each image once); or an image_path column.
- SEED-Bench: {"questions": [{"question_id", "question", "choice_a".."choice_d", "answer", "data_id",
  "data_type", "question_type_id"}], "question_type": {name: id}}; the image questions (SEED-Bench-1's
  data_type "image", SEED-Bench-2's "Single Image"), images {data_id}.
- ScienceQA: problems.json {pid: {"question", "choices", "answer": index, "hint", "image", "split"}}; the
  IMG set is the test split's questions with an image, at {split}/{pid}/image.png.
- AI2D: the release's folder, questions/{image}.json {"imageName", "questions": {text: {"answerTexts",
  "correctAnswer", "questionId"}}} and images/; a list of image ids beside it (ai2d_test_ids.csv, or .txt)
  keeps only those.

References: MMBench (arXiv 2307.06281), SEED-Bench (2307.16125) and SEED-Bench-2 (2311.17092), ScienceQA
(2209.09513), AI2D (1603.07396).
"""
import base64
import binascii
import csv
import string
import sys

from evals.files import image_at, named, need, read_json
from errors import BadSample


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
                        "category": r.get("category"), "l2_category": r.get("l2-category"),
                        "image": r.get("image_path"), "where": where})
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
        with named(where):
            if q.get("data_type", "image") not in ("image", "Single Image"):
                continue  # video, several images, generation (SEED-Bench's 10-12, SEED-Bench-2's other levels)
            qid, question, data_id = need(q, ("question_id", "question", "data_id"), where)
            options = {c.upper(): q[f"choice_{c}"] for c in "abcd" if f"choice_{c}" in q}
            out.append({"id": qid, "question": question, "hint": "", "options": options, "answer": q.get("answer"),
                        "category": names.get(q.get("question_type_id")),
                        "image": image_at(images, [data_id, f"SEED-Bench-image/{data_id}", f"SEED-Bench-image/"
                                                   f"{data_id}.jpg", f"SEED-Bench-2-image/{data_id}"], where)})
    return out


def scienceqa(path, doc, images, split):
    out = []
    for pid, q in doc.items():
        where = f"{path}: problem {pid}"
        with named(where):
            if q.get("split") != split or not q.get("image"):
                continue  # ScienceQA-IMG: the split's questions that come with an image
            question, choices, answer = need(q, ("question", "choices", "answer"), where)
            letters = string.ascii_uppercase[:len(choices)]
            out.append({"id": pid, "question": question, "hint": q.get("hint", ""),
                        "options": dict(zip(letters, choices)), "category": q.get("subject"),
                        "answer": letters[answer] if isinstance(answer, int) else None,
                        "image": image_at(images, [f"{split}/{pid}/{q['image']}", f"{pid}/{q['image']}"], where)})
    return out


def ai2d(folder, look, keep=None):
    out = []
    for f in sorted((folder / "questions").glob("*.json")):
        doc = read_json(f)
        with named(f):
            name, questions = doc.get("imageName", f.stem), list(doc.get("questions", {}).items())
            if keep is not None and name.split(".")[0] not in keep:
                continue
        for text, q in questions:
            where = f"{f}: question {text!r}"
            with named(where):
                qid, choices, answer = need(q, ("questionId", "answerTexts", "correctAnswer"), where)
                letters = string.ascii_uppercase[:len(choices)]
                out.append({"id": qid, "question": text, "hint": "", "options": dict(zip(letters, choices)),
                            "answer": letters[answer],
                            "image": image_at(folder / "images" if look else None, [name], where)})
    return out
