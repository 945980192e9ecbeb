"""
The open-answer benchmarks' files as released, read into records (evals/readers.py tells the formats apart):

    vqa      {"id", "image", "question", "answers": [10 strings] or None (no annotations), "answer_type"}
    caption  {"id", "image", "captions": [strings], "domain" (NoCaps)}
    pope     {"id", "image", "question", "label": "yes" | "no"}

- VQAv2 / OK-VQA: a questions file {"data_subtype", "questions": [{"image_id", "question", "question_id"}]}
  and an annotations file {"annotations": [{"question_id", "answers": [{"answer"}] x 10, "answer_type"}]};
  images COCO_{data_subtype}_{image_id:012d}.jpg. Without annotations (test-dev) answers are None. OK-VQA's
  answers carry "raw_answer" (the typed form) beside "answer" (the stemmed one, which is scored).
- TextVQA 0.5.1: {"data": [{"question_id", "question", "image_id", "answers": [10 strings]}]}, images
  {image_id}.jpg; the OCR tokens of the Rosetta file (TextVQA_Rosetta_OCR_v0.2_*.json, {"data": [{"image_id",
  "ocr_tokens"}]}) are joined by image, and used only when asked for.
- VizWiz: [{"image", "question", "answers": [{"answer", "answer_confidence"}], "answer_type", "answerable"}];
  the id is the image name, the challenge's key; "unanswerable" is an answer like any other.
- COCO Karpathy split: {"images": [{"filepath", "filename", "cocoid", "split", "sentences": [{"raw"}]}]}: the
  "test" split is scored and the "train" split is the few-shot pool (as OpenFlamingo's evaluation does).
- NoCaps: the COCO caption format, {"images": [{"id", "file_name", "domain"}], "annotations": [{"image_id",
  "caption"}]}; "domain" (in-domain, near-domain, out-domain) gives the per-domain rows.
- TextCaps 0.1: {"data": [{"image_id", "image_path", "reference_strs"}]}, one entry per caption of an image.
- POPE: JSON lines {"question_id", "image", "text", "label": "yes" | "no"} over COCO val2014 images.

References: VQAv2 (arXiv 1612.00837), OK-VQA (1906.00067), TextVQA (1904.08920), VizWiz (1802.08218), COCO
Captions (1504.00325) and the Karpathy split (1412.2306), NoCaps (1812.08658), TextCaps (2003.12462), POPE
(2305.10355).
"""
from pathlib import Path

from evals.files import image_at, named, need
from errors import BadSample


def vqa_questions(path, doc, images, answers):
    """VQAv2 / OK-VQA questions joined with {question_id: annotation} (None: no annotation file)."""
    subtype = doc.get("data_subtype") or next((s for s in ("train2014", "val2014", "test2015")
                                               if s in Path(path).name), "val2014")
    out = []
    for n, q in enumerate(doc["questions"]):
        where = f"{path}: question {n}"
        with named(where):
            qid, image_id, question = need(q, ("question_id", "image_id", "question"), where)
            name = f"COCO_{subtype}_{int(image_id):012d}.jpg"
            if answers is not None and qid not in answers:
                raise BadSample(where, f"question_id {qid} has no annotation in the annotations file", "no annotation")
            ann = answers.get(qid, {}) if answers is not None else {}
            out.append({"id": qid, "image": image_at(images, [name, f"{subtype}/{name}"], where), "question": question,
                        **vqa_answers(ann)})
    return out


def vqa_answers(ann):
    """The answers of one VQAv2 / OK-VQA annotation and the evaluator its published numbers use: OK-VQA's
    (its answers carry the typed "raw_answer" beside the stemmed "answer"), else OpenFlamingo's."""
    answers = ann.get("answers") or []
    raw = [a["raw_answer"] for a in answers if isinstance(a.get("raw_answer"), str)]
    return {"answers": [a["answer"] for a in answers] or None, "answer_type": ann.get("answer_type"),
            "raw_answers": raw or None, "evaluator": "okvqa" if raw else "openflamingo"}


def vqa_annotations(path, doc):
    """{question_id: annotation}, each checked for its answers."""
    out = {}
    for n, a in enumerate(doc["annotations"]):
        qid, answers = need(a, ("question_id", "answers"), f"{path}: annotation {n}")
        if not answers or not all(isinstance(x, dict) and "answer" in x for x in answers):
            raise BadSample(f"{path}: annotation {n}", "answers must be a list of {'answer': ...}", "bad answers")
        out[qid] = a
    return out


def textvqa(path, doc, images, ocr=()):
    """TextVQA's questions; `ocr`: {image_id: tokens} maps from Rosetta OCR files, joined by image."""
    tokens = {k: v for m in ocr for k, v in m.items()}
    out = []
    for n, q in enumerate(doc["data"]):
        where = f"{path}: record {n}"
        with named(where):
            qid, image_id, question = need(q, ("question_id", "image_id", "question"), where)
            out.append({"id": qid, "question": question, "answers": q.get("answers"), "evaluator": "textvqa",
                        "ocr_tokens": q.get("ocr_tokens", tokens.get(image_id)),
                        "image": image_at(images, [f"{image_id}.jpg", f"train_images/{image_id}.jpg",
                                                   f"test_images/{image_id}.jpg"], where)})
    return out


def ocr_tokens(path, doc):
    """{image_id: OCR tokens} of a TextVQA Rosetta OCR file."""
    out = {}
    for n, r in enumerate(doc["data"]):
        where = f"{path}: record {n}"
        with named(where):
            image_id, tokens = need(r, ("image_id", "ocr_tokens"), where)
            if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                raise BadSample(where, f"ocr_tokens must be a list of strings, not {tokens!r:.60}", "bad record")
            out[image_id] = tokens
    return out


def vizwiz(path, doc, images):
    out = []
    for n, q in enumerate(doc):
        where = f"{path}: record {n}"
        with named(where):
            image, question = need(q, ("image", "question"), where)
            split = image.split("_")[1] if image.count("_") >= 2 else ""  # VizWiz_val_00000000.jpg
            answers = [a["answer"] for a in q["answers"]] if q.get("answers") else None
            out.append({"id": image, "question": question, "answers": answers, "answer_type": q.get("answer_type"),
                        "evaluator": "vizwiz",
                        "image": image_at(images, [image, f"{split}/{image}"] if split else [image], where)})
    return out


def karpathy(path, doc, images, split):
    out = []
    for n, im in enumerate(doc["images"]):
        where = f"{path}: image {n}"
        with named(where):
            if im.get("split") != split:
                continue
            filename, sentences = need(im, ("filename", "sentences"), where)
            out.append({"id": im.get("cocoid", filename), "captions": [s["raw"] for s in sentences],
                        "image": image_at(images, [f"{im['filepath']}/{filename}", filename] if im.get("filepath")
                                                 else [filename], where)})
    return out


def coco_captions(path, doc, images):
    captions = {}
    for n, a in enumerate(doc["annotations"]):
        image_id, caption = need(a, ("image_id", "caption"), f"{path}: annotation {n}")
        captions.setdefault(image_id, []).append(caption)
    out = []
    for n, im in enumerate(doc.get("images", [])):
        where = f"{path}: image {n}"
        with named(where):
            image_id, name = need(im, ("id", "file_name"), where)
            if image_id not in captions and images is None:
                continue  # scoring: an image without captions has nothing to score against
            out.append({"id": image_id, "captions": captions.get(image_id), "domain": im.get("domain"),
                        "image": image_at(images, [name], where)})
    return out


def textcaps(path, doc, images):
    out, seen = [], set()
    for n, c in enumerate(doc["data"]):
        where = f"{path}: record {n}"
        with named(where):
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
        with named(where):
            qid, image, text = need(q, ("question_id", "image", "text"), where)
            label = q.get("label")
            if label not in ("yes", "no", None):
                raise BadSample(where, f"label {label!r} is neither 'yes' nor 'no'", "bad label")
            out.append({"id": qid, "question": text, "label": label,
                        "image": image_at(images, [image, f"val2014/{image}"], where)})
    return out
