"""
The one-GPU check: what only a GPU (and NCCL) can show, in one command of at most ~8 minutes, as one table.

    python -m bench.gpu                  # on one GPU: writes out/gpu/ (summary.md, summary.json, logs)
    python -m bench.gpu --dry-run        # every step on a CPU at tiny sizes, on gloo: the plumbing (~1 minute)

1. torchrun with one process (NCCL), which wraps the model as on eight: train.py under FSDP2 on a one-rank
   mesh over one image sample and one text-only sample with gradient accumulation (the vision path must stay
   in the graph); a LoRA stage under DDP (fp32 master weights under bf16 autocast, padded batches: FSDP2's
   bf16 gathers would hide a dtype mismatch); a LoRA stage under FSDP2 stopped after 2 steps and resumed to
   4, against an uninterrupted run (on a GPU the losses agree to float noise unless --deterministic: see the
   README); dpo.py --precompute-ref under FSDP2 on eight preference pairs.
2. The `small` preset: train.py's bf16 training step, its MFU and peak memory, and the largest batch (of 8,
   16, 32, ...) that fits.
3. The release's size, a random 4.4B checkpoint in its layout (bench.full): load time, the read bandwidth,
   prefill and decoding at batch 1 and 8, eager and compiled (CUDA graphs), against the bound of reading the
   weights and the KV cache; the training step with bf16 and fp32 weights; then sample.py on that checkpoint
   (load, first token, decode speed), eager: the compiled decode is bench.full's.
4. attention.py's Triton kernel compiled: tests/test_attention.py on CUDA tensors, then bench.attention (the
   kernel against SDPA flash / mem-efficient at 1k/2k/4k, a padded Phi-3-mini training step).

The summary (summary.md, summary.json) is rewritten after every row: a run cut short keeps what it measured.
A step that fails is one failed row with its last lines, and the next step runs.
"""
import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from bench.common import ROOT, noise_photo

# -----------------------------------------------------------------------------
# the table


class Summary:
    """Rows (name -> ok, time, figures), written to summary.md and summary.json each time one is added."""

    def __init__(self, out, device):
        self.out, self.rows, self.t0 = out, {}, time.perf_counter()
        self.device = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU (dry run)"

    def add(self, name, ok, seconds, figures):
        self.rows[name] = (bool(ok), f"{seconds:.0f} s" if seconds is not None else "",
                           " / ".join(figures) if isinstance(figures, list) else str(figures))
        self.write()

    def step(self, fn, *args):
        """Run one step; an exception becomes its failed row."""
        t = time.perf_counter()
        try:
            fn(self, *args)
        except Exception:
            self.add(f"{fn.__name__} (stopped by an error)", False, time.perf_counter() - t,
                     traceback.format_exc().strip().splitlines()[-3:])

    def lines(self):
        head = f"| {self.device}, {time.perf_counter() - self.t0:.0f} s in all | outcome | time | figures |"
        return [head, "|---|---|---|---|"] + [f"| {k} | {'ok' if ok else 'FAILED'} | {t} | {d} |"
                                              for k, (ok, t, d) in self.rows.items()]

    def write(self):
        (self.out / "summary.md").write_text("\n".join(self.lines()) + "\n")
        (self.out / "summary.json").write_text(json.dumps(
            {k: {"ok": ok, "time": t, "figures": d} for k, (ok, t, d) in self.rows.items()}, indent=2))

    def ok(self):
        return all(ok for ok, _, _ in self.rows.values())

# -----------------------------------------------------------------------------
# running the scripts


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
        r = subprocess.run([str(c) for c in cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                           env={**os.environ, "TRITON_CACHE_AUTOTUNING": "1"})  # the tests' tuning, reused
    tail = Path(log).read_text().strip().splitlines()[-3:]
    return time.perf_counter() - t, r.returncode, tail


def metrics(out):
    path = Path(out) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def pair_dataset(world, path):
    """One LLaVA record with an image, one without."""
    rows = json.loads((world / "sft" / "llava_sft.json").read_text())
    pick = [next(r for r in rows if "image" in r), next(r for r in rows if "image" not in r)]
    pick[0]["image"] = str(world / pick[0]["image"])
    path.write_text(json.dumps(pick))
    return path


def pairs_dataset(world, folder, n=8):
    """A mixture of the toy world's first n preference pairs (their images relative to the world)."""
    rows = (world / "dpo" / "pairs.jsonl").read_text().splitlines()[:n]
    (folder / "pairs.pairs.jsonl").write_text("".join(x + "\n" for x in rows))
    mix = {"sources": [{"name": "pairs", "type": "pairs", "path": "pairs.pairs.jsonl", "image_folder": str(world)}]}
    (folder / "pairs.json").write_text(json.dumps(mix))
    return folder / "pairs.json"


def losses(log):
    return f"losses {[round(r['loss'], 4) for r in log]}"

# -----------------------------------------------------------------------------
# the steps


def torchrun_steps(table, args, out, world):
    """Step 1: train.py and dpo.py under torchrun, one process: DDP and FSDP2 each wrap it (a one-rank mesh)."""
    dev = ["--device", args.device, "--workers", "0", "--log-every", "1", "--max-len", "512"]
    s, code, tail = shell(out / "fsdp2.log", "train.py", "--data", pair_dataset(world, out / "pair.json"),
                          "--tokenizer", world / "tokenizer", "--out-dir", out / "train", "--batch-size", "1",
                          "--grad-accum", "2", "--max-steps", "3", "--fsdp", *dev, torchrun=True)
    log = metrics(out / "train")
    ok = code == 0 and len(log) == 3 and all(r["loss"] == r["loss"] for r in log)
    table.add("torchrun, 1 process, FSDP2 on a one-rank mesh: image + text-only micro-batches, accumulated", ok, s,
              losses(log) if ok else tail)
    lora = ["--stage", "safety", "--init", out / "train", "--data", world / "mixtures" / "safety.json",
            "--batch-size", "2", "--max-steps", "4", "--lora-r", "8", *dev]
    s, code, tail = shell(out / "lora-ddp.log", "train.py", *lora, "--out-dir", out / "lora-ddp", torchrun=True)
    log = metrics(out / "lora-ddp")
    table.add("LoRA stage, DDP: fp32 master weights under bf16 autocast, padded batches", code == 0 and len(log) == 4,
              s, losses(log) if code == 0 else tail)
    s1, c1, t1 = shell(out / "lora-full.log", "train.py", *lora, "--fsdp", "--out-dir", out / "lora-full",
                       torchrun=True)
    s2, c2, t2 = shell(out / "lora-part.log", "train.py", *lora, "--fsdp", "--out-dir", out / "lora-part",
                       "--stop-after", "2", torchrun=True)
    s3, c3, t3 = shell(out / "lora-resume.log", "train.py", *lora, "--fsdp", "--out-dir", out / "lora-part",
                       "--resume", torchrun=True)
    a, b = metrics(out / "lora-full"), metrics(out / "lora-part")
    ok = not (c1 or c2 or c3) and len(a) == len(b) == 4
    diff = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) if ok else None
    table.add("FSDP2 LoRA stage stopped at 2, resumed to 4 vs uninterrupted", ok, s1 + s2 + s3,
              f"max loss difference {diff:.2e}" if ok else (t1 + t2 + t3)[-3:])
    s, code, tail = shell(out / "dpo.log", "dpo.py", "--init", out / "train", "--data",
                          pairs_dataset(world, out), "--out-dir", out / "dpo", "--batch-size", "2",
                          "--max-steps", "2", "--precompute-ref", "--fsdp", "--lora-r", "8", *dev, torchrun=True)
    table.add("dpo.py --precompute-ref, FSDP2", code == 0, s, losses(metrics(out / "dpo")) if code == 0 else tail)


def largest_batch(fits, first, cap):
    """The largest of first, 2 first, 4 first, ... up to cap for which fits(batch) holds (None if first does
    not): (that batch, the first batch that did not fit or None)."""
    largest, batch = None, first
    while batch <= cap:
        if not fits(batch):
            return largest, batch
        largest, batch = batch, batch * 2
    return largest, None


def small_training(table, args, out):
    """Step 2: the `small` preset's bf16 training step (bench.full's), and the largest batch that fits."""
    from types import SimpleNamespace
    import model
    from bench.full import train_step_figures
    device = torch.device(args.device)
    preset = "tiny" if args.dry_run else "small"
    fig = SimpleNamespace(train_batch=1, train_text=32, repeats=1) if args.dry_run else \
        SimpleNamespace(train_batch=8, train_text=1408, repeats=3)
    first, tried = fig.train_batch, {}
    dtype = torch.float32 if args.dry_run else torch.bfloat16  # a CPU's bf16 matmuls are slow

    def fits(batch):
        torch.manual_seed(0)
        m = model.XGenMM(model.preset(preset))
        m.lang_model.init_weights()
        fig.train_batch = batch
        tried[batch] = train_step_figures(m, fig, device, args.peak_tflops * 1e12, dtype)
        del m
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if "error" in tried[batch]:
            raise RuntimeError(tried[batch]["error"])
        return "out_of_memory" not in tried[batch]
    t = time.perf_counter()
    largest, refused = largest_batch(fits, first, first if args.dry_run else 512)
    r = tried[first]
    table.add(f"{preset}, {str(dtype).removeprefix('torch.')} weights, train step", largest is not None, r.get("step_s"), (
        f"{r['tok_s']:,.0f} tok/s, MFU {r['mfu']:.1%} of {args.peak_tflops:.0f} TFLOP/s, peak "
        f"{r['peak_memory'] / 1e9:.1f} GB, batch {first} x {r['tokens'] // first} tokens") if largest else
        r.get("out_of_memory", ""))
    table.add(f"{preset}: the largest batch that fits", largest is not None, time.perf_counter() - t,
              f"{largest} samples x {r['tokens'] // first} positions" + (f" ({refused} did not fit)" if refused else
                                                                          " (the largest tried)"))


def release_size(table, args, out):
    """Step 3: a random checkpoint of the release's size (bench.full), then sample.py on it."""
    ckpt = out / "xgenmm-random"
    preset = "tiny" if args.dry_run else "xgenmm"
    if not (ckpt / "config.json").is_file():
        s, code, tail = shell(out / "make.log", "-m", "bench.full", "--make-checkpoint", ckpt, "--preset", preset)
        table.add(f"write a random {preset} checkpoint", code == 0, s, tail[-1:] if code == 0 else tail)
    suite = ["--suite", "gpu", "--dtype", "float32" if args.dry_run else "bfloat16", "--no-train-small"]
    if args.dry_run:
        suite += ["--new-tokens", "4", "--batches", "1", "2", "--train-batch", "1", "--train-text", "32",
                  "--repeats", "1", "--no-compile", "--prompt-tokens", "8", "--bandwidth-gbs", "10"]
    s, code, tail = shell(out / "full.log", "-m", "bench.full", "--checkpoint", ckpt, "--device", args.device,
                          *suite, "--peak-tflops", str(args.peak_tflops), "--json", out / "full.json")
    table.add("bench.full on it (its table: full.log)", code == 0, s, "" if code == 0 else tail)
    img = out / "photo.png"
    noise_photo().save(img)
    if not (ckpt / "tokenizer.model").is_file():
        release_tokenizer(ckpt, preset)
    s, code, tail = shell(out / "sample.log", "sample.py", "--checkpoint", ckpt, "--image", img, "--prompt",
                          "Describe the picture.", "--device", args.device, "--max-new-tokens",
                          "8" if args.dry_run else "32")
    text = Path(out / "sample.log").read_text()
    load = re.search(r"loaded .* in ([\d.]+)s", text)
    speed = re.search(r"\[(\d+) tokens; first after ([\d.]+)s(?:, then ([\d.]+) tok/s)?\]", text)
    table.add("sample.py on it, eager: load / first token / decode", code == 0 and load and speed, s, (
        f"{load.group(1)} s / {speed.group(2)} s / {speed.group(3) or '-'} tok/s" if code == 0 and load and speed
        else tail))


def attention_kernel(table, args, out):
    """Step 4: the Triton kernel's tests compiled on the GPU, then its figures against SDPA (bench.attention)."""
    quick = ["-k", "dispatch or refuses"] if args.dry_run else []  # the interpreted kernel is the suite's
    s, code, tail = shell(out / "attention-tests.log", "-m", "pytest", "-q", "-p", "no:cacheprovider", *quick,
                          "tests/test_attention.py")
    table.add("tests/test_attention.py, the Triton kernel on this device", code == 0, s, tail[-1:] if code == 0
              else tail)
    sizes = (["--lengths", "64", "--repeats", "1", "--heads", "2", "--head-dim", "16", "--preset", "tiny",
              "--layers", "1"] if args.dry_run else [])
    dtype = "float32" if args.dry_run else "bfloat16"
    s, code, tail = shell(out / "attention.log", "-m", "bench.attention", "--device", args.device, "--dtype", dtype,
                          *sizes, "--json", out / "attention.json")
    table.add("bench.attention: Triton vs SDPA (its table: attention.log)", code == 0, s, "" if code == 0 else tail)


def release_tokenizer(ckpt, preset):
    """Tokenizer files for the random checkpoint (the release's are not here): a SentencePiece model trained on
    random words, then Phi-3's added tokens (for the release's size at their real ids 32000-32010), so the
    loader extends it to the preset's <pad>, <image>, ... ids and every id the model samples decodes (~15 s)."""
    import io
    import random
    import sentencepiece as spm
    import model as xgenmm
    from tests.reference import PHI3_ADDED
    from tokenizer import AddedToken, Tokenizer
    pieces = xgenmm.preset(preset).initial_tokenizer_len - 1 - len(PHI3_ADDED)  # then the added ones, then <pad>
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(60000)]
    lines, model = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(pieces * 5 // 8)], io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, model_type="bpe",
                                   vocab_size=pieces, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   character_coverage=1.0, minloglevel=2, num_threads=os.cpu_count())
    added = {pieces + k: AddedToken(c, rstrip=r) for k, (c, r) in enumerate(PHI3_ADDED)}
    Tokenizer(model.getvalue(), added, eos="<|endoftext|>", pad="<|endoftext|>", add_bos=False).save_pretrained(ckpt)

# -----------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/gpu", help="where the logs, runs, checkpoint and summary go")
    p.add_argument("--dry-run", action="store_true",
                   help="every step on the CPU at tiny sizes, torchrun on gloo: the plumbing, before a GPU minute")
    p.add_argument("--world", default=None, help="an existing toy world to read (default: written into --out)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 peak for the MFU (H100/H200 SXM: 989)")
    args = p.parse_args(argv)
    args.device = "cpu" if args.dry_run else "cuda"
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    world = Path(args.world).resolve() if args.world else out / "world"
    if not (world / "world.json").is_file():
        shell(out / "world.log", "-m", "toy.toyworld", "--out", world, "--size", "small")
    table = Summary(out, args.device)
    for step in (torchrun_steps, small_training, release_size, attention_kernel):
        table.step(step, args, out, world) if step is torchrun_steps else table.step(step, args, out)
    print("\n".join(table.lines()))
    for log in ("full.log", "attention.log"):  # their tables, after the summary
        if (out / log).is_file():
            print((out / log).read_text().split("\n| ", 1)[-1][:4000])
    return 0 if table.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
