"""
At full scale on the CPU: reading a checkpoint's files, loading it (ours and transformers'), its forward and
decode, each measurement in a fresh process.

    python -m bench.full --checkpoint DIR --fp32-layers 32 --json out/full-cpu.json   # the suite (~17 minutes)
    python -m bench.full_cpu --what load --checkpoint DIR --cold                      # one measurement, one JSON line

`python -m bench.full --checkpoint DIR` on the CPU runs `full_cpu`, which starts this module once per
measurement (`run_one`), so that each peak RSS (VmHWM: anonymous and mapped file pages) is its own:
- read: the files read sequentially into one 64 MB buffer, the rate a loader competes with;
- load, load-transformers: XGenMM.from_pretrained, or transformers' Phi3ForCausalLM reading the LLM from the
  same files, timed until it returns and until every weight is resident;
- forward: vision encoding, the LLM prefill and --new-tokens decode steps (eager as stored, eager in
  decode_layout(), compiled), in --dtype, with the first --layers LLM blocks;
cold (--cold: the files dropped from the page cache first) and warm. fp32 runs of a few block counts are
extrapolated linearly to the whole model where memory is short.
"""
import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import generate
import model
import weights
from bench.common import (CPU, ROOT, bandwidth, decode_bytes, noise_photo, parse, peak_rss, photo_prompt,
                          read_bandwidth, report)


def weight_files(path):
    return sorted(Path(path).glob("*.safetensors"))


def drop_page_cache(files):
    """Evict the files from the page cache (after writing back any dirty pages): the next read hits the disk."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_files(files, chunk=64 << 20):
    """Read the files sequentially into one reused buffer: the disk (or page cache) rate a loader competes with."""
    buf, n = memoryview(bytearray(chunk)), 0
    for f in files:
        with open(f, "rb", buffering=0) as h:
            while k := h.readinto(buf):
                n += k
    return n


def make_resident(module):
    """Read one element per 4 KiB page of every weight, so memory-mapped weights are in memory."""
    s = 0.0
    for t in module.state_dict().values():
        if t.is_floating_point() and t.numel():
            s += float(t.reshape(-1)[:: max(1, 4096 // t.element_size())].float().sum())
    return s


def param_bytes(module):
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def transformers_lm(path, dtype=torch.bfloat16):
    """transformers' Phi3ForCausalLM read from the same files: the LM's tensors renamed by `key_mapping`;
    the vision, resampler, decoupled-row and head-bias tensors are left unread (transformers has no place)."""
    import transformers
    text = model.XGenMMConfig.from_hf(weights.read_config(path)).text
    return transformers.Phi3ForCausalLM.from_pretrained(
        path, config=transformers.Phi3Config.from_dict(text.to_hf()), dtype=dtype,
        key_mapping={r"^vlm\.lang_model\.": ""})


def cpu_forward(args):
    """Load (lazily), optionally keep only the first --layers LLM blocks, cast, make resident; then time the
    vision encoding (preprocessing, ViT, resampler, splice), the LLM prefill, and --new-tokens decode steps
    after it in each way of running them: eager as stored (row-major), eager in decode_layout() (column-major,
    what sample.py uses on CPU), and the faster of the two compiled. One static cache serves the three runs."""
    m = model.XGenMM.from_pretrained(args.checkpoint)
    lm = m.lang_model
    if args.layers and args.layers < len(lm.model.layers):  # what fits: the rest is never touched
        lm.model.layers, lm.config.num_hidden_layers = lm.model.layers[: args.layers], args.layers
    m.to(getattr(torch, args.dtype))  # tensor by tensor, from the mapped bf16 file
    make_resident(m)
    img, prompt, n = noise_photo(), photo_prompt(m, args.prompt_tokens), args.new_tokens
    out = {"dtype": args.dtype, "layers": len(lm.model.layers), "param_bytes": param_bytes(m),
           "decode_bytes": decode_bytes(lm)}
    with torch.no_grad():  # CPU seconds too: wall >> CPU / threads means the run waited for the cores
        t, c = time.perf_counter(), time.process_time()
        embeds = m.embed(*m.encode_batch([prompt], [[img]])[::2])
        out |= {"vision_s": time.perf_counter() - t, "vision_cpu_s": time.process_time() - c}
        T = embeds.shape[1]
        valid = torch.ones(1, T + 3 * n, dtype=torch.bool)
        generate.setup_cache(lm, 1, T + 3 * n)
        try:
            t, c = time.perf_counter(), time.process_time()
            tok = lm(embeds=embeds, input_pos=torch.arange(T), last_only=True)[:, -1].argmax(-1)
            out |= {"positions": T, "prefill_s": time.perf_counter() - t, "prefill_cpu_s": time.process_time() - c}
            for i, mode in enumerate(["eager", "eager_decode_layout"] + ["compiled"] * args.compile):
                # the compiled step takes the faster eager layout (bf16 on an AVX2 CPU: the stored one)
                layout = mode.endswith("layout") or (mode == "compiled" and
                                                     out["eager_decode_layout"]["step_s"] < out["eager"]["step_s"])
                generate.decode_layout(lm, layout)
                step = generate.compiled_step(None) if mode == "compiled" else generate.decode_one_token
                times = []
                for pos in range(T + i * n, T + (i + 1) * n):
                    t = time.perf_counter()
                    tok = step(lm, tok[:, None], torch.tensor([pos]), valid, torch.tensor([[pos]])).argmax(-1)
                    times.append(time.perf_counter() - t)
                steady = times[2:] if mode == "compiled" and n > 3 else times  # the first compiled steps compile
                out[mode] = {"first_step_s": times[0], "step_s": statistics.median(steady),
                             "decode_tok_s": 1 / statistics.median(steady), "decode_layout": layout}
        finally:
            generate.clear_cache(lm)
    return out


def full_one(args):
    """One measurement in this fresh process, so that its peak RSS is its own; prints one JSON line."""
    files = weight_files(args.checkpoint)
    if args.cold:
        drop_page_cache(files)
    t0 = time.perf_counter()
    if args.what == "read":
        out = {"bytes": read_files(files), "seconds": time.perf_counter() - t0}
    elif args.what in ("load", "load-transformers"):
        m = model.XGenMM.from_pretrained(args.checkpoint) if args.what == "load" else transformers_lm(args.checkpoint)
        t1 = time.perf_counter()
        make_resident(m)
        out = {"returns_s": t1 - t0, "seconds": time.perf_counter() - t0, "bytes": param_bytes(m)}
    else:
        out = cpu_forward(args)
    print(json.dumps(out | {"peak_rss": peak_rss()}))


def run_one(args, what, cold=False, **kw):
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "bench.full_cpu", "--what", what, "--checkpoint", str(Path(args.checkpoint).resolve()),
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
           "--compile" if args.compile else "--no-compile"]
    cmd += ["--cold"] * cold + [x for k, v in kw.items() for x in (f"--{k}", str(v))]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {what}{' (cold)' * cold} {kw or ''}: {json.dumps(r)}", flush=True)
    return r


def extrapolate(runs, key, n):
    """Fit t = a + b * layers through the runs (two or more layer counts) and evaluate at n layers."""
    xs, ys = [r["layers"] for r in runs], [key(r) for r in runs]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my + b * (n - mx)


DECODE_MODES = {"eager": "eager, weights as stored", "eager_decode_layout": "eager, decode_layout()",
                "compiled": "compiled"}


def cpu_rows(r, gb=1e9):
    """The markdown rows of the CPU figures (see full_cpu)."""
    rows, nb = [], r["checkpoint_bytes"]
    for cache in ("cold", "warm"):
        rd = r.get(f"read_{cache}")
        if rd:
            rows.append(f"| read the {r['files']} files ({nb / gb:.2f} GB), {cache} cache | {rd['seconds']:.1f} s "
                        f"({rd['bytes'] / rd['seconds'] / gb:.2f} GB/s) | |")
        for what, name in (("load", "`XGenMM.from_pretrained`"), ("load-transformers", "transformers `Phi3ForCausalLM`")):
            x = r.get(f"{what}_{cache}")
            if x and rd:
                rows.append(f"| {name} ({x['bytes'] / gb:.2f} GB of weights), {cache}: returns / all weights "
                            f"resident | {x['returns_s']:.1f} s / {x['seconds']:.1f} s ({x['seconds'] / rd['seconds']:.2f}x "
                            f"the read) | {'≤ 2x the read' if what == 'load' else ''} |")
                rows.append(f"| its peak RSS, {cache} | {x['peak_rss'] / gb:.2f} GB ({x['peak_rss'] / x['bytes']:.2f}x "
                            f"its weights) | {'≤ 1.15x' if what == 'load' else ''} |")
    for key in [k for k in r if k.startswith(("bf16", "fp32"))]:
        x = r[key]
        what = f"{x['dtype']}, {x['layers']} LLM blocks" + (" (extrapolated)" if x.get("extrapolated") else "")
        bound, bound16 = r["bandwidth"] / x["decode_bytes"], r["bandwidth_bf16"] / x["decode_bytes"]
        rows.append(f"| CPU {what}: vision, 640x480 image (5 views) -> {x['positions'] - r['prompt_tokens']} tokens "
                    f"| {x['vision_s']:.1f} s | |")
        rows.append(f"| CPU {what}: LLM prefill, {x['positions']} positions | {x['prefill_s']:.1f} s "
                    f"({x['positions'] / x['prefill_s']:.1f} tok/s) | |")
        for mode, name in DECODE_MODES.items():
            if mode in x:
                d = x[mode]["decode_tok_s"]
                if mode == "compiled":
                    name += ", decode_layout()" if x[mode].get("decode_layout") else ", weights as stored"
                extra = f"; {d / bound16:.0%} of the bf16-GEMV bound" if x["dtype"] == "bfloat16" else ""
                rows.append(f"| CPU {what}: decode b=1, {name} | {d:.2f} tok/s ({d / bound:.0%} of the bound, "
                            f"{bound:.2f} tok/s{extra}) | |")
        best = min(x[k]["step_s"] for k in ("eager", "eager_decode_layout"))
        rows.append(f"| CPU {what}: image + {r['prompt_tokens']} tokens -> {r['new_tokens']} new (sum, best eager) | "
                    f"{x['vision_s'] + x['prefill_s'] + (r['new_tokens'] - 1) * best:.1f} s | |")
    return rows


def full_cpu(args):
    """Load time and peak RSS (ours, transformers', the file read), each in a fresh process, cold and warm;
    forward and decode in bf16 and in fp32 (or the fp32 layers that fit), eager and compiled."""
    files = weight_files(args.checkpoint)
    r = {"checkpoint": str(args.checkpoint), "files": len(files), "checkpoint_bytes": sum(f.stat().st_size for f in files),
         "bandwidth": bandwidth(args, CPU, torch.float32), "bandwidth_bf16": read_bandwidth(CPU, torch.bfloat16),
         "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "threads": torch.get_num_threads()}
    print(f"{r['checkpoint']}: {r['files']} files, {r['checkpoint_bytes'] / 1e9:.2f} GB; read bandwidth (GEMV) "
          f"fp32 {r['bandwidth'] / 1e9:.1f} GB/s, bf16 {r['bandwidth_bf16'] / 1e9:.1f} GB/s", flush=True)
    if "load" in args.measure:
        whats = ["read", "load"] + ["load-transformers"] * args.transformers
        for cache in ("cold", "warm"):
            for what in whats:
                if cache == "warm":
                    run_one(args, "read")  # the files into the page cache again
                r[f"{what}_{cache}"] = run_one(args, what, cold=cache == "cold")
    if "forward" in args.measure:
        r["bf16"] = run_one(args, "forward", dtype="bfloat16")
        fp32 = [run_one(args, "forward", dtype="float32", layers=k) for k in args.fp32_layers]
        for k, x in zip(args.fp32_layers, fp32):
            r[f"fp32_{k}"] = x
        n = r["bf16"]["layers"]
        if len(fp32) > 1 and n not in [x["layers"] for x in fp32]:
            r[f"fp32_{n}"] = fp32_extrapolated(fp32, n)
    report("| measure | measured | target |", cpu_rows(r), r, args.json)


def fp32_extrapolated(runs, n):
    """The fp32 figures of the whole model, fitted linearly in the LLM block count from the runs that fit."""
    fit = lambda key: extrapolate(runs, key, n)  # noqa: E731
    x = {"dtype": "float32", "layers": n, "extrapolated": True, "positions": runs[0]["positions"],
         "vision_s": statistics.mean(r["vision_s"] for r in runs)}  # the vision side is the same in every run
    x |= {k: fit(lambda r: r[k]) for k in ("prefill_s", "decode_bytes", "param_bytes")}
    for mode in DECODE_MODES:
        if all(mode in r for r in runs):
            step = fit(lambda r: r[mode]["step_s"])
            x[mode] = {"step_s": step, "decode_tok_s": 1 / step, "decode_layout": runs[-1][mode].get("decode_layout")}
    return x


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", choices=["read", "load", "load-transformers", "forward"], required=True,
                   help="read the files, load ours (XGenMM.from_pretrained), load transformers' LLM, or the "
                        "forward and decode")
    p.add_argument("--checkpoint", metavar="DIR", required=True, help="the checkpoint to measure")
    p.add_argument("--cold", action="store_true", help="drop the files from the page cache first")
    p.add_argument("--dtype", default="bfloat16", help="forward: the weights' dtype")
    p.add_argument("--layers", type=int, default=None, help="forward: keep only the first LLM blocks (default: all)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="forward: text tokens after the image")
    p.add_argument("--new-tokens", type=int, default=16, help="forward: tokens decoded")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="forward: also time the decode step through torch.compile")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    full_one(parse(p))


if __name__ == "__main__":
    main()
