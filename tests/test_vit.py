"""vit.py against transformers' SigLIP on tiny random checkpoints, plus the strict loader's errors."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import vit
import weights
from model import preset
from reference import perturb

transformers = pytest.importorskip("transformers")  # the numerical reference
SiglipConfig, SiglipModel = transformers.SiglipConfig, transformers.SiglipModel
SiglipVisionConfig, SiglipVisionModel = transformers.SiglipVisionConfig, transformers.SiglipVisionModel

TINY = dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4)  # head_dim 16, 16 patches


def hf_vision(use_head=False):
    """A tiny random SigLIP tower with perturbed weights (reference.perturb): transformers' defaults (norm
    weights 1, q/k/v and norm biases 0) would hide a swapped layer norm, a dropped norm weight or bias, or a
    dropped q/k/v bias."""
    torch.manual_seed(0)
    return perturb(SiglipVisionModel(SiglipVisionConfig(**TINY, vision_use_head=use_head)).eval())


def pixels(n=3):
    return torch.randn(n, 3, TINY["image_size"], TINY["image_size"], generator=torch.Generator().manual_seed(1))


def assert_features_match(model, hf_tower, x=None):
    x = pixels() if x is None else x
    with torch.no_grad():
        ours, ref = model(x), hf_tower(pixel_values=x).last_hidden_state
    assert ours.shape == ref.shape == (x.shape[0], 16, TINY["hidden_size"])
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.fixture
def saved(tmp_path):
    hf = hf_vision()
    hf.save_pretrained(tmp_path)
    return hf, tmp_path


def rewrite(path, edit):
    """Load the saved safetensors, let `edit` change the dict, write it back."""
    f = path / "model.safetensors"
    sd = load_file(f)
    edit(sd)
    save_file(sd, f, metadata={"format": "pt"})


def test_vision_model_matches_transformers(saved):
    hf, path = saved
    model = vit.ViT.from_pretrained(path)
    assert not model.training
    assert_features_match(model, hf)


def test_pooling_head_is_skipped(tmp_path):
    hf = hf_vision(use_head=True)
    hf.save_pretrained(tmp_path)
    assert any(k.startswith("head.") for k in load_file(tmp_path / "model.safetensors"))
    model = vit.ViT.from_pretrained(tmp_path)
    assert not any("head" in k for k in model.state_dict())
    assert_features_match(model, hf)


def test_full_siglip_loads_vision_tower_only(tmp_path):
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    hf = perturb(SiglipModel(SiglipConfig(vision_config=dict(TINY), text_config=text)).eval())
    hf.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "model.safetensors")
    assert "logit_scale" in keys and any(k.startswith("text_model.") for k in keys)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "siglip"
    assert_features_match(vit.ViT.from_pretrained(tmp_path), hf.vision_model)


def test_vision_model_saved_with_prefix(saved):
    # transformers 4.x (and the Hub's SiglipVisionModel saves) keep the "vision_model." prefix
    hf, path = saved
    rewrite(path, lambda sd: sd.update({"vision_model." + k: sd.pop(k) for k in list(sd)}))
    assert_features_match(vit.ViT.from_pretrained(path), hf)


def test_convert_checkpoint_under_xgenmm_prefix(saved, tmp_path):
    hf, path = saved
    sd = {"vlm.vision_encoder." + k: v for k, v in load_file(path / "model.safetensors").items()}
    sd["vlm.vision_tokenizer.latents"] = torch.zeros(4, 8)  # another component's keys: not ours to judge
    sd["vlm.lang_model.lm_head.weight"] = torch.zeros(5, 8)
    f = tmp_path / "xgenmm.safetensors"
    save_file(sd, f)
    config = vit.ViTConfig(**TINY)
    ckpt = weights.Checkpoint(f)
    with torch.device("meta"):
        model = vit.ViT(config)
    state = vit.convert_checkpoint(ckpt, model, "vlm.vision_encoder.")
    ckpt.finish("vlm.vision_encoder.")
    assert_features_match(weights.assign(model, state).eval(), hf)


def test_missing_key_is_named(saved):
    _, path = saved
    rewrite(path, lambda sd: sd.pop("encoder.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(weights.CheckpointError, match=r"encoder\.layers\.1\.self_attn\.k_proj\.weight"):
        vit.ViT.from_pretrained(path)


def test_unexpected_key_is_named(saved):
    _, path = saved
    rewrite(path, lambda sd: sd.update({"encoder.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(weights.CheckpointError, match=r"encoder\.layers\.0\.extra\.weight"):
        vit.ViT.from_pretrained(path)


def test_unexpected_key_in_full_siglip_is_named(tmp_path):
    sd = {"vision_model." + k: v for k, v in hf_vision().state_dict().items()}
    sd["vision_model.encoder.layers.0.extra.weight"] = torch.zeros(2)
    sd["text_model.anything"] = torch.zeros(1)  # the text tower is skipped wholesale
    save_file(sd, tmp_path / "model.safetensors")
    cfg = {"model_type": "siglip", "vision_config": dict(TINY)}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(weights.CheckpointError, match=r"vision_model\.encoder\.layers\.0\.extra\.weight"):
        vit.ViT.from_pretrained(tmp_path)


def test_wrong_shape_names_key_and_both_shapes(saved):
    _, path = saved
    rewrite(path, lambda sd: sd.update({"encoder.layers.0.mlp.fc1.weight": torch.zeros(100, 64)}))
    with pytest.raises(weights.CheckpointError, match=r"encoder\.layers\.0\.mlp\.fc1\.weight.*\(100, 64\).*\(128, 64\)"):
        vit.ViT.from_pretrained(path)


def test_official_state_dict_round_trip(saved, tmp_path):
    hf, path = saved
    model = vit.ViT.from_pretrained(path)
    official = model.official_state_dict()
    assert set(official) == set(k for k in hf.state_dict() if not k.startswith("head."))
    for k, v in official.items():
        assert torch.equal(v, hf.state_dict()[k]), k
    out = tmp_path / "again"
    out.mkdir()
    save_file(official, out / "model.safetensors")
    (out / "config.json").write_text((path / "config.json").read_text())
    assert_features_match(vit.ViT.from_pretrained(out), hf)


def test_wrong_image_size_is_a_clear_error():
    model = vit.ViT(vit.ViTConfig(**TINY))
    with pytest.raises(ValueError, match="32x32"):
        model(torch.randn(1, 3, 48, 48))


def test_bf16_loading(saved):
    hf, path = saved
    model = vit.ViT.from_pretrained(path, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    x = pixels()
    with torch.no_grad():
        out, ref = model(x), hf(pixel_values=x).last_hidden_state
    assert out.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits: 0.038 measured on features up to 4.9 (std 1.15). A dropped or swapped
    # norm weight or bias, or a dropped q/k/v bias, moves them by 0.3 or more (the weights are perturbed).
    assert (out.float() - ref).abs().max().item() < 0.08


def test_config_from_hf_and_presets():
    so400m = vit.PRESETS["so400m"]
    assert so400m.num_patches == 729 and so400m.hidden_size // so400m.num_attention_heads == 72
    # google/siglip-so400m-patch14-384's config.json lists the dims and leaves the rest to defaults
    hub = {"model_type": "siglip", "vision_config": {"hidden_size": 1152, "image_size": 384, "intermediate_size": 4304,
           "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14}}
    assert vit.ViTConfig.from_hf(hub) == so400m
    assert vit.ViTConfig.from_hf({"hidden_size": 768}).num_hidden_layers == 12  # transformers' default
    xgenmm = {"model_name": "google/siglip-so400m-patch14-384", "image_aspect_ratio": "anyres", "num_hidden_layers": 2}
    assert vit.ViTConfig.from_hf(xgenmm, base=so400m) == vit.ViTConfig(num_hidden_layers=2)
    with pytest.raises(ValueError, match="gelu_pytorch_tanh"):
        vit.ViTConfig.from_hf({**TINY, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="unknown preset"):  # presets are chosen by name in model.preset
        preset("huge")


def test_meta_construction_has_no_buffers():
    with torch.device("meta"):
        model = vit.ViT(vit.PRESETS["tiny"])
    assert list(model.buffers()) == []
