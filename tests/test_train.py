"""train.py on the toy world (CPU): learning, freezing, LoRA, accumulation == big batch, DDP == one process,
exact resume, a kill during a checkpoint write, bad samples."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import model
import train
from conftest import THREADS, world_source

ROOT = Path(__file__).resolve().parent.parent
# Two runs that must give the same update are compared three ways. The loss (<= 1e-5) and the gradient norm
# before clipping (<= 1e-4 relative) see a wrong normalisation: a dropped world size or accumulation factor in
# the loss scale doubles or halves the norm. The weights after two AdamW steps at lr 1e-3 cannot see a constant
# scale (Adam divides each gradient by its own size), and float noise in near-zero gradients, amplified by that
# division, moves some weights by up to ~1e-4 (4.6e-5 measured); a missed or doubled update moves them ~1e-3.
WEIGHTS = 3e-4
GRAD_NORM = 1e-4
FAST = ["--workers", "0", "--max-len", "512", "--log-every", "1", "--save-every", "100", "--lr", "1e-3"]


def run(world, out, *extra, mixture="pretrain"):
    train.main(["--data", str(world / "mixtures" / f"{mixture}.json"), "--out-dir", str(out), *FAST, *extra])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def params(ckpt):
    return load_file(ckpt / "model.safetensors")


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def same_updates(a, b):
    """Two runs' metrics agree step by step: supervised tokens exactly, loss and gradient norm (see above)."""
    assert len(a) == len(b) and [r["supervised_tokens"] for r in a] == [r["supervised_tokens"] for r in b]
    assert all(abs(x["loss"] - y["loss"]) <= 1e-5 for x, y in zip(a, b))
    assert all(abs(x["grad_norm"] - y["grad_norm"]) <= GRAD_NORM * y["grad_norm"] for x, y in zip(a, b))


def test_loss_falls_and_the_frozen_vit_stays(world, tmp_path):
    rows = json.loads((world / "sft" / "llava_sft.json").read_text())[:2]
    one = world_source(world, tmp_path, "one", "llava", rows)  # two samples: every batch is the same two, so the loss must fall
    train.main(["--data", str(one), "--tokenizer", str(world / "tokenizer"), "--out-dir", str(tmp_path / "a"),
                "--batch-size", "2", "--max-steps", "8", "--no-train-vit", *FAST])
    log = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    assert log[0]["supervised_tokens"] > 0
    torch.manual_seed(0)  # the initial weights, rebuilt from the same seed
    init = model.XGenMM.from_tokenizer(world / "tokenizer").official_state_dict()
    final = params(tmp_path / "a" / "ckpt-0000008")
    vit = [k for k in final if k.startswith("vlm.vision_encoder.")]
    assert vit and all(torch.equal(final[k], init[k]) for k in vit)  # frozen: bit for bit
    assert not torch.equal(final["vlm.vision_tokenizer.latents"], init["vlm.vision_tokenizer.latents"])
    assert model.XGenMM.from_pretrained(tmp_path / "a" / "ckpt-0000008").tokenizer is not None


def test_accumulation_equals_one_big_batch(world, tmp_path):
    run(world, tmp_path / "big", "--batch-size", "4", "--grad-accum", "1", "--max-steps", "2")
    run(world, tmp_path / "acc", "--batch-size", "1", "--grad-accum", "4", "--max-steps", "2")
    big, acc = ([json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("big", "acc"))
    same_updates(big, acc)
    assert max_diff(params(tmp_path / "big" / "ckpt-0000002"), params(tmp_path / "acc" / "ckpt-0000002")) <= WEIGHTS


def test_resume_is_exact(world, tmp_path):
    full = run(world, tmp_path / "full", "--batch-size", "2", "--max-steps", "6", "--save-every", "3")
    part = run(world, tmp_path / "part", "--batch-size", "2", "--max-steps", "6", "--stop-after", "3")
    assert len(part) == 3
    both = run(world, tmp_path / "part", "--batch-size", "2", "--max-steps", "6", "--resume")
    assert [r["loss"] for r in both] == [r["loss"] for r in full]  # bit for bit, step by step
    assert [r["grad_norm"] for r in both] == [r["grad_norm"] for r in full]
    assert max_diff(params(tmp_path / "full" / "ckpt-0000006"), params(tmp_path / "part" / "ckpt-0000006")) == 0


@pytest.fixture(scope="module")
def base(world, tmp_path_factory):
    """A one-step pretraining run: the --init of the LoRA stage tests."""
    out = tmp_path_factory.mktemp("base")
    run(world, out, "--batch-size", "2", "--max-steps", "1")
    return out


def test_safety_trains_only_lora_and_saves_a_merged_model(world, base, tmp_path):
    run(world, tmp_path / "safe", "--stage", "safety", "--init", str(base), "--batch-size", "2",
        "--max-steps", "3", "--lora-r", "4", "--lora-alpha", "8", mixture="safety")
    base = base / "ckpt-0000001"
    ckpt = tmp_path / "safe" / "ckpt-0000003"
    before, after = params(base), params(ckpt)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    targets = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    assert changed and all(k.startswith("vlm.lang_model.") and k.split(".")[-2] in targets for k in changed)
    adapters = load_file(ckpt / "trainer" / "adapters.safetensors")
    assert adapters and all(".lora_" in k for k in adapters)
    m = model.XGenMM.from_pretrained(ckpt)  # merged: a plain checkpoint in the official layout
    assert m.tokenizer is not None


def test_safety_stop_and_resume_equals_an_uninterrupted_run(world, base, tmp_path):
    """A LoRA stage resumes by rebuilding the model from --init and taking the adapters, optimiser and RNG
    (LoRA dropout draws) from its checkpoint: bit for bit the uninterrupted run, merged weights included."""
    args = ["--stage", "safety", "--init", str(base), "--batch-size", "2", "--max-steps", "4", "--lora-r", "4",
            "--lora-alpha", "8", "--lora-dropout", "0.1"]
    full = run(world, tmp_path / "full", *args, mixture="safety")
    part = run(world, tmp_path / "part", *args, "--stop-after", "2", mixture="safety")
    both = run(world, tmp_path / "part", *args, "--resume", mixture="safety")
    assert len(part) == 2 and [r["step"] for r in both] == [1, 2, 3, 4]
    assert [(r["loss"], r["grad_norm"]) for r in both] == [(r["loss"], r["grad_norm"]) for r in full]
    assert max_diff(params(tmp_path / "full" / "ckpt-0000004"), params(tmp_path / "part" / "ckpt-0000004")) == 0


def test_a_bf16_checkpoint_trains_in_fp32_master_weights(world, tmp_path):
    """From a bf16 checkpoint (as the release is), an SFT-rate step moves most weights by less than bf16's
    rounding step: fp32 master weights (the default) keep every update, --param-dtype bfloat16 loses most."""
    torch.manual_seed(0)
    model.XGenMM.from_tokenizer(world / "tokenizer").to(torch.bfloat16).save_pretrained(tmp_path / "init")
    init = params(tmp_path / "init")
    moved = {}
    for dtype in ("float32", "bfloat16"):
        args = ["--param-dtype", dtype] if dtype == "bfloat16" else []
        run(world, tmp_path / dtype, "--stage", "sft", "--init", str(tmp_path / "init"), "--batch-size", "2",
            "--max-steps", "1", "--lr", "2e-5", *args, mixture="sft")
        final = params(tmp_path / dtype / "ckpt-0000001")
        k = "vlm.lang_model.model.layers.0.mlp.down_proj.weight"
        assert final[k].dtype == getattr(torch, dtype)
        moved[dtype] = (final[k].float() != init[k].float()).float().mean().item()
        assert torch.equal(final["vlm.vision_encoder.embeddings.patch_embedding.weight"].float(),
                           init["vlm.vision_encoder.embeddings.patch_embedding.weight"].float())  # frozen
    # bf16 keeps only the updates of weights under ~0.01 (N(0, 0.02) init: ~30% of them); fp32 keeps all
    assert moved["float32"] > 0.99 and moved["bfloat16"] < 0.5, moved


def test_preset_sizes_a_new_model_and_conflicts_with_init(tmp_path, capsys):
    args = train.finish_args(train.build_parser().parse_args(["--preset", "small"]))
    assert args.preset == "small" and train.finish_args(train.build_parser().parse_args([])).preset == "tiny"
    with pytest.raises(SystemExit) as e:
        train.finish_args(train.build_parser().parse_args(["--preset", "small", "--init", str(tmp_path)]))
    assert e.value.code == 2 and "give only one" in capsys.readouterr().err


def test_the_run_prints_what_it_resolved(world, tmp_path, capsys):
    """Learning rate, warm-up, steps, batch, what trains and LoRA come from flags, the stage's defaults and the
    toy world: the run prints them, resolved, before it builds the model."""
    args = train.finish_args(train.build_parser().parse_args(["--stage", "safety", "--init", "x", "--max-steps", "40",
                                                              "--grad-accum", "2"]))
    text = train.resolved(args, 4, torch.device("cpu"))
    assert "lr: 1.00e-04 after 2 warm-up steps, cosine to 1.00e-05" in text and "stage: safety, 40 steps" in text
    assert "batch: 8 x grad-accum 2 x 4 rank(s)" in text and "weights: float32 on cpu" in text
    assert "trains: the LoRA adapters only" in text and "LoRA: r 64, alpha 128, dropout 0.05" in text
    run(world, tmp_path / "p", "--batch-size", "2", "--max-steps", "1")
    out = capsys.readouterr().out
    assert "lr: 1.00e-03 after 1 warm-up steps" in out and "trains: ViT, resampler and LLM" in out
    assert "LoRA: off" in out and out.index("from: a new tiny model") < out.index("parameters:")


def test_bad_samples_are_skipped_and_counted(world, tmp_path):
    rows = json.loads((world / "sft" / "llava_sft.json").read_text())[:12]
    rows[1]["image"] = "images/missing.png"
    world_source(world, tmp_path, "bad", "llava", rows)
    train.main(["--data", str(tmp_path / "bad.json"), "--tokenizer", str(world / "tokenizer"), "--out-dir",
                str(tmp_path / "b"), "--batch-size", "4", "--max-steps", "3", "--max-bad-fraction", "0.5", *FAST])
    log = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["bad_samples"] >= 1 and len(log) == 3
    # too many: 7 bad rows of 8 (bad ones are cheap to skip), judged once 200 samples are seen (10 steps of 20)
    text_only = [r for r in json.loads((world / "sft" / "llava_sft.json").read_text()) if "image" not in r][:1]
    world_source(world, tmp_path, "worse", "llava", text_only + [dict(rows[0], image="images/missing.png")] * 7)
    with pytest.raises(RuntimeError, match=r"samples were bad \(missing image: \d+\), more than the allowed 50%"):
        train.main(["--data", str(tmp_path / "worse.json"), "--tokenizer", str(world / "tokenizer"), "--out-dir",
                    str(tmp_path / "c"), "--batch-size", "20", "--max-steps", "60", "--max-bad-fraction", "0.5",
                    *FAST])
    log = [json.loads(x) for x in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 9  # stopped at the 10th step, the first to pass 200 samples


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def torchrun(world, out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", free_port(),
           "train.py", "--data", str(world / "mixtures" / "sft.json"), "--out-dir", str(out), *FAST, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_equal_one(world, tmp_path, fsdp):
    torch.set_num_threads(1)
    try:
        run(world, tmp_path / "one", "--batch-size", "4", "--max-steps", "2", mixture="sft")
    finally:
        torch.set_num_threads(THREADS)
    torchrun(world, tmp_path / "two", "--batch-size", "2", "--max-steps", "2", *(["--fsdp"] if fsdp else []))
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    same_updates(one, two)
    assert max_diff(params(tmp_path / "one" / "ckpt-0000002"), params(tmp_path / "two" / "ckpt-0000002")) <= WEIGHTS


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(world, tmp_path):
    out = tmp_path / "k"
    slow_save = (  # the real save, made slow after the model files are written, so the kill lands inside it
        "import sys, time, train\n"
        "real = train.XGenMM.save_pretrained\n"
        "def slow(self, *a, **k):\n"
        "    r = real(self, *a, **k)\n"
        "    if 'ckpt-0000004' in str(a[0]): print('SAVING', flush=True); time.sleep(60)\n"
        "    return r\n"
        "train.XGenMM.save_pretrained = slow\n"
        "train.main(sys.argv[1:])\n")
    args = ["--data", str(world / "mixtures" / "pretrain.json"), "--out-dir", str(out), *FAST, "--batch-size", "2",
            "--max-steps", "6", "--save-every", "2"]
    p = subprocess.Popen([sys.executable, "-c", slow_save, *args], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    watchdog = threading.Timer(300, p.kill)  # a run that never reaches the write must not hang the suite
    watchdog.start()
    try:
        saving = any("SAVING" in line for line in p.stdout)  # stops reading at the first SAVING, or at EOF
    finally:
        watchdog.cancel()
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert saving, "the run ended (or hung) before writing its second checkpoint"
    assert (out / ".tmp-ckpt-0000004").is_dir() and not (out / "ckpt-0000004").exists()
    assert checkpoint.newest(out).name == "ckpt-0000002"
    model.XGenMM.from_pretrained(out / "ckpt-0000002")  # loads
    log = run(world, out, "--batch-size", "2", "--max-steps", "6", "--save-every", "2", "--resume")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and (out / "ckpt-0000006").is_dir()
    full = run(world, tmp_path / "full", "--batch-size", "2", "--max-steps", "6", "--save-every", "2")
    assert [r["loss"] for r in log] == [r["loss"] for r in full]


@pytest.mark.parametrize("fused", [True, False], ids=["fused: skipped on the device", "skipped on the host"])
def test_nonfinite_steps_are_skipped_then_stop_the_run(world, tmp_path, monkeypatch, fused):
    lin = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(lin.parameters(), fused=fused)
    before = [p.detach().clone() for p in lin.parameters()]

    class Nan(torch.nn.Module):  # a model whose loss is NaN
        def forward(self, ids, images, mask, labels, **kw):
            return lin(torch.ones(1, 2)).sum() * float("nan")
    batch = {"input_ids": torch.ones(1, 3, dtype=torch.long), "labels": torch.ones(1, 3, dtype=torch.long),
             "images": None, "attention_mask": None}
    args = train.build_parser().parse_args([])
    s = SimpleNamespace(wrapped=Nan(), m=lin, opt=opt, params=list(lin.parameters()), args=args, world=1,
                        device=torch.device("cpu"))
    rec = train.train_step(s, [batch])
    assert torch.isnan(rec["grad_norm"]) and torch.isnan(rec["loss"])  # skipped, NaN reported
    assert all(torch.equal(a, b) for a, b in zip(before, lin.parameters())) and lin.weight.grad is None
    assert all(int(st["step"]) == 0 for st in opt.state.values())  # a skipped step is not counted by AdamW
    nan = torch.tensor(float("nan"))
    monkeypatch.setattr(train, "train_step", lambda s, micro: {"loss": nan, "grad_norm": nan})
    with pytest.raises(SystemExit, match="3 steps in a row had a NaN/inf loss"):
        run(world, tmp_path / "nan", "--batch-size", "2", "--max-steps", "10", "--max-nonfinite", "3")


def test_init_switches_strategy_and_adds_an_instruction_aware_resampler(world, tmp_path):
    """The ablation switches: --strategy on a checkpoint changes only the views; --instruction-aware adds a
    projection; the run trains and saves both."""
    run(world, tmp_path / "base", "--batch-size", "2", "--max-steps", "1")
    base = checkpoint.newest(tmp_path / "base")
    log = run(world, tmp_path / "fixed", "--init", str(base), "--stage", "sft", "--strategy", "fixed",
              "--instruction-aware", "--batch-size", "2", "--max-steps", "2", mixture="sft")
    assert len(log) == 2 and all(r["loss"] == r["loss"] for r in log)
    m = model.XGenMM.from_pretrained(checkpoint.newest(tmp_path / "fixed"))
    assert m.config.strategy == "fixed" and m.config.resampler.instruction_dim == m.config.text.hidden_size
    before = model.XGenMM.from_pretrained(base)
    assert before.config.strategy == "anyres" and not before.config.resampler.instruction_dim
    assert torch.equal(m.vision_encoder.embeddings.position_embedding.weight,
                       before.vision_encoder.embeddings.position_embedding.weight)  # the ViT stays frozen


def test_broken_data_is_one_line_and_exit_2(world, tmp_path, capsys):
    """A malformed data file stops train.py and dpo.py before training with one line naming it (no traceback)."""
    import dpo
    bad = tmp_path / "mix.json"
    bad.write_text('{"sources": [\n  {"name": "a" "type": "llava"}]}')
    model.XGenMM.from_tokenizer(world / "tokenizer").save_pretrained(tmp_path / "init")
    for main, extra in ((train.main, []), (dpo.main, ["--init", str(tmp_path / "init")])):
        with pytest.raises(SystemExit) as e:
            main(["--data", str(bad), "--tokenizer", str(world / "tokenizer"), "--out-dir", str(tmp_path / "o"),
                  *extra, *FAST])
        err = capsys.readouterr().err
        assert e.value.code == 2 and str(bad) in err and "not valid JSON" in err and "Traceback" not in err, err
    assert "--stage" not in dpo.build_parser().format_help()  # dpo.py is one stage
