"""The public benchmarks: evals/readers.py on small files in each official format, `eval.py score` and
`eval.py run` end to end on a tiny random checkpoint (resume and bad input included). The metrics against
the official evaluators' rules: tests/test_official_metrics.py."""
import base64
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import eval as ev
import model
from evals import metrics, prompts, readers, rices
from evals import run as evals_run
from reference import write_tokenizer
from tokenizer import chat_prompt

# -----------------------------------------------------------------------------
# small files in each official format


def picture(seed, size=(40, 30)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def save(img, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def jpeg_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def dump(path, obj, lines=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(o) for o in obj) + "\n" if lines else json.dumps(obj))
    return path


TEN = lambda *a: [{"answer": x, "answer_confidence": "yes", "answer_id": i + 1} for i, x in enumerate(a * 10)][:10]


def write_benchmarks(d):
    """Each benchmark's files as released, three or four records each, with real (tiny) images."""
    f = {}
    for i, split in [(1, "val2014"), (2, "val2014"), (3, "train2014"), (4, "train2014"), (5, "train2014")]:
        save(picture(i), d / "coco" / split / f"COCO_{split}_{i:012d}.jpg")
    # VQAv2 / OK-VQA: questions + annotations (+ the train split, for demonstrations)
    for split, ids in [("val2014", (1, 2)), ("train2014", (3, 4, 5))]:
        qs = [{"image_id": i, "question": f"What is in picture {i}?", "question_id": i * 10 + k} for i in ids
              for k in range(2)]
        f[f"vqa_q_{split}"] = dump(d / "vqav2" / f"v2_OpenEnded_mscoco_{split}_questions.json",
                                   {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
                                    "data_subtype": split, "questions": qs})
        anns = [{"question_id": q["question_id"], "image_id": q["image_id"], "question_type": "what is",
                 "answer_type": ["other", "yes/no"][q["question_id"] % 2], "multiple_choice_answer": "cat",
                 "answers": TEN("cat", "a cat", "dog")} for q in qs]
        f[f"vqa_a_{split}"] = dump(d / "vqav2" / f"v2_mscoco_{split}_annotations.json",
                                   {"info": {}, "data_subtype": split, "annotations": anns})
    # TextVQA 0.5.1
    for i in range(3):
        save(picture(10 + i), d / "textvqa" / "train_images" / f"{i:016x}.jpg")
    f["textvqa"] = dump(d / "textvqa" / "TextVQA_0.5.1_val.json", {
        "dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": [
            {"question": "what does the sign say?", "image_id": f"{i:016x}", "image_classes": ["Sign"],
             "image_width": 40, "image_height": 30, "answers": ["stop"] * 9 + ["halt"], "question_tokens": ["what"],
             "question_id": 34602 + i, "set_name": "val", "ocr_tokens": ["stop", "ahead"]} for i in range(3)]})
    # VizWiz
    for i in range(3):
        save(picture(20 + i), d / "vizwiz" / "val" / f"VizWiz_val_{i:08d}.jpg")
    f["vizwiz"] = dump(d / "vizwiz" / "val.json", [
        {"image": f"VizWiz_val_{i:08d}.jpg", "question": "What is this?", "answerable": int(i > 0),
         "answer_type": "unanswerable" if i == 0 else "other",
         "answers": [{"answer": "unanswerable" if i == 0 else "soup", "answer_confidence": "yes"}] * 10}
        for i in range(3)])
    # COCO Karpathy split (test + train in one file, images under their filepath)
    f["karpathy"] = dump(d / "coco" / "dataset_coco.json", {"dataset": "coco", "images": [
        {"filepath": split, "filename": f"COCO_{split}_{i:012d}.jpg", "cocoid": i, "imgid": i,
         "split": "test" if split == "val2014" else "train", "sentids": [0, 1],
         "sentences": [{"raw": f"A picture number {i}.", "tokens": ["a"]}, {"raw": "Some noise.", "tokens": ["x"]}]}
        for i, split in [(1, "val2014"), (2, "val2014"), (3, "train2014"), (4, "train2014"), (5, "train2014")]]})
    # NoCaps (the COCO caption format)
    for i in range(3):
        save(picture(30 + i), d / "nocaps" / "val" / f"{i:016x}.jpg")
    f["nocaps"] = dump(d / "nocaps" / "nocaps_val_4500_captions.json", {
        "licenses": [], "info": {"version": "0.1"},
        "images": [{"id": i, "open_images_id": f"{i:016x}", "file_name": f"{i:016x}.jpg", "domain": "in-domain",
                    "height": 30, "width": 40} for i in range(3)],
        "annotations": [{"image_id": i, "id": 10 * i + k, "caption": f"a thing {k}"}
                        for i in range(3) for k in range(2)]})
    # TextCaps 0.1: one entry per caption, each with all references
    for i in range(2):
        save(picture(40 + i), d / "textcaps" / "train_images" / f"{i:016x}.jpg")
    f["textcaps"] = dump(d / "textcaps" / "TextCaps_0.1_val.json", {"dataset_type": "val", "data": [
        {"image_id": f"{i:016x}", "image_path": f"train_images/{i:016x}.jpg", "caption_id": 2 * i + k,
         "caption_str": f"a sign {k}", "reference_strs": ["a sign 0", "a sign 1"], "set_name": "val"}
        for i in range(2) for k in range(2)]})
    # POPE: JSON lines over COCO val2014 images
    f["pope"] = dump(d / "pope" / "coco_pope_random.json", [
        {"question_id": q, "image": f"COCO_val2014_{1 + q // 2:012d}.jpg", "text": "Is there a cat in the image?",
         "label": "yes" if q % 2 == 0 else "no"} for q in range(4)], lines=True)
    # an MMBench-layout TSV: base64 images, a row that points to another row's image
    head = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
            "l2-category", "comment", "split"]
    image = base64.b64encode(jpeg_bytes(picture(50))).decode()
    rows = [[0, "What colour is it?", "nan", "red", "green", "blue", "nan", "B", "attribute", image, "x", "c", "", "dev"],
            [1, '"Which one?\nPick one."', "Look closely.", "cat", "dog", "cow", "pig", "D", "object", image, "x",
             "c", "", "dev"],  # pandas quotes a cell that holds a newline
            [2, "Same picture?", "nan", "yes", "no", "nan", "nan", "A", "object", "0", "x", "c", "", "dev"]]
    f["mmbench"] = d / "mmbench" / "MMBench_DEV_EN.tsv"
    f["mmbench"].parent.mkdir(parents=True)
    f["mmbench"].write_text("\n".join("\t".join(map(str, r)) for r in [head] + rows) + "\n")
    # SEED-Bench: image questions (and a video one, skipped)
    for i in range(2):
        save(picture(60 + i), d / "seed" / "SEED-Bench-image" / f"{i}_{i}.jpg")
    f["seed"] = dump(d / "seed" / "SEED-Bench.json", {"question_type": {"Scene Understanding": 1,
                                                                        "Action Recognition": 10}, "questions": [
        {"answer": "A", "choice_a": "One", "choice_b": "Two", "choice_c": "Three", "choice_d": "Four",
         "data_id": f"{i}_{i}.jpg", "data_type": "image", "question": "How many?", "question_id": str(101669 + i),
         "question_type_id": 1} for i in range(2)] + [
        {"answer": "B", "choice_a": "x", "choice_b": "y", "choice_c": "z", "choice_d": "w", "data_id": "v.mp4",
         "data_type": "video", "question": "What happens?", "question_id": "9", "question_type_id": 10}]})
    # ScienceQA problems.json: IMG = test questions with an image
    problems = {}
    for pid, split, image in [("1", "test", "image.png"), ("2", "test", None), ("3", "test", "image.png"),
                              ("4", "train", "image.png"), ("5", "train", "image.png"), ("6", "train", "image.png")]:
        problems[pid] = {"question": "Which is a mammal?", "choices": ["frog", "whale", "shark"], "answer": 1,
                         "hint": "Think." if pid == "1" else "", "image": image, "task": "closed choice",
                         "subject": "natural science", "split": split, "lecture": "", "solution": ""}
        if image:
            save(picture(70 + int(pid)), d / "scienceqa" / "images" / split / pid / image)
    f["scienceqa"] = dump(d / "scienceqa" / "problems.json", problems)
    # AI2D: the release's folder
    for i in range(2):
        save(picture(80 + i).convert("RGB"), d / "ai2d" / "images" / f"{i}.png")
        dump(d / "ai2d" / "questions" / f"{i}.png.json", {"imageName": f"{i}.png", "questions": {
            f"What is shown in {i}?": {"abcLabel": False, "answerTexts": ["sun", "moon", "earth", "mars"],
                                       "correctAnswer": 2, "questionId": f"{i}.png-0"}}})
    return f


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    f = write_benchmarks(d)
    (d / "tok").mkdir()
    write_tokenizer(d / "tok")
    model.XGenMM.from_tokenizer(d / "tok").save_pretrained(d / "ckpt")
    f["root"], f["ckpt"] = d, d / "ckpt"
    return f


def test_readers_read_each_format(files):
    d = files["root"]
    fmt, rs = readers.load([files["vqa_q_val2014"], files["vqa_a_val2014"]], d / "coco")
    assert fmt == "vqa-questions" and [r["id"] for r in rs] == [10, 11, 20, 21]
    assert rs[0]["image"] == d / "coco" / "val2014" / "COCO_val2014_000000000001.jpg"
    assert rs[0]["answers"][:3] == ["cat", "a cat", "dog"] and len(rs[0]["answers"]) == 10
    fmt, rs = readers.load([files["vqa_q_val2014"]], d / "coco")  # test-dev: no annotations
    assert rs[0]["answers"] is None
    fmt, rs = readers.load([files["vqa_a_val2014"]])  # scoring reads the annotations alone
    assert fmt == "vqa-annotations" and rs[1]["answer_type"] == "yes/no"
    fmt, rs = readers.load([files["textvqa"]], d / "textvqa")
    assert fmt == "textvqa" and rs[0]["id"] == 34602 and rs[0]["ocr_tokens"] == ["stop", "ahead"]
    fmt, rs = readers.load([files["vizwiz"]], d / "vizwiz")
    assert fmt == "vizwiz" and rs[0]["id"] == "VizWiz_val_00000000.jpg" and rs[0]["answers"][0] == "unanswerable"
    fmt, rs = readers.load([files["karpathy"]], d / "coco")
    assert fmt == "karpathy" and [r["id"] for r in rs] == [1, 2] and rs[0]["captions"][0] == "A picture number 1."
    assert [r["id"] for r in readers.load([files["karpathy"]], d / "coco", split="train")[1]] == [3, 4, 5]
    fmt, rs = readers.load([files["nocaps"]], d / "nocaps" / "val")
    assert fmt == "coco-captions" and rs[2]["captions"] == ["a thing 0", "a thing 1"]
    fmt, rs = readers.load([files["textcaps"]], d / "textcaps")
    assert fmt == "textcaps" and len(rs) == 2 and rs[1]["captions"] == ["a sign 0", "a sign 1"]
    fmt, rs = readers.load([files["pope"]], d / "coco")
    assert fmt == "pope" and [r["label"] for r in rs] == ["yes", "no", "yes", "no"]
    fmt, rs = readers.load([files["mmbench"]], d)
    assert fmt == "mmbench" and rs[0]["options"] == {"A": "red", "B": "green", "C": "blue"} and rs[0]["hint"] == ""
    assert rs[0]["category"] == "attribute" and rs[0]["l2_category"] == "c"
    assert rs[1]["hint"] == "Look closely." and rs[1]["question"] == "Which one?\nPick one."
    assert rs[2]["image"] == rs[0]["image"]  # the short cell names row 0
    assert Image.open(io.BytesIO(rs[2]["image"])).size == (40, 30)
    fmt, rs = readers.load([files["seed"]], d / "seed")
    assert fmt == "seed" and len(rs) == 2 and rs[0]["category"] == "Scene Understanding"
    fmt, rs = readers.load([files["scienceqa"]], d / "scienceqa" / "images")
    assert fmt == "scienceqa" and [r["id"] for r in rs] == ["1", "3"] and rs[0]["answer"] == "B"
    fmt, rs = readers.load([d / "ai2d"], d)
    assert fmt == "ai2d" and rs[0]["answer"] == "C" and rs[0]["image"] == d / "ai2d" / "images" / "0.png"
    keep = d / "ai2d_test_ids.txt"
    keep.write_text("1\n")
    assert [r["id"] for r in readers.load([d / "ai2d", keep], d)[1]] == ["1.png-0"]

def test_each_benchmark_scores_by_its_own_evaluator(files):
    ok = json.loads(files["vqa_a_val2014"].read_text())
    for a in ok["annotations"]:  # OK-VQA's annotations: the typed answer beside the stemmed one
        a["answers"] = [{**x, "raw_answer": x["answer"]} for x in a["answers"]]
    expect = {"vqa_a_val2014": "openflamingo", "textvqa": "textvqa", "vizwiz": "vizwiz",
              "okvqa": "okvqa"}
    files = {**files, "okvqa": dump(files["root"] / "okvqa" / "mscoco_val2014_annotations.json", ok)}
    for name, rule in expect.items():
        records = readers.load([files[name]])[1]
        said = {str(r["id"]): r["answers"][0] for r in records}
        assert metrics.score("vqa", records, said)["metric"] == rule, name


def test_released_files_as_downloaded(capsys, files, tmp_path):
    """POPE's answer files (no ids: matched by line), AI2D's ai2d_test_ids.csv, SEED-Bench-2's "Single Image",
    TextVQA's Rosetta OCR file, NoCaps' domains, a prediction null."""
    d = files["root"]
    questions = [r["question"] for r in readers.load([files["pope"]])[1]]
    pope = dump(tmp_path / "answer.json", [{"question": q.lower(), "answer": a} for q, a in
                                           zip(questions, ["Yes, there is.", "No.", "no", "no"])], lines=True)
    code, out, _ = call(capsys, "score", "--task", "pope", "--predictions", pope, "--references", files["pope"])
    got = json.loads(out)
    assert code == 0 and got["accuracy"] == 0.75 and got["metric"] == "POPE evaluate.py"
    short = dump(tmp_path / "short.json", [{"question": questions[0], "answer": "yes"}], lines=True)
    code, _, errors = call(capsys, "score", "--task", "pope", "--predictions", short, "--references", files["pope"])
    assert code == 2 and "1 answers by line for 4 questions" in errors[0]
    other = dump(tmp_path / "other.json", [{"question": "Is there a dog?", "answer": "yes"}] * 4, lines=True)
    code, _, errors = call(capsys, "score", "--task", "pope", "--predictions", other, "--references", files["pope"])
    assert code == 2 and "other.json:1" in errors[0] and "question file's order" in errors[0]
    ids = d / "ai2d_test_ids.csv"
    ids.write_text("1\n")
    assert [r["id"] for r in readers.load([d / "ai2d", ids], d)[1]] == ["1.png-0"]
    seed2 = json.loads(files["seed"].read_text())
    for q in seed2["questions"]:
        q["data_type"] = {"image": "Single Image", "video": "Multiple Images"}[q["data_type"]]
    assert len(readers.load([dump(d / "seed" / "SEED-Bench_v2.json", seed2)], d / "seed")[1]) == 2
    ocr = dump(tmp_path / "TextVQA_Rosetta_OCR_v0.2_val.json", {"dataset_name": "textvqa", "data": [
        {"image_id": f"{i:016x}", "ocr_tokens": ["exit", str(i)], "ocr_info": []} for i in range(3)]})
    plain = json.loads(files["textvqa"].read_text())
    for q in plain["data"]:
        del q["ocr_tokens"]
    fmt, rs = readers.load([dump(tmp_path / "TextVQA_0.5.1_val.json", plain), ocr], d / "textvqa")
    assert fmt == "textvqa" and [r["ocr_tokens"] for r in rs] == [["exit", "0"], ["exit", "1"], ["exit", "2"]]
    assert readers.load([files["nocaps"]])[1][0]["domain"] == "in-domain"
    null = dump(tmp_path / "null.json", [{"question_id": q, "answer": None if q == 10 else "cat"} for q in (10, 11, 20, 21)])
    assert readers.read_predictions(null)["10"] == ""  # not the string 'None', which normalises to '0'

# -----------------------------------------------------------------------------
# prompts: the paper's few-shot documents, the chat template


def vqa_record(i, image="q.jpg"):
    return {"id": i, "image": image, "question": f"What is {i}?", "answers": [f"thing {i}"] * 10}


def test_plain_few_shot_documents():
    pool = prompts.query_set([vqa_record(i, f"d{i}.jpg") for i in range(50)], seed=0)
    q = prompts.build(vqa_record(99), "vqa", "plain", shots=4, demos=pool)
    chunks = q.prompt.split("\n")
    assert len(chunks) == 5 and q.prompt.count("<image>") == 5 and len(q.images) == 5 and q.images[-1] == "q.jpg"
    for chunk, image in zip(chunks[:4], q.images):  # each demonstration: its image, question and first answer
        i = int(image[1:-4])
        assert chunk == f"<image>Question:What is {i}? Short answer:thing {i}<|endofchunk|>"
    assert chunks[4] == "<image>Question:What is 99? Short answer:" and q.max_new == 5
    again = prompts.build(vqa_record(99), "vqa", "plain", shots=4, demos=pool)
    other = prompts.build(vqa_record(98), "vqa", "plain", shots=4, demos=pool)
    assert again.prompt == q.prompt and other.images != q.images  # drawn per record, reproducibly
    zero = prompts.build(vqa_record(99), "vqa", "plain", shots=0, demos=pool)  # 2 demonstrations, text only
    assert zero.prompt.count("<image>") == 1 and zero.images == ["q.jpg"] and zero.prompt.count("<|endofchunk|>") == 2
    assert zero.prompt.startswith("Question:What is ")
    bare = prompts.build(vqa_record(99), "vqa", "plain", shots=0)  # no training split given
    assert bare.prompt == "<image>Question:What is 99? Short answer:"
    cap = prompts.build({"id": 1, "image": "c.jpg", "captions": [" A cat. "]}, "caption", "plain", shots=1,
                        demos=[{"id": 2, "image": "d.jpg", "captions": [" A dog. ", "x"]}])
    assert cap.prompt == "<image>Output:A dog.<|endofchunk|>\n<image>Output:" and cap.max_new == 20
    with pytest.raises(ValueError, match="--demos"):
        prompts.build(vqa_record(1), "vqa", "plain", shots=4, demos=pool[:3])


def test_chat_prompts():
    q = prompts.build(vqa_record(1), "vqa", "chat")
    assert q.prompt == chat_prompt(["<image>\nWhat is 1?\nAnswer the question using a single word or phrase."])
    viz = prompts.build(vqa_record(1), "vqa", "chat", task="vizwiz")
    assert "respond with 'Unanswerable'" in viz.prompt
    mc = {"id": 1, "image": "m.jpg", "question": "Which?", "hint": "Look.", "options": {"A": "x", "B": "y"},
          "answer": "B"}
    q = prompts.build(mc, "choice", "chat", shots=1, demos=[{**mc, "id": 2, "image": "n.jpg"}])
    turn = "<image>\nLook.\nWhich?\nA. x\nB. y\nAnswer with the option's letter from the given choices directly."
    assert q.prompt == chat_prompt([turn, "B", turn]) and q.images == ["n.jpg", "m.jpg"]


@pytest.mark.parametrize("text, kind, style, out", [
    ("cat, dog Question: what", "vqa", "plain", "cat"), (" two Short answer: 3", "vqa", "plain", "two"),
    ('A "dog" on grass Output: x', "caption", "plain", "A dog on grass"), ("B\nbecause", "choice", "chat", "B"),
    (" Yes, there is.", "pope", "chat", "Yes, there is."),
])
def test_answers_read_back(text, kind, style, out):
    assert prompts.read_answer(text, kind, style) == out

# -----------------------------------------------------------------------------
# eval.py run and eval.py score end to end


def call(capsys, *argv):
    """eval.py's main in this process -> (exit status, stdout, stderr lines starting 'eval.py: error:')."""
    try:
        ev.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, [x for x in err.splitlines() if x.startswith("eval.py: error:")]


RUNS = {  # task: (data files, image folder, extra flags, --references for score)
    "vqav2": (["vqa_q_val2014", "vqa_a_val2014"], "coco", ["--prompt", "plain", "--shots", "2", "--demos",
              "{vqa_q_train2014}", "{vqa_a_train2014}", "--demo-images", "{root}/coco", "--num-beams", "3"],
              ["vqa_a_val2014"]),
    "okvqa": (["vqa_q_val2014", "vqa_a_val2014"], "coco", [], ["vqa_a_val2014"]),
    "textvqa": (["textvqa"], "textvqa", ["--ocr-tokens"], ["textvqa"]),
    "vizwiz": (["vizwiz"], "vizwiz", [], ["vizwiz"]),
    "coco": (["karpathy"], "coco", ["--prompt", "plain", "--shots", "2", "--num-beams", "3"], ["karpathy"]),
    "nocaps": (["nocaps"], "nocaps/val", [], ["nocaps"]),
    "textcaps": (["textcaps"], "textcaps", [], ["textcaps"]),
    "pope": (["pope"], "coco", [], ["pope"]),
    "mmbench": (["mmbench"], "mmbench", ["--circular"], ["mmbench"]),
    "seed": (["seed"], "seed", [], ["seed"]),
    "scienceqa": (["scienceqa"], "scienceqa/images", ["--prompt", "plain", "--shots", "1"], ["scienceqa"]),
    "ai2d": (["ai2d"], "ai2d", [], ["ai2d"]),
}
EXPECTED = {"vqa": {"accuracy"}, "caption": {"CIDEr", "BLEU-4"}, "choice": {"accuracy"},
            "pope": {"accuracy", "precision", "recall", "f1", "yes_ratio"}}


def path_of(files, name):
    return files["root"] / "ai2d" if name == "ai2d" else files[name]


@pytest.mark.parametrize("task", RUNS)
def test_run_then_score_each_benchmark(capsys, files, tmp_path, task):
    data, images, extra, refs = RUNS[task]
    extra = [x.format(root=files["root"], **{k: v for k, v in files.items() if k != "root"}) for x in extra]
    preds, out = tmp_path / "p.jsonl", tmp_path / "r.json"
    code, stdout, errors = call(capsys, "run", "--checkpoint", files["ckpt"], "--task", task, "--data",
                                *[path_of(files, n) for n in data], "--images", files["root"] / images,
                                "--predictions", preds, "--json", out, "--batch-size", 4, "--max-new-tokens", 3,
                                "--quiet", *extra)
    assert code == 0, errors
    saved = json.loads(out.read_text())
    kind = readers.KINDS[saved["format"]]
    assert EXPECTED[kind] <= set(saved["metrics"]) and saved["metrics"]["n"] >= 2
    assert stdout.startswith("| | task | shots |") and f"| {task} |" in stdout
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    assert lines[0]["run"]["task"] == task and len(lines) == 1 + saved["metrics"]["n"]
    if task == "mmbench":  # 3 + 4 + 2 rotations of the three questions (3, 4 and 2 options)
        assert saved["metrics"]["n"] == 9 and "circular_accuracy" in saved["metrics"]
    code, stdout, errors = call(capsys, "score", "--task", kind, "--predictions", preds, "--references",
                                *[path_of(files, n) for n in refs])
    assert code == 0, errors
    assert json.loads(stdout) == {**saved["metrics"], "missing": 0, "format": json.loads(stdout)["format"]}


def test_rices_chooses_the_nearest_images_and_caches_them(files, tmp_path, monkeypatch):
    """The training record whose image is the record's own comes last (nearest the question); the pool's
    features are read back from the cache on a second call."""
    m = evals_run.load_model(files["ckpt"])[0]
    pool = readers.load([files["karpathy"]], files["root"] / "coco", split="train")[1]  # cocoids 3, 4, 5
    record = {**pool[1], "id": "q"}  # the image of pool record 4
    chosen = rices.choose(m, [record], pool, 2, "ckpt", tmp_path)["q"]
    assert chosen[-1]["id"] == 4 and len(chosen) == 2
    assert torch.equal(rices.nearest(torch.eye(3)[[2]], torch.eye(3), 3), torch.tensor([[1, 0, 2]]))
    real = rices.image_features
    monkeypatch.setattr(rices, "image_features", lambda m, recs, *a: real(m, recs) if len(recs) == 1 else 1 / 0)
    assert rices.choose(m, [record], pool, 2, "ckpt", tmp_path)["q"] == chosen  # the pool from the cache


def test_run_with_rices_and_trials(capsys, files, tmp_path):
    preds, out = tmp_path / "coco.jsonl", tmp_path / "r.json"
    code, stdout, errors = call(capsys, "run", "--checkpoint", files["ckpt"], "--task", "coco", "--data",
                                files["karpathy"], "--images", files["root"] / "coco", "--prompt", "plain", "--shots",
                                2, "--rices", "--rices-cache", tmp_path / "cache", "--trials", 2, "--predictions",
                                preds, "--json", out, "--max-new-tokens", 3, "--quiet")
    assert code == 0, errors
    saved = json.loads(out.read_text())
    assert saved["seeds"] == [42, 43] and len(saved["metrics"]["trials"]["CIDEr"]) == 2
    assert (tmp_path / "coco-seed42.jsonl").is_file() and (tmp_path / "coco-seed43.jsonl").is_file()
    assert list((tmp_path / "cache").glob("rices-*.pt"))


def test_run_resumes_where_it_stopped(capsys, files, tmp_path, monkeypatch):
    args = ["run", "--checkpoint", files["ckpt"], "--task", "pope", "--data", files["pope"], "--images",
            files["root"] / "coco", "--batch-size", 1, "--max-new-tokens", 3, "--quiet"]
    assert call(capsys, *args, "--predictions", tmp_path / "full.jsonl")[0] == 0
    calls, real = [], model.XGenMM.generate

    def interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(model.XGenMM, "generate", interrupted)
    part = tmp_path / "part.jsonl"
    with pytest.raises(KeyboardInterrupt):
        ev.main([str(a) for a in args + ["--predictions", part]])
    assert len(part.read_text().splitlines()) == 1 + 2  # the header and the two answers written so far
    part.write_text(part.read_text() + '{"question_id": 3, "ans')  # and a line a kill cut in half
    calls.clear()
    assert call(capsys, *args, "--predictions", part)[0] == 0
    assert len(calls) == 2  # only the two questions left were asked
    rows = lambda p: sorted(p.read_text().splitlines())
    assert rows(part) == rows(tmp_path / "full.jsonl")
    code, _, errors = call(capsys, *args, "--predictions", part, "--prompt", "plain")
    assert code == 2 and len(errors) == 1 and "another run's predictions" in errors[0]
    assert "prompt 'chat' -> 'plain'" in errors[0]


def test_run_task_toy_is_the_toy_evaluator(monkeypatch, files):
    seen = []
    monkeypatch.setattr(ev, "toy_main", lambda argv: seen.append(argv) or {"vqa": 1.0})
    assert ev.main(["run", "--checkpoint", "c", "--task", "toy", "--data", "w", "--limit", "3"]) == {"vqa": 1.0}
    assert seen == [["--checkpoint", "c", "--data", "w", "--prompt", "chat", "--limit", "3", "--batch-size", "16",
                     "--device", "cpu"]]


def test_predictions_without_answers_in_the_files(capsys, files, tmp_path):
    """VQAv2 test-dev has no annotations: the answers are written, nothing is scored."""
    code, out, errors = call(capsys, "run", "--checkpoint", files["ckpt"], "--task", "vqav2", "--data",
                             files["vqa_q_val2014"], "--images", files["root"] / "coco", "--max-new-tokens", 2, "--quiet",
                             "--predictions", tmp_path / "p.jsonl")
    assert code == 0 and "no answers to score them against" in out
    assert len(readers.read_predictions(tmp_path / "p.jsonl")) == 4

# -----------------------------------------------------------------------------
# bad input: one line naming the file and the record, exit status 2


def bad_files(files, d):
    """Broken copies of the official files, one fault each."""
    pope = [json.loads(x) for x in files["pope"].read_text().splitlines()]
    pope[2]["image"] = "COCO_val2014_000000000999.jpg"
    qs = json.loads(files["vqa_q_val2014"].read_text())
    qs["questions"].append({"image_id": 1, "question": "Orphan?", "question_id": 777})
    tsv = files["mmbench"].read_text().splitlines()
    short = tsv[:1] + ["\t".join(tsv[1].split("\t")[:5])] + tsv[2:]
    b64 = tsv[:1] + [tsv[1].replace(tsv[1].split("\t")[9], "%%%not-base64%%%")] + tsv[2:]
    return {
        "missing image": (["--task", "pope", "--data", dump(d / "pope.json", pope, lines=True)],
                          ["pope.json:3", "COCO_val2014_000000000999.jpg", "does not exist"]),
        "no annotation": (["--task", "vqav2", "--data", dump(d / "q.json", qs), files["vqa_a_val2014"]],
                          ["q.json: question 4", "question_id 777 has no annotation"]),
        "malformed TSV row": (["--task", "mmbench", "--data", d / "short.tsv"], ["short.tsv:2", "5 tab-separated"]),
        "bad base64": (["--task", "mmbench", "--data", d / "b64.tsv"], ["b64.tsv:2", "not base64"]),
        "malformed JSON line": (["--task", "pope", "--data", d / "cut.json"], ["cut.json:2", "malformed JSON"]),
        "wrong task": (["--task", "coco", "--data", files["pope"]], ["a pope file; task coco reads"]),
        "demos without answers": (["--task", "okvqa", "--data", files["vqa_q_val2014"], "--shots", 1, "--demos",
                                   files["vqa_q_train2014"], "--demo-images", files["root"] / "coco"],
                                  ["train2014_questions.json", "have no answers"]),
    }, short, b64


def test_bad_input_is_named(capsys, files, tmp_path):
    cases, short, b64 = bad_files(files, tmp_path)
    (tmp_path / "short.tsv").write_text("\n".join(short) + "\n")
    (tmp_path / "b64.tsv").write_text("\n".join(b64) + "\n")
    (tmp_path / "cut.json").write_text(files["pope"].read_text().splitlines()[0] + "\n{\"question_id\": 1,\n")
    for case, (args, says) in cases.items():
        code, out, errors = call(capsys, "run", "--checkpoint", files["ckpt"], "--images", files["root"] / "coco",
                                 "--predictions", tmp_path / f"{case}.jsonl", "--quiet", *args)
        assert code == 2 and out == "" and len(errors) == 1, (case, errors)
        assert all(s in errors[0] for s in says), (case, errors[0])


HOSTILE = {  # a downloaded benchmark file of the wrong shape: (file name, content, what the message says)
    "image: 5": ("viz.json", [{"image": 5, "question": "q", "answers": None}], "viz.json: record 0"),
    "answers as strings": ("viz.json", [{"image": "a.jpg", "question": "q", "answers": ["x"]}], "record 0"),
    "record not an object": ("viz2.json", [{"image": "a.jpg", "question": "q"}, 7], "must be a JSON object"),
    "question: 5": ("pope.jsonl", [{"question_id": 1, "image": "a.jpg", "text": 5, "label": "yes"}] * 2,
                    "question must be a string"),
    "image_id not a number": ("q.json", {"data_subtype": "val2014", "questions": [{"question_id": 1, "image_id": "x",
                                                                           "question": "q"}]}, "question 0"),
    "sentences: [5]": ("k.json", {"images": [{"split": "test", "filename": "a.jpg", "sentences": [5]}]}, "image 0"),
    "answer index out of range": ("sqa.json", {"1": {"question": "q", "choices": ["a", "b"], "answer": 9,
                                                     "image": "i.png", "split": "test"}}, "problem 1"),
    "image path ../": ("pope.jsonl", [{"question_id": 1, "image": "../../a.jpg", "text": "q", "label": "no"}] * 2,
                       "not a file name inside the image folder"),
    "absolute image path": ("viz.json", [{"image": "/etc/hostname", "question": "q"}], "not a file name inside"),
    "not UTF-8": ("bad.json", b'[{"image": "\xff"}]', "not UTF-8"),
    "nested 100k deep": ("deep.json", b"[" * 100_000, "nested too deeply"),
    "TSV not UTF-8": ("mm.tsv", b"index\tquestion\tA\tB\n0\t\xff\ta\tb\n", "not UTF-8"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_benchmark_files_of_the_wrong_shape_are_named(capsys, tmp_path, case):
    """Each is a BadSample naming the file and the record, and `eval.py score` ends with one line, exit 2
    (before, most were a TypeError / KeyError / UnicodeDecodeError traceback, and ../ was followed)."""
    name, content, says = HOSTILE[case]
    path = tmp_path / name
    save(picture(0), tmp_path / "a.jpg")  # the images the good fields name exist: only the fault is met
    path.write_bytes(content if isinstance(content, bytes) else
                     ("\n".join(map(json.dumps, content)) if name.endswith("l") else json.dumps(content)).encode())
    with pytest.raises(readers.BadSample, match=re.escape(says)) as e:
        readers.load([path], tmp_path)
    assert name in str(e.value)
    preds = dump(tmp_path / "p.json", [{"question_id": 1, "answer": "yes"}])
    code, out, errors = call(capsys, "score", "--task", "vqa", "--predictions", preds, "--references", path)
    assert code == 2 and out == "" and len(errors) == 1 and name in errors[0], errors


def test_a_predictions_file_that_is_not_one_is_named(capsys, files, tmp_path):
    args = ["run", "--checkpoint", files["ckpt"], "--task", "pope", "--data", files["pope"], "--images",
            files["root"] / "coco", "--max-new-tokens", 1, "--quiet"]
    for content in (b"\xff\xfe", b"[1, 2]\n[3]\n", b'{"run": 1}\n'):
        (tmp_path / "p.jsonl").write_bytes(content)
        code, out, errors = call(capsys, *args, "--predictions", tmp_path / "p.jsonl")
        assert code == 2 and len(errors) == 1 and "p.jsonl" in errors[0], (content, errors)


def test_score_reports_missing_and_unknown_predictions(capsys, files, tmp_path):
    refs = ["--task", "pope", "--references", files["pope"]]
    some = dump(tmp_path / "some.json", [{"question_id": q, "answer": "yes"} for q in (0, 1, 2)])
    code, out, errors = call(capsys, "score", "--predictions", some, *refs)
    assert code == 2 and "no prediction for 1 of 4 questions (e.g. 3)" in errors[0] and "some.json" in errors[0]
    code, out, errors = call(capsys, "score", "--predictions", some, *refs, "--partial")
    got = json.loads(out)
    assert code == 0 and got["missing"] == 1 and got["n"] == 3 and got["accuracy"] == pytest.approx(2 / 3)
    extra = dump(tmp_path / "extra.json", [{"question_id": q, "answer": "no"} for q in range(5)])
    code, out, errors = call(capsys, "score", "--predictions", extra, *refs)
    assert code == 2 and "1 prediction(s) answer no question" in errors[0]
    code, out, errors = call(capsys, "score", "--task", "caption", "--predictions", some, "--references", files["pope"])
    assert code == 2 and "holds pope references, not caption" in errors[0]


def test_score_in_the_challenge_formats(capsys, files, tmp_path):
    """What users already have: the VQA challenge's list, COCO's caption results, VizWiz's image-keyed list."""
    vqa = dump(tmp_path / "vqa.json", [{"question_id": q, "answer": a} for q, a in
                                       [(10, "cat"), (11, "A cat."), (20, "dog"), (21, "Dog")]])
    code, out, _ = call(capsys, "score", "--task", "vqa", "--predictions", vqa, "--references", files["vqa_a_val2014"])
    assert code == 0 and json.loads(out)["accuracy"] == pytest.approx((1 + 1 + 0.9 + 0.9) / 4)  # 7 cats, 3 dogs
    caps = dump(tmp_path / "caps.json", [{"image_id": 1, "caption": "A picture number 1."},
                                         {"image_id": 2, "caption": "noise"}])
    code, out, _ = call(capsys, "score", "--task", "caption", "--predictions", caps, "--references", files["karpathy"])
    Cider = pytest.importorskip("pycocoevalcap.cider.cider").Cider
    want = Cider().compute_score({1: ["a picture number 1", "some noise"], 2: ["a picture number 2", "some noise"]},
                                 {1: ["a picture number 1"], 2: ["noise"]})[0]
    assert code == 0 and json.loads(out)["CIDEr"] == pytest.approx(want, abs=1e-6)
    viz = dump(tmp_path / "viz.json", [{"image": f"VizWiz_val_{i:08d}.jpg", "answer": "Unanswerable"} for i in range(3)])
    code, out, _ = call(capsys, "score", "--task", "vqa", "--predictions", viz, "--references", files["vizwiz"])
    assert code == 0 and json.loads(out)["accuracy"] == pytest.approx(1 / 3)
    assert set(json.loads(out)["by_answer_type"]) == {"other", "unanswerable"}
