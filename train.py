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
2. The toy world has no pretrained SigLIP to freeze, so a model started from scratch (no --init) trains its
   ViT during pretraining (--train-vit defaults to on there): a frozen random ViT would hand the resampler
   random projections of pixels. Every later stage freezes it, as the paper does.
3. The loss is summed over tokens and divided by the supervised tokens of the whole optimiser step (all
   micro-batches, all ranks), so gradient accumulation and data parallelism give the update of one big batch.
4. Checkpoints (checkpoint.py) are directories written whole or not at all: the model in the official
   layout, the optimiser, the RNG states, the data position and the arguments. --resume continues from the
   newest one, bit for bit on a CPU.
5. A step whose loss is NaN or inf is skipped and counted; too many in a row stop the run.
6. Weights, gradients and AdamW's states are fp32 (--param-dtype), even from the bf16 release: at SFT's
   learning rate most updates are smaller than bf16's rounding step and would vanish. On CUDA the forward
   and backward compute in bf16 under autocast, and FSDP2 gathers the fp32 shards in bf16.
"""
import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import data
import lora
import weights
from model import PRESET_PARTS, STRATEGIES, XGenMM, XGenMMConfig

STAGES = ("pretrain", "sft", "interleave", "safety")
LORA_STAGES = ("safety", "dpo")  # the paper's LoRA stages (dpo.py runs the loop below as stage "dpo")
# SFT's 2e-5 is the paper's (docs/release.md §5); the others are this project's defaults, higher for LoRA
DEFAULT_LR = {"pretrain": 1e-4, "sft": 2e-5, "interleave": 2e-5, "safety": 1e-4, "dpo": 5e-5}
SCRATCH_LR = 1e-3  # a tiny model trained from scratch (the toy world's) learns fast at this rate

# -----------------------------------------------------------------------------
# arguments


def build_parser(description=__doc__, stages=STAGES):
    """train.py's flags; dpo.py reuses them with its own description and no --stage (it is one stage)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    if stages:
        g.add_argument("--stage", default="pretrain", choices=stages, help="what to train (default: pretrain)")
    g.add_argument("--out-dir", default=None, help="run directory for checkpoints and metrics.jsonl (default: out/<stage>)")
    g.add_argument("--init", nargs="+", default=None, metavar="PATH",
                   help="start from: an xGen-MM checkpoint (or a Hub id in the local cache), a previous run "
                        "directory (its newest checkpoint), or two paths SIGLIP PHI3 (a new model with a fresh "
                        "resampler). Default: a new model of --preset sized to the tokenizer (the toy world's)")
    g.add_argument("--data", default=None, help="a mixture config (JSON with 'sources') or one dataset path "
                                                 "(default: the toy world's mixture for the stage, written if missing)")
    g.add_argument("--tokenizer", default=None, help="tokenizer of a model started from scratch (default: the "
                                                      "`tokenizer/` folder that ships with --data, as the toy world's)")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="continue from the newest complete checkpoint in --out-dir, exactly")
    g.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="save and exit after N steps of this invocation (for job time limits; --resume goes on)")
    g = p.add_argument_group("schedule")
    g.add_argument("--max-steps", type=int, default=None, help="optimiser steps (default: 200 on the toy world, else 1000)")
    g.add_argument("--batch-size", type=int, default=8, help="samples per micro-batch per rank")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    g.add_argument("--max-len", type=int, default=2048, help="tokens per sample, images counted as their vision tokens")
    g.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default: {SCRATCH_LR:g} from scratch, "
                                                         f"else per stage {DEFAULT_LR})")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
    g.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default: 5%% of --max-steps)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices (paper: 0)")
    g.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping (0: off)")
    g.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    g = p.add_argument_group("model")
    g.add_argument("--preset", default=None, choices=sorted(PRESET_PARTS),
                   help="size of a new model, when there is no --init (default tiny, for a CPU; small: ~100M "
                   "parameters with the toy world's vocabulary, for one GPU; xgenmm: the release's architecture, randomly initialised)")
    g.add_argument("--strategy", default=None, choices=STRATEGIES,
                   help="image strategy: of a new model (default anyres), or switched on a checkpoint given to "
                   "--init (same weights, other views; the any-resolution ablation)")
    g.add_argument("--train-vit", action=argparse.BooleanOptionalAction, default=None,
                   help="train the ViT too (default: only when pretraining a model from scratch; see above)")
    g.add_argument("--instruction-aware", action="store_true",
                   help="make the resampler instruction-aware (an ablation: the user's question joins the image "
                   "features the latents read; a fresh projection is added to a plain checkpoint)")
    g.add_argument("--lora", action=argparse.BooleanOptionalAction, default=None,
                   help=f"train LoRA adapters on the LLM instead of the weights (default: on for {LORA_STAGES})")
    g.add_argument("--lora-r", type=int, default=64, help="LoRA rank")
    g.add_argument("--lora-alpha", type=float, default=128.0, help="LoRA alpha (scale alpha / r)")
    g.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    g.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the weights, their gradients and AdamW's states (default float32: master weights "
                   "in fp32 even from the bf16 release, computing in bf16 under autocast on CUDA; checkpoints are "
                   "saved in it. bfloat16 halves the memory, but updates smaller than ~0.3%% of a weight round "
                   "away, as most do at the SFT learning rate)")
    g.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=False,
                   help="shard parameters, gradients and optimiser state with FSDP2 (fully_shard) instead of DDP")
    g.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute the LLM blocks' activations in the backward pass (less memory, ~30%% slower)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the LLM blocks")
    g.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    g.add_argument("--peak-tflops", type=float, default=989.0, help="GPU bf16 peak for the MFU (H100 SXM: 989)")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--log-every", type=int, default=10, help="a log line (and metrics.jsonl record) every N steps")
    g.add_argument("--save-every", type=int, default=100, help="a checkpoint every N steps (and at the end)")
    g.add_argument("--keep", type=int, default=2, help="checkpoints kept (oldest removed)")
    g.add_argument("--max-bad-fraction", type=float, default=0.05, help="stop when more bad samples than this")
    g.add_argument("--max-nonfinite", type=int, default=10, help="stop after this many NaN/inf steps in a row")
    return p


def finish_args(args):
    """Defaults that depend on other flags; with no --data, a newcomer's first run: the toy world (toy/)."""
    args.out_dir = args.out_dir or f"out/{args.stage}"
    if args.preset and args.init:
        raise SystemExit("train.py: --preset sizes a new model and --init starts from a saved one; give only one")
    if args.init is None:
        args.preset = args.preset or "tiny"
    if args.data is None:
        import toy
        args.data = str(toy.WORLD / "mixtures" / f"{args.stage}.json")
        args.max_steps = args.max_steps or toy.STEPS
    args.max_steps = args.max_steps or 1000
    if args.lr is None:
        args.lr = SCRATCH_LR if args.init is None else DEFAULT_LR[args.stage]
    if args.warmup is None:
        args.warmup = max(1, args.max_steps // 20)
    if args.train_vit is None:
        args.train_vit = args.init is None and args.stage == "pretrain"
    if args.lora is None:
        args.lora = args.stage in LORA_STAGES
    return args


def fail(message, script="train.py"):
    """Bad input before training starts (unreadable data, an unknown checkpoint): one line on stderr, exit 2."""
    print(f"{script}: error: {message}", file=sys.stderr)
    raise SystemExit(2)

# -----------------------------------------------------------------------------
# distributed


def setup_distributed(args):
    """(rank, world, device). Under torchrun: one process per GPU (nccl) or per CPU slot (gloo)."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(args.device)
    cuda = args.device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def print0(*a, **kw):
    if checkpoint.rank() == 0:
        print(*a, **kw, flush=True)


def all_sum(x):
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def wrap(m, args, device, world):
    """DDP (default) or FSDP2 across ranks; the unwrapped model stays `m`."""
    if args.grad_checkpointing:
        m.lang_model.gradient_checkpointing = True
    if args.compile:
        for block in m.lang_model.model.layers:
            block.compile()
    if world == 1:
        return m
    if args.fsdp:
        try:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        except ImportError:  # torch < 2.6 keeps FSDP2 under its first, private name
            from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
        # On CUDA the fp32 shards are gathered in bf16 (what autocast computes in; half the traffic) and the
        # gradients reduced in fp32. On the CPU nothing runs in bf16, so the gathers stay in the weights' dtype.
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda"
              else MixedPrecisionPolicy())
        for block in m.lang_model.model.layers:
            fully_shard(block, mp_policy=mp)
        return fully_shard(m, mp_policy=mp)
    from torch.nn.parallel import DistributedDataParallel
    # text-only batches leave the resampler unused: DDP must not wait for its gradients then
    return DistributedDataParallel(m, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)

# -----------------------------------------------------------------------------
# the model


def load_model(args):
    """The model to start from: --init (see --help), or a new model of --preset sized to the tokenizer."""
    if args.init is None:
        tokenizer = args.tokenizer or data.dataset_tokenizer(args.data)
        if tokenizer is None:
            fail(f"a new model is sized to its tokenizer: pass --tokenizer (none ships with {args.data})")
        m = XGenMM.from_tokenizer(tokenizer, args.preset, args.strategy or "anyres")
    elif len(args.init) == 2:
        m = XGenMM.from_components(*args.init, strategy=args.strategy or "anyres")
    else:
        m = XGenMM.from_pretrained(checkpoint.resolve(args.init[0]))
        if args.strategy:  # the strategy is two config fields: the weights serve every strategy
            switched = XGenMMConfig.from_strategy(args.strategy)
            m.config.image_aspect_ratio = switched.image_aspect_ratio
            m.config.anyres_patch_sampling = switched.anyres_patch_sampling
    if m.tokenizer is None:
        fail(f"{args.init}: the checkpoint has no tokenizer files; training needs them")
    if args.instruction_aware and not m.config.resampler.instruction_dim:
        m.config.resampler.instruction_dim = m.config.text.hidden_size
        m.vision_tokenizer.instruction = torch.nn.Linear(m.config.text.hidden_size, m.config.resampler.dim,
                                                         bias=False)
    return m


def configure(m, args):
    """Freeze what the run does not train (the ViT unless --train-vit; all but the adapters with --lora).
    Returns a printable summary of the parameter counts."""
    m.vision_encoder.requires_grad_(bool(args.train_vit))
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
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def lr_at(step, args):
    """Linear warm-up to --lr, then cosine down to lr * --min-lr-ratio at --max-steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = min(1.0, (step - args.warmup) / max(1, args.max_steps - args.warmup))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

# -----------------------------------------------------------------------------
# one optimiser step


def train_step(run, micro):
    """Forward/backward over the micro-batches, then one optimiser step unless the loss is not finite.

    Returns {"loss": mean per supervised token, "grad_norm": None if skipped, "supervised_tokens"}.
    """
    wrapped, world, device = run.wrapped, run.world, run.device
    n_sup = all_sum(torch.tensor(float(sum((b["labels"][:, 1:] != -100).sum() for b in micro)), device=device))
    scale = world / n_sup.clamp(min=1)  # DDP averages over ranks: x world makes it the global sum / n_sup
    total = torch.zeros((), device=device)
    for k, b in enumerate(micro):
        if empty(b, world):
            continue
        with sync_grads(wrapped, k == len(micro) - 1), autocast(device):
            loss_sum = wrapped(b["input_ids"], b["images"], b["attention_mask"], labels=b["labels"], reduction="sum")
        (loss_sum * scale).backward()
        total += loss_sum.detach().float()
    loss = all_sum(total) / n_sup.clamp(min=1)
    return {"loss": loss.item(), "grad_norm": optimizer_step(run, loss), "supervised_tokens": int(n_sup)}


def empty(batch, world):
    """A micro-batch whose samples were all bad: skipped alone; with several ranks the collectives forbid it."""
    if batch["input_ids"].numel() and batch["input_ids"].shape[1]:
        return False
    if world > 1:
        raise RuntimeError("a whole micro-batch was bad samples; use a larger --batch-size")
    return True


def sync_grads(wrapped, last):
    """DDP reduces gradients only after the last micro-batch of a step (no_sync before it)."""
    return nullcontext() if last or not hasattr(wrapped, "no_sync") else wrapped.no_sync()


def autocast(device):
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()


def optimizer_step(run, loss):
    """Clip and step, or skip (return None) when the loss is NaN/inf; the gradients are cleared either way."""
    norm = None
    if torch.isfinite(loss):
        norm = float(torch.nn.utils.clip_grad_norm_(run.params, run.args.clip if run.args.clip > 0 else float("inf")))
        run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    return norm

# -----------------------------------------------------------------------------
# the run


class Run:
    """What a run holds: arguments, ranks, the model (plain and wrapped), optimiser, trainer state."""

    def __init__(self, args, script="train.py"):
        self.args = args
        self.rank, self.world, self.device = setup_distributed(args)
        self.run_dir = Path(args.out_dir)
        if not Path(args.data).exists():
            import toy
            if Path(args.data).is_relative_to(toy.WORLD):  # the default data of a first run, written once
                if self.rank == 0:
                    toy.ensure_world(toy.WORLD)
                checkpoint.barrier()
        resume = checkpoint.newest(self.run_dir) if args.resume else None
        if args.resume and resume is None:
            print0(f"--resume: no checkpoint in {self.run_dir} yet, starting from the beginning")
        torch.manual_seed(args.seed)
        try:
            # the checkpoint holds the whole model, unless LoRA: then the base from --init, the adapters from it
            m = XGenMM.from_pretrained(resume) if resume is not None and not args.lora else load_model(args)
            tok = m.tokenizer
            self.sources = data.open_sources(args.data, tok.id_to_token(tok.eos_id))
        except (weights.CheckpointError, data.DataError) as e:
            fail(str(e), script)
        print0(configure(m, args))
        self.m = m.to(self.device, getattr(torch, args.param_dtype)).train()
        self.wrapped = wrap(m, args, self.device, self.world)
        self.params = [p for p in m.parameters() if p.requires_grad]
        self.opt = make_optimizer(m, args, self.device)  # after wrapping: FSDP2 replaced the parameters
        self.trainer = {"step": 0, "nonfinite": 0, "seen": 0, "bad": {}}
        if resume is not None:
            self.trainer = checkpoint.load(resume, m, self.wrapped, self.opt)
            print0(f"resumed from {resume} at step {self.trainer['step']}")

    def batches(self):
        """The batches of this rank from the run's data position on, built by DataLoader workers."""
        args, tok = self.args, self.m.tokenizer
        mixture = data.Mixture(self.sources, data.Encoder(tok, self.m.config, args.max_len), args.batch_size,
                               tok.pad_id, seed=args.seed, rank=self.rank, world=self.world,
                               start_batch=self.trainer["step"] * args.grad_accum)
        return iter(data.loader(mixture, num_workers=args.workers))

    def close(self):
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None):
    run = Run(finish_args(build_parser().parse_args(argv)))
    train(run, train_step)
    run.close()
    return run


def train(run, step_fn):
    """The loop: batches, `step_fn` per optimiser step, logging, checkpoints. step_fn(run, micro) -> metrics dict
    with at least "loss" and "grad_norm" (None when the step was skipped for a NaN/inf loss)."""
    args, state = run.args, run.trainer
    start, batches = state["step"], run.batches()
    tally = data.Tally(args.max_bad_fraction, seen=state["seen"], bad=state["bad"])
    metrics = run.run_dir / "metrics.jsonl"
    if run.rank == 0:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.keep_metrics(metrics, start)
    bar = tqdm(total=args.max_steps, initial=start, disable=run.rank != 0, desc=args.stage, dynamic_ncols=True)
    t0, tokens = time.perf_counter(), 0
    for step in range(start, args.max_steps):
        for g in run.opt.param_groups:
            g["lr"] = lr_at(step, args)
        micro = [next(batches) for _ in range(args.grad_accum)]
        count_bad(run, tally, micro)
        rec = step_fn(run, micro)
        state["nonfinite"] = 0 if rec["grad_norm"] is not None else state["nonfinite"] + 1
        if state["nonfinite"] >= args.max_nonfinite:
            raise SystemExit(f"train.py: {state['nonfinite']} steps in a row had a NaN/inf loss (last "
                             f"{rec['loss']}); lower --lr or check the data")
        tokens += int(all_sum(torch.tensor(sum(b["tokens"] for b in micro))))
        state.update(step=step + 1, seen=tally.seen, bad=dict(tally.bad))
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.4f}")
        if run.rank == 0 and ((step + 1) % args.log_every == 0 or step + 1 == args.max_steps):
            elapsed = time.perf_counter() - t0
            log(bar, metrics, record(run, rec, step, tokens / elapsed, elapsed, tally),
                eta=elapsed / (step + 1 - start) * (args.max_steps - step - 1))
        stop = args.stop_after is not None and step + 1 - start >= args.stop_after
        if (step + 1) % args.save_every == 0 or step + 1 == args.max_steps or stop:
            checkpoint.save(run.run_dir, step + 1, run.m, run.wrapped, run.opt, state, args, args.keep)
        if stop:
            break
    bar.close()
    last = checkpoint.newest(run.run_dir)
    print0(f"done: {last if last else run.run_dir} (bad samples: {tally.report()})")


def count_bad(run, tally, micro):
    """Count the step's bad samples; the same totals on every rank, so every rank stops alike when too many."""
    bad = sum((Counter(b["bad"]) for b in micro), Counter())
    seen_bad = all_sum(torch.tensor([sum(b["samples"] for b in micro), sum(bad.values())]))
    tally.update(int(seen_bad[0]), bad if run.world == 1 else {"bad (all ranks)": int(seen_bad[1])})


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
