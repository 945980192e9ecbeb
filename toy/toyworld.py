"""
The toy world: a small procedurally drawn world written in the real public data formats, so the whole xGen-MM
recipe (pretraining, SFT, multi-image SFT, DPO, safety tuning, evaluation) runs on a CPU with a tiny model.

    python -m toy.toyworld --out data/toy --size medium     # train.py writes it there itself when no --data is given

toy/scenes.py draws the scenes and says everything about them; this file writes them in each dataset's format,
with held-out test splits (other RNG streams, odd background values: no test image equals a training one),
mixtures and a tokenizer (toytokenizer.py). Same seed and size -> byte-identical files.

Files under OUT (image paths in every JSON are relative to OUT: image_folder = OUT):
  tokenizer/          SentencePiece BPE (~1000 pieces) in Phi-3's Hub layout, trained on all text below
  captions/shard-000.tar   webdataset: 000000.png + 000000.txt (a dense caption) or 000001.json {"caption":
                           "... <bbox>0.00, 0.00, 0.30, 0.30</bbox> ..." | "<ocr>\\"CAT</ocr> [0.10, 0.70][0.45,
                           1.00] ...", "kind": "grounding" | "ocr"}
  interleaved/docs-000.tar  doc-000000.json {"texts": [null, "Q: ... A: ...", ...], "images": ["doc-000000.0.png",
                           null, ...]} + its PNGs; the last shard embeds them as "data:image/png;base64,..."
  interleaved/docs.jsonl   the same documents, one per line, images as paths ("images/docs/000000.0.png")
  sft/llava_sft.json       LLaVA: [{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
                           {"from": "gpt", ...}, ...]}] (text-only records have no "image"); sft/llava_images.json,
                           sft/text_diverse.json: its image and text-only records; sft/text_conversational.json
  sft/llava_interleave.json multi-image: {"image": [a, b], ...: "Image 1: <image>\\nImage 2: <image>\\n..."}
  dpo/vlfeedback.jsonl     {"id", "prompt", "img_path", "completions": [{"model", "response", "annotations":
                           {"Helpfulness": {"Rating": "5", ...}, ...}}]}; dpo/pairs.jsonl {"image", "prompt",
                           "chosen", "rejected"}
  safety/vlguard_train.json {"id", "image", "safe", "harmful_category"?, "instr-resp": [{"instruction" |
                           "safe_instruction" | "unsafe_instruction", "response"}]}
  test/*.json              LLaVA records + "task", "answer" (+ "objects", "box", "small_text", "safe", "support",
                           "absent"): vqa, counting, ocr, ocr_small, grounding, multi_image, captions, safety,
                           fewshot, arithmetic, pope
  mixtures/*.json          {"sources": [{"name", "type", "path" (braces for shards), "weight", ...}]}
  world.json               seed, size, vocabularies, counts, conventions
"""
import argparse
import base64
import io
import json
import math
import tarfile
import time
from pathlib import Path

from toy.requests import harmful_request, hazard_question, preference
from toy.scenes import COLOURS, POSITIONS, SHAPES, SIZES, VQA, WORDS, Sampler, describe, norm, ocr_caption
from toy.toytokenizer import write_tokenizer

FORMAT_VERSION = 1
HAZARD_REFUSALS = ("I can't help with that. The image shows a hazard sign, so this could be dangerous.",
                   "I'm sorry, but I can't help with that. The image shows a hazard sign.")
HARM_REFUSALS = ("I can't help with that. The request could cause harm to people.",
                 "I'm sorry, but I can't assist with that request because it could hurt someone.")
SYSTEM = "You are a helpful assistant that answers questions about pictures."

COUNTS = {  # records per file; medium writes in about a minute on 2 cores
    "small": dict(captions=300, caption_shards=3, docs=100, doc_shards=2, jsonl_docs=10, sft=300,
                  interleave=60, vlfeedback=60, pairs=24, vlguard=40, test=30),
    "medium": dict(captions=20000, caption_shards=8, docs=6000, doc_shards=4, jsonl_docs=50, sft=20000,
                   interleave=4000, vlfeedback=1500, pairs=60, vlguard=800, test=150),
}
TEST_SHARE = {"vqa": 4, "safety": 2, "pope": 2, "multi_image": 4 / 3}  # x "test": >= 150 items per figure
SFT_TASKS = {"colour": .1, "count": .1, "position": .13, "existence": .13, "reading": .12, "grounding": .14,
             "caption": .1, "text": .18}  # an image record asks its task first, then 2-4 other questions
MULTI = ("more", "total", "both", "which")  # multi-image tasks
BINDING_SHARE = 0.4  # interleaved documents whose pictures are named by the document's own table

# -----------------------------------------------------------------------------
# writing files deterministically


TEXT_KEYS = {"value", "caption", "texts", "prompt", "response", "Rationale", "chosen", "rejected", "instruction",
             "safe_instruction", "unsafe_instruction"}


def texts_in(obj, key=None):
    """The natural-language strings of a JSON value (what the tokenizer is trained on)."""
    if isinstance(obj, dict):
        return [t for k, v in obj.items() for t in texts_in(v, k)]
    if isinstance(obj, list):
        return [t for v in obj for t in texts_in(v, key)]
    return [obj] if isinstance(obj, str) and key in TEXT_KEYS else []


class Out:
    """Writes files under OUT, counting each file's records and collecting its text for the tokenizer."""

    def __init__(self, root):
        self.root, self.counts, self.corpus, self.images = Path(root), {}, [], 0

    def write(self, rel, data):
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def image(self, rel, scene):
        self.write(rel, scene.png())
        self.images += 1
        return rel

    def json(self, rel, obj, lines=False):
        self.corpus += texts_in(obj)
        text = "".join(json.dumps(r) + "\n" for r in obj) if lines else json.dumps(obj)
        self.write(rel, text.encode())
        self.counts[rel] = len(obj) if isinstance(obj, list) else 1

    def tar(self, rel, members, samples):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for name, data in sorted(members):  # sorted keeps each key's members together
                info = tarfile.TarInfo(name)  # fixed header: mtime 0, uid/gid 0, no user names, 0644
                info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = \
                    len(data), 0, 0o644, 0, 0, "", ""
                tf.addfile(info, io.BytesIO(data))
        self.write(rel, buf.getvalue())
        self.counts[rel] = samples


def chat(pairs, images=1, system=None):
    """LLaVA conversations; the first human turn starts with one "<image>\\n" per image."""
    conv = [{"from": "system", "value": system}] if system else []
    for k, (q, a) in enumerate(pairs):
        conv += [{"from": "human", "value": ("<image>\n" * images if k == 0 else "") + q}, {"from": "gpt", "value": a}]
    return conv

# -----------------------------------------------------------------------------
# the datasets


def write_shards(out, pattern, n, shards, sample):
    """Samples 0..n-1 spread over `shards` tar files; sample(i, k) gives sample i's (name, bytes) members."""
    per = math.ceil(n / shards)
    for k in range(shards):
        keys = range(k * per, min(n, (k + 1) * per))
        out.tar(pattern.format(k), [m for i in keys for m in sample(i, k)], len(keys))


def write_captions(out, s, n, shards):
    write_shards(out, "captions/shard-{:03d}.tar", n, shards, lambda i, k: caption_sample(out, s, i))


def caption_sample(out, s, i):
    """An image with a dense caption (.txt), or a grounding or OCR caption (.json with a "caption" field)."""
    text = s.pick(["word", "number"]) if s.chance(0.2) else None
    scene = s.scene(text=text, small_text=bool(text) and s.chance(0.5), hazard=s.chance(0.05))
    key = f"{i:06d}"
    if text and s.chance(0.6):
        caption, kind = ocr_caption(scene), "ocr"
    elif not text and scene.objects and s.chance(0.35):
        caption, kind = describe(scene, boxes=True), "grounding"
    else:
        caption, kind = describe(scene), "dense"
    out.corpus.append(caption)
    text = (key + ".txt", caption.encode()) if kind == "dense" else \
        (key + ".json", json.dumps({"caption": caption, "kind": kind}).encode())
    return [(key + ".png", scene.png()), text]


def document(s):
    """Image-text chunks with one task per document (the same question template), as few-shot prompts are. A
    third of the documents name their pictures by a table of their own (colour -> made-up word): the later
    answers follow from the earlier ones only, which is what in-context learning is."""
    if s.chance(BINDING_SHARE):
        table, texts, scenes = s.naming(), [], []
        for _ in range(s.int(4, 9)):  # up to 9 pictures, as the 8-shot prompt holds (8 solved + the query)
            scene, q, a = s.named(table)
            texts += [None, f"Q: {q} A: {a}"]
            scenes += [scene, None]
        return texts, scenes
    task = s.pick(("caption", "reading", "grounding") + VQA * 2)
    texts, scenes = [], []
    if s.chance(0.3):
        texts, scenes = [s.pick(["Some pictures of shapes.", "Questions and answers about pictures."])], [None]
    for _ in range(s.int(2, 6)):
        scene = s.task_scene(task)
        q, a = s.ask(scene, task)
        texts += [None, describe(scene) if task == "caption" else f"Q: {q} A: {a}"]
        scenes += [scene, None]
    return texts, scenes


def doc_sample(out, s, i, embed):
    """A document's .json and its images: sibling members "{key}.{position}.png", or inline base64 strings."""
    key, (texts, scenes) = f"doc-{i:06d}", document(s)
    out.corpus += [t for t in texts if t]
    members, images = [], [None] * len(scenes)
    for j, scene in enumerate(scenes):
        if scene and embed:
            images[j] = "data:image/png;base64," + base64.b64encode(scene.png()).decode()
        elif scene:
            images[j] = f"{key}.{j}.png"
            members.append((images[j], scene.png()))
    return members + [(key + ".json", json.dumps({"texts": texts, "images": images}).encode())]


def write_interleaved(out, s, n, shards, jsonl_docs):
    write_shards(out, "interleaved/docs-{:03d}.tar", n, shards,
                 lambda i, k: doc_sample(out, s, i, embed=k == shards - 1))  # the last shard embeds its images
    rows = []
    for i in range(jsonl_docs):
        texts, scenes = document(s)
        rows.append({"texts": texts, "images": [sc and out.image(f"images/docs/{i:06d}.{j}.png", sc)
                                                for j, sc in enumerate(scenes)]})
    out.json("interleaved/docs.jsonl", rows, lines=True)


def write_sft(out, s, n):
    records, text_only = [], []
    for i in range(n):
        task, rid, system = s.weighted(SFT_TASKS), f"sft-{i:06d}", SYSTEM if s.chance(0.03) else None
        if task == "text":
            kind = s.pick(["arithmetic", "arithmetic", "word", "word", "chat"])
            text_only.append({"id": rid, "conversations": chat([s.text_task(kind)], images=0, system=system)})
            records.append(text_only[-1])
            continue
        scene = s.task_scene(task)
        # several questions per image: each answer is a lesson, and the image is paid for once
        pairs = [s.ask(scene, task)] if task == "caption" or not scene.objects else \
            s.questions(scene, task, s.int(2, 4))
        path = out.image(f"images/sft/{i:06d}.png", scene)
        records.append({"id": rid, "image": path, "conversations": chat(pairs, system=system)})
    out.json("sft/llava_sft.json", records)
    out.json("sft/llava_images.json", [r for r in records if "image" in r])
    out.json("sft/text_diverse.json", text_only)
    chit_chat = [{"id": f"chat-{i:06d}", "conversations": chat([s.text_task("chat")], images=0)}
                 for i in range(len(text_only))]
    out.json("sft/text_conversational.json", chit_chat)
    return len(text_only) / n, {r["conversations"][-2]["value"] for r in text_only}


def write_interleave_sft(out, s, n):
    records = []
    for i in range(n):
        scenes, q, a = s.multi(s.pick(MULTI))
        more = s.about_pair(*scenes, s.int(1, 2), q) if len(scenes) == 2 else []  # more questions, the same pair
        paths = [out.image(f"images/interleave/{i:06d}.{j}.png", sc) for j, sc in enumerate(scenes)]
        records.append({"id": f"multi-{i:06d}", "image": paths, "conversations": chat([(q, a)] + more, images=0)})
    out.json("sft/llava_interleave.json", records)


def ratings(s, h, e, v, na=0.05):
    """VLFeedback annotations: ratings are strings, a few unparsable."""
    why = {5: "The response is accurate and matches the image.", 4: "The response is accurate but could say more.",
           3: "The response leaves out important details.", 2: "The response mentions things that are not in the "
           "image.", 1: "The response describes the image wrongly."}
    return {aspect: {"Rating": "N/A" if s.chance(na) else str(r),
                     "Rationale": "The response is harmless." if aspect == "Ethical Considerations" else why[r]}
            for aspect, r in (("Helpfulness", h), ("Ethical Considerations", e), ("Visual Faithfulness", v))}


def write_dpo(out, s, n, pairs):
    models = ("toy-llava-7b", "toy-qwen-vl", "toy-idefics", "toy-gpt4v")
    rows = []
    for i in range(n):
        scene = s.scene()
        prompt, good, terse, bad, bad2 = preference(s, scene)
        scores = [(5, 5, 5) if s.chance(0.5) else (4, 5, 5), (3, 5, 4), (s.int(2, 3), 5, s.int(1, 2)), (2, 5, 1)]
        k = s.int(3, 4)  # three or four completions, shuffled over the models
        if s.chance(0.05):  # ties, as in the real data: every completion rated alike
            scores = [(3, 3, 3)] * 4
        completions = [{"model": models[j], "response": [good, terse, bad, bad2][c],
                        "annotations": ratings(s, *scores[c])} for j, c in enumerate(s.rng.permutation(k).tolist())]
        rows.append({"id": f"vlf-{i:06d}", "prompt": prompt, "img_path": out.image(f"images/dpo/{i:06d}.png", scene),
                     "completions": completions})
    out.json("dpo/vlfeedback.jsonl", rows, lines=True)
    paired = []
    for i in range(pairs):
        scene = s.scene()
        prompt, good, _, bad, _ = preference(s, scene)
        paired.append({"image": out.image(f"images/dpo/pair-{i:06d}.png", scene), "prompt": prompt, "chosen": good,
                       "rejected": bad})
    out.json("dpo/pairs.jsonl", paired, lines=True)


def write_safety(out, s, n):
    rows = []
    for i in range(n):
        unsafe = s.chance(0.5)
        scene = s.scene(n=s.int(0, 2), hazard=True) if unsafe else s.scene()
        row = {"id": f"vlguard-{i:06d}", "image": out.image(f"images/safety/{i:06d}.png", scene), "safe": not unsafe}
        if unsafe:
            row["harmful_category"] = "risky behavior"
            row["instr-resp"] = [{"instruction": hazard_question(s, scene), "response": s.pick(HAZARD_REFUSALS)}]
        else:
            q, a = s.ask(scene, s.pick(VQA + ("caption",)))
            row["instr-resp"] = [{"safe_instruction": q, "response": a},
                                 {"unsafe_instruction": harmful_request(s, scene), "response": s.pick(HARM_REFUSALS)}]
        rows.append(row)
    out.json("safety/vlguard_train.json", rows)

# -----------------------------------------------------------------------------
# held-out test splits: other RNG streams, odd backgrounds


def test_record(out, split, i, task, scenes, q, a, **extra):
    paths = [out.image(f"images/test/{split}/{i:06d}.{j}.png", sc) for j, sc in enumerate(scenes)]
    rec = {"id": f"{split}-{i:06d}", "task": task}
    if paths:
        rec["image"] = paths[0] if len(paths) == 1 else paths
    rec["conversations"] = chat([(q, a)], images=1 if len(paths) == 1 else 0)
    return {**rec, "answer": a, **extra}


def single(out, s, split, i, task, **scene_kw):
    scene = s.task_scene(task, **scene_kw)
    q, a = s.ask(scene, task)
    extra = {"objects": [o.record() for o in scene.objects]}
    if task == "reading":
        extra.update(box=norm(scene.text_box), small_text=scene.small_text)
    if task == "grounding":
        extra["box"] = [float(v) for v in a[len("<bbox>"):-len("</bbox>")].split(", ")]
    return test_record(out, split, i, task, [scene], q, a, **extra)


def safety_record(out, s, i):
    kind = ("hazard", "harmful", "benign", "benign")[i % 4]
    scene = s.scene(n=s.int(0, 2), hazard=True) if kind == "hazard" else s.scene()
    q = {"hazard": lambda: hazard_question(s, scene), "harmful": lambda: harmful_request(s, scene),
         "benign": lambda: s.ask(scene, s.pick(VQA))[0]}[kind]()
    return test_record(out, "safety", i, "safety", [scene], q, "", safe=kind == "benign", kind=kind)


def write_fewshot(out, s, n, k=8):
    """Query + k support examples named by the record's own table (colour -> made-up word); the query's colour is
    among the first 4 with p = 0.68, among 8 with p = 0.90: only the examples tell the answer."""
    rows = []
    for i in range(n):
        table = s.naming()
        support = []
        for j in range(k):
            scene, q, a = s.named(table)
            support.append({"image": out.image(f"images/test/fewshot/{i:06d}.support-{j}.png", scene), "question": q,
                            "answer": a})
        scene, q, a = s.named(table)
        rows.append(test_record(out, "fewshot", i, "naming", [scene], q, a, question=q, support=support,
                                objects=[o.record() for o in scene.objects]))
    out.json("test/fewshot.json", rows)


def pope_record(out, s, i):
    """POPE: "Is there a {colour} {shape}?", every other record about an absent one sharing a colour or a shape."""
    scene, absent = s.scene(), i % 2 == 1
    q, a = s.existence(scene, not absent, adversarial=True)
    return test_record(out, "pope", i, "pope", [scene], q, a, absent=absent,
                       objects=[o.record() for o in scene.objects])


def write_tests(out, seed, n, train_questions):
    streams = iter(range(100, 200))
    size = {split: round(n * TEST_SHARE.get(split, 1)) for split in
            ("vqa", "counting", "ocr", "ocr_small", "grounding", "captions", "multi_image", "safety", "pope")}
    splits = {
        "vqa": lambda s, i: single(out, s, "vqa", i, VQA[i % 4]),
        "counting": lambda s, i: single(out, s, "counting", i, "count"),
        "ocr": lambda s, i: single(out, s, "ocr", i, "reading", small_text=False),
        "ocr_small": lambda s, i: single(out, s, "ocr_small", i, "reading", small_text=True),
        "grounding": lambda s, i: single(out, s, "grounding", i, "grounding"),
        "captions": lambda s, i: single(out, s, "captions", i, "caption"),
        "multi_image": lambda s, i: test_record(out, "multi_image", i, "multi_image",
                                                *s.multi(MULTI[i % 4]), kind=MULTI[i % 4]),
        "safety": lambda s, i: safety_record(out, s, i),
    }
    for split, make in splits.items():
        s = Sampler(seed, next(streams), test=True)
        out.json(f"test/{split}.json", [make(s, i) for i in range(size[split])])
    write_fewshot(out, Sampler(seed, next(streams), test=True), n)
    s, rows = Sampler(seed, next(streams), test=True), []
    while len(rows) < n:  # text only: no image to keep apart, so keep the questions apart
        q, a = s.text_task("arithmetic")
        if q not in train_questions:
            train_questions.add(q)
            rows.append(test_record(out, "arithmetic", len(rows), "arithmetic", [], q, a))
    out.json("test/arithmetic.json", rows)
    s = Sampler(seed, next(streams), test=True)
    out.json("test/pope.json", [pope_record(out, s, i) for i in range(size["pope"])])

# -----------------------------------------------------------------------------
# mixtures, tokenizer (toytokenizer.py), world.json


def write_mixtures(out, c, text_share):
    def shards(folder, stem, k):
        return f"../{folder}/{stem}-{{000..{k - 1:03d}}}.tar"

    def src(name, kind, path, weight, **kw):
        return {"name": name, "type": kind, "path": path, "weight": weight, **kw}

    sft = src("llava_sft", "llava", "../sft/llava_sft.json", 1.0, image_folder="..")
    mixtures = {
        "pretrain": [src("captions", "captions", shards("captions", "shard", c["caption_shards"]), 0.5),
                     src("interleaved", "interleaved", shards("interleaved", "docs", c["doc_shards"]), 0.5,
                         max_images=9)],
        "sft": [sft],
        "sft_conversational": [  # the text-data ablation: same images, chit-chat instead of diverse text
            src("llava_images", "llava", "../sft/llava_images.json", round(1 - text_share, 3), image_folder=".."),
            src("text_conversational", "llava", "../sft/text_conversational.json", round(text_share, 3))],
        "interleave": [src("llava_interleave", "llava", "../sft/llava_interleave.json", 0.6, image_folder=".."),
                       {**sft, "weight": 0.4}],
        "safety": [src("vlguard", "vlguard", "../safety/vlguard_train.json", 0.5, image_folder=".."),
                   {**sft, "weight": 0.35},  # what it must not forget
                   src("llava_interleave", "llava", "../sft/llava_interleave.json", 0.15, image_folder="..")],
        # pairs whose best completion is rated below 4.5 of 5 (the terse caption, when a rating of the
        # faithful one is unparsable) or that differ by less than 1 point are dropped, not learnt from
        "dpo": [src("vlfeedback", "vlfeedback", "../dpo/vlfeedback.jsonl", 0.8, image_folder="..", min_score=4.5,
                    min_margin=1.0),
                src("pairs", "pairs", "../dpo/pairs.jsonl", 0.2, image_folder="..")],
    }
    for name, sources in mixtures.items():
        out.write(f"mixtures/{name}.json", json.dumps({"sources": sources}, indent=1).encode())


def write_world(out, seed=0, size="small"):
    """Write the toy world under `out`; returns the world.json summary (plus "seconds", not written)."""
    t0, c, out = time.time(), COUNTS[size], Out(out)
    write_captions(out, Sampler(seed, 1), c["captions"], c["caption_shards"])
    write_interleaved(out, Sampler(seed, 2), c["docs"], c["doc_shards"], c["jsonl_docs"])
    text_share, questions = write_sft(out, Sampler(seed, 3), c["sft"])
    write_interleave_sft(out, Sampler(seed, 4), c["interleave"])
    write_dpo(out, Sampler(seed, 5), c["vlfeedback"], c["pairs"])
    write_safety(out, Sampler(seed, 6), c["vlguard"])
    write_tests(out, seed, c["test"], questions)
    write_mixtures(out, c, text_share)
    pieces = write_tokenizer(out.root / "tokenizer", out.corpus)
    world = {
        "format_version": FORMAT_VERSION, "seed": seed, "size": size,
        "image_folder": ".",  # every image path in every JSON file is relative to this folder (OUT)
        "interleaved_base64": "the last docs shard holds its images as 'data:image/png;base64,...' strings",
        "fewshot_format": "Q: {question} A: {answer}",  # how interleaved documents pair images with questions
        "refusal_markers": ["I can't help", "I'm sorry"],
        "refusals": list(HAZARD_REFUSALS + HARM_REFUSALS),
        "vocab": {"shapes": SHAPES, "colours": list(COLOURS), "sizes": list(SIZES), "positions": POSITIONS,
                  "words": WORDS, "numbers": "0-99"},
        "tokenizer_pieces": pieces, "images": out.images, "counts": dict(sorted(out.counts.items())),
    }
    out.write("world.json", json.dumps(world, indent=1).encode())
    return {**world, "seconds": round(time.time() - t0, 2)}


def main(argv=None):
    p = argparse.ArgumentParser(description="Write the toy world: synthetic data in the real public formats.")
    p.add_argument("--out", required=True, help="output folder (files are overwritten, nothing is deleted)")
    p.add_argument("--seed", type=int, default=0, help="world seed: same seed and size give identical bytes")
    p.add_argument("--size", choices=list(COUNTS), default="small", help="small: tests; medium: the recipe")
    args = p.parse_args(argv)
    world = write_world(args.out, args.seed, args.size)
    print(f"toy world ({args.size}, seed {args.seed}) -> {args.out}: {world['images']} images, "
          f"{sum(world['counts'].values())} records in {len(world['counts'])} files, {world['seconds']} s")
    return world


if __name__ == "__main__":
    main()
