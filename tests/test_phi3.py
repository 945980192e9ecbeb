"""phi3.Phi3 against transformers' Phi3ForCausalLM on tiny random checkpoints (the numerical reference)."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import generate
import phi3
import weights
from reference import perturb

transformers = pytest.importorskip("transformers")


def hf_config(**kw):
    base = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=256, original_max_position_embeddings=256,
                sliding_window=8, bos_token_id=1, eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-5,
                attn_implementation="eager")
    base.update(kw)
    return transformers.Phi3Config(**base)


def make_hf(tmp_path, seed=0, shard="60KB", **kw):
    """A tiny random Phi-3 with perturbed weights (reference.perturb): transformers' defaults (every RMSNorm
    weight 1, attention near uniform) would hide a swapped or dropped norm weight and most position bugs."""
    torch.manual_seed(seed)
    hf = perturb(transformers.Phi3ForCausalLM(hf_config(**kw)).eval(), seed, matrix_std=0.08)
    hf.save_pretrained(tmp_path, max_shard_size=shard)
    return hf


def recorded(monkeypatch):
    """generate.decode's logits at every step, as `sample` sees them: a list of (B, V) tensors, filled by each
    generate call made while the monkeypatch holds."""
    seen, real = [], generate.sample

    def sample(logits, *a, **k):
        seen.append(logits.clone())
        return real(logits, *a, **k)
    monkeypatch.setattr(generate, "sample", sample)
    return seen


def hf_step_logits(hf, idx, mask, n, **kw):
    """transformers' greedy generation: (new tokens (B, n), raw logits (B, n, V) at every step)."""
    out = hf.generate(input_ids=idx, attention_mask=mask, max_new_tokens=n, do_sample=False, output_logits=True,
                      return_dict_in_generate=True, **kw)
    return out.sequences[:, idx.shape[1]:], torch.stack(out.logits, 1)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("phi3")
    hf = make_hf(d)
    assert (d / "model.safetensors.index.json").exists(), "the fixture should be sharded"
    return hf, phi3.Phi3.from_pretrained(d), d


def padded_batch(side):
    torch.manual_seed(1)
    a, b = torch.randint(3, 384, (20,)), torch.randint(3, 384, (13,))  # both longer than the window (8)
    idx = torch.zeros(2, 20, dtype=torch.long)
    mask = torch.zeros(2, 20, dtype=torch.long)
    idx[0], mask[0] = a, 1
    if side == "left":
        idx[1, 7:], mask[1, 7:] = b, 1
    else:
        idx[1, :13], mask[1, :13] = b, 1
    return idx, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_match_transformers_padded_batch(pair, side):
    hf, ours, _ = pair
    idx, mask = padded_batch(side)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=idx, attention_mask=mask, position_ids=pos).logits
        got = ours(idx, attention_mask=mask)
    real = mask.bool()
    assert (got[real] - ref[real]).abs().max() <= 1e-4


def test_logits_unpadded_use_the_fast_causal_path(pair):
    hf, ours, _ = pair
    for T in (6, 8, 9, 30):  # below, at and above the sliding window
        idx = torch.randint(3, 384, (2, T))
        with torch.no_grad():
            assert (ours(idx) - hf(input_ids=idx).logits).abs().max() <= 1e-4


def test_loss_matches_transformers(pair):
    hf, ours, _ = pair
    idx = torch.randint(3, 384, (2, 12))
    labels = idx.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        loss = ours(idx, labels)
        ref = hf(input_ids=idx, labels=labels).loss
        s = ours(idx, labels, reduction="sum")
    assert torch.allclose(loss, ref, atol=1e-5)
    assert torch.allclose(s, loss * (labels[:, 1:] != -100).sum(), atol=1e-4)


def test_embeds_input_equals_ids(pair):
    _, ours, _ = pair
    idx = torch.randint(3, 384, (2, 10))
    with torch.no_grad():
        assert torch.equal(ours(idx), ours(embeds=ours.model.embed_tokens(idx)))


def test_greedy_generate_matches_transformers(pair):
    hf, ours, _ = pair
    prompts = [[1, 17, 33, 250, 9, 81, 4, 120, 77, 5, 6], [1, 300, 42, 8]]
    idx, mask = generate.left_pad(prompts, 0)
    ref = hf.generate(input_ids=idx, attention_mask=mask, max_new_tokens=32, do_sample=False,
                      eos_token_id=2, pad_token_id=0)[:, idx.shape[1]:]
    got = ours.generate(prompts, 32)
    assert got.tolist() == ref.tolist()


def test_left_padded_cached_decoding_logits_equal_transformers_at_every_step(pair, monkeypatch):
    """Not only the greedy tokens: the logits of every step, prefill and cached decoding, for a left-padded
    batch longer than the sliding window (8). A position or mask bug that leaves the argmax alone (a padded
    row's positions off by its padding, a cache slot of padding attended to) still moves these by 1e-2 or more;
    fp32 rounding stays under 1e-5."""
    hf, ours, _ = pair
    prompts = [[1, 17, 33, 250, 9, 81, 4, 120, 77, 5, 6], [1, 300, 42, 8], [1, 5, 9]]
    idx, mask = generate.left_pad(prompts, 0)
    ref_tokens, ref_logits = hf_step_logits(hf, idx, mask, 24, eos_token_id=None, pad_token_id=0)
    seen = recorded(monkeypatch)
    got = ours.generate(prompts, 24, stop_ids=[])
    assert got.tolist() == ref_tokens.tolist()
    assert (torch.stack(seen, 1) - ref_logits).abs().max().item() <= 1e-4


def test_batched_generate_equals_one_by_one(pair):
    _, ours, _ = pair
    prompts = [[1, 17, 33, 250, 9, 81, 4, 120, 77, 5, 6], [1, 300, 42, 8], [1, 5]]
    batched = ours.generate(prompts, 20, stop_ids=[])
    for i, p in enumerate(prompts):
        assert ours.generate([p], 20, stop_ids=[])[0].tolist() == batched[i].tolist()


def test_cached_decoding_equals_full_forward(pair):
    _, ours, _ = pair
    torch.manual_seed(3)
    idx = torch.randint(3, 384, (2, 24))
    with torch.no_grad():
        full = ours(idx)
        # token by token from an empty cache
        generate.setup_cache(ours, 2, 24)
        steps = [ours.forward(idx[:, t:t + 1], input_pos=torch.tensor([t]))[:, -1] for t in range(24)]
        assert (torch.stack(steps, 1) - full).abs().max() <= 1e-5
        # multi-token prefill, then single steps
        generate.setup_cache(ours, 2, 24)
        pre = ours.forward(idx[:, :10], input_pos=torch.arange(10))
        valid = torch.ones(2, 24, dtype=torch.bool)
        rest = [generate.decode_one_token(ours, idx[:, t:t + 1], torch.tensor([t]), valid, torch.full((2, 1), t))
                for t in range(10, 24)]
        got = torch.cat([pre, torch.stack(rest, 1)], 1)
        generate.clear_cache(ours)
    assert (got - full).abs().max() <= 1e-5


def test_gqa_and_longrope_match_transformers(tmp_path, monkeypatch):
    """GQA and LongRoPE (random per-frequency factors, so a factor applied to the wrong frequency shows), then
    generation across the switch from short to long factors: the logits of every step equal the reference's
    (the cache is rebuilt with the long factors exactly when the reference rebuilds it; keeping the keys
    rotated with the short factors moves later logits by 1e-2 or more, whatever the greedy tokens do)."""
    half = 64 // 4 // 2
    g = torch.Generator().manual_seed(5)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": (1.0 + torch.rand(half, generator=g)).tolist(),
            "long_factor": (1.0 + 4.0 * torch.rand(half, generator=g)).tolist()}
    hf = make_hf(tmp_path, num_key_value_heads=2, max_position_embeddings=64, original_max_position_embeddings=16,
                 rope_parameters=rope, sliding_window=None)
    ours = phi3.Phi3.from_pretrained(tmp_path)
    assert ours.config.rope_scaling["type"] == "longrope" and ours.config.num_key_value_heads == 2
    for T in (12, 40):  # short factors, then long factors (T > original 16)
        idx = torch.randint(3, 384, (1, T))
        with torch.no_grad():
            assert (ours(idx) - hf(input_ids=idx).logits).abs().max() <= 1e-4
    # generation that crosses the switch point rebuilds the cache exactly as the reference does
    prompt = torch.randint(3, 384, (1, 10))
    ref_tokens, ref_logits = hf_step_logits(hf, prompt, torch.ones_like(prompt), 20, eos_token_id=None,
                                            pad_token_id=0)
    seen = recorded(monkeypatch)
    got = ours.generate(prompt, 20, stop_ids=[])
    assert got.tolist() == ref_tokens.tolist()
    assert (torch.stack(seen, 1) - ref_logits).abs().max().item() <= 1e-4


def test_generation_config_stop_ids_match_transformers(tmp_path):
    make_hf(tmp_path)
    hf = transformers.Phi3ForCausalLM.from_pretrained(tmp_path).eval()
    prompt = [[1, 17, 33, 250, 9, 81, 4, 120, 77, 5, 6]]
    free = hf.generate(torch.tensor(prompt), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    stop = free[0, len(prompt[0]) + 3].item()  # a token greedy decoding emits: instruct models list several
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [2, stop]}))
    hf = transformers.Phi3ForCausalLM.from_pretrained(tmp_path).eval()
    ours = phi3.Phi3.from_pretrained(tmp_path)
    assert ours.config.eos_ids == [2, stop]
    ref = hf.generate(torch.tensor(prompt), max_new_tokens=12, do_sample=False, pad_token_id=0)[:, len(prompt[0]):]
    got = ours.generate(prompt, 12)
    assert got.tolist() == ref.tolist() and got[0, -1].item() == stop and got.shape[1] <= 4


def test_clear_errors_for_misuse(pair, tmp_path):
    _, ours, d = pair
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        ours.generate([[1, 2]], 0)
    with pytest.raises(RuntimeError, match="call setup_cache"):
        ours(torch.tensor([[5]]), input_pos=torch.tensor([0]))
    with pytest.raises(weights.CheckpointError, match="pass the checkpoint directory"):
        phi3.Phi3.from_pretrained(next(d.glob("*.safetensors")))
    with pytest.raises(ValueError, match="an xGen-MM checkpoint loads with model.py"):
        phi3.Phi3Config.from_hf({"model_type": "xgenmm"})
    with pytest.raises(ValueError, match="short_factor has 3 entries"):
        phi3.Phi3Config.from_hf({"hidden_size": 64, "num_attention_heads": 4, "rope_scaling": {
            "type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 8}})
    assert phi3.Phi3Config.from_hf({"hidden_size": 64, "num_attention_heads": 4}).sliding_window is None
    # the cache holds prompt + max_new_tokens - 1 tokens: a generation that exactly fills the context is allowed
    ours.config.max_position_embeddings, saved = 8, ours.config.max_position_embeddings
    try:
        assert ours.generate([[1, 2, 3, 4]], 5, stop_ids=[]).shape == (1, 5)
    finally:
        ours.config.max_position_embeddings = saved


def test_duplicate_tensor_across_files_is_refused(tmp_path):
    make_hf(tmp_path, shard="10GB")
    sd = load_file(tmp_path / "model.safetensors")
    save_file({"lm_head.weight": sd["lm_head.weight"]}, tmp_path / "stale.safetensors")
    with pytest.raises(weights.CheckpointError, match="'lm_head.weight' is in both"):
        phi3.Phi3.from_pretrained(tmp_path)


def test_unsupported_config_is_refused():
    with pytest.raises(ValueError, match="rope scaling type 'dynamic'"):
        phi3.Phi3Config.from_hf({"num_attention_heads": 4, "hidden_size": 64, "rope_scaling": {"type": "dynamic"}})
    with pytest.raises(ValueError, match="hidden_act"):
        phi3.Phi3Config.from_hf({"num_attention_heads": 4, "hidden_size": 64, "hidden_act": "gelu"})


def test_sampling_respects_top_k_and_top_p():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]]).repeat(400, 1)
    g = torch.Generator().manual_seed(0)
    assert set(generate.sample(logits, 1.0, top_k=2, generator=g).tolist()) <= {0, 1}
    p = logits.softmax(-1)[0]
    assert p[0] < 0.8 < p[0] + p[1]
    assert set(generate.sample(logits, 1.0, top_p=0.8, generator=g).tolist()) == {0, 1}
    assert generate.sample(logits, 0.0).tolist() == [0] * 400


def test_decode_layout_changes_nothing_but_strides(pair):
    _, ours, d = pair
    m = phi3.Phi3.from_pretrained(d)
    idx = torch.randint(3, 384, (2, 12))
    with torch.no_grad():
        ref, ref_gen = m(idx), m.generate(idx, 12, stop_ids=[])
        generate.decode_layout(m)
        assert m.lm_head.weight.stride() == (1, 384) and m.lm_head.weight.shape == (384, 64)
        assert torch.allclose(m(idx), ref, atol=1e-5) and torch.equal(m.generate(idx, 12, stop_ids=[]), ref_gen)
        generate.decode_layout(m, False)
    assert all(p.is_contiguous() for p in m.parameters()) and torch.equal(m(idx), ref)


def test_compiled_decode_step_matches_eager(pair):
    _, ours, _ = pair
    prompts = [[1, 17, 33, 250, 9, 81], [1, 300, 42, 8]]
    assert torch.equal(ours.generate(prompts, 6, stop_ids=[], compile=True), ours.generate(prompts, 6, stop_ids=[]))


def test_generate_stops_each_row_and_pads(pair):
    _, ours, _ = pair
    prompts = [[1, 17, 33, 250, 9], [1, 300, 42, 8]]
    free = ours.generate(prompts, 16, stop_ids=[])
    s = free[0, 3].item()  # stop on row 0's fourth token
    got = ours.generate(prompts, 16, stop_ids=[s], pad_id=-1)
    ends = []
    for r in range(2):
        row = free[r].tolist()
        k = row.index(s) if s in row else len(row) - 1
        ends.append(k + 1)
        assert got[r].tolist() == (row[:k + 1] + [-1] * 16)[:got.shape[1]]
    assert got.shape[1] == max(ends)  # the loop ends once every row has stopped


def test_gradients_and_checkpointing_agree(pair):
    _, ours, d = pair
    idx = torch.randint(3, 384, (2, 16))
    m = phi3.Phi3.from_pretrained(d).train()
    loss = m(idx, idx)
    loss.backward()
    g1 = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.gradient_checkpointing = True
    loss2 = m(idx, idx)
    loss2.backward()
    assert torch.allclose(loss, loss2)
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(g1, m.parameters()))
    assert all(g.abs().sum() > 0 for g in g1)


# ---- loader ------------------------------------------------------------------


def rewrite(d, edit):
    """Apply `edit` to the state dict of the (first-shard-merged) checkpoint, write it unsharded."""
    sd = {}
    for f in sorted(d.glob("*.safetensors")):
        sd.update(load_file(f))
        f.unlink()
    (d / "model.safetensors.index.json").unlink(missing_ok=True)
    edit(sd)
    save_file(sd, d / "model.safetensors")


@pytest.mark.parametrize("case", ["missing", "extra", "shape"])
def test_loader_errors_name_the_key(tmp_path, case):
    make_hf(tmp_path)
    key = "model.layers.1.mlp.down_proj.weight"
    if case == "missing":
        rewrite(tmp_path, lambda sd: sd.pop(key))
        match = f"missing tensor '{key}'"
    elif case == "extra":
        rewrite(tmp_path, lambda sd: sd.__setitem__("model.layers.1.mlp.extra.weight", torch.zeros(3)))
        match = "model.layers.1.mlp.extra.weight"
    else:
        rewrite(tmp_path, lambda sd: sd.__setitem__(key, torch.zeros(64, 95)))
        match = rf"'{key}' has shape \(64, 95\), the model expects \(64, 96\)"
    with pytest.raises(weights.CheckpointError, match=match):
        phi3.Phi3.from_pretrained(tmp_path)


def test_loads_in_bf16_without_pickles(tmp_path):
    make_hf(tmp_path, shard="10GB")
    m = phi3.Phi3.from_pretrained(tmp_path, dtype="bfloat16")
    assert m.lm_head.weight.dtype == torch.bfloat16 and not m.lm_head.weight.is_meta
    with torch.no_grad():
        m(torch.randint(3, 384, (1, 5)))
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(weights.CheckpointError, match="pickled weights are not loaded"):
        phi3.Phi3.from_pretrained(tmp_path)


def test_lm_head_bias_and_output_vocab(tmp_path):
    hf = make_hf(tmp_path, shard="10GB")
    rewrite(tmp_path, lambda sd: sd.__setitem__("lm_head.bias", torch.randn(384)))
    m = phi3.Phi3.from_pretrained(tmp_path)
    idx = torch.randint(3, 384, (1, 6))
    with torch.no_grad():
        ref = hf(input_ids=idx).logits + load_file(tmp_path / "model.safetensors")["lm_head.bias"]
        assert (m(idx) - ref).abs().max() <= 1e-4
        m.config.output_vocab_size = 300
        assert (m(idx) - ref[..., :300]).abs().max() <= 1e-4


def test_sequence_reduction_is_the_summed_loss_of_each_row(pair):
    _, ours, _ = pair
    idx, mask = padded_batch("right")
    labels = idx.masked_fill(mask == 0, -100)
    labels[0, :5] = -100  # a prompt without loss
    with torch.no_grad():
        per_row = ours(idx, labels, attention_mask=mask, reduction="sequence")
        logits = ours(idx, attention_mask=mask)
    expected = torch.stack([F.cross_entropy(logits[b, :-1], labels[b, 1:], ignore_index=-100, reduction="sum")
                            for b in range(len(idx))])
    assert per_row.shape == (len(idx),) and (per_row - expected).abs().max().item() <= 1e-3


def test_cache_is_kept_across_calls_and_leaves_forward_alone(pair):
    """A second call of the same batch and length reuses the cache (so a compiled step keeps its graph) and gives
    the same tokens; another batch size gets a new cache; a plain forward ignores a cache left by generation."""
    _, ours, _ = pair
    prompts, idx = [[1, 17, 33, 250, 9], [1, 300, 42]], torch.randint(3, 384, (2, 12))
    with torch.no_grad():
        full = ours(idx)
        first = ours.generate(prompts, 8, stop_ids=[])
        cache = ours.model.layers[0].self_attn.kv_cache
        assert torch.equal(ours.generate(prompts, 8, stop_ids=[]), first)
        assert ours.model.layers[0].self_attn.kv_cache is cache
        assert torch.equal(ours(idx), full)
        ours.generate(prompts[:1], 8, stop_ids=[])
        assert ours.model.layers[0].self_attn.kv_cache is not cache
        generate.clear_cache(ours)
    assert all(b.self_attn.kv_cache is None for b in ours.model.layers)
