"""
Benchmark: the whole xGen-MM against the same model composed from transformers' modules, on the same weights.

    python -m bench.whole_model                     # the whole xGen-MM, tiny and small presets, fp32, CPU
    python -m bench.whole_model --presets tiny --repeats 1 --no-compile   # a quick look (under a minute)

It times model.py against `XGenMMReference` of tests/reference.py (transformers' SiglipVisionModel and
Phi3ForCausalLM, the official resampler math, the LLaVA-NeXT tiling), built from the tensors our random
model saved in the official layout, after checking that both give the same vision tokens and prefill
logits. tests/ has no __init__.py: it imports as a namespace package from the repository root (where
`python -m bench.whole_model` runs). CPU and fp32 only: the reference preprocesses and resamples on the CPU.
It times
- vision encoding of one 640x480 image (anyres: global view + 2x2 crops), PIL preprocessing included on
  both sides, in images/s;
- prompt-to-answer latency, 1 image + 32 text tokens -> 128 new tokens, greedy, no early stop, in s;
- decode tokens/s = 127 / (t(128 new tokens) - t(1 new token)): the prefill and the image cancel out;
  also as a fraction of the memory-bandwidth bound, as above.
"""
import argparse
import tempfile
from pathlib import Path

import torch

import generate
import model
from images import Images
from bench.common import (CPU, alternate, bandwidth, common_flags, decode_bytes, noise_photo, parse, photo_prompt,
                          report, xgenmm_pair)

PROMPT, NEW = 32, 128  # text tokens after the image, tokens generated


def check_parity(m, ref, ids, img, tol=1e-3):
    """Max |ours - reference| of the vision tokens and of the logits that pick the first new token."""
    with torch.inference_mode():
        expanded, _, images = m.encode_batch([ids], [[img]])
        pairs = {"vision_tokens": (m.encode_images(images)[0], ref.image_tokens(img)),
                 "prefill_logits": (m(expanded, images)[0, -1], ref.logits(ids, [img])[-1])}
    diffs = {k: (a - b).abs().max().item() for k, (a, b) in pairs.items()}
    if max(diffs.values()) > tol:
        raise AssertionError(f"ours and the reference disagree: max abs diff {diffs}, tolerance {tol}")
    return diffs


def bench_generate(m, ref, ids, img, repeats, new, compile):
    """Median seconds from prompt + PIL image to `new` greedy tokens, [ours, reference], no early stop."""
    def run_ours():
        assert m.generate([ids], [[img]], max_new_tokens=new, stop_ids=[], compile=compile).shape == (1, new)

    def run_ref():
        embeds = torch.cat([ref.image_tokens(img) if i == ref.image_id else ref.embed([i]) for i in ids])[None]
        out = ref.lm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                              max_new_tokens=new, do_sample=False, pad_token_id=m.config.text.pad_token_id)
        assert out.shape == (1, new)

    ref.lm.generation_config.eos_token_id = None  # exactly `new` tokens on both sides
    with torch.inference_mode():
        return [1 / r for r in alternate(run_ours, run_ref, CPU, repeats, 1)]


def model_preset(preset, args, bw, tmp):
    """{measure: [ours, reference]}; "..._compiled" runs ours with the ViT, resampler and decode step compiled."""
    m, ref = xgenmm_pair(preset, tmp)
    g = torch.Generator().manual_seed(0)
    img, ids = noise_photo(640, 480, g), photo_prompt(m, PROMPT, g)
    out = {"parity_max_abs_diff": check_parity(m, ref, ids, img), "decode_bound_tok_s": bw / decode_bytes(m.lang_model)}
    generate.decode_layout(m.lang_model)
    encode = lambda: m.encode_images(Images.from_pil([[img]], m.config))  # noqa: E731
    r = {}
    for comp in [False, True] if args.compile else [False]:
        for module in (m.vision_encoder, m.vision_tokenizer) if comp else ():
            module.compile()  # in place: encode_images now calls the compiled forwards
        with torch.inference_mode():
            r["vision" + "_compiled" * comp] = alternate(encode, lambda: ref.image_tokens(img), CPU, args.repeats, 1)
        t_new, t_one = (bench_generate(m, ref, ids, img, args.repeats, n, comp) for n in (NEW, 1))
        r["latency" + "_compiled" * comp] = t_new
        r["decode" + "_compiled" * comp] = [(NEW - 1) / (a - b) for a, b in zip(t_new, t_one)]
    return out | {k: {"ours": a, "reference": b} for k, (a, b) in r.items()}


MODEL_ROWS = {"vision": ("vision encode 640x480 (5 views), preprocessing included", "img/s"),
              "latency": (f"latency: image + {PROMPT} tokens -> {NEW} new (lower is better)", "s"),
              "decode": ("greedy decode b=1", "tok/s")}


def model_row(preset, key, r):
    (name, unit), a, b = MODEL_ROWS[key.split("_")[0]], r[key]["ours"], r[key]["reference"]
    frac = (f" ({a / r['decode_bound_tok_s']:.0%} of bound)", f" ({b / r['decode_bound_tok_s']:.0%})") \
        if unit == "tok/s" else ("", "")
    name += ", ours compiled" if key.endswith("compiled") else ""
    speedup = b / a if unit == "s" else a / b
    return f"| {preset} | {name} | {a:,.3g} {unit}{frac[0]} | {b:,.3g} {unit}{frac[1]} | {speedup:.2f}x |"


def full_model(args):
    bw = bandwidth(args, CPU, torch.float32)
    print(f"cpu float32, {torch.get_num_threads()} threads; read bandwidth {bw / 1e9:.1f} GB/s")
    results, rows = {"device": "cpu", "dtype": "float32", "bandwidth": bw}, []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for preset in args.presets:
            r = results[preset] = model_preset(preset, args, bw, Path(tmp))
            print(f"{preset}: vision tokens and prefill logits match the reference, max abs diff "
                  f"{r['parity_max_abs_diff']}")
            rows += [model_row(preset, k, r) for k in ("vision", "vision_compiled", "latency", "latency_compiled",
                                                      "decode", "decode_compiled") if k in r]
    report("| preset | measure | ours | reference | speed-up |", rows, results, args.json)
    print("speed-up: ours / reference for rates, reference / ours for the latency (> 1: ours is faster)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_flags(p, "model sizes to time (model.preset)",
                 "also time ours with the ViT and the resampler through torch.compile and compile=True decoding")
    full_model(parse(p))


if __name__ == "__main__":
    main()
