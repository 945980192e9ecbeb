"""bench/gpu.py, the one-GPU check, before any GPU minute is spent: `python -m bench.gpu --dry-run` runs every
step on the CPU at tiny sizes (torchrun on gloo) and writes a summary with every row ok; a step that fails is
one failed row and the summary is on disk after each row; the batch search reports the largest batch that
fits; the decode bound counts the KV cache; sample.py's decode rate leaves compilation out; the FSDP2 memory
arithmetic counts the unsharded gradients of gradient accumulation."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import bench.full
import bench.gpu
import sample

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_runs_every_step(world, tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench.gpu", "--dry-run", "--out", tmp_path, "--world", world],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert r.returncode == 0 and all(x["ok"] for x in rows.values()), (rows, r.stdout[-3000:], r.stderr[-3000:])
    names = " | ".join(rows)
    for step in ("FSDP2 on a one-rank mesh", "LoRA stage, DDP", "resumed to 4", "dpo.py",
                 "tiny, float32 weights, train step", "largest batch", "bench.full", "sample.py", "test_attention",
                 "bench.attention"):
        assert step in names, (step, names)
    full = json.loads((tmp_path / "full.json").read_text())
    assert {"decode_b1", "decode_b2", "train_bfloat16", "train_float32"} <= full.keys()
    assert (tmp_path / "summary.md").read_text().count("| ok |") == len(rows)


def test_a_failed_step_is_one_row_and_the_summary_is_written_at_once(tmp_path):
    table = bench.gpu.Summary(tmp_path, "cpu")
    table.add("first", True, 1.0, "figures")
    assert "| first | ok | 1 s | figures |" in (tmp_path / "summary.md").read_text()

    def broken(table, *args):
        raise ValueError("no such thing")
    table.step(broken, None)
    table.add("after", True, None, ["a", "b"])
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert list(rows) == ["first", "broken (stopped by an error)", "after"] and not table.ok()
    assert "ValueError: no such thing" in rows["broken (stopped by an error)"]["figures"]


@pytest.mark.parametrize("limit, found", [(100, (64, 128)), (512, (512, None)), (4, (None, 8))])
def test_largest_batch(limit, found):
    tried = []
    assert bench.gpu.largest_batch(lambda b: tried.append(b) or b <= limit, 8, 512) == found
    assert tried == [b for b in (8, 16, 32, 64, 128, 256, 512) if b <= (found[1] or 512)]


def test_decode_bound_counts_the_kv_cache():
    """The 4.4B model's decode at 720 slots: ~0.28 GB of KV cache per row, ~30% of a batch-8 step's bytes."""
    import model
    cfg = model.preset("xgenmm").text
    kv = bench.full.kv_cache_bytes(cfg, 720, __import__("torch").bfloat16)
    assert abs(kv / 1e9 - 0.283) < 0.01
    weights = 7.4e9
    r, x = {"bandwidth": 3e12, "weight_bytes": weights}, {"batch": 8, "kv_bytes_per_row": kv}
    assert bench.full.decode_bound(r, x) == pytest.approx(8 * 3e12 / (weights + 8 * kv))
    assert 0.2 < 8 * kv / (weights + 8 * kv) < 0.35


def test_compiled_decode_rate_leaves_the_first_steps_out():
    s = sample.Stream(None, [])
    s.times = [0.0, 1.0, 11.0, 12.0, 13.0, 14.0]  # prefill 1 s; the first step compiles (10 s); then 1 s each
    assert s.speed() == "[5 tokens; first after 1.00s, then 0.3 tok/s]"
    assert s.speed(warmup=2) == "[5 tokens; first after 1.00s, then 1.0 tok/s]"


def test_fsdp2_memory_counts_the_unsharded_gradients_of_accumulation():
    """--grad-accum 2 under FSDP2: the trained gradients stay unsharded in fp32 until the step's last backward."""
    from types import SimpleNamespace
    import bench.fsdp_memory
    c = {"layers": 2, "blocks": 200, "model": 1000, "vit": 300, "lora": 20}
    act = {"block": (0, 10), "block_lora": (0, 12), "head_sft": (5, 1), "head_dpo": (5, 2), "resampler_group": (3, 7)}
    cfg = SimpleNamespace(text=SimpleNamespace(hidden_size=4))
    plan = lambda accum, lora_run: bench.fsdp_memory.fsdp_plan(c, act, cfg, 4, 1, 10, 2, 6, lora_run,  # noqa: E731
                                                               grad_accum=accum)
    for lora_run, trained in ((False, 700), (True, 20)):
        one, two = plan(1, lora_run), plan(2, lora_run)
        extra = {k: v for k, v in two.items() if k not in one}
        assert list(extra.values()) == [4 * trained] and all(two[k] == one[k] for k in one)
