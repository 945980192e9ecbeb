"""
Benchmark: DPO with the reference as the same model with its adapters off, against a second copy.

    python -m bench.preference                      # DPO step memory and speed: adapters-off reference vs a copy
    python -m bench.preference --presets tiny --repeats 1   # a quick look

It runs one DPO step (2 preference pairs with an image each, rank-64 LoRA) with the reference as the
same model with its adapters off (dpo.py's way) and with a second copy of the model, each in a fresh
process, and reports the parameter memory, the peak resident memory and steps/s.
Each process is this module with --reference: one configuration, one JSON line.
"""
import argparse
import json
import statistics

import torch

import model
from images import preprocess
from bench.common import CPU, ROOT, SHAPES, TEXT, parse, peak_rss, report, timed, train_batch


def dpo_setup(preset, reference):
    """A random model of `preset` with rank-64 LoRA and one batch of 2 preference pairs (one image each);
    reference "adapters-off" (dpo.py's way) or "copy" (a second model held for the reference)."""
    import copy
    from types import SimpleNamespace
    import data
    import dpo
    import lora
    torch.manual_seed(0)
    m = model.XGenMM(model.preset(preset)).train()
    m.lang_model.init_weights()
    ref = copy.deepcopy(m).eval().requires_grad_(False) if reference == "copy" else None
    lora.apply_lora(m.lang_model, r=64, alpha=128)
    lora.mark_only_lora_trainable(m)
    ids, imgs = train_batch(m, 2)
    prompts = [m.config.expand_images(ids[b].tolist(), [imgs[b].size]) for b in range(2)]  # <image> -> its block
    rows = [{"input_ids": prompts[b] + answer, "labels": [-100] * len(prompts[b]) + answer, "length": 0,
             "images": [preprocess(imgs[b], m.config)], "where": f"pair {b}"}
            for answer in ([5, 6, 7, 8] * 8, [9, 10, 11, 12] * 8) for b in range(2)]
    batch = data.collate([{"chosen": rows[b], "rejected": rows[2 + b]} for b in range(2)], 0) | {"keys": [(0, 0)] * 2}
    params = [p for p in m.parameters() if p.requires_grad]
    args = SimpleNamespace(beta=0.1, loss="sigmoid", label_smoothing=0.0, clip=1.0)
    s = SimpleNamespace(m=m, wrapped=m, opt=torch.optim.AdamW(params, lr=1e-4), params=params, args=args, world=1,
                        device=CPU)
    if ref is not None:  # the same step, the reference read from the copy instead
        dpo.reference = lambda s, b, table: torch.no_grad()(dpo.logps)(ref, b)
    return s, batch, dpo


def dpo_one(args):
    """One configuration in its own process, so the peak resident memory is this configuration's alone."""
    s, batch, dpo = dpo_setup(args.presets[0], args.reference)
    params = sum(p.numel() * p.element_size() for p in s.m.parameters())
    if args.reference == "copy":
        params *= 2  # the copy holds the same tensors again (without the adapters: within 3%)
    dpo.dpo_step(s, [batch])  # warm-up
    times = [timed(lambda: dpo.dpo_step(s, [batch]), CPU) for _ in range(args.repeats)]
    print(json.dumps({"peak_rss": peak_rss(), "param_bytes": params, "steps_per_s": 1 / statistics.median(times)}))


def dpo_bench(args):
    import subprocess
    import sys
    results, rows = {}, []
    for preset in args.presets:
        for reference in ("adapters-off", "copy"):
            cmd = [sys.executable, "-m", "bench.preference", "--presets", preset, "--reference", reference,
                   "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
            r = results[f"{preset}/{reference}"] = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(f"| {preset} | {reference} | {r['param_bytes'] / 2**20:,.0f} MiB | "
                        f"{r['peak_rss'] / 2**20:,.0f} MiB | {r['steps_per_s']:.2f} |")
    report("| preset | DPO reference | parameter memory | peak RSS of the step | steps/s |", rows, results, args.json)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=sorted(SHAPES), help="model sizes")
    p.add_argument("--repeats", type=int, default=5, help="timed steps (median kept)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--reference", choices=["adapters-off", "copy"], default=None,
                   help="run this one configuration of the one preset in this process and print its JSON line "
                        "(what the benchmark starts a fresh process for)")
    args = parse(p)
    if args.reference and len(args.presets) != 1:
        p.error("--reference runs one configuration: give one preset")
    (dpo_one if args.reference else dpo_bench)(args)


if __name__ == "__main__":
    main()
