"""
Benchmarks: our components, and the whole model, against transformers, in the same process, on the same weights.

    python bench.py components                      # tiny and small presets, fp32, CPU (~15 minutes)
    python bench.py components --presets tiny --json out/bench.json
    python bench.py components --device cuda --dtype bfloat16   # on a GPU (MFU against --peak-tflops)

For each preset it times, alternating ours and the reference (A B A B ...) and keeping the median:
- LM training step (forward + backward, no optimizer) in tokens/s, and FLOP/s as a fraction of the
  machine's measured matmul peak;
- greedy decode (batch 1, 32-token prompt, 128 new tokens) in tokens/s, and as a fraction of the
  memory-bandwidth bound (measured read bandwidth / weight bytes read per token), ours in
  `Phi3.decode_layout()`;
- the ViT forward in images/s, and FLOP/s as a fraction of the peak.
Each is timed with ours eager and again with ours through torch.compile (`--no-compile` skips that).

    python bench.py model                           # the whole xGen-MM, tiny and small presets, fp32, CPU
    python bench.py model --presets tiny --repeats 1 --no-compile   # a quick look (under a minute)

`model` times model.py against `XGenMMReference` of tests/reference.py (transformers' SiglipVisionModel and
Phi3ForCausalLM, the official resampler math, the LLaVA-NeXT tiling), built from the tensors our random
model saved in the official layout, after checking that both give the same vision tokens and prefill
logits. tests/ has no __init__.py: it imports as a namespace package from the repository root (the
directory of bench.py). CPU and fp32 only: the reference preprocesses and resamples on the CPU. It times
- vision encoding of one 640x480 image (anyres: global view + 2x2 crops), PIL preprocessing included on
  both sides, in images/s;
- prompt-to-answer latency, 1 image + 32 text tokens -> 128 new tokens, greedy, no early stop, in s;
- decode tokens/s = 127 / (t(128 new tokens) - t(1 new token)): the prefill and the image cancel out;
  also as a fraction of the memory-bandwidth bound, as above.
Compiled rows run ours with the ViT and the resampler through torch.compile and `compile=True` decoding.

    python bench.py train                           # a training step, tiny and small presets, fp32, CPU
    python bench.py train --presets tiny --repeats 1 --no-compile   # a quick look

`train` times a training step (forward + backward, no optimizer step; ViT frozen; resampler + LLM trained; loss
= next-token cross-entropy summed over the supervised tokens) in tokens/s of the spliced sequence (text + vision
tokens), on a fixed batch (4 samples at tiny, 2 at small: one 320x240 noise image each, 5 anyres views, and 96
supervised text tokens), against the same step composed from `xgenmm_pair`'s reference on the same weights and
batched as a transformers user would: SigLIP on all views at once (no_grad), the official resampler math on all
groups at once (weights as leaf Parameters), the blocks spliced into right-padded inputs_embeds, and
Phi3ForCausalLM(labels=...), its mean loss x the supervised tokens. Both sides get images preprocessed once,
outside the step (a DataLoader's work: `data`). transformers' lm_head has no bias and all vocab_size rows
(ours the first output_vocab_size): negligible, but the mean losses, which must agree within 1e-4 relative
first, take the reference's through the decoupled head. FLOP/s (fraction of the matmul peak) counts 6 per
trainable weight per token (embedding table out) + 2 per ViT weight per patch. Compiled rows compile the LLM
blocks in place (train.py --compile).

    python bench.py data --data data/toy/mixtures/sft.json data/toy/mixtures/interleave.json

`data` times data.py's pipeline (read, decode, any-resolution preprocessing, tokenize, collate) through a
DataLoader with 2 workers, in samples/s, next to a `tiny` training step (forward + backward) on the same
batches: the pipeline must outpace the step, or training waits for data.

    python bench.py dpo                             # DPO step memory and speed: adapters-off reference vs a copy

`dpo` runs one DPO step (2 preference pairs with an image each, rank-64 LoRA) with the reference as the
same model with its adapters off (dpo.py's way) and with a second copy of the model, each in a fresh
process, and reports the parameter memory, the peak resident memory and steps/s.

    python bench.py full --make-checkpoint DIR       # a random 4.4B model in the release's layout (bf16, 8.7 GB)
    python bench.py full --checkpoint DIR --fp32-layers 32 --json out/full-cpu.json   # CPU figures (~17 minutes)
    python bench.py full --checkpoint DIR --device cuda --peak-tflops 989     # GPU figures
    python bench.py full --memory                    # parameter counts, FSDP2 memory per GPU (SFT, DPO-LoRA)

`full` works at the real sizes. --make-checkpoint writes every tensor name and shape of the Hub release
(the pooling head included) through model.save_pretrained, one shard in memory at a time. --checkpoint on
the CPU times, each in a fresh process (so each peak RSS is its own), cold (page cache dropped) and warm:
reading the files, XGenMM.from_pretrained until every weight is resident, and transformers'
Phi3ForCausalLM reading the LLM from the same files; then vision encoding, the LLM prefill and decoding in
bf16 and in fp32 (the whole model with --fp32-layers 32, else the blocks that fit, extrapolated). On cuda
it times the load, prefill and decode at batch 1 and 8, and train.py's step with gradient checkpointing
(tokens/s, MFU, peak memory) for the checkpoint's model with bf16 and fp32 weights and for `small`;
`--suite gpu` runs that path on the CPU at small sizes.

transformers is needed only here and in the tests; the project itself never imports it.
"""
import argparse
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image

import fused
import model
import phi3
import resampler
import vit
import weights

# -----------------------------------------------------------------------------
# machine limits


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def peak_matmul_flops(device, dtype, n=2048, reps=10):
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    return max(2 * n**3 * reps / timed(lambda: [a @ b for _ in range(reps)], device) for _ in range(3))


def read_bandwidth(device, dtype, gb=1.0, reps=5):
    """Bytes/s of a matrix-vector product over `gb` GB: the access pattern of batch-1 decoding."""
    rows = int(gb * 1e9 / 4096 / torch.finfo(dtype).bits * 8)
    w, x = torch.randn(rows, 4096, device=device, dtype=dtype), torch.randn(4096, device=device, dtype=dtype)
    w @ x
    best = min(timed(lambda: w @ x, device) for _ in range(reps))
    return w.numel() * w.element_size() / best


def bandwidth(args, device, dtype):
    return args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else read_bandwidth(device, dtype)


def decode_bytes(lm):
    """Weight bytes one batch-1 decode step reads: every LM parameter but the embedding table (one row is read).
    The decode bound is bandwidth / decode_bytes tokens/s."""
    return sum(p.numel() * p.element_size() for n, p in lm.named_parameters() if "embed" not in n)


def peak_rss():
    """This process's peak resident memory (VmHWM: anonymous and mapped file pages), in bytes. Not ru_maxrss,
    which a child started by fork + exec inherits from its parent."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def noise_photo(w=640, h=480, g=None):
    """A PIL image of uniform noise, drawn from `g` (default: a generator seeded 0)."""
    g = g or torch.Generator().manual_seed(0)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g).numpy())


def photo_prompt(m, n, g=None):
    """`<image>` then n random text ids, drawn from `g` (default: a generator seeded 0)."""
    g = g or torch.Generator().manual_seed(0)
    return [m.config.image_token_id] + torch.randint(3, m.config.initial_tokenizer_len, (n,), generator=g).tolist()

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
        _, loss = ours(idx, idx, return_logits=False)  # the fused chunked loss, as a trainer would use it
        loss.backward()

    def step_ref():
        ref(input_ids=idx, labels=idx).loss.backward()

    return alternate(step_ours, step_ref, device, repeats, B * T)


def bench_decode(ours, ref, cfg, device, repeats, prompt=32, new=128, compile=False):
    """Greedy batch-1 decoding, ours in its decode layout (column-major weights), optionally compiled."""
    idx = torch.randint(3, cfg.vocab_size, (1, prompt), device=device)
    mask = torch.ones_like(idx)
    ours.decode_layout()

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


def alternate(a, b, device, repeats, units):
    """Median units/s of a and b, run alternately after one warm-up each."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(timed(a, device))
        tb.append(timed(b, device))
    return units / statistics.median(ta), units / statistics.median(tb)

# -----------------------------------------------------------------------------


SHAPES = {"tiny": dict(train=(8, 256), vit_batch=32), "small": dict(train=(4, 256), vit_batch=8)}


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


def report(header, rows, results, path):
    print(f"\n{header}\n|" + "---|" * header.count(" |"))
    print("\n".join(rows))
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=2))

# -----------------------------------------------------------------------------
# the whole model against the transformers-composed reference

CPU, PROMPT, NEW = torch.device("cpu"), 32, 128


def xgenmm_pair(preset, tmp):
    """Ours with random weights, saved in the official layout, and XGenMMReference loaded from those tensors."""
    import transformers
    from safetensors.torch import load_file
    from tests.reference import XGenMMReference  # tests/ has no __init__.py: a namespace package from the repo root
    torch.manual_seed(0)
    m = model.XGenMM(model.preset(preset))
    m.lang_model.init_weights()
    files = sorted(m.save_pretrained(tmp / f"xgenmm-{preset}").glob("*.safetensors"))
    sd = {k: v for f in files for k, v in load_file(f).items()}
    part = lambda prefix: {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}  # noqa: E731
    cfg = m.config
    siglip = transformers.SiglipVisionModel(
        transformers.SiglipVisionConfig(**asdict(cfg.vision), vision_use_head=False))  # ours saves no pooling head
    pre = "vision_model." if "vision_model.post_layernorm.weight" in siglip.state_dict() else ""  # transformers 4.x
    siglip.load_state_dict({pre + k: v for k, v in part("vlm.vision_encoder.").items()})
    lm = transformers.Phi3ForCausalLM(transformers.Phi3Config.from_dict(cfg.text.to_hf()))
    lm_sd, main = part(model.LM), lm.state_dict().keys()
    lm.load_state_dict({k: lm_sd[k] for k in main})  # HF's lm_head has no bias: it and the decoupled rows go in extra
    extra = {k: v for k, v in lm_sd.items() if k not in main}
    ref = XGenMMReference(siglip.eval(), part("vlm.vision_tokenizer."), cfg.resampler, lm.eval(), extra,
                          cfg.initial_tokenizer_len, "anyres", grids=[list(g) for g in cfg.grids])
    return m.eval(), ref


def check_parity(m, ref, ids, img, tol=1e-3):
    """Max |ours - reference| of the vision tokens and of the logits that pick the first new token."""
    with torch.inference_mode():
        images = model.Images.from_pil([[img]], m.config)
        pairs = {"vision_tokens": (m.encode_images(images)[0], ref.image_tokens(img)),
                 "prefill_logits": (m(torch.tensor([ids]), images)[0, -1], ref.logits(ids, [img])[-1])}
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
    m.lang_model.decode_layout()
    encode = lambda: m.encode_images(model.Images.from_pil([[img]], m.config))  # noqa: E731
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


# -----------------------------------------------------------------------------
# a training step against the same step composed from transformers' modules

TRAIN_BATCH, TEXT, PHOTO = {"tiny": 4, "small": 2}, 96, (320, 240)  # samples per step, text tokens, image (W, H)


def train_batch(m, B):
    """B samples, each one random-noise PHOTO and TEXT random supervised tokens: ids (B, 1 + TEXT), PIL images."""
    g, (W, H) = torch.Generator().manual_seed(0), PHOTO
    imgs = [noise_photo(W, H, g) for _ in range(B)]
    text = torch.randint(3, m.config.initial_tokenizer_len, (B, TEXT), generator=g)
    return torch.cat((torch.full((B, 1), m.config.image_token_id), text), 1), imgs


def ref_pixels(ref, imgs):
    """The official processor, image by image, once (a DataLoader's work): all views and (size, grid) per image."""
    from tests.reference import divide_to_patches, processor, resize_and_pad_image, select_best_resolution
    S, views, meta = ref.S, [], []
    for img in imgs:
        best = select_best_resolution(img.size, ref.grids)
        crops = divide_to_patches(resize_and_pad_image(img, best), S)
        views += [processor(v, S) for v in [img.resize((S, S))] + crops]
        meta.append((img.size, (best[0] // S, best[1] // S)))
    return torch.stack(views), meta


def ref_groups(ref, feats, size, grid):
    """One image's view features (1 + cols*rows, P, D) -> resampler groups and masks, as in
    XGenMMReference.image_tokens (which runs one image under no_grad)."""
    from tests.reference import unpad_image
    (nw, nh), h, D = grid, ref.side, feats.shape[-1]
    f = feats[1:].view(nh, nw, h, h, D).permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)  # (D, H, W)
    f, mask = unpad_image(f, size, keep_original_shape=True)
    f = f.flatten(1, 2).transpose(0, 1)  # (H*W, D)
    return (torch.cat((feats[:1], f.reshape(-1, h * h, D))),
            torch.cat((torch.ones(1, h * h, dtype=torch.bool), mask.flatten().view(-1, h * h))))


def ref_inputs(ref, res, pixels, meta, ids):
    """Batched: SigLIP once on every view (frozen), the official resampler math once on every group, each
    sample's <image> replaced by its block, rows right-padded -> (inputs_embeds, attention_mask, labels)."""
    from tests.reference import resampler_reference
    with torch.no_grad():
        feats = ref.siglip(pixel_values=pixels).last_hidden_state  # (V, P, D)
    per_image = feats.split([1 + c * r for _, (c, r) in meta])
    grouped = [ref_groups(ref, f, size, grid) for f, (size, grid) in zip(per_image, meta)]
    tokens = resampler_reference(res, ref.rcfg, *(torch.cat(t) for t in zip(*grouped)))  # (G, L, C)
    blocks = iter(t.flatten(0, 1) for t in tokens.split([len(g) for g, _ in grouped]))
    extra = ref.extra["model.embed_tokens.additional_embedding.weight"]  # decoupled rows: ids >= initial
    embeds = torch.where((ids >= ref.initial)[..., None], extra[(ids - ref.initial).clamp(0, len(extra) - 1)],
                         ref.lm.model.embed_tokens(ids.clamp(max=ref.initial - 1)))  # (B, T, C)
    rows_e, rows_l = [], []
    for e, x in zip(embeds, ids):
        i, blk = (x == ref.image_id).nonzero().item(), next(blocks)  # one image per sample here
        rows_e.append(torch.cat((e[:i], blk, e[i + 1:])))
        rows_l.append(torch.cat((x[:i], x.new_full((len(blk),), -100), x[i + 1:])))
    pad = lambda rows, v: torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=v)  # noqa: E731
    return pad(rows_e, 0.0), pad([torch.ones(len(r), dtype=torch.long) for r in rows_l], 0), pad(rows_l, -100)


def train_parity(m, ref, res, batch, tol=1e-4):
    """Mean loss of ours and of the reference. transformers' lm_head has no bias and all vocab_size rows, so the
    reference's loss here goes from its hidden states through the decoupled head, as XGenMMReference.logits."""
    (ids, images, pixels, meta), x = batch, ref.extra
    with torch.no_grad():
        ours = m(ids, images, labels=ids)[1].item()
        embeds, mask, labels = ref_inputs(ref, res, pixels, meta, ids)
        h = ref.lm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        w = torch.cat((ref.lm.lm_head.weight[: ref.initial], x["lm_head.additional_fc.weight"]))
        b = torch.cat((x["lm_head.bias"][: ref.initial], x["lm_head.additional_fc.bias"]))
        logits = (h @ w.T + b)[:, :-1]
        theirs = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten()).item()
    if abs(ours - theirs) > tol * abs(theirs):
        raise AssertionError(f"training loss: ours {ours:.6f}, reference {theirs:.6f} (relative tolerance {tol})")
    return {"ours": ours, "reference": theirs}


def train_steps(m, ref, res, batch):
    """The two steps timed: zero the grads (set to None), forward, backward of the summed loss."""
    ids, images, pixels, meta = batch
    n_sup = int((ref_inputs(ref, res, pixels, meta, ids)[2][:, 1:] != -100).sum())

    def ours():
        m.zero_grad(set_to_none=True)
        m(ids, images, labels=ids, reduction="sum", return_logits=False)[1].backward()

    def reference():
        ref.lm.zero_grad(set_to_none=True)
        for p in res.values():
            p.grad = None
        embeds, mask, labels = ref_inputs(ref, res, pixels, meta, ids)
        loss = ref.lm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        (loss * n_sup).backward()  # its mean -> the sum ours takes (the same cost either way)
    return ours, reference


def train_flops(m, tokens, views):
    """The estimate: 6 FLOPs per trainable weight (resampler + LLM, less the embedding table: a lookup) per
    sequence token, + 2 per frozen ViT weight per patch; attention scores left out."""
    trained = sum(p.numel() for k, p in m.named_parameters() if p.requires_grad and "embed_tokens" not in k)
    vit_weights, v = sum(p.numel() for p in m.vision_encoder.parameters()), m.config.vision
    return 6 * trained * tokens + 2 * vit_weights * views * (v.image_size // v.patch_size) ** 2


def train_preset(preset, args, peak, tmp):
    """Tokens/s of forward + backward (no optimizer step) of ours and of the reference on one fixed batch."""
    m, ref = xgenmm_pair(preset, tmp)
    m.train(), ref.lm.train(), ref.siglip.requires_grad_(False)
    res = {k: torch.nn.Parameter(v.clone()) for k, v in ref.res_sd.items()}  # the trainable resampler, as leaves
    ids, imgs = train_batch(m, TRAIN_BATCH[preset])
    batch = (ids, model.Images.from_pil([[im] for im in imgs], m.config), *ref_pixels(ref, imgs))
    B, T = ref_inputs(ref, res, *batch[2:], ids)[0].shape[:2]
    flops = train_flops(m, B * T, len(batch[2]))
    out = {"parity_loss": train_parity(m, ref, res, batch), "samples": B, "tokens_per_sample": T,
           "flops_per_step": flops}
    for comp in [False, True] if args.compile else [False]:
        for block in m.lang_model.model.layers if comp else ():
            block.compile()  # in place, as train.py --compile
        a, r = alternate(*train_steps(m, ref, res, batch), CPU, args.repeats, B * T)
        util = flops / (B * T) / peak
        out["train" + "_compiled" * comp] = {"ours": a, "reference": r, "ours_frac": a * util,
                                             "reference_frac": r * util}
    return out


def train_row(preset, key, r):
    x, name = r[key], f"train step fwd+bwd ({r['samples']} samples x {r['tokens_per_sample']} tokens)"
    name += ", ours compiled" if key.endswith("compiled") else ""
    return (f"| {preset} | {name} | {x['ours']:,.0f} tok/s ({x['ours_frac']:.0%} of peak) | "
            f"{x['reference']:,.0f} tok/s ({x['reference_frac']:.0%}) | {x['ours'] / x['reference']:.2f}x |")


def train_bench(args):
    peak = peak_matmul_flops(CPU, torch.float32)
    print(f"cpu float32, {torch.get_num_threads()} threads; matmul peak {peak / 1e9:.0f} GFLOP/s")
    results, rows = {"device": "cpu", "dtype": "float32", "peak_flops": peak}, []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for preset in args.presets:
            r = results[preset] = train_preset(preset, args, peak, Path(tmp))
            print(f"{preset}: mean training loss, ours {r['parity_loss']['ours']:.6f}, "
                  f"reference {r['parity_loss']['reference']:.6f}")
            rows += [train_row(preset, k, r) for k in ("train", "train_compiled") if k in r]
    report("| preset | measure | ours | transformers-composed | ours / reference |", rows, results, args.json)


# -----------------------------------------------------------------------------
# the data pipeline: can it feed a training step?


def data_pipeline(args):
    """Samples/s of data.py's pipeline (read + decode + anyres preprocessing + tokenize + collate) through a
    DataLoader with --workers workers, next to the samples/s of a training step of the model preset it feeds."""
    import data
    results, rows = {}, []
    for path in args.data:
        world = Path(path).resolve().parent.parent
        tok = model.Tokenizer.from_pretrained(world / "tokenizer")
        model.extend_tokenizer(tok)
        cfg = model.preset(args.preset, tokenizer=tok)
        enc = data.Encoder(tok, cfg, args.max_len)
        mix = data.Mixture(data.open_sources(path, tok.id_to_token(tok.eos_id)), enc, args.batch_size, tok.pad_id)
        it = iter(data.loader(mix, num_workers=args.workers))
        batches = [next(it) for _ in range(2)]  # workers started and warm
        t = time.perf_counter()
        batches += [next(it) for _ in range(args.batches)]
        feed = sum(len(b["where"]) for b in batches[2:]) / (time.perf_counter() - t)
        del it
        step = train_step_rate(cfg, batches[2:], args.repeats)
        results[path] = {"data_samples_per_s": feed, "train_samples_per_s": step}
        rows.append(f"| {Path(path).name} | {feed:,.1f} samples/s | {step:,.1f} samples/s | {feed / step:.1f}x |")
    report(f"| data ({args.workers} workers, batch {args.batch_size}) | pipeline | {args.preset} training step "
           "(fwd+bwd) | pipeline / step |", rows, results, args.json)


def train_step_rate(cfg, batches, repeats):
    """Samples/s of forward + backward of a fresh model of `cfg` on the given batches (median of repeats)."""
    torch.manual_seed(0)
    m = model.XGenMM(cfg).train()
    m.lang_model.init_weights()

    def step():
        for b in batches:
            _, loss = m(b["input_ids"], b["images"], b["attention_mask"], labels=b["labels"], return_logits=False)
            loss.backward()
    step()
    t = statistics.median(timed(step, CPU) for _ in range(repeats))
    return sum(len(b["where"]) for b in batches) / t


# -----------------------------------------------------------------------------
# DPO: the reference as the same model with its adapters off, against a second copy


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
    rows = [{"input_ids": ids[b].tolist() + answer, "labels": [-100] * (TEXT + 1) + answer, "length": 0,
             "images": [model.preprocess(imgs[b], m.config)], "where": f"pair {b}"}
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
    s, batch, dpo = dpo_setup(args.preset, args.reference)
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
            out = subprocess.run([sys.executable, __file__, "dpo-one", "--preset", preset, "--reference", reference,
                                  "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
            r = results[f"{preset}/{reference}"] = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(f"| {preset} | {reference} | {r['param_bytes'] / 2**20:,.0f} MiB | "
                        f"{r['peak_rss'] / 2**20:,.0f} MiB | {r['steps_per_s']:.2f} |")
    report("| preset | DPO reference | parameter memory | peak RSS of the step | steps/s |", rows, results, args.json)


# -----------------------------------------------------------------------------
# at full scale: the release's checkpoint layout and sizes, lean loading, CPU and GPU figures, FSDP2 memory

HEAD = "vlm.vision_encoder.head."  # SigLIP's attention-pooling head: in the release's files, unused by xGen-MM


def pooling_head_shapes(v):
    """{official name: shape} of the pooling head the release carries (transformers'
    SiglipMultiheadAttentionPoolingHead: a probe, nn.MultiheadAttention, LayerNorm, MLP)."""
    C, I = v.hidden_size, v.intermediate_size
    shapes = {"probe": (1, 1, C), "attention.in_proj_weight": (3 * C, C), "attention.in_proj_bias": (3 * C,),
              "attention.out_proj.weight": (C, C), "attention.out_proj.bias": (C,), "layernorm.weight": (C,),
              "layernorm.bias": (C,), "mlp.fc1.weight": (I, C), "mlp.fc1.bias": (I,), "mlp.fc2.weight": (C, I),
              "mlp.fc2.bias": (C,)}
    return {HEAD + k: s for k, s in shapes.items()}


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


def stamped_generate(m, prompts, images, new, compile, device):
    """m.generate with a clock per new token: (seconds to the first token, [seconds of each later step])."""
    stamps = []

    def stamp(_):
        sync(device)
        stamps.append(time.perf_counter())
    sync(device)
    t0 = time.perf_counter()
    m.generate(prompts, images, max_new_tokens=new, stop_ids=[], callback=stamp, compile=compile)
    return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])]


def decode_figures(m, args, device, batch, compile):
    """Prefill (PIL image + prompt -> first token) and steady decode step of `batch` identical rows."""
    prompt, img = photo_prompt(m, args.prompt_tokens), noise_photo()
    first, steps = stamped_generate(m, [prompt] * batch, [[img]] * batch, args.new_tokens, compile, device)
    steady = steps[2:] if compile and len(steps) > 3 else steps  # the first compiled steps compile
    positions = len(prompt) - 1 + m.config.image_tokens(img.size)
    return {"batch": batch, "positions": positions, "prefill_s": first, "prefill_tok_s": batch * positions / first,
            "step_s": statistics.median(steady), "decode_tok_s": batch / statistics.median(steady),
            "first_step_s": steps[0]}


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
        embeds = m.prepare_inputs(torch.tensor([prompt]), model.Images.from_pil([[img]], m.config))[0]
        out |= {"vision_s": time.perf_counter() - t, "vision_cpu_s": time.process_time() - c}
        T = embeds.shape[1]
        lm.setup_cache(1, T + 3 * n)
        try:
            t, c = time.perf_counter(), time.process_time()
            tok = lm(embeds=embeds, input_pos=torch.arange(T), last_only=True)[:, -1].argmax(-1)
            out |= {"positions": T, "prefill_s": time.perf_counter() - t, "prefill_cpu_s": time.process_time() - c}
            for i, mode in enumerate(["eager", "eager_decode_layout"] + ["compiled"] * args.compile):
                # the compiled step takes the faster eager layout (bf16 on an AVX2 CPU: the stored one)
                layout = mode.endswith("layout") or (mode == "compiled" and
                                                     out["eager_decode_layout"]["step_s"] < out["eager"]["step_s"])
                lm.decode_layout(layout)
                step = torch.compile(lm.decode_step, dynamic=False) if mode == "compiled" else lm.decode_step
                times = []
                for pos in range(T + i * n, T + (i + 1) * n):
                    t = time.perf_counter()
                    tok = step(tok[:, None], torch.tensor([pos])).argmax(-1)
                    times.append(time.perf_counter() - t)
                steady = times[2:] if mode == "compiled" and n > 3 else times  # the first compiled steps compile
                out[mode] = {"first_step_s": times[0], "step_s": statistics.median(steady),
                             "decode_tok_s": 1 / statistics.median(steady), "decode_layout": layout}
        finally:
            lm.clear_cache()
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
    cmd = [sys.executable, __file__, "full-one", "--what", what, "--checkpoint", str(args.checkpoint),
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
           "--compile" if args.compile else "--no-compile"]
    cmd += ["--cold"] * cold + [x for k, v in kw.items() for x in (f"--{k}", str(v))]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
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


# ---- on a GPU (or, at small sizes, on the CPU: the same code path)


def train_step_figures(m, args, device, peak, dtype):
    """train.py's own step (train_step: loss summed over the supervised tokens, AdamW, clipping; ViT frozen,
    resampler + LLM trained) with gradient checkpointing, on --train-batch samples of one 640x480 image and
    --train-text tokens, the weights in `dtype` (train.py --param-dtype); tokens/s, MFU and the peak memory
    over the timed steps. A GPU too small for it gives {"out_of_memory": the error} and the suite goes on."""
    name = str(dtype).removeprefix("torch.")
    try:
        return {"param_dtype": name, **train_step_run(m, args, device, peak, dtype)}
    except torch.cuda.OutOfMemoryError as e:  # the same class as torch.OutOfMemoryError (torch >= 2.5)
        oom = str(e).splitlines()[0]
    for p in m.parameters():  # the failed step's gradients; its optimiser went with its frame
        p.grad = None
    mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"param_dtype": name, "out_of_memory": oom, "peak_memory": mem}


def train_step_run(m, args, device, peak, dtype):
    from types import SimpleNamespace
    import train
    a = SimpleNamespace(stage="sft", train_vit=False, lr=2e-5, weight_decay=0.0, clip=1.0, grad_checkpointing=True,
                        compile=False, fsdp=False)
    m.to(device=device, dtype=dtype)
    train.configure(m, a)
    wrapped = train.wrap(m.train(), a, device, 1)
    s = SimpleNamespace(wrapped=wrapped, world=1, device=device, args=a, opt=train.make_optimizer(m, a, device),
                        params=[p for p in m.parameters() if p.requires_grad])
    B, img = args.train_batch, noise_photo()
    ids = torch.tensor([photo_prompt(m, args.train_text, torch.Generator().manual_seed(b)) for b in range(B)])
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": None,
             "images": model.Images.from_pil([[img]] * B, m.config)}
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
    fp32 weights), and the `small` preset's training MFU."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_matmul_flops(device, dtype)
    r = {"device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
         "dtype": args.dtype, "peak_flops": peak, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens}
    sync(device)
    t0 = time.perf_counter()
    m = model.XGenMM.from_pretrained(args.checkpoint, dtype=dtype, device=device)
    sync(device)
    r["load"] = {"seconds": time.perf_counter() - t0, "bytes": param_bytes(m)}
    for batch in args.batches:
        for comp in [False, True] if args.compile else [False]:
            r[f"decode_b{batch}" + "_compiled" * comp] = decode_figures(m, args, device, batch, comp)
    for param_dtype in (torch.bfloat16, torch.float32):  # bf16 fits one GPU; train.py's fp32 default may not
        r[f"train_{str(param_dtype).removeprefix('torch.')}"] = train_step_figures(m, args, device, peak, param_dtype)
    del m
    torch.manual_seed(0)
    small = model.XGenMM(model.preset("small"))
    small.lang_model.init_weights()
    r["train_small"] = train_step_figures(small, args, device, peak, torch.float32)  # fp32 master, as train.py
    report(f"| {r['device']}, {args.dtype} | measured |", gpu_rows(r), r, args.json)


def gpu_rows(r, gb=1e9):
    rows = [f"| load `XGenMM.from_pretrained` ({r['load']['bytes'] / gb:.2f} GB) | {r['load']['seconds']:.1f} s |"]
    for k in [k for k in r if k.startswith("decode_b")]:
        x, how = r[k], "compiled" if k.endswith("compiled") else "eager"
        rows.append(f"| batch {x['batch']}, {how}: prefill image + {r['prompt_tokens']} tokens ({x['positions']} "
                    f"positions) | {x['prefill_tok_s']:,.0f} tok/s ({x['prefill_s'] * 1e3:,.0f} ms) |")
        rows.append(f"| batch {x['batch']}, {how}: decode | {x['decode_tok_s']:,.1f} tok/s "
                    f"({x['step_s'] * 1e3:.1f} ms/step) |")
    for k, name in (("train_bfloat16", "checkpoint's model"), ("train_float32", "checkpoint's model"),
                    ("train_small", "`small` preset")):
        x, what = r[k], f"training step, {name}, {r[k]['param_dtype']} weights"
        if x.get("out_of_memory"):
            rows.append(f"| {what} | out of memory ({x['peak_memory'] / gb:.1f} GB allocated at the peak) |")
            continue
        rows.append(f"| {what}, {x['samples']} x {x['tokens'] // x['samples']} tokens, grad. checkpointing | "
                    f"{x['tok_s']:,.0f} tok/s, MFU {x['mfu']:.1%}, peak memory {x['peak_memory'] / gb:.1f} GB |")
    return rows


# ---- FSDP2 on 8 GPUs: memory per GPU, from the real configs

def saved_bytes(fn, exclude):
    """Bytes autograd keeps for the backward of fn(): each storage once, those of `exclude` (parameters,
    inputs) left out."""
    skip, kept = {t.untyped_storage().data_ptr() for t in exclude}, {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            kept[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(kept.values())


def saved_per_unit(run, units=(16, 32)):
    """(fixed bytes, bytes per unit) of run(n) -> saved bytes, fitted through two sizes."""
    a, b = (run(n) for n in units)
    per = (b - a) / (units[1] - units[0])
    return a - per * units[0], per


def real_size(make, dtype=torch.bfloat16):
    """make() built on the meta device, then given CPU memory in `dtype` and filled as init_weights does
    (matrices N(0, 0.02), biases 0, other vectors 1): real sizes without a slow fp32 initialisation."""
    with torch.device("meta"):
        module = make()
    module = module.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.zero_() if name.endswith("bias") else p.fill_(1.0)
    return module


def activation_costs(cfg, lora_r=64):
    """Saved-for-backward bytes measured on real-size bf16 modules (CPU, SDPA's fused causal kernel, as on a
    GPU): per token of a Phi-3 block, the same with rank-`lora_r` LoRA (dropout 0.05, base frozen), the final
    norm + the fused loss (SFT, per supervised token, + its fp32 weight gradient), the final norm + per-sequence
    log-likelihoods (DPO, per supervised token), and per group of 729 features through the resampler."""
    import lora
    t, dt = cfg.text, torch.bfloat16
    inv, scale = phi3.rope_inv_freq(t)

    def block_run(block):
        def run(T):
            x = torch.randn(1, T, t.hidden_size, dtype=dt, requires_grad=True)
            cos, sin = phi3.rope_cos_sin(t, torch.arange(T)[None], dt, inv, None, scale)
            return saved_bytes(lambda: block(x, cos, sin, None, None), [x, *block.parameters()])
        return saved_per_unit(run)
    out = {"block": block_run(real_size(lambda: phi3.Block(t)).train())}
    b = real_size(lambda: phi3.Block(t))
    lora.apply_lora(b, r=lora_r, alpha=2 * lora_r, dropout=0.05)
    lora.mark_only_lora_trainable(b)
    out["block_lora"] = block_run(b.train())
    del b
    norm = phi3.RMSNorm(t.hidden_size, t.rms_norm_eps).to(dt)
    head = real_size(lambda: torch.nn.Linear(t.hidden_size, t.output_vocab_size or t.vocab_size))

    def head_run(loss, trained):
        head.requires_grad_(trained)

        def run(T):
            x = torch.randn(1, T, t.hidden_size, dtype=dt, requires_grad=True)
            y = torch.randint(0, head.out_features, (1, T))
            return saved_bytes(lambda: loss(norm(x), head.weight, head.bias, y), [x, *head.parameters(), norm.weight])
        return saved_per_unit(run)
    out["head_sft"] = head_run(lambda x, w, b, y: fused.linear_cross_entropy(x, w, b, y, "sum"), True)
    out["head_dpo"] = head_run(phi3.sequence_nll, False)
    del head
    res = real_size(lambda: resampler.PerceiverResampler(cfg.resampler)).train()
    P = cfg.vision.num_patches

    def res_run(G):
        x = torch.randn(G, P, cfg.resampler.dim, dtype=dt)
        return saved_bytes(lambda: res(x, torch.ones(G, P, dtype=torch.bool)), [x, *res.parameters()])
    out["resampler_group"] = saved_per_unit(res_run, (1, 2))
    return out


def parameter_counts(cfg, lora_r=64):
    """Parameters of each part, counted on a meta-device model of `cfg` (nothing allocated)."""
    import lora
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    with torch.device("meta"):
        m = model.XGenMM(cfg)
        lm = m.lang_model
        c = {"vit": n(m.vision_encoder), "pooling_head": sum(math.prod(s) for s in pooling_head_shapes(cfg.vision).values()),
             "resampler": n(m.vision_tokenizer), "embed": n(lm.model.embed_tokens), "blocks": n(lm.model.layers),
             "head": n(lm.lm_head) + n(lm.model.norm), "layers": len(lm.model.layers)}
        lora.apply_lora(lm, r=lora_r, alpha=2 * lora_r)
        c["lora"] = sum(p.numel() for k, p in lm.named_parameters() if ".lora_" in k)
    c["lm"] = c["embed"] + c["blocks"] + c["head"]
    c["model"] = c["vit"] + c["resampler"] + c["lm"]
    return c


def fsdp_plan(c, act, cfg, gpus, batch, T, groups, supervised, lora_run, master=4):
    """Bytes per GPU, term by term, of one training step of train.py/dpo.py --fsdp --grad-checkpointing on
    CUDA: the weights, gradients and AdamW's two states in --param-dtype (`master` bytes each; fp32 by default,
    even from the bf16 release), and the compute in bf16 under autocast. FSDP2 (fully_shard on each LLM block,
    then on the model) shards every tensor over the GPUs and gathers the shards in bf16; the root group (ViT,
    resampler, embeddings, final norm, head) stays gathered from forward to backward (FSDP2 does not reshard
    the root after forward), and up to two blocks are gathered at a time (the current one and the prefetched
    one). Gradients come out of backward in bf16 and are reduce-scattered in fp32 (a copy). Each term is
    taken at its largest at once: an upper bound. `batch` rows of T positions per GPU; for DPO the rows are
    chosen + rejected."""
    C, L, bf16 = cfg.text.hidden_size, c["layers"], 2
    block, root = c["blocks"] / L, c["model"] - c["blocks"]
    lora_block = c["lora"] / L if lora_run else 0
    trained = c["lora"] if lora_run else c["model"] - c["vit"]
    root_trained = 0 if lora_run else root - c["vit"]
    rows = {"parameters, sharded": (c["model"] + (c["lora"] if lora_run else 0)) * master / gpus,
            "root group, gathered in bf16 (ViT, resampler, embeddings, head)": root * bf16,
            "2 LLM blocks gathered in bf16 (current + prefetched)": 2 * (block + lora_block) * bf16,
            "gradients, sharded": trained * master / gpus,
            "gradients before reduce-scatter (root group + 1 block; bf16 + fp32 copy)":
                (root_trained + block * (not lora_run) + lora_block) * (bf16 + 4),
            "AdamW exp_avg + exp_avg_sq, sharded": 2 * trained * master / gpus}
    per_block = act["block_lora" if lora_run else "block"][1]
    fixed, per_sup = act["head_dpo" if lora_run else "head_sft"]
    rows[f"activations: {L} block inputs kept by checkpointing"] = L * batch * T * C * bf16
    rows["activations: one block recomputed in backward"] = batch * T * per_block
    if not lora_run:  # DPO trains nothing before the LLM: the resampler keeps no activations
        rows["activations: resampler"] = batch * groups * act["resampler_group"][1] + act["resampler_group"][0]
    rows["activations: final norm + loss"] = fixed + batch * supervised * per_sup
    return rows


def fsdp_memory(args):
    """Parameter counts of the real configs and the per-GPU memory of SFT and DPO-with-LoRA under FSDP2."""
    cfg = model.preset("xgenmm")
    c, act = parameter_counts(cfg), activation_costs(cfg)
    img = cfg.image_tokens((640, 480))
    groups = img // cfg.resampler.num_latents
    T, b, ans = args.seq_len, args.micro_batch, args.answer_tokens
    master = torch.finfo(getattr(torch, args.param_dtype)).bits // 8
    plans = {"sft": fsdp_plan(c, act, cfg, args.gpus, b, T, groups, T - img, False, master),
             "dpo": fsdp_plan(c, act, cfg, args.gpus, 2 * b, T, groups, ans, True, master)}
    r = {"params": c, "activation_costs": act, "plans": plans, "seq_len": T, "micro_batch": b, "gpus": args.gpus,
         "param_dtype": args.param_dtype}
    g, M = 1e9, 1e6
    print("| part | parameters | bf16 | fp32 |\n|---|---|---|---|")
    for k, name in (("vit", "ViT, SigLIP so400m (27 blocks; the pooling head not loaded)"),
                    ("pooling_head", "SigLIP pooling head (in the files only)"), ("resampler", "Perceiver resampler"),
                    ("embed", "LLM embeddings (32064 rows)"), ("blocks", f"LLM: {c['layers']} blocks"),
                    ("head", "LLM: final norm + head (with bias)"), ("model", "the model in memory"),
                    ("lora", "LoRA r=64 on qkv/o/gate_up/down (DPO)")):
        print(f"| {name} | {c[k] / M:,.1f}M | {c[k] * 2 / g:.2f} GB | {c[k] * 4 / g:.2f} GB |")
    files = c["model"] + c["pooling_head"]
    print(f"| the checkpoint's files | {files / M:,.1f}M | {files * 2 / g:.2f} GB | |")
    rows = [f"| {k} | {plans['sft'].get(k, 0) / g:.2f} GB | {plans['dpo'].get(k, 0) / g:.2f} GB |"
            for k in dict.fromkeys([*plans["sft"], *plans["dpo"]])]
    rows.append(f"| **total per GPU** (of 80 GB) | **{sum(plans['sft'].values()) / g:.1f} GB** | "
                f"**{sum(plans['dpo'].values()) / g:.1f} GB** |")
    report(f"| per GPU, {args.gpus} GPUs, FSDP2, grad. checkpointing, {args.param_dtype} weights, bf16 compute | "
           f"SFT: {b} x {T} positions (1 image = {img}) | DPO, LoRA: {b} pairs = {2 * b} x {T} ({ans} answer tokens) |",
           rows, r, args.json)


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


def full_flags(sub):
    f = sub.add_parser("full", help="the real 4.4B model: a random checkpoint in the release's layout; load time, peak "
                                    "RSS, CPU forward and decode, transformers' load; the GPU figures; FSDP2 memory")
    what = f.add_mutually_exclusive_group(required=True)
    what.add_argument("--make-checkpoint", metavar="DIR", help="write a random checkpoint of --preset (bf16) to DIR")
    what.add_argument("--checkpoint", metavar="DIR", help="measure this checkpoint (CPU suite, or GPU suite on cuda)")
    what.add_argument("--memory", action="store_true", help="parameter counts and FSDP2 memory per GPU (no weights)")
    f.add_argument("--preset", default="xgenmm", choices=sorted(model.PRESET_PARTS), help="--make-checkpoint's size")
    f.add_argument("--seed", type=int, default=0, help="--make-checkpoint's random values")
    f.add_argument("--device", default="cpu", help="cpu or cuda: which suite runs (see --suite)")
    f.add_argument("--suite", choices=["cpu", "gpu"], default=None,
                   help="force a suite: `gpu` on --device cpu runs the GPU path at small sizes (default: by --device)")
    f.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="--make-checkpoint's dtype, and the GPU suite's")
    f.add_argument("--measure", nargs="+", default=["load", "forward"], choices=["load", "forward"],
                   help="CPU suite: load time and RSS, and/or forward and decode")
    f.add_argument("--transformers", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU suite: also load transformers' Phi3ForCausalLM from the same files")
    f.add_argument("--fp32-layers", nargs="+", type=int, default=[8, 16],
                   help="CPU suite: fp32 runs keep this many LLM blocks; two or more counts are extrapolated "
                        "linearly to the whole model. 32: the whole fp32 model, 17.4 GB of weights (peak RSS "
                        "21 GB, of which ~3.6 GB reclaimable file pages; it ran on a 23 GB machine)")
    f.add_argument("--prompt-tokens", type=int, default=64, help="text tokens after the image")
    f.add_argument("--new-tokens", type=int, default=16, help="tokens decoded")
    f.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="GPU suite: generation batch sizes")
    f.add_argument("--train-batch", type=int, default=4, help="GPU suite: samples per training step")
    f.add_argument("--train-text", type=int, default=1408, help="GPU suite: text tokens per sample (+ 640 image tokens)")
    f.add_argument("--peak-tflops", type=float, default=None, help="matmul peak for the MFU (H100 SXM bf16: 989; "
                                                                    "default: measured)")
    f.add_argument("--bandwidth-gbs", type=float, default=None, help="read bandwidth instead of measuring it")
    f.add_argument("--gpus", type=int, default=8, help="--memory: GPUs sharing the model")
    f.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="--memory: the trained weights' dtype, as train.py --param-dtype")
    f.add_argument("--seq-len", type=int, default=2048, help="--memory: positions per row (train.py --max-len)")
    f.add_argument("--micro-batch", type=int, default=4, help="--memory: rows (SFT) or pairs (DPO) per GPU")
    f.add_argument("--answer-tokens", type=int, default=512, help="--memory: supervised tokens per DPO row")
    f.add_argument("--repeats", type=int, default=3, help="GPU suite: timed training steps (median kept)")
    f.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the decode step through torch.compile")
    f.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    f.add_argument("--json", default=None, help="also write the figures to this JSON file")
    f.set_defaults(run=full)
    one = sub.add_parser("full-one")  # internal: one measurement of `full`, in a fresh process
    one.add_argument("--what", choices=["read", "load", "load-transformers", "forward"])
    one.add_argument("--checkpoint")
    one.add_argument("--cold", action="store_true")
    one.add_argument("--dtype", default="bfloat16")
    one.add_argument("--layers", type=int, default=None)
    one.add_argument("--prompt-tokens", type=int, default=64)
    one.add_argument("--new-tokens", type=int, default=16)
    one.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    one.add_argument("--threads", type=int, default=None)
    one.set_defaults(run=full_one)


def common_flags(p, presets_help, compile_help, bandwidth=True):
    p.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=sorted(SHAPES), help=presets_help)
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each side (median kept)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help=compile_help + "; transformers stays eager, as users run it")
    if bandwidth:
        p.add_argument("--bandwidth-gbs", type=float, default=None,
                       help="read bandwidth to use instead of measuring it")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("components", help="vit.py and phi3.py against transformers, same weights, same inputs")
    common_flags(c, "model sizes to time (phi3.PRESETS / vit.PRESETS)",
                 "also time ours through torch.compile (the decode step, the training step, the ViT)")
    c.add_argument("--device", default="cpu", help="cpu or cuda")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    c.add_argument("--peak-tflops", type=float, default=None, help="matmul peak to use instead of measuring it")
    c.set_defaults(run=components)
    m = sub.add_parser("model", help="model.py against tests/reference.py's transformers-composed xGen-MM, same "
                                     "weights: vision encoding, prompt-to-answer latency, decode tokens/s (CPU, fp32)")
    common_flags(m, "model sizes to time (model.preset)",
                 "also time ours with the ViT and the resampler through torch.compile and compile=True decoding")
    m.set_defaults(run=full_model)
    t = sub.add_parser("train", help="a training step (fwd+bwd, images + text, ViT frozen) against the same step "
                                     "composed from transformers' modules, same weights, same batch (CPU, fp32)")
    common_flags(t, "model sizes to time (model.preset)",
                 "also time ours with the LLM blocks compiled in place, as train.py --compile", bandwidth=False)
    t.set_defaults(run=train_bench)
    d = sub.add_parser("data", help="data.py's pipeline (samples/s with DataLoader workers) against a training step")
    d.add_argument("--data", nargs="+", required=True, help="mixture configs of a toy world (DIR/mixtures/*.json)")
    d.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    d.add_argument("--batch-size", type=int, default=8, help="samples per batch")
    d.add_argument("--batches", type=int, default=20, help="batches timed (after two warm-up batches)")
    d.add_argument("--max-len", type=int, default=1024, help="token budget per sample")
    d.add_argument("--preset", default="tiny", choices=sorted(model.PRESET_PARTS), help="model the data feeds")
    d.add_argument("--repeats", type=int, default=3, help="timed passes of the training step (median kept)")
    d.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    d.add_argument("--json", default=None, help="also write the figures to this JSON file")
    d.set_defaults(run=data_pipeline)
    o = sub.add_parser("dpo", help="a DPO step (2 pairs, LoRA r=64): reference = adapters off vs a second copy; "
                                   "peak memory and steps/s, each configuration in its own process")
    o.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=sorted(SHAPES), help="model sizes")
    o.add_argument("--repeats", type=int, default=5, help="timed steps (median kept)")
    o.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    o.add_argument("--json", default=None, help="also write the figures to this JSON file")
    o.set_defaults(run=dpo_bench)
    one = sub.add_parser("dpo-one")  # internal: one configuration of `dpo`, in a fresh process
    one.add_argument("--preset")
    one.add_argument("--reference")
    one.add_argument("--repeats", type=int, default=5)
    one.add_argument("--threads", type=int, default=None)
    one.set_defaults(run=dpo_one)
    full_flags(sub)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.run(args)


if __name__ == "__main__":
    main()
