"""
What the benchmarks in bench/ share: the machine's limits, the inputs, the xGen-MM pair on the same weights,
alternate A/B timing, the markdown table and the flags. No benchmark of its own.

- `peak_matmul_flops` and `read_bandwidth` measure the machine: the denominators of "of peak" (FLOP/s) and
  "of bound" (decode tokens/s x weight bytes per token / bandwidth); `peak_rss` reads VmHWM.
- `alternate` times ours and the reference alternately (A B A B ...) after one warm-up each, median kept.
- `xgenmm_pair`: ours with random weights, saved in the official layout, and tests/reference.py's
  transformers-composed xGen-MM loaded from those tensors (bench.whole_model and bench.training).
- `noise_photo`, `photo_prompt`, `train_batch`: seeded inputs, the same on both sides and in every run.
- `pooling_head_shapes`: SigLIP's pooling head, in the release's files but unused (bench.full writes it,
  bench.fsdp_memory counts it).

Every benchmark runs from the repository root (`python -m bench.<name>`): the components are top-level
files, and tests/ (no __init__.py) imports as a namespace package from there. transformers is needed only in
bench/ and the tests; the project itself never imports it.
"""
import argparse
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image

import model
import release

ROOT = Path(__file__).resolve().parent.parent  # the repository root: the working directory of every fresh process
CPU = torch.device("cpu")

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
    """Bytes/s of a matrix-vector product over `gb` GB: the access pattern of batch-1 decoding. What a decode
    step can reach, so the bound it gives is achievable; not the memory's peak (an H100's HBM3 is rated higher)."""
    rows = int(gb * 1e9 / 4096 / torch.finfo(dtype).bits * 8)
    w, x = torch.randn(rows, 4096, device=device, dtype=dtype), torch.randn(4096, device=device, dtype=dtype)
    w @ x
    best = min(timed(lambda: w @ x, device) for _ in range(reps))
    return w.numel() * w.element_size() / best


def bandwidth(args, device, dtype):
    return args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else read_bandwidth(device, dtype)


def decode_bytes(lm):
    """Weight bytes one decode step reads: every LM parameter but the embedding table (one row is read). Each
    row also reads its KV cache (bench.full.kv_cache_bytes), which the GPU bound adds."""
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


TEXT, PHOTO = 96, (320, 240)  # a training sample's text tokens and image (W, H)


def train_batch(m, B):
    """B samples, each one random-noise PHOTO and TEXT random supervised tokens: ids (B, 1 + TEXT), PIL images."""
    g, (W, H) = torch.Generator().manual_seed(0), PHOTO
    imgs = [noise_photo(W, H, g) for _ in range(B)]
    text = torch.randint(3, m.config.initial_tokenizer_len, (B, TEXT), generator=g)
    return torch.cat((torch.full((B, 1), m.config.image_token_id), text), 1), imgs

# -----------------------------------------------------------------------------
# the release's checkpoint: the one part of it xGen-MM does not use

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

# -----------------------------------------------------------------------------
# the whole model on the same weights, timing, the table


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
    lm_sd, main = part(release.LM), lm.state_dict().keys()
    lm.load_state_dict({k: lm_sd[k] for k in main})  # HF's lm_head has no bias: it and the decoupled rows go in extra
    extra = {k: v for k, v in lm_sd.items() if k not in main}
    ref = XGenMMReference(siglip.eval(), part("vlm.vision_tokenizer."), cfg.resampler, lm.eval(), extra,
                          cfg.initial_tokenizer_len, "anyres", grids=[list(g) for g in cfg.grids])
    return m.eval(), ref


def alternate(a, b, device, repeats, units):
    """Median units/s of a and b, run alternately after one warm-up each."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(timed(a, device))
        tb.append(timed(b, device))
    return units / statistics.median(ta), units / statistics.median(tb)


def train_flops(m, tokens, views):
    """The estimate: 6 FLOPs per trainable weight (resampler + LLM, less the embedding table: a lookup) per
    sequence token, + 2 per frozen ViT weight per patch; attention scores left out."""
    trained = sum(p.numel() for k, p in m.named_parameters() if p.requires_grad and "embed_tokens" not in k)
    vit_weights, v = sum(p.numel() for p in m.vision_encoder.parameters()), m.config.vision
    return 6 * trained * tokens + 2 * vit_weights * views * (v.image_size // v.patch_size) ** 2


def report(header, rows, results, path):
    print(f"\n{header}\n|" + "---|" * header.count(" |"))
    print("\n".join(rows))
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=2))

# -----------------------------------------------------------------------------
# flags

# the presets the side-by-side benchmarks take, with bench.components' shapes at each
SHAPES = {"tiny": dict(train=(8, 256), vit_batch=32), "small": dict(train=(4, 256), vit_batch=8)}


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


def parse(p):
    """Parse the command line; --threads sets torch's thread count before anything runs."""
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args
