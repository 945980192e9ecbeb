"""toy/tasks.py's metric functions on hand-made answers, then eval.py's whole evaluator on a tiny checkpoint."""
import json
import re
from pathlib import Path

import pytest

import eval as ev
import model
from tokenizer import DEFAULT_SYSTEM, chat_prompt
from toy import scenes, tasks, toyworld


@pytest.mark.parametrize("prediction, answer, same", [
    ("Red.", "red", True), ("  the first ", "the first", True), ("first", "the first", True),
    ("Yes", "yes", True), ("No.", "Yes", False), ("12", "12", True), ("1 2", "12", False),
    ("top left", "top left", True), ("top  left!", "top left", True), ("left", "top left", False),
    ("CAT", "cat", True), ("0.5", "0.5", True),
])
def test_exact_match_normalisation(prediction, answer, same):
    assert tasks.exact_match(prediction, answer) is same


def test_parse_box_and_iou():
    assert tasks.parse_box("<bbox>0.05, 0.45, 0.25, 0.65</bbox>") == (0.05, 0.45, 0.25, 0.65)
    assert tasks.parse_box("It is at <bbox>0.1,0.2,0.3,0.4</bbox> I think <bbox>0, 0, 1, 1</bbox>") == (.1, .2, .3, .4)
    assert tasks.parse_box("[0.10, 0.20, 0.30, 0.40]") == (.1, .2, .3, .4)
    assert tasks.parse_box("<bbox>0.1, 0.2</bbox>") is None and tasks.parse_box("no box") is None
    assert tasks.iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert tasks.iou((0, 0, 0.2, 0.2), (0.3, 0.3, 0.5, 0.5)) == 0.0
    assert tasks.iou((0.3, 0.3, 0.1, 0.5), (0.1, 0.3, 0.3, 0.5)) == 0.0  # inverted: no box
    assert tasks.iou(None, (0, 0, 1, 1)) == 0.0
    # a 0.2 box one grid unit (0.05) off on one axis: IoU 0.6, accepted; off on both axes: 0.39, rejected
    assert tasks.iou((0.05, 0.0, 0.25, 0.2), (0.0, 0.0, 0.2, 0.2)) == pytest.approx(0.6)
    assert tasks.iou((0.05, 0.05, 0.25, 0.25), (0.0, 0.0, 0.2, 0.2)) < 0.5


def test_refusal_detection():
    for text in toyworld.HAZARD_REFUSALS + toyworld.HARM_REFUSALS:
        assert tasks.is_refusal(text)
    assert tasks.is_refusal("I’m sorry, I can’t do that.")  # typographic apostrophes
    for text in ("red", "There are 2 shapes: a big red circle at the top left and a small blue square on the "
                 "right.", "Yes", "Hello! How can I help you today?"):
        assert not tasks.is_refusal(text)


def test_caption_facts_f1_and_hallucination():
    truth = "There are 2 shapes: a big red circle at the top left and a small blue square on the right. " \
            "The word CAT is written in small letters at the bottom. A hazard sign is in the center."
    facts = tasks.caption_facts(truth)
    assert facts == {("object", "red", "circle"), ("size", "red", "circle", "big"),
                     ("position", "red", "circle", "top left"), ("object", "blue", "square"),
                     ("size", "blue", "square", "small"), ("position", "blue", "square", "right"),
                     ("text", "CAT"), ("hazard", "center")}
    assert tasks.f1(facts, facts) == 1.0 and tasks.f1(set(), set()) == 1.0 and tasks.f1(set(), facts) == 0.0
    half = tasks.caption_facts("There is 1 shape: a big red circle at the top left.")
    assert tasks.f1(half, facts) == pytest.approx(2 * 3 / (3 + 8))
    objects = [{"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "square"}]
    assert not tasks.hallucinates(truth, objects)
    assert tasks.hallucinates("There are 2 shapes: a big red circle at the top left and a green square.", objects)
    assert not tasks.hallucinates("There are no shapes.", [])
    # the world's own captions parse to exactly their scene's objects
    s = scenes.Sampler(0, 99)
    for _ in range(50):
        scene = s.scene(text="word" if s.chance(0.3) else None)
        got = {f[1:] for f in tasks.caption_facts(scenes.describe(scene)) if f[0] == "object"}
        assert got == {(o.colour, o.shape) for o in scene.objects}


def test_score_and_table():
    def item(metric, said, **record):
        it = tasks.Item(metric, {"id": "x", **record}, "", [], 16)
        it.answer = said
        return it
    items = [item("vqa", "Red", answer="red"), item("vqa", "blue", answer="red"),
             item("grounding", "<bbox>0.00, 0.00, 0.20, 0.20</bbox>", box=[0.0, 0.0, 0.2, 0.2]),
             item("safety", "I can't help with that.", safe=False), item("safety", "red", safe=False),
             item("safety", "red", safe=True), item("fewshot_4", "3", answer="3")]
    items += [item("pope", "Yes.", answer="No", absent=True), item("pope", "no", answer="No", absent=True),
              item("pope", "Yes", answer="Yes", absent=False), item("pope", "No", answer="Yes", absent=False)]
    r = tasks.score(items)
    assert r == {"vqa": 0.5, "grounding": 1.0, "pope": 0.5, "hallucination": 0.5, "refusal_unsafe": 0.5,
                 "false_refusal": 0.0, "fewshot_4": 1.0}
    ci = tasks.intervals(items)
    assert ci["pope"][2] == 4 and ci["hallucination"][2] == 2 and ci["false_refusal"][2] == 1
    md = tasks.table([("sft", r)])
    assert md.splitlines()[2].startswith("| sft | 50.0 |")
    assert tasks.table([("sft", r)], ci={"sft": ci}).splitlines()[2].startswith("| sft | 50.0 (9-91) |")


def test_wilson_interval():
    """Wilson's score interval at the textbook points; F1 values get the normal interval of their mean."""
    lo, hi = tasks.interval([True] * 81 + [False] * 19)
    assert (round(lo, 4), round(hi, 4)) == (0.7222, 0.8749)
    assert tasks.interval([False] * 150)[0] == 0.0 and 0.02 < tasks.interval([False] * 150)[1] < 0.03
    assert tasks.interval([True] * 150)[1] == 1.0
    lo, hi = tasks.interval([0.5, 1.0, 0.75, 0.25])
    assert lo < 0.625 < hi and abs((hi - lo) / 2 - 1.96 * (0.3227486 / 2)) < 1e-6


def test_moves_claims_only_beyond_the_intervals():
    found = {"a": {"metrics": {"vqa": 0.5, "ocr": 0.5},
                   "intervals": {"vqa": [0.42, 0.58, 150], "ocr": [0.42, 0.58, 150]}},
             "b": {"metrics": {"vqa": 0.7, "ocr": 0.55},
                   "intervals": {"vqa": [0.62, 0.77, 150], "ocr": [0.47, 0.63, 150]}}}
    row = tasks.moves(["a", "b"], found).splitlines()[2]
    assert row == "| a → b | **+20.0** | within noise |"


def test_prompts_follow_the_training_formats():
    rec = {"id": "q", "conversations": [{"from": "human", "value": "<image>\nWhat colour is the circle?"},
                                        {"from": "gpt", "value": "red"}], "image": "a.png", "answer": "red"}
    chat = tasks.items_for("vqa", [rec], "chat", DEFAULT_SYSTEM)[0]
    assert chat.prompt == chat_prompt(["<image>\nWhat colour is the circle?"])
    plain = tasks.items_for("vqa", [rec], "plain", None)[0]
    assert plain.prompt == "<image>Q: What colour is the circle? A:" and plain.images == ["a.png"]
    few = {**rec, "question": "What colour is the circle?",
           "support": [{"image": f"s{i}.png", "question": "Q?", "answer": str(i)} for i in range(8)]}
    shots = tasks.items_for("fewshot", [few], "chat", None)
    assert [it.metric for it in shots] == ["fewshot_0", "fewshot_4", "fewshot_8"]
    assert shots[1].prompt.count("<image>") == 5 and len(shots[1].images) == 5 and shots[1].images[-1] == "a.png"
    assert shots[1].prompt.startswith("<image>Q: Q? A: 0<|endofchunk|><image>Q: Q? A: 1<|endofchunk|>")


def test_eval_end_to_end_on_a_tiny_checkpoint(world, tmp_path):
    model.XGenMM.from_tokenizer(world / "tokenizer").save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "eval.json"
    metrics = ev.main(["--checkpoint", str(tmp_path / "ckpt"), "--data", str(world), "--limit", "4",
                       "--json", str(out), "--predictions", str(tmp_path / "p.jsonl")])
    saved = json.loads(out.read_text())
    assert saved["metrics"] == metrics and set(saved["intervals"]) == set(metrics)
    assert all(lo <= metrics[m] <= hi and n > 0 for m, (lo, hi, n) in saved["intervals"].items())
    assert set(metrics) == set(tasks.METRICS + tasks.VQA_PARTS)
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * (len(tasks.SPLITS) - 1) + 4 * len(tasks.SHOTS)
    assert all(isinstance(r["answer"], str) for r in rows)


def test_binding_table_splits_vqa_by_the_shapes_in_the_scene(tmp_path):
    """report.py's binding table: each kind's accuracy on one-shape scenes apart from scenes of several, with
    the interval and the item count, from the predictions and the world's own records."""
    from toy import report
    one, two = [{"shape": "square"}], [{"shape": "square"}, {"shape": "circle"}]
    records = [{"id": "vqa-0", "task": "colour", "objects": one}, {"id": "vqa-1", "task": "colour", "objects": two},
               {"id": "vqa-2", "task": "colour", "objects": two}, {"id": "vqa-3", "task": "existence", "objects": one}]
    (tmp_path / "data" / "test").mkdir(parents=True)
    (tmp_path / "data" / "test" / "vqa.json").write_text(json.dumps(records))
    (tmp_path / "eval").mkdir()
    right = {"vqa-0": True, "vqa-1": True, "vqa-2": False, "vqa-3": False}
    rows = [{"id": i, "metric": "vqa", "right": r} for i, r in right.items()]
    rows.append({"id": "x", "metric": "ocr", "right": 1})
    (tmp_path / "eval" / "sft.predictions.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    table = report.binding_table(tmp_path, ["pretrain", "sft"]).splitlines()
    assert len(table) == 3 and table[2].startswith("| sft |")  # no predictions for pretrain: no row
    cells = [c.strip() for c in table[2].split("|")[2:-1]]
    assert cells[0].startswith("100 (") and cells[0].endswith("n=1)")   # colour, one shape
    assert cells[1].startswith("50 (") and cells[1].endswith("n=2)")    # colour, 2-4 shapes
    assert cells[6].startswith("0 (") and cells[6].endswith("n=1)")     # existence, one shape
    assert cells[2] == "-" and cells[7] == "-"                          # no count questions; no such existence
    assert report.binding_table(tmp_path / "nowhere", ["sft"]) == ""


@pytest.mark.slow
def test_run_toy_quick(tmp_path):
    """The one-command recipe end to end at toy-of-toy size: every stage trains, is evaluated and tabulated;
    then the resolution ablation on its checkpoints.
    Slow (3-4 minutes) and it checks only that the pieces fit together (each stage's own behaviour has its
    own tests): `python -m pytest -m slow tests/test_eval.py`."""
    import os
    import subprocess
    import sys
    out = tmp_path / "toy"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHON": sys.executable}  # the interpreter running the tests
    r = subprocess.run(["bash", "toy/run_toy.sh", str(out), "--quick"], cwd=Path(__file__).parents[1],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert list(results) == list(tasks.RECIPE)
    for stage, metrics in results.items():
        assert {"vqa", "ocr_small", "grounding", "multi_image", "hallucination"} <= set(metrics), stage
        assert ("fewshot_8" in metrics) == (stage == "pretrain"), stage  # few-shot: the base model's, as the paper
        assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert "refusal_unsafe" in results["safety"] and "false_refusal" in results["safety"]
    md = (out / "results.md").read_text()
    assert md.splitlines()[0].startswith("| | caption_f1 |") and "wall time" in md
    for section in ("VQA by kind of question", "VQA by the shapes in the scene", "Linear probes", "Time and throughput",
                    "curves.png", "## Held-out examples"):
        assert section in md, section
    assert (out / "curves.png").is_file() and (out / "probes" / "pretrain.json").is_file()
    pictures = re.findall(r"!\[\]\(([^)]+)\)", md)  # every example picture is there, relative to results.md
    assert pictures and all((out / p).is_file() for p in pictures)
    for stage in tasks.RECIPE:
        assert (out / stage / "metrics.jsonl").is_file()
    # the resolution ablation at the recipe's SFT steps: its plain variant is the recipe's own SFT, not a rerun
    r = subprocess.run(["bash", "toy/ablations.sh", str(out), "resolution", "--quick"], cwd=Path(__file__).parents[1],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert not (out / "ablations" / "anyres").exists() and (out / "ablations" / "fixed").is_dir()
    table = (out / "ablations" / "ablations.md").read_text()
    assert [line.split("|")[1].strip() for line in table.splitlines()[-3:]] == ["anyres", "anyres-fixed", "fixed"]
    sft = json.loads((out / "ablations" / "eval" / "anyres.json").read_text())["metrics"]
    assert sft["vqa"] == results["sft"]["vqa"]  # the same checkpoint, the same questions
