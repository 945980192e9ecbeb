"""dpo.py: log 2 at the start, the margin grows, the reference stays fixed, precomputed == on the fly,
bad pairs are counted, the merged checkpoint equals the trained policy."""
import json
import math

import pytest
import torch

import checkpoint
import data
import dpo
import model
import train

FAST = ["--workers", "0", "--max-len", "512", "--log-every", "1", "--save-every", "100", "--lora-r", "8",
        "--lora-alpha", "16", "--lora-dropout", "0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, world):
    """An SFT checkpoint (3 steps on the toy world) and two preference pairs of the world's, in a mixture
    config whose image folder is the world (the pairs' image paths are relative to it)."""
    root = tmp_path_factory.mktemp("dpo")
    train.main(["--data", str(world / "mixtures" / "sft.json"), "--out-dir", str(root / "sft"),
                "--max-steps", "3", "--batch-size", "4", *FAST[:6]])
    rows = [json.loads(x) for x in (world / "dpo" / "pairs.jsonl").read_text().splitlines()][:2]
    write_pairs(root, "two", rows, world)
    return root


def write_pairs(root, name, rows, world):
    """`rows` as {root}/{name}.pairs.jsonl, read through a mixture config {root}/{name}.json whose image folder
    is the world's (the rows name their images relative to it, as the world's own files do)."""
    (root / f"{name}.pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    mix = {"sources": [{"name": name, "type": "pairs", "path": f"{name}.pairs.jsonl", "image_folder": str(world)}]}
    (root / f"{name}.json").write_text(json.dumps(mix))
    return root / f"{name}.json"


def run(setup, out, data_path, *extra):
    s = dpo.main(["--init", str(setup / "sft"), "--data", str(data_path), "--out-dir", str(out), *FAST, *extra])
    return s, [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_first_step_is_log_2_and_the_margin_grows(setup, tmp_path):
    s, log = run(setup, tmp_path / "a", setup / "two.json", "--batch-size", "2", "--max-steps", "8", "--lr", "2e-3")
    assert abs(log[0]["loss"] - math.log(2)) <= 1e-6  # policy == reference: fresh adapters change nothing
    assert log[0]["reward_chosen"] == 0 and log[0]["reward_rejected"] == 0 and log[0]["pairs"] == 2
    assert log[-1]["margin"] > log[0]["margin"] + 0.05 and log[-1]["loss"] < log[0]["loss"]
    assert log[-1]["accuracy"] == 1.0


def fixed_batch(setup, m):
    tok = m.tokenizer
    src = data.open_sources(setup / "two.json", tok.id_to_token(tok.eos_id))[0][0]
    enc = data.Encoder(tok, m.config, 512)
    return data.collate([enc(src.record(i)) for i in range(len(src))], tok.pad_id) | {"keys": [(0, 0), (0, 1)]}


def test_reference_stays_fixed_and_the_merged_checkpoint_is_the_policy(setup, tmp_path):
    s, _ = run(setup, tmp_path / "b", setup / "two.json", "--batch-size", "2", "--max-steps", "4", "--lr", "2e-3")
    init = model.XGenMM.from_pretrained(checkpoint.newest(setup / "sft")).train()
    b = fixed_batch(setup, init)
    with torch.no_grad():
        before = dpo.logps(init, b)
        after = dpo.reference(s, b, None)  # the trained model with its adapters off
        policy = dpo.logps(s.m, b)
        merged = dpo.logps(model.XGenMM.from_pretrained(tmp_path / "b" / "ckpt-0000004").train(), b)
    assert (before - after).abs().max().item() <= 1e-5
    assert (policy - before).abs().max().item() > 1e-3  # training moved the policy
    assert (merged - policy).abs().max().item() <= 1e-3


def test_precomputed_reference_equals_on_the_fly(setup, tmp_path):
    args = ["--batch-size", "2", "--max-steps", "3", "--lr", "2e-3"]
    _, fly = run(setup, tmp_path / "fly", setup / "two.json", *args)
    _, pre = run(setup, tmp_path / "pre", setup / "two.json", *args, "--precompute-ref")
    assert (tmp_path / "pre" / "ref_logps.safetensors").is_file()
    for a, b in zip(fly, pre):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and abs(a["margin"] - b["margin"]) <= 1e-5


def test_bad_pairs_are_reported_not_used(setup, world, tmp_path):
    rows = [json.loads(x) for x in (setup / "two.pairs.jsonl").read_text().splitlines()]
    same = dict(rows[0], rejected=rows[0]["chosen"])
    missing = dict(rows[1], image="images/nope.png")
    bad = write_pairs(tmp_path, "bad", rows + [same, missing], world)
    _, log = run(setup, tmp_path / "c", bad, "--batch-size", "4", "--max-steps", "2",
                 "--max-bad-fraction", "0.6")
    assert log[0]["pairs"] == 2 and log[-1]["bad_samples"] == 4  # two bad rows in each of the two steps


def test_dpo_needs_an_initial_model(setup):
    with pytest.raises(SystemExit, match="--init is required"):
        dpo.main(["--data", str(setup / "two.jsonl")])
