"""
The one-GPU check: what only a GPU (and NCCL) can show, in one command of at most ~8 minutes, as one table.

    python -m bench.gpu                           # on one GPU: writes out/gpu/ (summary.md, summary.json, logs)
    python -m bench.gpu --device cpu --quick      # the same steps on a CPU at toy sizes (gloo): the plumbing

1. torchrun with one process on NCCL, DDP and FSDP2: training steps over a dataset of one image sample and
   one text-only sample with gradient accumulation (the vision path must stay in the graph), the loss finite.
2. A LoRA stage under FSDP2 stopped after 2 steps and resumed to 4, against an uninterrupted run: on a GPU
   the losses agree to float noise unless --deterministic (see the README on resume).
3. dpo.py --precompute-ref under FSDP2.
4. The `small` preset: train.py's bf16 training step, its MFU and peak memory, and the largest batch that fits.
5. The release's size, a random 4.4B checkpoint in its layout (bench.full): load time, prefill and decoding
   at batch 1 and 8, eager and compiled (CUDA graphs), against the memory-bandwidth bound; the training step
   with bf16 and fp32 weights; then sample.py on that checkpoint (load, first token, decode speed).

Each step's outcome goes into the table: a failure is reported with its last lines, and the next step runs.
"""
import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import ROOT, noise_photo, report

# -----------------------------------------------------------------------------
# steps


def port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def shell(log, *cmd, torchrun=False):
    """Run a command from the repository root, its output to `log`; (seconds, exit status, last lines)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port", port(), *cmd] \
        if torchrun else [sys.executable, *cmd]
    t = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run([str(c) for c in cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    tail = Path(log).read_text().strip().splitlines()[-3:]
    return time.perf_counter() - t, r.returncode, tail


def last_metrics(out):
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines() if (Path(out) / "metrics.jsonl").is_file() else []
    return [json.loads(x) for x in lines]


def pair_dataset(world, path):
    """One LLaVA record with an image, one without."""
    rows = json.loads((world / "sft" / "llava_sft.json").read_text())
    pick = [next(r for r in rows if "image" in r), next(r for r in rows if "image" not in r)]
    pick[0]["image"] = str(world / pick[0]["image"])
    path.write_text(json.dumps(pick))
    return path


def distributed_checks(args, out, world):
    """Steps 1-3: torchrun on one process (NCCL on a GPU), each run's outcome."""
    dev, rows = ["--device", args.device, "--workers", "0", "--log-every", "1", "--max-len", "512"], {}
    pair = pair_dataset(world, out / "pair.json")
    for fsdp in (False, True):
        name = "fsdp2" if fsdp else "ddp"
        run = out / f"train-{name}"
        s, code, tail = shell(out / f"{name}.log", "train.py", "--data", pair, "--tokenizer", world / "tokenizer",
                              "--out-dir", run, "--batch-size", "1", "--grad-accum", "2", "--max-steps", "3", *dev,
                              *(["--fsdp"] if fsdp else []), torchrun=True)
        log = last_metrics(run)
        ok = code == 0 and len(log) == 3 and all(r["loss"] == r["loss"] for r in log)
        rows[f"torchrun, 1 process, {name}: image + text-only micro-batches"] = (ok, f"{s:.0f} s", tail if not ok else
                                                                                 f"losses {[round(r['loss'], 4) for r in log]}")
    lora = ["--stage", "safety", "--init", out / "train-ddp", "--data", world / "mixtures" / "safety.json",
            "--batch-size", "2", "--max-steps", "4", "--fsdp", "--lora-r", "8", *dev]
    s1, c1, t1 = shell(out / "lora-full.log", "train.py", *lora, "--out-dir", out / "lora-full", torchrun=True)
    s2, c2, t2 = shell(out / "lora-part.log", "train.py", *lora, "--out-dir", out / "lora-part", "--stop-after", "2",
                       torchrun=True)
    s3, c3, t3 = shell(out / "lora-resume.log", "train.py", *lora, "--out-dir", out / "lora-part", "--resume",
                       torchrun=True)
    a, b = last_metrics(out / "lora-full"), last_metrics(out / "lora-part")
    ok = not (c1 or c2 or c3) and len(a) == len(b) == 4
    diff = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) if ok else None
    rows["FSDP2 LoRA stage stopped at 2, resumed to 4 vs uninterrupted"] = (
        ok, f"{s1 + s2 + s3:.0f} s", f"max loss difference {diff:.2e}" if ok else (t1 + t2 + t3)[-3:])
    s, code, tail = shell(out / "dpo.log", "dpo.py", "--init", out / "train-ddp", "--data",
                          world / "mixtures" / "dpo.json", "--out-dir", out / "dpo", "--batch-size", "2",
                          "--max-steps", "2", "--precompute-ref", "--fsdp", "--lora-r", "8", *dev, torchrun=True)
    rows["dpo.py --precompute-ref, FSDP2"] = (code == 0, f"{s:.0f} s", tail if code else
                                              f"reference of {len(last_metrics(out / 'dpo'))} steps' pairs cached")
    return rows


def small_training(args, out):
    """Step 4: the `small` preset's bf16 training step (bench.full's), and the largest batch that fits."""
    from types import SimpleNamespace
    import model
    from bench.full import train_step_figures
    device = torch.device(args.device)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    fig = SimpleNamespace(train_batch=8, train_text=1408, repeats=3)
    if args.quick:
        fig.train_batch, fig.train_text, fig.repeats = 1, 32, 1
    rows, batch, largest = {}, fig.train_batch, None
    while True:  # double the batch until a step does not fit
        torch.manual_seed(0)
        m = model.XGenMM(model.preset("small"))
        m.lang_model.init_weights()
        fig.train_batch = batch
        r = train_step_figures(m, fig, device, peak or 1e12, torch.bfloat16)
        del m
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if r.get("out_of_memory") or args.quick or batch >= 512:
            break
        if largest is None:
            rows["small, bf16 weights, train step"] = (True, f"{r['step_s']:.2f} s", (
                f"{r['tok_s']:,.0f} tok/s, MFU {r['mfu']:.1%} of {peak / 1e12 if peak else 1:.0f} TFLOP/s, "
                f"peak {r['peak_memory'] / 1e9:.1f} GB, batch {batch} x {r['tokens'] // batch} tokens"))
        largest, batch = batch, batch * 2
    rows["small: the largest batch that fits"] = (True, "", f"{largest} samples x 2048 positions" if largest
                                                  else "not searched (--quick)")
    return rows


def release_size(args, out):
    """Step 5: a random checkpoint of the release's size (bench.full), then sample.py on it."""
    ckpt = out / "xgenmm-random"
    preset = "small" if args.quick else "xgenmm"
    rows = {}
    if not (ckpt / "config.json").is_file():
        s, code, tail = shell(out / "make.log", "-m", "bench.full", "--make-checkpoint", ckpt, "--preset", preset)
        rows[f"write a random {preset} checkpoint"] = (code == 0, f"{s:.0f} s", tail[-1:] if code == 0 else tail)
    suite = ["--suite", "gpu", "--dtype", "bfloat16" if args.device.startswith("cuda") else "float32"]
    if args.quick:
        suite += ["--new-tokens", "4", "--batches", "1", "2", "--train-batch", "1", "--train-text", "32",
                  "--repeats", "1", "--no-compile"]
    s, code, tail = shell(out / "full.log", "-m", "bench.full", "--checkpoint", ckpt, "--device", args.device,
                          *suite, *(["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []),
                          "--json", out / "full.json")
    rows["bench.full on it (the table below)"] = (code == 0, f"{s:.0f} s", "" if code == 0 else tail)
    img = out / "photo.png"
    noise_photo().save(img)
    if not (ckpt / "tokenizer.model").is_file():
        release_tokenizer(ckpt)
    s, code, tail = shell(out / "sample.log", "sample.py", "--checkpoint", ckpt, "--image", img, "--prompt",
                          "Describe the picture.", "--device", args.device, "--max-new-tokens", "32", "--compile")
    text = Path(out / "sample.log").read_text()
    load = re.search(r"loaded .* in ([\d.]+)s", text)
    speed = re.search(r"\[(\d+) tokens; first after ([\d.]+)s(?:, then ([\d.]+) tok/s)?\]", text)
    rows["sample.py on it: load / first token / decode"] = (code == 0, f"{s:.0f} s", (
        f"{load.group(1)} s / {speed.group(2)} s / {speed.group(3) or '-'} tok/s" if code == 0 and load and speed
        else tail))
    return rows


def release_tokenizer(ckpt):
    """Tokenizer files for the random checkpoint (the release's are not here): a 32,000-piece SentencePiece
    model trained on random words, with Phi-3's added tokens at their real ids 32000-32010, so the loader
    extends it to the release's <pad>, <image>, ... ids and every id the model samples decodes (~15 s)."""
    import io
    import random
    import sentencepiece as spm
    from tests.reference import PHI3_ADDED
    from tokenizer import AddedToken, Tokenizer
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(60000)]
    lines, model = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(20000)], io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, model_type="bpe",
                                   vocab_size=32000, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   character_coverage=1.0, minloglevel=2, num_threads=os.cpu_count())
    added = {32000 + k: AddedToken(c, rstrip=r) for k, (c, r) in enumerate(PHI3_ADDED)}
    Tokenizer(model.getvalue(), added, eos="<|endoftext|>", pad="<|endoftext|>", add_bos=False).save_pretrained(ckpt)

# -----------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/gpu", help="where the logs, runs, checkpoint and summary go")
    p.add_argument("--device", default="cuda", help="cuda (the check), or cpu for --quick plumbing runs")
    p.add_argument("--quick", action="store_true", help="toy sizes, a few steps: the plumbing, on any machine")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 peak for the MFU (H100/H200 SXM: 989)")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    world = out / "world"
    if not (world / "world.json").is_file():
        shell(out / "world.log", "-m", "toy.toyworld", "--out", world, "--size", "small")
    t0 = time.perf_counter()
    rows = distributed_checks(args, out, world) | small_training(args, out) | release_size(args, out)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    lines = [f"| {k} | {'ok' if ok else 'FAILED'} | {t} | {' / '.join(d) if isinstance(d, list) else d} |"
             for k, (ok, t, d) in rows.items()]
    report(f"| {name}, {time.perf_counter() - t0:.0f} s in all | outcome | time | figures |", lines,
           {k: {"ok": ok, "time": t, "figures": d} for k, (ok, t, d) in rows.items()}, out / "summary.json")
    if (out / "full.json").is_file():
        print((out / "full.log").read_text().split("\n| ", 1)[-1][:4000])
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    sys.exit(0 if all(ok for ok, _, _ in rows.values()) else 1)


if __name__ == "__main__":
    main()
