"""
At full scale: the real 4.4B model without the real weights (nothing here downloads them): a random checkpoint
in the release's layout; load time, peak RSS, CPU forward and decode, transformers' load; the GPU figures; FSDP2
memory.

    python -m bench.full --make-checkpoint DIR       # a random 4.4B model in the release's layout (bf16, 8.7 GB)
    python -m bench.full --checkpoint DIR --fp32-layers 32 --json out/full-cpu.json   # CPU figures (~17 minutes)
    python -m bench.full --checkpoint DIR --device cuda --peak-tflops 989     # GPU figures
    python -m bench.full --memory                    # parameter counts, FSDP2 memory per GPU (SFT, DPO-LoRA)

--make-checkpoint writes every tensor name and shape of the Hub release (the pooling head included) through
model.save_pretrained, one shard in memory at a time. --checkpoint on the CPU runs bench/full_cpu.py's suite,
each measurement in a fresh process (so each peak RSS is its own), cold (page cache dropped) and warm:
reading the files, XGenMM.from_pretrained until every weight is resident, and transformers'
Phi3ForCausalLM reading the LLM from the same files; then vision encoding, the LLM prefill and decoding in
bf16 and in fp32 (the whole model with --fp32-layers 32, else the blocks that fit, extrapolated). On cuda
it times (here) the load, prefill and decode at batch 1 and 8, and train.py's step with gradient
checkpointing (tokens/s, MFU, peak memory) for the checkpoint's model with bf16 and fp32 weights and for
`small`; `--suite gpu` runs that path on the CPU at small sizes. --memory is bench/fsdp_memory.py's
arithmetic (`python -m bench.fsdp_memory` alone).
"""
import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

import model
import phi3
from bench.common import (bandwidth, decode_bytes, noise_photo, parse, peak_matmul_flops, peak_rss, photo_prompt,
                          pooling_head_shapes, report, sync, timed, train_flops)
from bench.fsdp_memory import fsdp_memory, memory_flags
from bench.full_cpu import full_cpu, param_bytes, weight_files

# -----------------------------------------------------------------------------
# the release's checkpoint layout and sizes


def official_layout(cfg, dtype=torch.bfloat16):
    """{official name: meta tensor} of a checkpoint of `cfg` as the release stores it: what save_pretrained
    writes, plus the pooling head. Nothing is allocated (meta device)."""
    with torch.device("meta"):
        m = model.XGenMM(cfg).to(dtype)
        head = {k: torch.empty(s, dtype=dtype) for k, s in pooling_head_shapes(cfg.vision).items()}
    return with_head(m.official_state_dict(), head)


def with_head(state, head):
    """The pooling head placed after the vision tower's tensors, where the release has it."""
    vision = {k: v for k, v in state.items() if k.startswith("vlm.vision_encoder.")}
    return vision | head | {k: v for k, v in state.items() if k not in vision}


def random_pool(n, dtype, generator, chunk=1 << 24):
    """n values of N(0, 0.02) in `dtype`, drawn a chunk at a time (no full-size fp32 temporary)."""
    pool = torch.empty(n, dtype=dtype)
    for i in range(0, n, chunk):
        part = pool[i: i + chunk]
        part.copy_(torch.randn(part.numel(), generator=generator).mul_(0.02))
    return pool


def random_window(shape, pool, generator, fill=None):
    """A random tensor that costs no memory: a view of `pool` at a random offset, or `fill` broadcast.
    save_sharded copies each tensor into its shard, so only one shard is ever materialised."""
    if fill is not None:
        return torch.full((), fill, dtype=pool.dtype).expand(shape)
    n = math.prod(shape)
    off = int(torch.randint(0, pool.numel() - n + 1, (), generator=generator))
    return pool[off: off + n].view(shape)


def make_checkpoint(path, preset="xgenmm", dtype=torch.bfloat16, seed=0):
    """A random xGen-MM of `preset` in the release's layout, written by model.save_pretrained (config.json,
    generation_config.json, 5 GiB shards + index; no tokenizer files: there is no tokenizer to copy offline).
    Peak memory is one shard plus a pool of 2x the largest tensor, not the model."""
    cfg = model.preset(preset)
    with torch.device("meta"):
        m = model.XGenMM(cfg).to(dtype)
    g = torch.Generator().manual_seed(seed)
    shapes = m.state_dict()
    pool = random_pool(2 * max(t.numel() for t in shapes.values()), dtype, g)
    norms = {n for n, mod in m.named_modules() if isinstance(mod, (torch.nn.LayerNorm, phi3.RMSNorm))}

    def fill(name):  # as init_weights: norms 1, biases 0, the rest N(0, 0.02)
        owner, _, leaf = name.rpartition(".")
        return 0.0 if leaf.endswith("bias") else 1.0 if owner in norms or ".layernorm." in name else None
    m.load_state_dict({k: random_window(t.shape, pool, g, fill(k)) for k, t in shapes.items()}, assign=True)
    head = {k: random_window(s, pool, g, fill(k)) for k, s in pooling_head_shapes(cfg.vision).items()}
    return m.save_pretrained(path, state_dict=with_head(m.official_state_dict(), head))


# ---- on a GPU (or, at small sizes, on the CPU: the same code path)


def stamped_generate(m, prompts, images, new, compile, device):
    """m.generate with a clock per new token: (seconds to the first token, [seconds of each later step], slots
    of the KV cache each decode step reads)."""
    stamps, slots = [], []

    def stamp(_):
        sync(device)
        stamps.append(time.perf_counter())
        slots.append(m.lang_model.model.layers[0].self_attn.kv_cache.k.shape[2])  # the cache exists during the call
    sync(device)
    t0 = time.perf_counter()
    m.generate(prompts, images, max_new_tokens=new, stop_ids=[], callback=stamp, compile=compile)
    return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])], slots[0]


def decode_figures(m, args, device, batch, compile):
    """Prefill (PIL image + prompt -> first token) and steady decode step of `batch` identical rows."""
    prompt, img = photo_prompt(m, args.prompt_tokens), noise_photo()
    first, steps, slots = stamped_generate(m, [prompt] * batch, [[img]] * batch, args.new_tokens, compile, device)
    steady = steps[len(steps) // 2:] if compile else steps  # the first compiled steps compile, record graphs
    positions = len(prompt) - 1 + m.config.image_tokens(img.size)
    return {"batch": batch, "positions": positions, "prefill_s": first, "prefill_tok_s": batch * positions / first,
            "step_s": statistics.median(steady), "decode_tok_s": batch / statistics.median(steady),
            "first_step_s": steps[0], "cache_slots": slots,
            "kv_bytes_per_row": kv_cache_bytes(m.lang_model.config, slots, next(m.parameters()).dtype)}


def kv_cache_bytes(cfg, slots, dtype):
    """Bytes of one row's KV cache, which each decode step reads whole (keys and values of every layer)."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * slots * dtype.itemsize


def train_step_figures(m, args, device, peak, dtype):
    """train.py's own step (train_step: loss summed over the supervised tokens, AdamW, clipping; ViT frozen,
    resampler + LLM trained) with gradient checkpointing, on --train-batch samples of one 640x480 image and
    --train-text tokens, the weights in `dtype` (train.py --param-dtype); tokens/s, MFU and the peak memory
    over the timed steps. A GPU too small for it gives {"out_of_memory": the error}, any other failure
    {"error": its last line}, and the suite goes on."""
    name = str(dtype).removeprefix("torch.")
    try:
        return {"param_dtype": name, **train_step_run(m, args, device, peak, dtype)}
    except torch.cuda.OutOfMemoryError as e:  # the same class as torch.OutOfMemoryError (torch >= 2.5)
        failed = {"out_of_memory": str(e).splitlines()[0]}
    except Exception as e:  # one failed row, not a lost table
        failed = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"}
    for p in m.parameters():  # the failed step's gradients; its optimiser went with its frame
        p.grad = None
    mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"param_dtype": name, **failed, "peak_memory": mem}


def train_step_run(m, args, device, peak, dtype):
    from types import SimpleNamespace
    import train
    a = SimpleNamespace(stage="sft", train_vit=False, lr=2e-5, weight_decay=0.0, clip=1.0, grad_checkpointing=True,
                        compile=False, lora=False)
    m.to(device=device, dtype=dtype)
    train.configure(m, a)
    m.train()
    s = SimpleNamespace(m=m, wrapped=m, world=1, device=device, args=a, opt=train.make_optimizer(m, a, device),
                        params=[p for p in m.parameters() if p.requires_grad])
    B, img = args.train_batch, noise_photo()
    prompts = [photo_prompt(m, args.train_text, torch.Generator().manual_seed(b)) for b in range(B)]
    ids, _, images = m.encode_batch(prompts, [[img]] * B)  # each <image> expanded to its block
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": None, "images": images}
    train.train_step(s, [batch])  # warm-up; creates the optimizer state
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = statistics.median(timed(lambda: train.train_step(s, [batch]), device) for _ in range(args.repeats))
    tokens = B * (args.train_text + m.config.image_tokens(img.size))
    mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()
    return {"samples": B, "tokens": tokens, "step_s": t, "tok_s": tokens / t,
            "mfu": train_flops(m, tokens, len(batch["images"].pixel_values)) / t / peak, "peak_memory": mem}


def full_gpu(args):
    """On --device (cuda): load time, prefill and decode tok/s at each --batches size, a training step of the
    checkpoint's model with gradient checkpointing and its peak memory (bf16 weights, then train.py's default
    fp32 weights), and the `small` preset's training MFU. The JSON is written after each figure (the table at
    the end), and a figure that fails is one row saying so: a run cut short keeps what it measured."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_matmul_flops(device, dtype)
    r = {"device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
         "dtype": args.dtype, "peak_flops": peak, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens}
    sync(device)
    t0 = time.perf_counter()
    m = model.XGenMM.from_pretrained(args.checkpoint, dtype=dtype, device=device)
    sync(device)
    r["load"] = {"seconds": time.perf_counter() - t0, "bytes": param_bytes(m)}
    r["bandwidth"] = bandwidth(args, device, dtype)
    r["weight_bytes"] = decode_bytes(m.lang_model)  # with each row's KV cache: the decode bound
    save = lambda: args.json and Path(args.json).write_text(json.dumps(r, indent=2))  # noqa: E731
    for batch in args.batches:
        for comp in [False, True] if args.compile else [False]:  # compiled on CUDA: CUDA graphs
            key = f"decode_b{batch}" + "_compiled" * comp
            try:
                r[key] = decode_figures(m, args, device, batch, comp)
            except Exception as e:  # one failed row, not a lost table
                r[key] = {"batch": batch, "error": f"{type(e).__name__}: {str(e).strip()[-300:]}"}
            save()
    for param_dtype in (torch.bfloat16, torch.float32):  # bf16 fits one GPU; train.py's fp32 default may not
        r[f"train_{str(param_dtype).removeprefix('torch.')}"] = train_step_figures(m, args, device, peak, param_dtype)
        save()
    del m
    if args.train_small:
        torch.manual_seed(0)
        small = model.XGenMM(model.preset("small"))
        small.lang_model.init_weights()
        r["train_small"] = train_step_figures(small, args, device, peak, torch.float32)  # fp32 master, as train.py
    report(f"| {r['device']}, {args.dtype} | measured |", gpu_rows(r), r, args.json)


def decode_bound(r, x):
    """Tokens/s if a decode step did nothing but read its bytes at the measured bandwidth: every weight once,
    and each row's whole KV cache (~0.28 GB per row at 720 slots of the 4.4B model: ~30% of a batch-8 step)."""
    return x["batch"] * r["bandwidth"] / (r["weight_bytes"] + x["batch"] * x["kv_bytes_per_row"])


def gpu_rows(r, gb=1e9):
    rows = [f"| load `XGenMM.from_pretrained` ({r['load']['bytes'] / gb:.2f} GB) | {r['load']['seconds']:.1f} s |",
            f"| read bandwidth: a matrix-vector product over 1 GB (what decoding can reach, not the HBM peak) | "
            f"{r['bandwidth'] / gb:,.0f} GB/s |"]
    for k in [k for k in r if k.startswith("decode_b")]:
        x, how = r[k], "compiled" if k.endswith("compiled") else "eager"
        if "error" in x:
            rows.append(f"| batch {x['batch']}, {how}: prefill and decode | FAILED: {x['error']} |")
            continue
        rows.append(f"| batch {x['batch']}, {how}: prefill image + {r['prompt_tokens']} tokens ({x['positions']} "
                    f"positions) | {x['prefill_tok_s']:,.0f} tok/s ({x['prefill_s'] * 1e3:,.0f} ms) |")
        bound = decode_bound(r, x)
        rows.append(f"| batch {x['batch']}, {how}: decode ({x['cache_slots']} cache slots) | "
                    f"{x['decode_tok_s']:,.1f} tok/s ({x['step_s'] * 1e3:.1f} ms/step; {x['decode_tok_s'] / bound:.0%} "
                    f"of the {bound:,.0f} tok/s bound: weights + KV cache read at that bandwidth) |")
    for k, name in (("train_bfloat16", "checkpoint's model"), ("train_float32", "checkpoint's model"),
                    ("train_small", "`small` preset")):
        if k not in r:
            continue
        x, what = r[k], f"training step, {name}, {r[k]['param_dtype']} weights"
        if x.get("error"):
            rows.append(f"| {what} | FAILED: {x['error']} |")
            continue
        if x.get("out_of_memory"):
            rows.append(f"| {what} | out of memory ({x['peak_memory'] / gb:.1f} GB allocated at the peak) |")
            continue
        rows.append(f"| {what}, {x['samples']} x {x['tokens'] // x['samples']} tokens, grad. checkpointing | "
                    f"{x['tok_s']:,.0f} tok/s, MFU {x['mfu']:.1%}, peak memory {x['peak_memory'] / gb:.1f} GB |")
    return rows


# -----------------------------------------------------------------------------


def full(args):
    if args.make_checkpoint:
        t = time.perf_counter()
        path = make_checkpoint(args.make_checkpoint, args.preset, getattr(torch, args.dtype), args.seed)
        files = weight_files(path)
        print(f"{path}: {', '.join(f'{f.name} ({f.stat().st_size / 1e9:.2f} GB)' for f in files)}; "
              f"{sum(f.stat().st_size for f in files) / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s, "
              f"peak RSS {peak_rss() / 1e9:.2f} GB")
    elif args.memory:
        fsdp_memory(args)
    else:
        gpu = (args.suite or ("gpu" if args.device.startswith("cuda") else "cpu")) == "gpu"
        (full_gpu if gpu else full_cpu)(args)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--make-checkpoint", metavar="DIR", help="write a random checkpoint of --preset (bf16) to DIR")
    what.add_argument("--checkpoint", metavar="DIR", help="measure this checkpoint (CPU suite, or GPU suite on cuda)")
    what.add_argument("--memory", action="store_true", help="parameter counts and FSDP2 memory per GPU (no weights)")
    p.add_argument("--preset", default="xgenmm", choices=sorted(model.PRESET_PARTS), help="--make-checkpoint's size")
    p.add_argument("--seed", type=int, default=0, help="--make-checkpoint's random values")
    p.add_argument("--device", default="cpu", help="cpu or cuda: which suite runs (see --suite)")
    p.add_argument("--suite", choices=["cpu", "gpu"], default=None,
                   help="force a suite: `gpu` on --device cpu runs the GPU path at small sizes (default: by --device)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="--make-checkpoint's dtype, and the GPU suite's")
    p.add_argument("--measure", nargs="+", default=["load", "forward"], choices=["load", "forward"],
                   help="CPU suite: load time and RSS, and/or forward and decode")
    p.add_argument("--transformers", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU suite: also load transformers' Phi3ForCausalLM from the same files")
    p.add_argument("--fp32-layers", nargs="+", type=int, default=[8, 16],
                   help="CPU suite: fp32 runs keep this many LLM blocks; two or more counts are extrapolated "
                        "linearly to the whole model. 32: the whole fp32 model, 17.4 GB of weights (peak RSS "
                        "21 GB, of which ~3.6 GB reclaimable file pages; it ran on a 23 GB machine)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="text tokens after the image")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens decoded")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="GPU suite: generation batch sizes")
    p.add_argument("--train-batch", type=int, default=4, help="GPU suite: samples per training step")
    p.add_argument("--train-text", type=int, default=1408, help="GPU suite: text tokens per sample (+ 640 image tokens)")
    p.add_argument("--peak-tflops", type=float, default=None, help="matmul peak for the MFU (H100 SXM bf16: 989; "
                                                                    "default: measured)")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="read bandwidth instead of measuring it")
    memory_flags(p)
    p.add_argument("--repeats", type=int, default=3, help="GPU suite: timed training steps (median kept)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the decode step through torch.compile")
    p.add_argument("--train-small", action=argparse.BooleanOptionalAction, default=True,
                   help="GPU suite: also the `small` preset's training step (bench.gpu times it itself)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    full(parse(p))


if __name__ == "__main__":
    main()
