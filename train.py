"""
Train xGen-MM: pretraining, SFT, interleaved (multi-image) SFT and safety tuning, one objective (next-token
loss on the supervised text), on a CPU, one GPU, or many with torchrun.

    python train.py                                            # toy world pretraining on a CPU (~4 minutes)
    python train.py --stage sft --init out/pretrain --data data/toy/mixtures/sft.json
    python train.py --stage pretrain --init siglip-so400m-patch14-384 Phi-3-mini-4k-instruct \\
        --data mixtures/pretrain.json --device cuda --batch-size 8 --grad-accum 8 --grad-checkpointing
    torchrun --nproc_per_node=8 train.py --stage sft --init Salesforce/xgen-mm-phi3-mini-base-r-v1.5 \\
        --data mixtures/sft.json --device cuda --batch-size 4 --grad-accum 2 --fsdp --grad-checkpointing
    python train.py --stage sft --resume                       # continue out/sft exactly where it stopped

What is notable:
1. What trains follows the paper (docs/release.md §5): the ViT is frozen in every stage; pretraining and SFT
   train the resampler and the LLM; safety tuning (and dpo.py) trains LoRA adapters (lora.py) on the LLM.
2. A model started from scratch (no --init: the toy world has no SigLIP to freeze) trains its ViT in
   pretraining (--train-vit): a frozen random ViT would hand the resampler random projections of pixels.
3. The loss is summed over tokens and divided by the supervised tokens of the whole optimiser step (all
   micro-batches, all ranks), so gradient accumulation and data parallelism give the update of one big batch.
4. Checkpoints (checkpoint.py) are written whole or not at all: the model in the official layout, optimiser,
   RNG states, data position and arguments. --resume continues from the newest, bit for bit on a CPU.
5. A step whose loss is NaN or inf is skipped and counted; too many in a row stop the run.
6. Weights, gradients and AdamW's states are fp32 (--param-dtype), even from the bf16 release: at SFT's
   learning rate most updates are smaller than bf16's rounding step and would vanish. On CUDA the forward
   and backward compute in bf16 under autocast, and FSDP2 gathers the fp32 shards in bf16.
"""
import argparse
import json
import math
import os
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoint
import data
import lora
import toy
import weights
from distributed import all_sum, print0, sync_grads
import distributed
from errors import fail
from model import PRESET_PARTS, STRATEGIES, XGenMM, XGenMMConfig
from resampler import InstructionAwareResampler

STAGES = ("pretrain", "sft", "interleave", "safety")
LORA_STAGES = ("safety", "dpo")  # the paper's LoRA stages (dpo.py runs the loop below as stage "dpo")
# SFT's 2e-5 is the paper's (docs/release.md §5); the others are this project's defaults, higher for LoRA
DEFAULT_LR = {"pretrain": 1e-4, "sft": 2e-5, "interleave": 2e-5, "safety": 1e-4, "dpo": 5e-5}
SCRATCH_LR = 1e-3  # a tiny model trained from scratch (the toy world's) learns fast at this rate


def main(argv=None):
    """Flags -> the resolved run (printed) -> the loop, one `train_step` per optimiser step."""
    run = Run(finish_args(build_parser().parse_args(argv)))
    train(run, train_step)
    run.close()
    return run

# -----------------------------------------------------------------------------
# arguments


def build_parser(description=__doc__, stages=STAGES):
    """train.py's flags, one a line; dpo.py reuses them with its own description and no --stage (one stage)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    on_off = argparse.BooleanOptionalAction
    g = p.add_argument_group("run")
    if stages:
        g.add_argument("--stage", default="pretrain", choices=stages, help="what to train (default: pretrain)")
    g.add_argument("--out-dir", default=None, help="run directory: checkpoints, metrics.jsonl (default: out/<stage>)")
    g.add_argument("--init", nargs="+", default=None, metavar="PATH", help="a checkpoint, a Hub id in the local "
                   "cache, a run directory (its newest), or SIGLIP PHI3 (default: a new --preset model)")
    g.add_argument("--data", default=None, help="a mixture config or one dataset (default: the toy world's mixture)")
    g.add_argument("--tokenizer", default=None, help="of a new model (default: the tokenizer/ that ships with --data)")
    g.add_argument("--resume", action=on_off, default=False, help="continue exactly from --out-dir's newest checkpoint")
    g.add_argument("--stop-after", type=int, default=None, metavar="N", help="save and exit after N steps (job limits)")
    g = p.add_argument_group("schedule")
    g.add_argument("--max-steps", type=int, default=None, help="optimiser steps (default: toy world 200, else 1000)")
    g.add_argument("--batch-size", type=int, default=8, help="samples per micro-batch per rank")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    g.add_argument("--max-len", type=int, default=2048, help="tokens per sample, images counted as their vision tokens")
    g.add_argument("--system", default=None, metavar="TEXT", help="system prompt of the chats that bring none "
                   "(default: the release's helpful-assistant one; \"\" for none)")
    g.add_argument("--lr", type=float, default=None, help=f"peak (default: {SCRATCH_LR:g} from scratch, else by stage: "
                   f"{DEFAULT_LR})")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
    g.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default: 5%% of --max-steps)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices (paper: 0)")
    g.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping (0: off)")
    g.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    g.add_argument("--length-groups", type=int, default=1, metavar="G", help="sort G batches by length (less padding)")
    g = p.add_argument_group("model")
    g.add_argument("--preset", default=None, choices=sorted(PRESET_PARTS), help="size of a new model (default: tiny)")
    g.add_argument("--strategy", default=None, choices=STRATEGIES, help="image strategy, also switched on an --init")
    g.add_argument("--train-vit", action=on_off, default=None, help="train the ViT (default: pretraining from scratch)")
    g.add_argument("--instruction-aware", action="store_true", help="the resampler reads the question (an ablation)")
    g.add_argument("--lora", action=on_off, default=None, help=f"train LoRA adapters (default: on for {LORA_STAGES})")
    g.add_argument("--lora-r", type=int, default=64, help="LoRA rank")
    g.add_argument("--lora-alpha", type=float, default=128.0, help="LoRA alpha (scale alpha / r)")
    g.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    g.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"], help="of weights and AdamW")
    g.add_argument("--fsdp", action=on_off, default=False, help="shard with FSDP2 (fully_shard) instead of DDP")
    g.add_argument("--grad-checkpointing", action=on_off, default=False, help="recompute activations (~30%% slower)")
    g.add_argument("--compile", action=on_off, default=False, help="torch.compile the LLM blocks")
    g.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    g.add_argument("--dist-timeout", type=float, default=60.0, metavar="MIN", help="minutes a collective waits")
    g.add_argument("--deterministic", action=on_off, default=False, help="deterministic GPU kernels (exact resume)")
    g.add_argument("--peak-tflops", type=float, default=989.0, help="GPU bf16 peak for the MFU (H100 SXM: 989)")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--log-every", type=int, default=10, help="a log line (and metrics.jsonl record) every N steps")
    g.add_argument("--save-every", type=int, default=100, help="a checkpoint every N steps (and at the end)")
    g.add_argument("--keep", type=int, default=2, help="checkpoints kept (oldest removed)")
    g.add_argument("--max-bad-fraction", type=float, default=0.05, help="stop when more bad samples than this")
    g.add_argument("--max-nonfinite", type=int, default=10, help="stop after this many NaN/inf steps in a row")
    return p


def finish_args(args, script="train.py"):
    """Defaults that depend on other flags; with no --data, a newcomer's first run: the toy world (toy/)."""
    args.out_dir = args.out_dir or f"out/{args.stage}"
    if args.preset and args.init:
        fail(script, "--preset sizes a new model and --init starts from a saved one; give only one")
    if args.init is None:
        args.preset = args.preset or "tiny"
    if args.data is None:
        args.data = str(toy.WORLD / "mixtures" / f"{args.stage}.json")
        args.max_steps = args.max_steps or toy.STEPS
    args.max_steps = args.max_steps or 1000
    if args.lr is None:
        args.lr = SCRATCH_LR if args.init is None else DEFAULT_LR[args.stage]
    if args.warmup is None:
        args.warmup = max(1, args.max_steps // 20)
    args.train_vit = args.init is None and args.stage == "pretrain" if args.train_vit is None else args.train_vit
    args.lora = args.stage in LORA_STAGES if args.lora is None else args.lora
    args.system = data.DEFAULT_SYSTEM if args.system is None else args.system
    return args


def resolved(args, world, device):
    """The run as its flags, the stage's defaults and the toy world resolved it: printed first, as nanochat does."""
    trains = "ViT, resampler and LLM" if args.train_vit else "resampler and LLM (the ViT is frozen)"
    return "\n".join(f"{k:>7}: {v}" for k, v in {
        "stage": f"{args.stage}, {args.max_steps} steps, data {args.data}, out {args.out_dir}",
        "from": " ".join(args.init) if args.init else f"a new {args.preset} model",
        "lr": f"{args.lr:.2e} after {args.warmup} warm-up steps, cosine to {args.lr * args.min_lr_ratio:.2e}",
        "batch": f"{args.batch_size} x grad-accum {args.grad_accum} x {world} rank(s), <= {args.max_len} tokens each",
        "trains": "the LoRA adapters only" if args.lora else trains,
        "LoRA": f"r {args.lora_r}, alpha {args.lora_alpha:g}, dropout {args.lora_dropout:g}" if args.lora else "off",
        "weights": f"{args.param_dtype} on {device}" + (", FSDP2" if args.fsdp else ""),
    }.items())


# -----------------------------------------------------------------------------
# the run: model, optimiser, data


class Run:
    """What a run holds: arguments, ranks, the model (plain and wrapped), optimiser, trainer state."""

    def __init__(self, args, script="train.py"):
        self.args, self.script = args, script
        self.rank, self.world, self.device = distributed.setup(args.device, args.dist_timeout)
        print0(resolved(args, self.world, self.device))
        if args.deterministic:  # cuBLAS needs its workspace fixed for deterministic matrix products
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.run_dir = Path(args.out_dir)
        if not Path(args.data).exists() and Path(args.data).is_relative_to(toy.WORLD):  # a first run's, written once
            if self.rank == 0:
                toy.ensure_world(toy.WORLD)
            distributed.barrier()
        resume = checkpoint.newest(self.run_dir) if args.resume else None
        if args.resume and resume is None:
            print0(f"--resume: no checkpoint in {self.run_dir} yet, starting from the beginning")
        torch.manual_seed(args.seed)
        dtype = getattr(torch, args.param_dtype)
        try:
            # the checkpoint holds the whole model, unless LoRA: then the base from --init, the adapters from it
            whole = resume is not None and not args.lora
            m = XGenMM.from_pretrained(resume, dtype, self.device) if whole else load_model(args, self.device)
            tok = m.tokenizer
            self.sources = data.open_sources(args.data, tok.id_to_token(tok.eos_id))
        except (weights.CheckpointError, data.DataError) as e:
            fail(script, e)
        print0(configure(m, args))
        self.m = m.to(self.device, dtype).train()
        if resume is not None and args.lora:  # into the plain parameters, before FSDP2 shards them
            lora.load_adapters(m, resume / "trainer" / "adapters.safetensors")
        self.wrapped = distributed.wrap(m, self.device, self.world, args.fsdp)
        self.params = [p for p in m.parameters() if p.requires_grad]
        self.opt = make_optimizer(m, args, self.device)  # after wrapping: FSDP2 replaced the parameters
        self.trainer = {"step": 0, "nonfinite": 0, "seen": 0, "bad": {}}
        if resume is not None:
            self.trainer = checkpoint.load(resume, self.wrapped, self.opt)
            print0(f"resumed from {resume} at step {self.trainer['step']}")

    def batches(self):
        """The batches of this rank from the run's data position on, built by DataLoader workers (in pinned
        memory on CUDA, so the copies to the GPU do not wait)."""
        args, tok = self.args, self.m.tokenizer
        mixture = data.Mixture(self.sources, data.Encoder(tok, self.m.config, args.max_len, args.system),
                               args.batch_size, tok.pad_id, seed=args.seed, rank=self.rank, world=self.world,
                               start_batch=self.trainer["step"] * args.grad_accum, group=args.length_groups)
        return iter(data.loader(mixture, num_workers=args.workers, pin_memory=self.device.type == "cuda"))

    def close(self):
        distributed.close()


def load_model(args, device):
    """The model to start from: --init (see --help), or a new model of --preset sized to the tokenizer. Built or
    loaded straight onto `device`, in --param-dtype: each rank holds one copy there and none on the host."""
    dtype = getattr(torch, args.param_dtype)
    if args.init is None:
        tokenizer = args.tokenizer or data.dataset_tokenizer(args.data)
        if tokenizer is None:
            raise data.DataError(f"a new model is sized to its tokenizer: pass --tokenizer (none ships with "
                                 f"{args.data})")
        with torch.device(device):
            m = XGenMM.from_tokenizer(tokenizer, args.preset, args.strategy or "anyres")
    elif len(args.init) == 2:
        m = XGenMM.from_components(*args.init, strategy=args.strategy or "anyres", dtype=dtype, device=device)
    else:
        m = XGenMM.from_pretrained(checkpoint.resolve(args.init[0]), dtype=dtype, device=device)
        if args.strategy:  # the strategy is two config fields: the weights serve every strategy
            switched = XGenMMConfig.from_strategy(args.strategy)
            m.config.image_aspect_ratio = switched.image_aspect_ratio
            m.config.anyres_patch_sampling = switched.anyres_patch_sampling
    if m.tokenizer is None:
        raise weights.CheckpointError(f"{args.init}: the checkpoint has no tokenizer files; training needs them")
    if args.instruction_aware and not m.config.resampler.instruction_dim:
        m.vision_tokenizer = InstructionAwareResampler.from_resampler(m.vision_tokenizer, m.config.text.hidden_size)
    return m


def configure(m, args):
    """Freeze what the run does not train (the ViT unless --train-vit; all but the adapters with --lora); set
    gradient checkpointing and compile the LLM blocks when asked. Returns a summary of the parameter counts."""
    m.vision_encoder.requires_grad_(bool(args.train_vit))
    m.lang_model.gradient_checkpointing = args.grad_checkpointing
    for block in m.lang_model.model.layers if args.compile else ():
        block.compile()
    if args.lora:
        lora.apply_lora(m.lang_model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
        lora.mark_only_lora_trainable(m)
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    total = sum(p.numel() for p in m.parameters())
    parts = {n: sum(p.numel() for p in getattr(m, n).parameters() if p.requires_grad)
             for n in ("vision_encoder", "vision_tokenizer", "lang_model")}
    lm = sum(p.numel() for n, p in m.lang_model.named_parameters() if ".lora_" not in n)
    share = f"; LoRA r={args.lora_r}: {trainable / lm:.2%} of the LLM's weights" if args.lora else ""
    return (f"parameters: {trainable / 1e6:.2f}M trainable, {(total - trainable) / 1e6:.2f}M frozen "
            f"({', '.join(f'{k} {v / 1e6:.2f}M' for k, v in parts.items())} trainable){share}")


def make_optimizer(m, args, device):
    """AdamW; weight decay on matrices only (norms, biases and the resampler's latents are not decayed)."""
    params = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.dim() >= 2 and "latents" not in n]
    rest = [p for n, p in params if not (p.dim() >= 2 and "latents" not in n)]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    # fused: one kernel for every tensor (~14x faster than the per-tensor loop on a CPU), and it can skip a
    # NaN/inf step on the device (found_inf); FSDP2's sharded parameters on a CPU take the per-tensor path
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                             fused=device.type == "cuda" or not distributed.sharded(m))

# -----------------------------------------------------------------------------
# the loop


def train(run, step_fn):
    """The loop: batches, `step_fn` per optimiser step, logging, checkpoints. step_fn(run, micro) -> a dict of
    device tensors with at least "loss" and "grad_norm" (NaN when the step was skipped for a NaN/inf loss).
    The host reads the device once per log line and checkpoint (Meter.flush), never in between."""
    args, state = run.args, run.trainer
    start, batches = state["step"], run.batches()
    tally = data.Tally(args.max_bad_fraction, seen=state["seen"], bad=state["bad"])
    metrics = run.run_dir / "metrics.jsonl"
    if run.rank == 0:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.keep_metrics(metrics, start)
    bar = tqdm(total=args.max_steps, initial=start, disable=run.rank != 0, desc=args.stage, dynamic_ncols=True)
    meter, t0 = Meter(run, state["nonfinite"]), time.perf_counter()
    for step in range(start, args.max_steps):
        for g in run.opt.param_groups:
            g["lr"] = lr_at(step, args)
        waited = time.perf_counter()
        micro = [next(batches) for _ in range(args.grad_accum)]
        meter.waited += time.perf_counter() - waited
        meter.add(micro, step_fn(run, micro))
        bar.update(1)
        done = step + 1 == args.max_steps
        stop = args.stop_after is not None and step + 1 - start >= args.stop_after  # --stop-after: save and exit
        logged = (step + 1) % args.log_every == 0 or done
        saved = (step + 1) % args.save_every == 0 or done or stop
        if logged or saved:
            rec = meter.flush(tally)  # the one wait for the device, and the bad-sample check
            state.update(step=step + 1, seen=tally.seen, bad=dict(tally.bad), nonfinite=meter.streak)
            if meter.worst >= args.max_nonfinite:
                raise SystemExit(f"{run.script}: {meter.worst} steps in a row had a NaN/inf loss (last {rec['loss']}); "
                                 "lower --lr or check the data")
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            if logged and run.rank == 0:
                elapsed = time.perf_counter() - t0
                rec |= {"fill": meter.total_tokens / max(meter.total_positions, 1), "data_wait_s": meter.waited}
                log(bar, metrics, record(run, rec, step, meter.total_tokens / elapsed, elapsed, tally),
                    eta=elapsed / (step + 1 - start) * (args.max_steps - step - 1))
        if saved:
            checkpoint.save(run.run_dir, step + 1, run.m, run.wrapped, run.opt, state, args, args.keep)
        if stop:
            break
    bar.close()
    last = checkpoint.newest(run.run_dir)
    print0(f"done: {last if last else run.run_dir} (bad samples: {tally.report()})")


def lr_at(step, args):
    """Linear warm-up to --lr, then cosine down to lr * --min-lr-ratio at --max-steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = min(1.0, (step - args.warmup) / max(1, args.max_steps - args.warmup))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

# -----------------------------------------------------------------------------
# one optimiser step


def train_step(run, micro):
    """Forward/backward over the micro-batches, then one optimiser step (skipped if the loss is not finite).

    Returns device tensors, read at log time: {"loss": mean per supervised token, "grad_norm": before
    clipping, NaN if the step was skipped, "supervised_tokens"}.
    """
    wrapped, world, device = run.wrapped, run.world, run.device
    labels = [b["labels"].to(device, non_blocking=True) for b in micro]
    n_sup = all_sum(sum((lab[:, 1:] != -100).sum() for lab in labels).float())  # over the whole step, all ranks
    scale = world / n_sup.clamp(min=1)  # DDP averages over ranks: x world makes it the global sum / n_sup
    total = torch.zeros((), device=device)
    for k, (b, lab) in enumerate(zip(micro, labels)):
        if empty(b, world):
            continue
        with sync_grads(wrapped, k == len(micro) - 1), autocast(device):
            loss_sum = wrapped(b["input_ids"], b["images"], b["attention_mask"], labels=lab, reduction="sum")
        (loss_sum * scale).backward()
        total += loss_sum.detach().float()
    loss = all_sum(total) / n_sup.clamp(min=1)
    return {"loss": loss, "grad_norm": optimizer_step(run, loss), "supervised_tokens": n_sup}


def empty(batch, world):
    """A micro-batch whose samples were all bad: skipped alone; with several ranks the collectives forbid it."""
    if batch["input_ids"].numel() and batch["input_ids"].shape[1]:
        return False
    if world > 1:
        raise RuntimeError("a whole micro-batch was bad samples; use a larger --batch-size")
    return True


def autocast(device):
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()


def optimizer_step(run, loss):
    """Clip and step; a step whose loss or gradient norm is NaN/inf is skipped. The fused AdamW skips it
    itself (`found_inf`), so the host never waits for the device here; other optimisers are checked on the
    host. Returns the gradient norm before clipping, NaN for a skipped step."""
    norm = torch.nn.utils.clip_grad_norm_(run.params, run.args.clip if run.args.clip > 0 else float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a replicated DTensor
    skip = ~(torch.isfinite(loss) & torch.isfinite(norm))
    if run.opt.defaults.get("fused") and not distributed.sharded(run.m):
        run.opt.found_inf = skip.float()
        run.opt.step()
    elif not skip:
        run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    return torch.where(skip, float("nan"), norm.float())

# -----------------------------------------------------------------------------
# what the loop reports


class Meter:
    """What the loop counts between two reads of the device: this rank's samples, bad samples and tokens (host
    numbers, summed over ranks at each flush), the last step's metrics and the run of NaN/inf steps (device
    tensors). `flush` reads them all back at once."""

    INTS = ("supervised_tokens", "pairs")

    def __init__(self, run, streak):
        self.run, self.samples, self.bad, self.tokens, self.total_tokens = run, 0, Counter(), 0, 0
        self.positions, self.total_positions, self.waited = 0, 0, 0.0  # padded positions; seconds waiting for data
        self._streak = torch.tensor(float(streak), device=run.device)  # NaN/inf steps in a row
        self._worst = self._streak.clone()
        self.streak, self.worst, self.rec = streak, streak, None

    def add(self, micro, rec):
        self.samples += sum(b["samples"] for b in micro)
        self.bad += sum((Counter(b["bad"]) for b in micro), Counter())
        self.tokens += sum(b["tokens"] for b in micro)
        self.positions += sum(b["positions"] for b in micro)
        self._streak = torch.where(torch.isnan(rec["grad_norm"]), self._streak + 1, 0.0)
        self._worst = torch.maximum(self._worst, self._streak)
        self.rec = rec

    def flush(self, tally):
        """Everything counted since the last flush, as numbers: sums over ranks go into `tally` (which stops the
        run when too many samples were bad), the last step's record is returned."""
        run, keys = self.run, list(self.rec)
        counts = torch.tensor([self.samples, sum(self.bad.values()), self.tokens, self.positions], dtype=torch.float64)
        counts = all_sum(counts.to(run.device, non_blocking=True))
        values = torch.cat([counts, torch.stack([self._streak, self._worst]).double(),
                            torch.stack([torch.as_tensor(self.rec[k]).double() for k in keys])]).tolist()
        (samples, bad, tokens, positions, self.streak, self.worst), rest = map(int, values[:6]), values[6:]
        tally.update(samples, self.bad if run.world == 1 else {"bad (all ranks)": bad})
        self.total_tokens, self.total_positions = self.total_tokens + tokens, self.total_positions + positions
        self.samples, self.bad, self.tokens, self.positions = 0, Counter(), 0, 0
        rec = {k: int(v) if k in self.INTS else v for k, v in zip(keys, rest)}
        return rec | {"grad_norm": None if math.isnan(rec["grad_norm"]) else rec["grad_norm"]}


def record(run, rec, step, tokens_per_s, elapsed, tally):
    """One step's metrics record: the step function's values, the schedule, speed and bad samples."""
    out = {"step": step + 1, **rec, "lr": lr_at(step, run.args), "tokens_per_s": tokens_per_s,
           "skipped_nonfinite": rec["grad_norm"] is None, "bad_samples": sum(tally.bad.values()), "elapsed_s": elapsed}
    if run.device.type == "cuda":  # 6 FLOPs per LLM weight per token: the usual estimate, ViT and resampler aside
        n_lm = sum(p.numel() for p in run.m.lang_model.parameters())
        out["mfu"] = 6 * n_lm * tokens_per_s / (run.args.peak_tflops * 1e12 * run.world)
    return out


def log(bar, path, rec, eta):
    """One line on the console and the record appended to metrics.jsonl."""
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    shown = " | ".join(f"{k} {v:.4g}" for k, v in rec.items() if k not in ("step", "loss", "lr", "grad_norm",
                       "tokens_per_s", "skipped_nonfinite", "elapsed_s", "mfu") and isinstance(v, (int, float)))
    bar.write(f"step {rec['step']} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | grad-norm "
              f"{rec['grad_norm'] or float('nan'):.3f} | {rec['tokens_per_s']:,.0f} tok/s"
              + (f" | MFU {rec['mfu']:.1%}" if "mfu" in rec else "") + f" | {shown} | ETA {eta:.0f}s")


if __name__ == "__main__":
    main()
