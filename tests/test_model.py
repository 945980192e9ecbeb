"""model.py: end-to-end parity with a transformers-composed xGen-MM, any-resolution tiling, loading and saving."""
import functools
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

import model
import phi3
import resampler
import weights
from images import Images, group_features, preprocess, select_grid, unpad_mask
from tokenizer import XGENMM_TOKENS, Tokenizer, chat_prompt, extend_tokenizer
from reference import GRIDS, TINY_SIGLIP, write_xgenmm, write_tokenizer

transformers = pytest.importorskip("transformers")
STRATEGIES = ["anyres", "anyres-fixed", "fixed"]


def noise_image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=STRATEGIES)
def released(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    ref = write_xgenmm(d, strategy=request.param)
    return ref, model.XGenMM.from_pretrained(d), d


def batch_images():
    """One image (wide: a 2x1 grid), two (tall 1x3, square 1x2), none, and one on a 2x2 grid: the only grid
    where a column-major crop order or a wrong stitching permute shows."""
    return [[noise_image(50, 30)], [noise_image(20, 70, 1), noise_image(32, 32, 2)], [], [noise_image(60, 50, 3)]]


def batch(tok):
    """The cases of an interleaved batch: prompts with one `<image>` per image of batch_images()."""
    prompts = [tok.encode("<image>\nwhat is this?"), tok.encode("compare <image> and <image> now"),
               tok.encode("no image here, just text"), tok.encode("<image>\nand this one?")]
    return prompts, batch_images()


def test_the_batch_covers_every_grid_shape():
    grids = {select_grid(im.size, GRIDS) for ims in batch_images() for im in ims}
    assert grids == {(64, 32), (32, 96), (32, 64), (64, 64)}  # 2x1, 1x3, 1x2, 2x2

# -----------------------------------------------------------------------------
# parity


def test_logits_equal_transformers_composed_reference(released):
    ref, m, _ = released
    prompts, images = batch(m.tokenizer)
    ids, mask, imgs = m.encode_batch(prompts, images)  # right-padded, each <image> expanded
    with torch.no_grad():
        logits = m(ids, imgs, mask)
    assert logits.shape[-1] == ref.initial + 3  # 3 decoupled logits after the initial vocabulary
    for b in range(len(prompts)):
        expected = ref.logits(prompts[b], images[b])
        assert (logits[b, : len(expected)] - expected).abs().max().item() <= 1e-4, b


def test_loss_ignores_vision_tokens_and_equals_plain_math(released):
    ref, m, _ = released
    prompts, images = batch(m.tokenizer)
    ids, mask, imgs = m.encode_batch(prompts, images)
    labels = ids.masked_fill(mask == 0, -100)  # forward keeps the image positions out of the loss itself
    with torch.no_grad():
        loss = m(ids, imgs, mask, labels=labels, reduction="sum")
        logits = m(ids, imgs, mask)
    fused = sum(F.cross_entropy(logits[b, :-1], labels[b, 1:].masked_fill(ids[b, 1:] == ref.image_id, -100),
                                ignore_index=-100, reduction="sum") for b in range(len(prompts)))
    total = 0.0
    for b in range(len(prompts)):  # targets: the text ids with every image's block as -100, shifted by one
        seq, k = [], 0
        for i in prompts[b]:
            if i == ref.image_id:
                seq += [-100] * ref.image_tokens(images[b][k]).shape[0]
                k += 1
            else:
                seq.append(i)
        logits = ref.logits(prompts[b], images[b])
        total += F.cross_entropy(logits, torch.tensor(seq[1:] + [-100]), ignore_index=-100, reduction="sum").item()
    # fp32 gives the same sum to ~1e-7 (measured: equal); 1e-5 of it (~4e-3 of ~390) is what a loss bug moves
    # at the least: label smoothing of 1e-4 moves it 7e-5, one of the ~70 supervised tokens dropped 1.5%
    assert abs(loss.item() - total) <= 1e-5 * total
    assert abs(fused.item() - loss.item()) <= 1e-5 * total


def test_batched_generate_equals_one_by_one(released):
    _, m, _ = released
    prompts, images = batch(m.tokenizer)
    together = m.generate(prompts, images, max_new_tokens=12, stop_ids=[])
    for b in range(len(prompts)):
        alone = m.generate([prompts[b]], [images[b]], max_new_tokens=12, stop_ids=[])
        assert torch.equal(together[b], alone[0]), b


def test_generate_continues_the_reference_greedily(released):
    ref, m, _ = released
    prompts, images = batch(m.tokenizer)
    out = m.generate(prompts[:1], images[:1], max_new_tokens=6, stop_ids=[])[0].tolist()
    ids = list(prompts[0])
    for tok in out:  # each token is the argmax of the reference's last logits given everything before it
        assert ref.logits(ids, images[0])[-1].argmax().item() == tok
        ids.append(tok)


def test_generate_streams_and_stops(released):
    _, m, _ = released
    prompts, images = batch(m.tokenizer)
    first = m.generate(prompts[:1], images[:1], max_new_tokens=8, stop_ids=[])[0]
    k = max(i for i in range(8) if int(first[i]) not in first[:i].tolist())  # a token not seen before it
    seen = []
    out = m.generate(prompts[:1], images[:1], max_new_tokens=8, stop_ids=[int(first[k])], callback=seen.append)
    assert out.shape[1] == k + 1 and torch.equal(out[0], first[: k + 1])
    assert torch.equal(torch.stack(seen, 1)[0], out[0])
    assert m.tokenizer.token_to_id("<|end|>") in m.stop_ids


def test_marker_count_mismatch_names_the_sample(released):
    _, m, _ = released
    prompts, images = batch(m.tokenizer)
    with pytest.raises(ValueError, match=r"sample 1: 2 <image> marker\(s\) in the text but 1 image"):
        m.generate(prompts, [images[0], images[1][:1], [], images[3]], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"sample 2: 0 <image> marker\(s\) in the text but 1 image"):
        m.generate(prompts, [images[0], images[1], [noise_image(9, 9)], images[3]], max_new_tokens=2)

# -----------------------------------------------------------------------------
# any-resolution (the examples of docs/release.md §4, at the released 384-pixel size)


RELEASED = model.XGenMMConfig()


@pytest.mark.parametrize("size, grid, tokens", [
    ((640, 480), (768, 768), 640), ((300, 1000), (384, 1152), 512), ((384, 384), (384, 768), 384),
    ((49, 49), (384, 768), 384), ((1000, 300), (1152, 384), 512), ((800, 400), (768, 384), 384),
])
def test_grid_selection_and_token_counts(size, grid, tokens):
    assert select_grid(size, RELEASED.grids) == grid
    assert RELEASED.image_tokens(size) == tokens
    assert model.XGenMMConfig.from_strategy("fixed").image_tokens(size) == 128
    assert model.XGenMMConfig.from_strategy("anyres-fixed").image_tokens(size) == 128


def unpad_sizes():
    """Image sizes for the unpad sweep: squares, 1:2, 2:1, 1:3 and 3:1 shapes (where the rounding of the
    ratio decides a row: 49x49 and 196x196 among them) and 300 random sizes."""
    rng = np.random.default_rng(0)
    shaped = [(n * a, n * b) for n in range(1, 400) for a, b in ((1, 1), (1, 2), (2, 1), (1, 3), (3, 1))]
    return shaped + [tuple(int(v) for v in rng.integers(1, 2000, 2)) for _ in range(300)]


def test_unpad_mask_equals_the_llava_next_reference():
    """unpad_mask against LLaVA-NeXT's unpad_image (tests/reference.py) on every stitched map shape of the
    release's grids (27 tokens a side) and ~2,300 image sizes: the ratio-first rounding is the reference's
    everywhere, not only on the examples below (product-first on the columns alone passes those three, and
    fails 196x196 on the 2x1 map)."""
    from reference import unpad_image
    maps = [(27 * c, 27 * r) for c, r in model.GRIDS]
    for W, H in unpad_sizes():
        for map_w, map_h in maps:
            _, expected = unpad_image(torch.zeros(1, map_h, map_w), (W, H), keep_original_shape=True)
            assert torch.equal(unpad_mask((W, H), map_w, map_h), expected), (W, H, map_w, map_h)


def test_unpad_mask_examples():
    keep = unpad_mask((640, 480), 54, 54)  # 2x2 grid: rows 0-6 and 47-53 fell on the padding
    masked_rows = (~keep).all(1).nonzero().flatten().tolist()
    assert masked_rows == list(range(0, 7)) + list(range(47, 54)) and keep[7:47].all()
    keep = unpad_mask((49, 49), 27, 54)  # int(49 * (27/49)) = 26, not 27: 14 rows each side
    assert (~keep).all(1).nonzero().flatten().tolist() == list(range(0, 14)) + list(range(40, 54))
    keep = unpad_mask((300, 1000), 27, 81)  # tall image on a 1x3 grid: columns are padded
    pad = (27 - int(300 * (81 / 1000))) // 2
    assert (~keep).all(0).nonzero().flatten().tolist() == list(range(pad)) + list(range(27 - pad, 27))


def test_preprocess_views_and_bands():
    cfg = model.preset("tiny")
    views, size, grid = preprocess(noise_image(640, 480), cfg)
    assert views.shape == (5, 3, 64, 64) and size == (640, 480) and grid == (2, 2)
    assert views.min() >= -1 and views.max() <= 1
    views, _, grid = preprocess(noise_image(640, 480), model.preset("tiny", "fixed"))
    assert views.shape == (1, 3, 64, 64) and grid == (0, 0)
    # quirk: with two crops side by side, a group is a band across the whole map, not one crop
    side = 8
    feats = torch.arange(3 * side * side, dtype=torch.float32).repeat_interleave(2).view(3, side * side, 2)
    groups, masks = group_features(feats, (128, 64), (2, 1))
    left, right = feats[1].view(side, side, 2), feats[2].view(side, side, 2)
    band0 = torch.cat((left[: side // 2], right[: side // 2]), dim=1).reshape(-1, 2)  # top halves of both crops
    assert torch.equal(groups[0], feats[0]) and torch.equal(groups[1], band0) and masks[0] is None


def test_images_collate_any_count():
    cfg = model.preset("tiny")
    imgs = Images.from_pil([[], [noise_image(40, 40)], [noise_image(300, 100), noise_image(10, 90)], []], cfg)
    assert imgs.counts == [0, 1, 2, 0] and len(imgs.sizes) == 3
    assert imgs.pixel_values.shape[0] == sum(1 + c * r for c, r in imgs.grids)
    empty = Images.from_pil([[], []], cfg)
    assert empty.pixel_values.shape[0] == 0 and empty.counts == [0, 0]

# -----------------------------------------------------------------------------
# checkpoints


def test_save_load_round_trip_is_bit_exact(released, tmp_path):
    ref, m, d = released
    m.save_pretrained(tmp_path / "saved", max_shard_size=200_000)
    assert (tmp_path / "saved" / "model.safetensors.index.json").is_file()
    again = model.XGenMM.from_pretrained(tmp_path / "saved")
    a, b = m.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.config == m.config
    text = "<|user|>\n<image>\nhi<|end|>\n<|assistant|>\n"
    assert again.tokenizer.encode(text) == m.tokenizer.encode(text) and len(again.tokenizer) == len(m.tokenizer)
    # the official layout: the same tensor names and shapes as the released-style checkpoint we started from
    original, saved = weights.Checkpoint(d), weights.Checkpoint(tmp_path / "saved")
    ours = {k: original.shape(k) for k in original.keys() if ".head." not in k}  # the unused pooling head is not kept
    assert {k: saved.shape(k) for k in saved.keys()} == ours
    cfg = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert cfg["model_type"] == "xgenmm" and cfg["text_config"]["initial_tokenizer_len"] == ref.initial
    assert cfg["vision_encoder_config"]["anyres_grids"] == GRIDS


def test_decoupled_rows_are_folded_and_split_back(released, tmp_path):
    ref, m, d = released
    i = ref.initial
    emb = m.lang_model.model.embed_tokens.weight
    assert torch.equal(emb[i: i + 3], ref.extra["model.embed_tokens.additional_embedding.weight"])
    assert torch.equal(m.lang_model.lm_head.bias[i: i + 3], ref.extra["lm_head.additional_fc.bias"])
    sd = m.official_state_dict()
    assert torch.equal(sd["vlm.lang_model.lm_head.additional_fc.weight"], ref.extra["lm_head.additional_fc.weight"])


def test_release_tokenizer_without_xgenmm_tokens_is_extended(released, tmp_path):
    ref, m, _ = released
    tok = m.tokenizer
    assert [tok.token_to_id(t) for t in XGENMM_TOKENS] == [ref.initial, ref.initial + 1, ref.initial + 2]
    assert tok.pad_id == ref.initial - 1 and tok.id_to_token(tok.pad_id) == "<pad>"
    d = tmp_path / "with-tokens"  # files that already hold every token load to the same ids
    ref2 = write_xgenmm(d, tokenizer="xgenmm")
    m2 = model.XGenMM.from_pretrained(d)
    assert [m2.tokenizer.token_to_id(t) for t in XGENMM_TOKENS] == [ref2.initial + k for k in range(3)]


def test_tokenizer_that_disagrees_with_the_rows_is_refused(tmp_path):
    write_xgenmm(tmp_path, tokenizer="phi3")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["text_config"]["initial_tokenizer_len"] += 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(weights.CheckpointError, match=r"the tokenizer gives .*<image>.* the ids"):
        model.XGenMM.from_pretrained(tmp_path)


def rewrite_first_shard(d, edit):
    f = sorted(d.glob("model-*.safetensors"))[0]
    sd = load_file(f)
    edit(sd)
    save_file(sd, f, metadata={"format": "pt"})
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != f.name} | {k: f.name for k in sd}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("edit, pattern", [
    (lambda sd: sd.update({"vlm.extra.weight": torch.zeros(2)}), r"unexpected tensor.*'vlm\.extra\.weight'"),
    (lambda sd: sd.pop("vlm.vision_encoder.post_layernorm.weight"), r"missing tensor 'vlm\.vision_encoder\.post_layernorm"),
    (lambda sd: sd.update({"vlm.vision_encoder.post_layernorm.weight": torch.zeros(3)}),
     r"'vlm\.vision_encoder\.post_layernorm\.weight' has shape \(3,\), the model expects \(64,\)"),
])
def test_strict_keys(tmp_path, edit, pattern):
    write_xgenmm(tmp_path, tokenizer=None, shards=1)
    rewrite_first_shard(tmp_path, edit)
    with pytest.raises(weights.CheckpointError, match=pattern):
        model.XGenMM.from_pretrained(tmp_path)


def test_head_without_bias_and_bf16(tmp_path):
    ref = write_xgenmm(tmp_path, tokenizer=None, bias=False)
    m = model.XGenMM.from_pretrained(tmp_path, dtype="bfloat16")
    assert m.lang_model.lm_head.bias is None and m.tokenizer is None
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    ids = [5, ref.initial, 7]
    with torch.no_grad():
        got = m(*m.encode_batch([ids], [[noise_image(40, 20)]])[::2]).float()[0]
    expected = ref.logits(ids, [noise_image(40, 20)])
    # bf16 weights and activations: 1.8% of the largest logit measured (0.048 of 2.66). A weight lost or
    # mis-cast in the bf16 path (a norm weight, ~5% per channel here) moves the logits by 5% or more.
    assert (got - expected).abs().max().item() < 0.04 * expected.abs().max().item()


def test_config_reading_rules():
    ve = {"model_name": model.SIGLIP_SO400M, "anyres_grids": [[384, 768]], "image_aspect_ratio": "anyres",
          "anyres_patch_sampling": True}
    d = {"model_type": "xgenmm", "vision_encoder_config": ve,
         "vision_tokenizer_config": {"vis_feature_dim": 1152, "lang_embedding_dim": 3072, "num_vis_tokens": 128},
         "text_config": {**phi3.Phi3Config().to_hf(), "initial_tokenizer_len": 32012}}
    cfg = model.XGenMMConfig.from_hf(d)  # SigLIP so400m dims by name; resampler constructor defaults
    assert cfg.vision == model.vit.PRESETS["so400m"] and cfg.resampler == model.resampler.PRESETS["xgenmm"]
    assert cfg.strategy == "anyres" and cfg.grids == [(384, 768)] and cfg.image_token_id == 32012
    ve |= TINY_SIGLIP  # this project's rule: SigLIP fields in vision_encoder_config win over the name
    assert model.XGenMMConfig.from_hf(d).vision.hidden_size == 64
    with pytest.raises(weights.CheckpointError, match="only google/siglip-so400m-patch14-384 is known"):
        model.XGenMMConfig.from_hf(d | {"vision_encoder_config": {"model_name": "google/siglip-base-patch16-224"}})
    again = model.XGenMMConfig.from_hf(json.loads(json.dumps(cfg.to_hf())))
    assert again == cfg


def test_not_an_xgenmm_checkpoint(tmp_path):
    transformers.Phi3ForCausalLM(transformers.Phi3Config(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                         num_hidden_layers=1, num_attention_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)).save_pretrained(tmp_path)
    with pytest.raises(weights.CheckpointError, match="not 'xgenmm'.*from_components"):
        model.XGenMM.from_pretrained(tmp_path)
    with pytest.raises(weights.CheckpointError, match="no such file or directory"):
        model.XGenMM.from_pretrained(tmp_path / "nope")


def test_hub_id_resolves_in_the_local_cache(tmp_path, monkeypatch, released):
    _, m, d = released
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(weights.CheckpointError, match=r"hf download Salesforce/xgen-mm-tiny"):
        model.XGenMM.from_pretrained("Salesforce/xgen-mm-tiny")
    repo = tmp_path / "hub" / "models--Salesforce--xgen-mm-tiny"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in d.iterdir():  # the cache layout: content-addressed blobs, symlinked from the snapshot
        blob = repo / "blobs" / f"blob-{f.name}"
        blob.write_bytes(f.read_bytes())
        os.symlink(blob, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    cached = model.XGenMM.from_pretrained("Salesforce/xgen-mm-tiny")
    assert all(torch.equal(a, b) for a, b in zip(cached.state_dict().values(), m.state_dict().values()))

# -----------------------------------------------------------------------------
# a new model from components


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    d = tmp_path_factory.mktemp("components")
    torch.manual_seed(3)
    transformers.SiglipModel(transformers.SiglipConfig(  # a full SigLIP, as google/siglip-so400m-patch14-384
        vision_config=TINY_SIGLIP, text_config=dict(vocab_size=50, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=1, num_attention_heads=2))).save_pretrained(d / "siglip")
    (d / "phi3").mkdir()
    n = write_tokenizer(d / "phi3", add_bos=True, vocab_size=300)
    transformers.Phi3ForCausalLM(transformers.Phi3Config(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        bos_token_id=1, eos_token_id=n, pad_token_id=n)).save_pretrained(d / "phi3")
    return d, n


def test_from_components_extends_the_tokenizer_and_saves_the_official_layout(components, tmp_path):
    d, n = components
    m = model.XGenMM.from_components(d / "siglip", d / "phi3", strategy="anyres")
    tok = m.tokenizer
    assert tok.pad_id == n + 11 and [tok.token_to_id(t) for t in XGENMM_TOKENS] == [n + 12, n + 13, n + 14]
    assert m.config.initial_tokenizer_len == n + 12 and m.config.text.output_vocab_size == len(tok) == n + 15
    assert m.config.text.vocab_size == 320 and m.config.text.pad_token_id == n + 11
    lm = m.lang_model
    assert torch.allclose(lm.model.embed_tokens.weight[n + 12], lm.model.embed_tokens.weight[: n + 12].mean(0))
    assert lm.lm_head.bias is not None and not lm.lm_head.bias.any()
    assert not any(p.requires_grad for p in m.vision_encoder.parameters())
    prompts = [tok.encode("<image>\nwhat is it?"), tok.encode("text only")]
    images = [[noise_image(70, 30)], []]
    out = m.generate(prompts, images, max_new_tokens=4, stop_ids=[])
    m.save_pretrained(tmp_path / "new")
    again = model.XGenMM.from_pretrained(tmp_path / "new")
    assert torch.equal(again.generate(prompts, images, max_new_tokens=4, stop_ids=[]), out)
    assert "vlm.lang_model.lm_head.additional_fc.bias" in weights.Checkpoint(tmp_path / "new").keys()


def test_from_components_grows_a_full_vocabulary(components, tmp_path):
    d, n = components
    tight = tmp_path / "phi3"
    tight.mkdir()
    write_tokenizer(tight, add_bos=True, vocab_size=300)
    transformers.Phi3ForCausalLM(transformers.Phi3Config(
        vocab_size=n + 11, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        bos_token_id=1, eos_token_id=n, pad_token_id=n)).save_pretrained(tight)
    m = model.XGenMM.from_components(d / "siglip", tight, strategy="fixed")
    assert m.config.text.vocab_size == 320 and m.config.text.output_vocab_size == n + 15
    with torch.no_grad():
        logits = m(*m.encode_batch([[1, m.config.image_token_id, 5]], [[noise_image(9, 20)]])[::2])
    assert logits.shape == (1, 2 + m.config.resampler.num_latents, n + 15)  # fixed: one block of 128


def test_training_gradients_reach_resampler_and_lm_only(released):
    _, m, _ = released
    prompts, images = batch(m.tokenizer)
    ids, mask, imgs = m.encode_batch(prompts, images)
    m.train()
    try:
        loss = m(ids, imgs, mask, labels=ids.masked_fill(mask == 0, -100))
        loss.backward()
    finally:
        m.eval()
    assert all(p.grad is None for p in m.vision_encoder.parameters())
    assert m.vision_tokenizer.latents.grad.abs().sum() > 0
    assert m.lang_model.model.layers[0].self_attn.qkv_proj.weight.grad.abs().sum() > 0
    m.zero_grad(set_to_none=True)


def test_chat_prompt_format():
    assert chat_prompt(["hi", "hello", "how?"], system="S") == (
        "<|system|>\nS<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\nhello<|end|>\n<|user|>\nhow?<|end|>\n<|assistant|>\n")
    assert chat_prompt(["q"], system=None) == "<|user|>\nq<|end|>\n<|assistant|>\n"


def test_preset_sized_to_a_tokenizer(tmp_path):
    write_tokenizer(tmp_path, add_bos=True, vocab_size=300)
    tok = Tokenizer.from_pretrained(tmp_path)
    initial = extend_tokenizer(tok)
    cfg = model.preset("tiny", tokenizer=tok)
    t = cfg.text
    assert (t.vocab_size, t.output_vocab_size, cfg.image_token_id) == (320, len(tok), initial)
    assert t.pad_token_id == tok.pad_id and t.eos_ids == [tok.eos_id, tok.token_to_id("<|end|>")]
    plain = model.preset("tiny")
    assert plain.text.vocab_size == 4096 and plain.image_token_id == 4093


def test_instruction_aware_resampler_reads_the_users_words_only(released, tmp_path):
    """The ablation variant: each image's instruction is the rest of its user turn (after the last of the images
    listed together), never an answer; a plain document gives none. It saves and loads; batched = one by one."""
    ref, m, d = released
    tok = m.tokenizer
    m2 = model.XGenMM.from_pretrained(d)
    m2.vision_tokenizer = resampler.InstructionAwareResampler.from_resampler(m2.vision_tokenizer,
                                                                          m2.config.text.hidden_size)
    find = functools.partial(m2.vision_tokenizer.instructions, image_id=m2.config.image_token_id,
                             stop_ids=m2.stop_ids)
    chat = chat_prompt(["Image 1: <image>\nImage 2: <image>\nwhich is red?"]) + "the first<|end|>\n"
    sizes = [(40, 40), (30, 60)]
    tokens = [m2.config.image_tokens(size) for size in sizes]
    ids = torch.tensor(m2.config.expand_images(tok.encode(chat), sizes))
    spans = find(torch.arange(len(ids))[:, None].float(), ids, tokens)  # "embeddings" = positions
    words = [tok.decode(ids[s[:, 0].long()].tolist()) for s in spans]
    assert words == ["\nwhich is red?", "\nwhich is red?"]
    doc = torch.tensor(m2.config.expand_images(tok.encode("<image>Q: which is red? A: the first<|endofchunk|>"),
                                                sizes[:1]))
    assert [len(s) for s in find(torch.zeros(len(doc), 1), doc, tokens[:1])] == [0]
    prompts, images = batch(tok)
    prompts[0] = tok.encode(chat_prompt(["<image>\nwhat is this?"]))
    with torch.no_grad():
        together = m2.generate(prompts, images, max_new_tokens=4)
        alone = [m2.generate([p], [im], max_new_tokens=4)[0] for p, im in zip(prompts, images)]
    for row, one in zip(together, alone):
        assert row[: len(one)].tolist() == one.tolist()
    m2.save_pretrained(tmp_path / "ia")
    again = model.XGenMM.from_pretrained(tmp_path / "ia")
    assert again.config.resampler.instruction_dim == m2.config.text.hidden_size
    assert torch.equal(again.vision_tokenizer.instruction.weight, m2.vision_tokenizer.instruction.weight)
