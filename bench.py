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

transformers is needed only here and in the tests; the project itself never imports it.
"""
import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image

import model
import phi3
import vit

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
    img = Image.fromarray(torch.randint(0, 256, (480, 640, 3), dtype=torch.uint8, generator=g).numpy())
    ids = [m.config.image_token_id] + torch.randint(3, m.config.initial_tokenizer_len, (PROMPT,), generator=g).tolist()
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
    imgs = [Image.fromarray(torch.randint(0, 256, (H, W, 3), dtype=torch.uint8, generator=g).numpy())
            for _ in range(B)]
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
    import resource
    s, batch, dpo = dpo_setup(args.preset, args.reference)
    params = sum(p.numel() * p.element_size() for p in s.m.parameters())
    if args.reference == "copy":
        params *= 2  # the copy holds the same tensors again (without the adapters: within 3%)
    dpo.dpo_step(s, [batch])  # warm-up
    times = [timed(lambda: dpo.dpo_step(s, [batch]), CPU) for _ in range(args.repeats)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    print(json.dumps({"peak_rss": peak, "param_bytes": params, "steps_per_s": 1 / statistics.median(times)}))


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
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.run(args)


if __name__ == "__main__":
    main()
