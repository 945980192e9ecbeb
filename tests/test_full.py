"""At full scale: the release's checkpoint layout (on meta tensors), `python -m bench.full` end to end at small sizes
(a random checkpoint in that layout, loaded back; the CPU suite; the GPU suite's code path on the CPU), and
FSDP2 on two processes equal to one for the `small` model. All but the layout checks are marked slow:
`python -m pytest -m slow tests/test_full.py`."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import bench.common
import bench.fsdp_memory
import bench.full
import bench.full_cpu
import model
import train
from conftest import THREADS

ROOT = Path(__file__).resolve().parent.parent

# -----------------------------------------------------------------------------
# the release's layout, written out from docs/release.md §1-2 (not from our modules)


def release_layout():
    """{official name: shape} of Salesforce/xgen-mm-phi3-mini-*-r-v1.5 from the dimensions of docs/release.md §1."""
    C, P, F, L = 1152, 729, 4304, 27                       # SigLIP so400m/14-384
    D, inner, ff, latents = 1152, 16 * 96, 4 * 1152, 128   # resampler: 6 layers, 16 heads x 96
    H, I, V, added = 3072, 8192, 32064, 3                  # Phi-3-mini, 3 decoupled tokens
    out = {"vlm.vision_encoder.embeddings.patch_embedding.weight": (C, 3, 14, 14),
           "vlm.vision_encoder.embeddings.patch_embedding.bias": (C,),
           "vlm.vision_encoder.embeddings.position_embedding.weight": (P, C),
           "vlm.vision_encoder.post_layernorm.weight": (C,), "vlm.vision_encoder.post_layernorm.bias": (C,)}
    for i in range(L):
        p = f"vlm.vision_encoder.encoder.layers.{i}."
        for n in ("layer_norm1", "layer_norm2"):
            out |= {p + n + ".weight": (C,), p + n + ".bias": (C,)}
        for n in "qkvo":
            proj = p + f"self_attn.{'out' if n == 'o' else n}_proj."
            out |= {proj + "weight": (C, C), proj + "bias": (C,)}
        out |= {p + "mlp.fc1.weight": (F, C), p + "mlp.fc1.bias": (F,), p + "mlp.fc2.weight": (C, F),
                p + "mlp.fc2.bias": (C,)}
    head = "vlm.vision_encoder.head."  # the attention-pooling head: in the files, unused
    out |= {head + "probe": (1, 1, C), head + "attention.in_proj_weight": (3 * C, C),
            head + "attention.in_proj_bias": (3 * C,), head + "attention.out_proj.weight": (C, C),
            head + "attention.out_proj.bias": (C,), head + "layernorm.weight": (C,), head + "layernorm.bias": (C,),
            head + "mlp.fc1.weight": (F, C), head + "mlp.fc1.bias": (F,), head + "mlp.fc2.weight": (C, F),
            head + "mlp.fc2.bias": (C,)}
    r = "vlm.vision_tokenizer."
    out |= {r + "latents": (latents, D), r + "norm.weight": (D,), r + "norm.bias": (D,),
            r + "projection.weight": (H, D), r + "projection.bias": (H,)}
    for i in range(6):
        p = f"{r}layers.{i}."
        for n in ("0.norm_media", "0.norm_latents", "1.0"):
            out |= {p + n + ".weight": (D,), p + n + ".bias": (D,)}
        out |= {p + "0.to_q.weight": (inner, D), p + "0.to_kv.weight": (2 * inner, D),
                p + "0.to_out.weight": (D, inner), p + "1.1.weight": (ff, D), p + "1.3.weight": (D, ff)}
    lm = "vlm.lang_model."
    out |= {lm + "model.embed_tokens.weight": (V, H), lm + "model.embed_tokens.additional_embedding.weight": (added, H),
            lm + "model.norm.weight": (H,), lm + "lm_head.weight": (V, H), lm + "lm_head.bias": (V,),
            lm + "lm_head.additional_fc.weight": (added, H), lm + "lm_head.additional_fc.bias": (added,)}
    for i in range(32):
        p = f"{lm}model.layers.{i}."
        out |= {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                p + "self_attn.qkv_proj.weight": (3 * H, H), p + "self_attn.o_proj.weight": (H, H),
                p + "mlp.gate_up_proj.weight": (2 * I, H), p + "mlp.down_proj.weight": (H, I)}
    return out


@pytest.fixture(scope="module")
def full_layout():
    return bench.full.official_layout(model.preset("xgenmm"))  # meta tensors: names, shapes, dtypes, no memory


def test_full_size_layout_is_the_release_layout(full_layout):
    """What `python -m bench.full --make-checkpoint` writes at full size, checked without writing it: every name and
    shape of the release (docs/release.md §2), bf16, 4.36B parameters = 8.7 GB (§1)."""
    ours = full_layout
    expected = release_layout()
    assert sorted(set(ours) ^ set(expected)) == []
    assert {k: tuple(v.shape) for k, v in ours.items()} == expected
    assert {v.dtype for v in ours.values()} == {torch.bfloat16}
    n = sum(v.numel() for v in ours.values())
    assert round(n / 1e9, 2) == 4.36 and round(2 * n / 1e9, 1) == 8.7


def test_full_size_names_are_transformers_names(full_layout):
    """The vision tower (with its pooling head) and the LLM under the release's prefixes carry exactly the
    names and shapes of transformers' SiglipVisionModel and Phi3ForCausalLM at the real sizes."""
    transformers = pytest.importorskip("transformers")
    cfg = model.preset("xgenmm")
    v, t = cfg.vision, cfg.text
    with torch.device("meta"):
        siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
            hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
            num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size))
        phi = transformers.Phi3ForCausalLM(transformers.Phi3Config.from_dict(t.to_hf()))
    ours = {k: tuple(x.shape) for k, x in full_layout.items()}
    vision = {k.removeprefix("vlm.vision_encoder."): s for k, s in ours.items() if k.startswith("vlm.vision_encoder.")}
    theirs = {k.removeprefix("vision_model."): tuple(x.shape) for k, x in siglip.state_dict().items()}
    assert vision == theirs
    lm = {k.removeprefix("vlm.lang_model."): s for k, s in ours.items() if k.startswith("vlm.lang_model.")}
    decoupled = {"model.embed_tokens.additional_embedding.weight", "lm_head.additional_fc.weight",
                 "lm_head.additional_fc.bias", "lm_head.bias"}  # the release's additions to a Phi-3
    assert {k: s for k, s in lm.items() if k not in decoupled} == {k: tuple(x.shape) for k, x in phi.state_dict().items()}


def test_parameter_counts_are_the_papers():
    c = bench.fsdp_memory.parameter_counts(model.preset("xgenmm"))
    assert round((c["vit"] + c["pooling_head"]) / 1e9, 2) == 0.43 and round(c["resampler"] / 1e9, 2) == 0.11
    assert round(c["lm"] / 1e9, 2) == 3.82
    assert round(c["lora"] / 1e6, 1) == 100.7  # rank 64 on the four projections: the paper's 2.6%


# -----------------------------------------------------------------------------
# python -m bench.full, end to end at small sizes


def bench_full(*args, timeout=1200):
    r = subprocess.run([sys.executable, "-m", "bench.full", *map(str, args)], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("small") / "xgenmm"
    bench_full("--make-checkpoint", d, "--preset", "small")
    return d


@pytest.mark.slow
def test_make_checkpoint_writes_the_layout_and_loads(small_checkpoint):
    files = bench.full_cpu.weight_files(small_checkpoint)
    header = {}
    for f in files:
        with safe_open(f, "pt") as h:
            header |= {k: (tuple(h.get_slice(k).get_shape()), h.get_slice(k).get_dtype()) for k in h.keys()}
    expected = bench.full.official_layout(model.preset("small"))
    assert header == {k: (tuple(v.shape), "BF16") for k, v in expected.items()}
    config = json.loads((small_checkpoint / "config.json").read_text())
    assert config["model_type"] == "xgenmm" and config["text_config"]["initial_tokenizer_len"] == 32012
    m = model.XGenMM.from_pretrained(small_checkpoint)  # strict: the pooling head is named and skipped
    assert next(m.parameters()).dtype == torch.bfloat16
    assert torch.equal(m.lang_model.model.norm.weight, torch.ones_like(m.lang_model.model.norm.weight))
    ids, _, images = m.encode_batch([bench.common.photo_prompt(m, 8)], [[bench.common.noise_photo()]])
    with torch.no_grad():
        logits = m(ids, images)
    assert logits.shape[-1] == 32015 and torch.isfinite(logits).all()


@pytest.mark.slow
def test_cpu_suite_runs(small_checkpoint, tmp_path):
    out = bench_full("--checkpoint", small_checkpoint, "--fp32-layers", "4", "8", "--prompt-tokens", "8",
                     "--new-tokens", "4", "--json", tmp_path / "cpu.json")
    r = json.loads((tmp_path / "cpu.json").read_text())
    n = bench.fsdp_memory.parameter_counts(model.preset("small"))["model"]
    for cache in ("cold", "warm"):
        assert r[f"load_{cache}"]["bytes"] == 2 * n and r[f"read_{cache}"]["bytes"] == r["checkpoint_bytes"]
        assert 0 < r[f"load_{cache}"]["peak_rss"] and 0 < r[f"load-transformers_{cache}"]["seconds"]
    assert r["bf16"]["layers"] == 12 and [r[f"fp32_{k}"]["layers"] for k in (4, 8, 12)] == [4, 8, 12]
    assert r["fp32_12"]["extrapolated"] and r["fp32_8"]["param_bytes"] > r["fp32_4"]["param_bytes"]
    assert all(r["bf16"][m]["decode_tok_s"] > 0 for m in ("eager", "eager_decode_layout", "compiled"))
    assert "| `XGenMM.from_pretrained`" in out and "| CPU float32, 12 LLM blocks (extrapolated)" in out


@pytest.mark.slow
def test_gpu_suite_runs_on_the_cpu_at_small_sizes(small_checkpoint, tmp_path):
    bench_full("--checkpoint", small_checkpoint, "--suite", "gpu", "--dtype", "float32", "--batches", "1", "2",
               "--prompt-tokens", "8", "--new-tokens", "4", "--train-batch", "2", "--train-text", "16", "--repeats", "1",
               "--json", tmp_path / "gpu.json")
    r = json.loads((tmp_path / "gpu.json").read_text())
    assert r["load"]["bytes"] == 4 * bench.fsdp_memory.parameter_counts(model.preset("small"))["model"]  # cast to fp32
    assert {k for k in r if k.startswith("decode_")} == {"decode_b1", "decode_b1_compiled", "decode_b2",
                                                         "decode_b2_compiled"}
    assert r["decode_b2"]["positions"] == 8 + 160  # 640x480 -> 2x2 crops + global view, 32 latents each
    assert [r[k]["param_dtype"] for k in ("train_bfloat16", "train_float32", "train_small")] == \
        ["bfloat16", "float32", "float32"]
    for k in ("train_bfloat16", "train_float32", "train_small"):
        assert r[k]["tokens"] == 2 * (16 + 160) and 0 < r[k]["mfu"] < 1 and r[k]["peak_memory"] > 0


def test_fsdp_plan_terms():
    """The per-GPU arithmetic on round numbers: fp32 weights shard at 4 bytes, gathers are bf16, gradients are
    reduce-scattered in fp32 from their bf16 copy; bf16 weights halve exactly the sharded terms."""
    from types import SimpleNamespace
    c = {"layers": 2, "blocks": 200, "model": 1000, "vit": 300, "lora": 20}
    act = {"block": (0, 10), "block_lora": (0, 12), "head_sft": (5, 1), "head_dpo": (5, 2), "resampler_group": (3, 7)}
    cfg = SimpleNamespace(text=SimpleNamespace(hidden_size=4))
    sft = bench.fsdp_memory.fsdp_plan(c, act, cfg, gpus=4, batch=1, T=10, groups=2, supervised=6, lora_run=False)
    assert list(sft.values()) == [1000, 1600, 400, 700, 3600, 1400, 160, 100, 17, 11]
    half = bench.fsdp_memory.fsdp_plan(c, act, cfg, gpus=4, batch=1, T=10, groups=2, supervised=6, lora_run=False,
                                       master=2)
    sharded = ("parameters, sharded", "gradients, sharded", "AdamW exp_avg + exp_avg_sq, sharded")
    assert all(half[k] == sft[k] / 2 if k in sharded else half[k] == sft[k] for k in sft)
    dpo = bench.fsdp_memory.fsdp_plan(c, act, cfg, gpus=4, batch=2, T=10, groups=2, supervised=6, lora_run=True)
    # LoRA: only the adapters train (20 = 10 per block); the frozen base is still sharded in fp32
    assert dpo["parameters, sharded"] == 1020 and dpo["gradients, sharded"] == 20 and "activations: resampler" not in dpo
    assert dpo["gradients before reduce-scatter (root group + 1 block; bf16 + fp32 copy)"] == 10 * 6


@pytest.mark.slow
def test_memory_table(tmp_path):
    bench_full("--memory", "--json", tmp_path / "m.json")
    r = json.loads((tmp_path / "m.json").read_text())
    for plan in ("sft", "dpo"):
        assert 0 < sum(r["plans"][plan].values()) < 80e9
    per_token = r["activation_costs"]["block"][1]
    assert 12 * 3072 < per_token < 120 * 3072  # bytes a block keeps per token: between 6 and 60 bf16 widths

# -----------------------------------------------------------------------------
# FSDP2 on two processes equals one process, `small` model


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.mark.slow
def test_fsdp2_small_two_processes_equal_one(world, tmp_path):
    common = ["--stage", "sft", "--preset", "small", "--data", str(world / "mixtures" / "sft.json"),
              "--workers", "0", "--max-len", "384", "--log-every", "1", "--lr", "1e-3", "--max-steps", "2",
              "--grad-checkpointing"]
    torch.set_num_threads(1)
    try:
        train.main(common + ["--out-dir", str(tmp_path / "one"), "--batch-size", "4"])
    finally:
        torch.set_num_threads(THREADS)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                        free_port(), "train.py", *common, "--out-dir", str(tmp_path / "two"), "--batch-size", "2",
                        "--fsdp"], cwd=ROOT, capture_output=True, text=True, timeout=1200,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = ([json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("one", "two"))
    assert [x["supervised_tokens"] for x in one] == [x["supervised_tokens"] for x in two] and len(one) == 2
    assert all(abs(a["loss"] - b["loss"]) <= 1e-5 for a, b in zip(one, two))
    # the gradients agree to ~3e-6; the norms to ~3e-5, because the CPU's fp32 norm of a whole tensor and the
    # sum of its two shards' norms round differently (measured against float64: the sharded one was closer)
    assert all(abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"] for a, b in zip(one, two))
    a, b = (model.XGenMM.from_pretrained(tmp_path / d / "ckpt-0000002").state_dict() for d in ("one", "two"))
    # AdamW's first steps move each weight by about lr * sign(gradient): weights whose gradient is ~0 turn
    # rounding differences into up to a few % of lr (5e-5 measured at lr 1e-3, 26 of 101M weights above 1e-5)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4
