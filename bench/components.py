"""
Benchmarks: our components against transformers, in the same process, on the same weights.

    python -m bench.components                      # tiny and small presets, fp32, CPU (~15 minutes)
    python -m bench.components --presets tiny --repeats 1 --no-compile   # a quick look
    python -m bench.components --presets tiny --json out/bench.json
    python -m bench.components --device cuda --dtype bfloat16   # on a GPU (MFU against --peak-tflops)

For each preset it times, alternating ours and the reference (A B A B ...) and keeping the median:
- LM training step (forward + backward, no optimizer) in tokens/s, and FLOP/s as a fraction of the
  machine's measured matmul peak;
- greedy decode (batch 1, 32-token prompt, 128 new tokens) in tokens/s, and as a fraction of the
  memory-bandwidth bound (measured read bandwidth / weight bytes read per token), ours in
  `generate.decode_layout`;
- the ViT forward in images/s, and FLOP/s as a fraction of the peak.
Each is timed with ours eager and again with ours through torch.compile (`--no-compile` skips that).
"""
import argparse
import tempfile
from pathlib import Path

import torch

import generate
import phi3
import vit
from bench.common import SHAPES, alternate, bandwidth, common_flags, decode_bytes, parse, peak_matmul_flops, report

# -----------------------------------------------------------------------------
# model pairs on the same weights


def phi3_pair(preset, device, dtype, tmp):
    """A random transformers Phi-3 of the preset's size, saved, and ours loaded from the same files."""
    import transformers
    cfg = phi3.PRESETS[preset]
    hf_cfg = transformers.Phi3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        sliding_window=cfg.sliding_window, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id, rms_norm_eps=cfg.rms_norm_eps)
    torch.manual_seed(0)
    ref = transformers.Phi3ForCausalLM(hf_cfg)
    ref.save_pretrained(tmp / f"phi3-{preset}")
    ours = phi3.Phi3.from_pretrained(tmp / f"phi3-{preset}", dtype=dtype, device=device)
    return ours, ref.to(device=device, dtype=dtype)


def vit_pair(preset, device, dtype, tmp):
    """A random transformers SigLIP vision tower of the preset's size, saved, and ours loaded from it."""
    import transformers
    c = vit.PRESETS[preset]
    hf_cfg = transformers.SiglipVisionConfig(
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, image_size=c.image_size, patch_size=c.patch_size,
        layer_norm_eps=c.layer_norm_eps, vision_use_head=False)
    torch.manual_seed(0)
    ref = transformers.SiglipVisionModel(hf_cfg)
    ref.save_pretrained(tmp / f"siglip-{preset}")
    ours = vit.ViT.from_pretrained(tmp / f"siglip-{preset}", dtype=dtype, device=device)
    return ours, ref.to(device=device, dtype=dtype).eval()


# -----------------------------------------------------------------------------
# the three measurements


def lm_flops_per_token(cfg, T):
    """6 FLOPs per weight per token (forward + backward) plus attention scores, the nanoGPT/PaLM estimate."""
    n = sum(cfg.hidden_size * x for x in (
        (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim,
        cfg.num_attention_heads * cfg.head_dim, 2 * cfg.intermediate_size, cfg.intermediate_size))
    n = n * cfg.num_hidden_layers + cfg.vocab_size * cfg.hidden_size  # lm_head
    return 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * T


def bench_train(ours, ref, cfg, B, T, device, repeats, compile=False):
    idx = torch.randint(3, cfg.vocab_size, (B, T), device=device)
    ours = torch.compile(ours) if compile else ours

    def step_ours():
        loss = ours(idx, idx)  # with labels: the fused chunked loss, as a trainer uses it
        loss.backward()

    def step_ref():
        ref(input_ids=idx, labels=idx).loss.backward()

    return alternate(step_ours, step_ref, device, repeats, B * T)


def bench_decode(ours, ref, cfg, device, repeats, prompt=32, new=128, compile=False):
    """Greedy batch-1 decoding, ours in its decode layout (column-major weights), optionally compiled."""
    idx = torch.randint(3, cfg.vocab_size, (1, prompt), device=device)
    mask = torch.ones_like(idx)
    generate.decode_layout(ours)

    def run_ours():
        out = ours.generate(idx, new, stop_ids=[], compile=compile)
        assert out.shape[1] == new

    ref.generation_config.eos_token_id = None  # exactly `new` tokens on both sides, no extra logits processor

    def run_ref():
        out = ref.generate(input_ids=idx, attention_mask=mask, max_new_tokens=new, do_sample=False,
                           pad_token_id=cfg.pad_token_id)
        assert out.shape[1] == prompt + new

    with torch.inference_mode():
        return alternate(run_ours, run_ref, device, repeats, new)


def bench_vit(ours, ref, c, B, device, dtype, repeats, compile=False):
    x = torch.randn(B, 3, c.image_size, c.image_size, device=device, dtype=dtype)
    ours = torch.compile(ours) if compile else ours
    with torch.inference_mode():
        return alternate(lambda: ours(x), lambda: ref(pixel_values=x), device, repeats, B)


def vit_flops_per_image(c):
    P, C, L = c.num_patches, c.hidden_size, c.num_hidden_layers
    per_layer = 2 * P * (4 * C * C + 2 * C * c.intermediate_size) + 4 * P * P * C
    return L * per_layer + 2 * P * C * c.num_channels * c.patch_size**2

# -----------------------------------------------------------------------------


def bench_preset(preset, args, device, dtype, peak, bw, tmp):
    """{measure: [ours, transformers]} per measure; "... compiled" rows run our side through torch.compile."""
    cfg, shapes, c = phi3.PRESETS[preset], SHAPES[preset], vit.PRESETS[preset]
    modes = [False, True] if args.compile else [False]
    ours, ref = phi3_pair(preset, device, dtype, tmp)
    B, T = shapes["train"]
    r = {}
    for comp in modes:
        r["train" + "_compiled" * comp] = bench_train(ours.train(), ref.train(), cfg, B, T, device, args.repeats, comp)
    ours.eval(), ref.eval()
    for comp in modes:
        r["decode" + "_compiled" * comp] = bench_decode(ours, ref, cfg, device, args.repeats, compile=comp)
    weight_bytes = decode_bytes(ours)
    del ours, ref
    vo, vr = vit_pair(preset, device, dtype, tmp)
    for comp in modes:
        r["vit" + "_compiled" * comp] = bench_vit(vo, vr, c, shapes["vit_batch"], device, dtype, args.repeats, comp)
    util = {"train": lm_flops_per_token(cfg, T) / peak, "decode": weight_bytes / bw, "vit": vit_flops_per_image(c) / peak}
    return {k: {"ours": v[0], "transformers": v[1], "ours_frac": v[0] * util[k.split("_")[0]],
                "transformers_frac": v[1] * util[k.split("_")[0]]} for k, v in r.items()} | {
        "decode_bound_tok_s": bw / weight_bytes}


ROWS = {"train": ("LM train fwd+bwd", "tok/s", "of peak"), "decode": ("greedy decode b=1", "tok/s", "of bound"),
        "vit": ("ViT forward", "img/s", "of peak")}


def components(args):
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_matmul_flops(device, dtype)
    bw = bandwidth(args, device, dtype)
    print(f"device {device} {args.dtype}, {torch.get_num_threads()} threads; matmul peak {peak / 1e9:.0f} GFLOP/s, "
          f"read bandwidth {bw / 1e9:.1f} GB/s")
    results = {"device": str(device), "dtype": args.dtype, "peak_flops": peak, "bandwidth": bw}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for preset in args.presets:
            r = results[preset] = bench_preset(preset, args, device, dtype, peak, bw, Path(tmp))
            for key in ("train", "train_compiled", "decode", "decode_compiled", "vit", "vit_compiled"):
                if key in r:
                    (name, unit, what), x = ROWS[key.split("_")[0]], r[key]
                    name += ", ours compiled" if key.endswith("compiled") else ""
                    rows.append(f"| {preset} | {name} | {x['ours']:,.1f} {unit} ({x['ours_frac']:.0%} {what}) | "
                                f"{x['transformers']:,.1f} {unit} ({x['transformers_frac']:.0%}) | "
                                f"{x['ours'] / x['transformers']:.2f}x |")
    report("| preset | measure | ours | transformers | ours / transformers |", rows, results, args.json)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_flags(p, "model sizes to time (phi3.PRESETS / vit.PRESETS)",
                 "also time ours through torch.compile (the decode step, the training step, the ViT)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--peak-tflops", type=float, default=None, help="matmul peak to use instead of measuring it")
    components(parse(p))


if __name__ == "__main__":
    main()
