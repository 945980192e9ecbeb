"""resampler.py: fused attention == the official einsum math, masking, the official key layout, gradients."""
import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import resampler
import weights
from reference import resampler_reference as reference

CFG = resampler.ResamplerConfig(dim=32, dim_inner=48, num_latents=8, depth=2, heads=4, dim_head=16, ff_mult=4)
G, N = 4, 10  # groups, media tokens per group


def make_model(seed=0):
    torch.manual_seed(seed)
    model = resampler.PerceiverResampler(CFG)
    with torch.no_grad():  # perturb LayerNorm ones/zeros too, so a swapped or skipped norm cannot hide
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(G, N, CFG.dim, generator=g)
    mask = torch.rand(G, N, generator=g) < 0.6
    mask[1] = False  # a group that is all padding: only the latents themselves are visible
    mask[2] = True
    return x, mask


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("use_mask", [False, True])
def test_fused_equals_reference_math(use_mask):
    model = make_model()
    x, mask = inputs()
    mask = mask if use_mask else None
    with torch.no_grad():
        out = model(x, mask)
        ref = reference(model.official_state_dict(), CFG, x, mask)
    assert out.shape == (G, CFG.num_latents, CFG.dim_inner)
    assert torch.isfinite(out).all()
    assert max_diff(out, ref) <= 1e-5


def test_masked_media_has_no_influence():
    model = make_model()
    x, mask = inputs()
    noise = torch.randn_like(x) * 10
    with torch.no_grad():
        out = model(x, mask)
        masked_changed = model(torch.where(mask[..., None], x, x + noise), mask)
        visible_changed = model(torch.where(mask[..., None], x + noise, x), mask)
    assert max_diff(out, masked_changed) <= 1e-6
    visible_groups = mask.any(dim=1)  # groups with at least one real feature must react
    assert ((out - visible_changed).abs().amax(dim=(1, 2)) > 1e-3).tolist() == visible_groups.tolist()


def test_mask_none_equals_all_true():
    model = make_model()
    x, _ = inputs()
    with torch.no_grad():
        assert max_diff(model(x), model(x, torch.ones(G, N, dtype=torch.bool))) <= 1e-6


def write_official(path, model, prefix="", config=None, extra=None):
    path.mkdir(exist_ok=True)
    sd = {prefix + k: v.detach().clone() for k, v in model.official_state_dict().items()}
    sd.update(extra or {})
    save_file(sd, path / "model.safetensors")
    config = config if config is not None else {f: getattr(CFG, f) for f in vars(CFG)}
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_official_layout_round_trip(tmp_path):
    model = make_model()
    official = model.official_state_dict()
    assert "layers.1.1.3.weight" in official and "layers.0.0.to_kv.weight" in official
    loaded = resampler.PerceiverResampler.from_pretrained(write_official(tmp_path / "r", model))
    assert not loaded.training
    x, mask = inputs()
    with torch.no_grad():
        assert max_diff(loaded(x, mask), model(x, mask)) == 0


XGENMM_CONFIG = {"model_type": "xgenmm", "vision_tokenizer_config": {
    "vis_feature_dim": CFG.dim, "lang_embedding_dim": CFG.dim_inner, "num_vis_tokens": CFG.num_latents,
    "depth": CFG.depth, "heads": CFG.heads, "dim_head": CFG.dim_head, "ff_mult": CFG.ff_mult}}
OTHERS = {"vlm.vision_encoder.post_layernorm.weight": torch.zeros(3), "vlm.lang_model.lm_head.weight": torch.zeros(2, 2)}


def test_xgenmm_prefix(tmp_path):
    model = make_model()
    prefix = "vlm.vision_tokenizer."
    path = write_official(tmp_path / "x", model, prefix, XGENMM_CONFIG, OTHERS)
    x, mask = inputs()
    loaded = resampler.PerceiverResampler.from_pretrained(path, prefix=prefix)
    ckpt = weights.Checkpoint(path)  # the way model.py loads it
    with torch.device("meta"):
        empty = resampler.PerceiverResampler(CFG)
    state = resampler.convert_checkpoint(ckpt, empty, prefix)
    ckpt.finish(prefix)
    converted = weights.assign(empty, state).eval()
    with torch.no_grad():
        assert max_diff(loaded(x, mask), model(x, mask)) == 0
        assert max_diff(converted(x, mask), model(x, mask)) == 0
    with pytest.raises(weights.CheckpointError, match="pass prefix='vlm.vision_tokenizer.'"):
        resampler.PerceiverResampler.from_pretrained(path)  # the prefix forgotten


@pytest.mark.parametrize("edit, pattern", [
    (lambda sd: sd.pop("layers.1.1.3.weight"), r"missing tensor 'layers\.1\.1\.3\.weight'"),
    (lambda sd: sd.update({"layers.0.1.2.weight": torch.zeros(3)}), r"unexpected.*'layers\.0\.1\.2\.weight'"),
    (lambda sd: sd.update({"layers.0.0.to_q.weight": torch.zeros(64, 31)}),
     r"'layers\.0\.0\.to_q\.weight' has shape \(64, 31\), the model expects \(64, 32\)"),
])
def test_loader_errors_name_the_key(tmp_path, edit, pattern):
    sd = {k: v.detach().clone() for k, v in make_model().official_state_dict().items()}
    edit(sd)
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({f: getattr(CFG, f) for f in vars(CFG)}))
    with pytest.raises(weights.CheckpointError, match=pattern):
        resampler.PerceiverResampler.from_pretrained(tmp_path)


def test_unknown_config_is_rejected(tmp_path):
    write_official(tmp_path / "c", make_model(), config={"dim": 32, "hidden_size": 7})
    with pytest.raises(weights.CheckpointError, match="hidden_size"):
        resampler.PerceiverResampler.from_pretrained(tmp_path / "c")


def test_gradients_reach_latents_and_every_weight():
    model = make_model()
    x, mask = inputs()
    model(x, mask).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_config_from_hf_and_presets():
    released = {"vis_feature_dim": 1152, "lang_embedding_dim": 3072, "num_vis_tokens": 128}
    assert resampler.ResamplerConfig.from_hf(released) == resampler.PRESETS["xgenmm"]
    assert resampler.ResamplerConfig.from_hf(XGENMM_CONFIG["vision_tokenizer_config"]) == CFG
    model = resampler.PerceiverResampler(resampler.PRESETS["tiny"])
    assert model(torch.randn(2, 5, 192)).shape == (2, 16, 256)


def test_official_parameter_count():
    with torch.device("meta"):  # docs/release.md §1: resampler ~0.11 B parameters
        n = sum(p.numel() for p in resampler.PerceiverResampler(resampler.ResamplerConfig()).parameters())
    assert 0.10e9 < n < 0.12e9


def test_instruction_aware_variant():
    """Off by default (the release's layout); on, the instruction joins the media keys, masked text is unseen,
    and the config round-trips through config.json."""
    torch.manual_seed(0)
    cfg = replace(resampler.PRESETS["tiny"], instruction_dim=24)
    r = resampler.build(cfg)
    assert isinstance(r, resampler.InstructionAwareResampler)
    assert "instruction.weight" not in resampler.PerceiverResampler(resampler.PRESETS["tiny"]).state_dict()
    x, text = torch.randn(2, 10, cfg.dim), torch.randn(2, 5, 24)
    plain = r(x)
    with_text = r(x, text=text)
    assert with_text.shape == plain.shape and not torch.allclose(with_text, plain)
    masked = r(x, text=text, text_mask=torch.zeros(2, 5, dtype=torch.bool))
    assert torch.allclose(masked, plain, atol=1e-6)  # nothing of the instruction visible: the plain result
    other = text.clone()
    other[:, 3:] = 100.0
    keep = torch.arange(5) < 3
    assert torch.allclose(r(x, text=text, text_mask=keep.expand(2, 5)), r(x, text=other, text_mask=keep.expand(2, 5)),
                          atol=1e-6)
    assert resampler.ResamplerConfig.from_hf(cfg.to_hf()) == cfg
    assert "instruction_dim" not in resampler.PRESETS["tiny"].to_hf()
