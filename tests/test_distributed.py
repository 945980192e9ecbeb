"""Two CPU processes (torchrun, gloo) against one process, in the cases a GPU run meets: a rank whose micro-batch
has no image, gradient accumulation under FSDP2, the resume of a LoRA stage under FSDP2, DPO's precomputed
reference with uneven shares, and DPO steps (DDP and FSDP2, reference cached or not) against one process. Gloo accepts what NCCL would refuse (CPU tensors), so these tests show the
collectives line up and the numbers agree; the GPU script (bench/gpu.sh) shows NCCL takes them.

Each comparison: the same supervised tokens, losses within 1e-5 and gradient norms within 1e-4 relative (a
wrong loss scale, e.g. a dropped world size, doubles or halves the norm), weights within 3e-4 after AdamW
(float noise in near-zero gradients, divided by their own size, moves some weights by ~1e-4; a missed or
doubled update moves them by ~lr = 1e-3)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dpo
import train
from conftest import THREADS, world_source

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--workers", "0", "--max-len", "512", "--log-every", "1", "--save-every", "100", "--lr", "1e-3"]
LORA = ["--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0"]


def port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def two(script, *args):
    """`torchrun --nproc_per_node=2 script args` with one thread per process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", port(), script,
           *map(str, args)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def one(main, *args):
    torch.set_num_threads(1)  # as each torchrun process: the same float summation order where it matters
    try:
        main([*map(str, args)])
    finally:
        torch.set_num_threads(THREADS)


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def weights(ckpt):
    return load_file(ckpt / "model.safetensors")


def agree(a, b, weights_a=None, weights_b=None, count="supervised_tokens"):
    """Two runs agree step by step (see the module docstring for the tolerances and what they catch)."""
    a, b = metrics(a), metrics(b)
    assert len(a) == len(b) and [r[count] for r in a] == [r[count] for r in b]
    assert all(abs(x["loss"] - y["loss"]) <= 1e-5 for x, y in zip(a, b)), (a, b)
    assert all(abs(x["grad_norm"] - y["grad_norm"]) <= 1e-4 * y["grad_norm"] for x, y in zip(a, b)), (a, b)
    if weights_a is not None:
        wa, wb = weights(weights_a), weights(weights_b)
        assert wa.keys() == wb.keys()
        assert max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) <= 3e-4


def llava_pair(world, tmp_path):
    """A dataset of two records, one with an image and one text-only: with one sample per rank, one rank's
    micro-batch has an image and the other's has none (FSDP2 then needs the vision path in every rank's graph)."""
    rows = json.loads((world / "sft" / "llava_sft.json").read_text())
    pick = [next(r for r in rows if "image" in r), next(r for r in rows if "image" not in r)]
    return world_source(world, tmp_path, "pair", "llava", pick)


@pytest.mark.parametrize("fsdp", [True, False], ids=["fsdp2", "ddp"])
def test_a_rank_without_images_equals_one_process(world, tmp_path, fsdp):
    data = llava_pair(world, tmp_path)
    common = ["--data", data, "--tokenizer", world / "tokenizer", "--max-steps", "2", *FAST]
    one(train.main, *common, "--out-dir", tmp_path / "one", "--batch-size", "2")
    two("train.py", *common, "--out-dir", tmp_path / "two", "--batch-size", "1", *(["--fsdp"] if fsdp else []))
    agree(tmp_path / "one", tmp_path / "two", tmp_path / "one" / "ckpt-0000002", tmp_path / "two" / "ckpt-0000002")


def test_accumulation_under_fsdp2_equals_one_big_batch(world, tmp_path):
    common = ["--data", world / "mixtures" / "sft.json", "--max-steps", "2", *FAST]
    one(train.main, *common, "--out-dir", tmp_path / "one", "--batch-size", "4")
    two("train.py", *common, "--out-dir", tmp_path / "two", "--batch-size", "1", "--grad-accum", "2", "--fsdp")
    agree(tmp_path / "one", tmp_path / "two", tmp_path / "one" / "ckpt-0000002", tmp_path / "two" / "ckpt-0000002")


RECORDING = """import json, os, sys
sys.path.insert(0, {root!r})
import checkpoint, train
reads, load_file = [], checkpoint.load_file
checkpoint.load_file = lambda path, *a, **kw: reads.append(str(path)) or load_file(path, *a, **kw)
train.main(sys.argv[1:])
open(os.path.join({out!r}, "reads-" + os.environ["RANK"] + ".json"), "w").write(json.dumps(reads))
"""


def test_fsdp2_resume_of_a_lora_stage_equals_an_uninterrupted_run(world, tmp_path):
    one(train.main, "--data", world / "mixtures" / "sft.json", "--out-dir", tmp_path / "base", "--max-steps", "1",
        "--batch-size", "2", *FAST)
    common = ["--stage", "safety", "--init", tmp_path / "base", "--data", world / "mixtures" / "safety.json",
              "--batch-size", "1", "--max-steps", "4", "--fsdp", *LORA, *FAST]
    two("train.py", *common, "--out-dir", tmp_path / "full")
    two("train.py", *common, "--out-dir", tmp_path / "part", "--stop-after", "2")
    recording = tmp_path / "recording.py"  # train.py, noting which files each rank reads with load_file
    recording.write_text(RECORDING.format(root=str(ROOT), out=str(tmp_path)))
    two(recording, *common, "--out-dir", tmp_path / "part", "--resume")
    reads = [json.loads((tmp_path / f"reads-{r}.json").read_text()) for r in (0, 1)]
    assert any(p.endswith("optimizer.safetensors") for p in reads[0])  # rank 0 reads the optimiser state and
    assert not any(p.endswith("optimizer.safetensors") for p in reads[1])  # broadcasts it: rank 1 never holds it
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "part")
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and [r["step"] for r in b] == [1, 2, 3, 4]
    wa, wb = weights(tmp_path / "full" / "ckpt-0000004"), weights(tmp_path / "part" / "ckpt-0000004")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # the merged adapters, bit for bit


def test_precomputed_reference_with_uneven_shares_equals_one_process(world, tmp_path):
    one(train.main, "--data", world / "mixtures" / "sft.json", "--out-dir", tmp_path / "sft", "--max-steps", "1",
        "--batch-size", "2", *FAST)
    rows = [json.loads(x) for x in (world / "dpo" / "pairs.jsonl").read_text().splitlines()][:5]
    five = world_source(world, tmp_path, "five", "pairs", rows)  # shares of 3 and 2
    common = ["--init", tmp_path / "sft", "--data", five, "--max-steps", "1", "--batch-size", "2",
              "--precompute-ref", *LORA, *FAST]
    one(dpo.main, *common, "--out-dir", tmp_path / "one")
    two("dpo.py", *common, "--out-dir", tmp_path / "two", "--fsdp")
    a, b = (load_file(tmp_path / d / "ref_logps.safetensors")["0"] for d in ("one", "two"))
    assert a.shape == (5, 2) and torch.isfinite(a).all() and torch.allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def dpo_setup(tmp_path_factory, world):
    """An SFT checkpoint, four preference pairs, and one process's DPO run on them (batch 4, two steps)."""
    root = tmp_path_factory.mktemp("dpo2")
    one(train.main, "--data", world / "mixtures" / "sft.json", "--out-dir", root / "sft", "--max-steps", "1",
        "--batch-size", "2", *FAST)
    rows = [json.loads(x) for x in (world / "dpo" / "pairs.jsonl").read_text().splitlines()][:4]
    four = world_source(world, root, "four", "pairs", rows)
    common = ["--init", root / "sft", "--data", four, "--max-steps", "2", *LORA, *FAST]
    one(dpo.main, *common, "--out-dir", root / "one", "--batch-size", "4")
    return root, common


@pytest.mark.parametrize("fsdp", [True, False], ids=["fsdp2", "ddp"])
@pytest.mark.parametrize("precompute", [True, False], ids=["precomputed", "on-the-fly"])
def test_dpo_on_two_ranks_equals_one_process(dpo_setup, tmp_path, fsdp, precompute):
    """Two ranks of two pairs against one process of four: the loss scale's world factor, the shared pair
    count and the reference (cached or with the adapters off) must line up across ranks."""
    root, common = dpo_setup
    two("dpo.py", *common, "--out-dir", tmp_path / "two", "--batch-size", "2", *(["--fsdp"] if fsdp else []),
        *(["--precompute-ref"] if precompute else []))
    assert [r["pairs"] for r in metrics(tmp_path / "two")] == [4, 4]
    agree(root / "one", tmp_path / "two", root / "one" / "ckpt-0000002", tmp_path / "two" / "ckpt-0000002", "pairs")
