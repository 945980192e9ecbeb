"""
Benchmark: attention.py's paths against PyTorch's SDPA, attention alone and in a decoder training step.

    python -m bench.attention --threads 1                        # CPU, fp32: blockwise and SDPA (~12 minutes)
    python -m bench.attention --lengths 1024 --repeats 1         # a quick look
    python -m bench.attention --device cuda --dtype bfloat16     # GPU: Triton against SDPA flash / mem-efficient

The batch: --batch rows, every other one right-padded to 3/4 of the length (training batches are
right-padded), Phi-3's window of 2047 (it binds at 4k), Phi-3-mini's heads (32 of 96 on a GPU; --heads). Two masks:
- "causal": no padding and no window, so no mask at all: SDPA's flash kernel (is_causal) is the one to beat.
- "padded": the padded batch with the window. "sdpa dense" is what the decoder did before attention.py: one
  (B, 1, T, T) mask (on a GPU SDPA's mem-efficient kernel runs it; flash takes no mask). Now "sdpa" cuts the
  queries into chunks of 512, each with the mask of the keys it reaches (the CPU default), "triton" runs the
  kernel with no mask tensor (the GPU default), "blockwise" is the readable algorithm in PyTorch.
Each path runs forward alone and forward + backward, alternated (A B C A B C ...), median of --repeats; the
first path of a row is the baseline of the ratios. At the first length every path is first checked against the
reference math in fp32 (the error is reported). The decoder step: a --preset Phi-3 training step (forward and
backward of the loss, no optimizer) on the padded batch on each path, with the peak GPU memory on CUDA.
"""
import argparse
import statistics
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attention
import phi3
from attention import Mask
from bench.common import parse, peak_matmul_flops, report, sync, timed

WINDOW = 2047  # Phi-3-mini's sliding window (docs/release.md §1)

# -----------------------------------------------------------------------------
# the paths: attention.py's, and SDPA the way the decoder called it before


def dense_sdpa(q, k, v, mask, scale=None):
    """The decoder before attention.py: one (B, 1, T, T) boolean mask."""
    ok = attention.visible(mask, torch.arange(q.shape[2], device=q.device), torch.arange(k.shape[2], device=q.device))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=ok, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def on_backend(backend):
    def run(q, k, v, mask, scale=None):
        with sdpa_kernel(backend):
            return attention.sdpa(q, k, v, mask, scale)
    return run


BENCH_PATHS = {"sdpa dense": dense_sdpa, "sdpa flash": on_backend(SDPBackend.FLASH_ATTENTION),
               "sdpa mem-efficient": on_backend(SDPBackend.EFFICIENT_ATTENTION)}
attention.PATHS.update(BENCH_PATHS)  # so that attention.use can put the decoder on them too


def paths(device, kind):
    if device.type == "cuda":
        return ["sdpa flash", "sdpa mem-efficient", "triton"] if kind == "causal" else ["sdpa dense", "sdpa", "triton"]
    return ["sdpa", "blockwise"] if kind == "causal" else ["sdpa dense", "sdpa", "blockwise"]


def padded_mask(B, T, device, kind):
    if kind == "causal":
        return Mask(causal=True), None
    real = torch.ones(B, T, dtype=torch.long, device=device)
    real[1::2, T * 3 // 4:] = 0  # every other row right-padded to 3/4
    return Mask.from_padding(real, causal=True, window=WINDOW), real


def race(fns, device, repeats):
    """Median seconds of each function, run in turn (A B C A B C ...) after one warm-up each."""
    for f in fns.values():
        f()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            times[name].append(timed(f, device))
    return {name: statistics.median(t) for name, t in times.items()}

# -----------------------------------------------------------------------------
# attention alone


def bench_op(args, device, dtype, T, kind, check):
    B, H, D = args.batch, args.heads, args.head_dim
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, do = (torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask, _ = padded_mask(B, T, device, kind)
    names = paths(device, kind)
    err = {}
    if check:  # every path against the reference math in fp32, before timing anything
        with torch.no_grad():
            ref = attention.reference(*(t.float() for t in (q, k, v)), mask)
            for name in names:
                with attention.use(name):
                    err[name] = (attention.attention(q, k, v, mask).float() - ref).abs().max().item()
        del ref

    def forward(name):
        def run():
            with torch.no_grad(), attention.use(name):
                attention.attention(q, k, v, mask)
        return run

    def train(name):
        def run():
            with attention.use(name):
                torch.autograd.grad(attention.attention(q, k, v, mask), (q, k, v), do)
        return run
    fwd = race({n: forward(n) for n in names}, device, args.repeats)
    both = race({n: train(n) for n in names}, device, args.repeats)
    return {n: {"forward_s": fwd[n], "train_s": both[n], "max_err": err.get(n)} for n in names}

# -----------------------------------------------------------------------------
# a decoder training step


def decoder(args, device, dtype):
    cfg = phi3.PRESETS[args.preset]
    cfg = replace(cfg, sliding_window=WINDOW, max_position_embeddings=max(args.lengths),
                  num_hidden_layers=args.layers or cfg.num_hidden_layers)
    torch.manual_seed(0)
    with torch.device(device):
        model = phi3.Phi3(cfg).init_weights()
    return model.to(dtype).train(), cfg


def bench_step(args, model, cfg, device, T):
    B = args.batch
    idx = torch.randint(3, cfg.vocab_size, (B, T), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    _, real = padded_mask(B, T, device, "padded")
    labels = idx.masked_fill(real == 0, -100)

    def step(name):
        def run():
            with attention.use(name):
                model(idx, labels, attention_mask=real).backward()
            model.zero_grad(set_to_none=True)
        return run
    out = {}
    for name, t in race({n: step(n) for n in paths(device, "padded")}, device, args.repeats).items():
        out[name] = {"step_s": t, "tok_s": B * T / t}
        if device.type == "cuda":  # peak memory of one more step on this path alone
            torch.cuda.reset_peak_memory_stats()
            step(name)()
            sync(device)
            out[name]["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out

# -----------------------------------------------------------------------------
# the run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("shapes")
    g.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096], help="sequence lengths T")
    g.add_argument("--batch", type=int, default=2, help="rows; every other one is right-padded to 3/4")
    g.add_argument("--heads", type=int, default=None, help="attention heads (default: 32 on CUDA, 8 on CPU)")
    g.add_argument("--head-dim", type=int, default=96, help="Phi-3-mini's 96")
    g = p.add_argument_group("decoder step")
    g.add_argument("--preset", default=None, help="phi3.PRESETS name (default: phi3-mini-4k on CUDA, tiny on CPU)")
    g.add_argument("--layers", type=int, default=None, help="override the preset's number of layers")
    g.add_argument("--no-step", action="store_true", help="time attention alone only")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--repeats", type=int, default=3, help="timed runs of each path (median kept)")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    g.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parse(p)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    args.heads = args.heads or (32 if device.type == "cuda" else 8)
    args.preset = args.preset or ("phi3-mini-4k" if device.type == "cuda" else "tiny")
    peak = peak_matmul_flops(device, dtype)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"{name}, {args.dtype}; matmul peak {peak / 1e9:,.0f} GFLOP/s; B={args.batch}, heads {args.heads} x "
          f"{args.head_dim}, window {WINDOW}")
    results, rows = {"device": name, "dtype": args.dtype, "peak_flops": peak, "args": vars(args)}, []
    for i, T in enumerate(args.lengths):
        for kind in ("causal", "padded"):
            r = results[f"op T={T} {kind}"] = bench_op(args, device, dtype, T, kind, check=i == 0)
            base = next(iter(r.values()))
            for n, x in r.items():
                err = "" if x["max_err"] is None else f"{x['max_err']:.1e}"
                speed = f"{base['forward_s'] / x['forward_s']:.2f}x | {base['train_s'] / x['train_s']:.2f}x"
                rows.append(f"| {T} | {kind} | {n} | {x['forward_s'] * 1e3:,.1f} ms | {x['train_s'] * 1e3:,.1f} ms | "
                            f"{speed} | {err} |")
            print(rows[-1], flush=True)
    op_header = "| T | mask | path | forward | forward + backward | speed vs first, fwd | fwd+bwd | max error |"
    if args.no_step:
        return report(op_header, rows, results, args.json)
    report(op_header, rows, results, None)
    model, cfg = decoder(args, device, dtype)
    rows = []
    for T in args.lengths:
        r = results[f"step T={T}"] = bench_step(args, model, cfg, device, T)
        base = next(iter(r.values()))
        for n, x in r.items():
            mem = f" {x['peak_gb']:.1f} GB |" if "peak_gb" in x else ""
            rows.append(f"| {args.preset} | {T} | {n} | {x['step_s'] * 1e3:,.0f} ms | {x['tok_s']:,.0f} tok/s | "
                        f"{base['step_s'] / x['step_s']:.2f}x |{mem}")
            print(rows[-1], flush=True)
    mem = " peak memory |" if device.type == "cuda" else ""
    report("| preset | T | path | training step | tokens/s | speed vs first |" + mem, rows, results, args.json)


if __name__ == "__main__":
    main()
