"""lora.py: a fresh adapter is a no-op, merged == unmerged, only adapters train, the paper's 2.6%, save / load."""
import copy

import pytest
import torch

import lora
import model
import phi3

IDS = torch.tensor([[1, 5, 9, 42, 7, 300, 11, 2], [3, 3, 100, 64, 8, 9, 1000, 4]])


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    return phi3.Phi3(phi3.PRESETS["tiny"]).init_weights().eval()


def randomize_B(m, seed=1, std=0.02):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, mod in lora.lora_modules(m):
            mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * std)


def wrapped(r=8, targets=lora.TARGETS, seed=0):
    m = tiny_lm(seed)
    base = copy.deepcopy(m)
    lora.apply_lora(m, targets=targets, r=r, alpha=2 * r)
    return m, base


@torch.no_grad()
def logits(m, ids=IDS):
    return m(ids)


def maxdiff(a, b):
    return (a - b).abs().max().item()


def test_fresh_adapters_are_exactly_the_base_model():
    m, base = wrapped()
    names = [n for n, _ in lora.lora_modules(m)]
    assert len(names) == 4 * phi3.PRESETS["tiny"].num_hidden_layers
    assert set(base.state_dict()) <= set(m.state_dict())  # every original key kept, under its own name
    assert torch.equal(logits(m), logits(base))


def test_merge_equals_unmerged_and_unmerge_restores():
    m, base = wrapped()
    randomize_B(m)
    ref, adapted = logits(base), logits(m)
    assert maxdiff(adapted, ref) > 1e-3  # the adapters do change the output
    qkv = m.model.layers[0].self_attn.qkv_proj
    weight, before = qkv.weight, qkv.weight.detach().clone()
    for _ in range(2):  # merge / unmerge twice: each idempotent
        lora.merge(m)
        lora.merge(m)
        assert qkv.merged and maxdiff(qkv.weight, before) > 0
        assert maxdiff(logits(m), adapted) <= 1e-5
        lora.unmerge(m)
        lora.unmerge(m)
        assert not qkv.merged and qkv.weight is weight
        assert maxdiff(qkv.weight, before) <= 1e-6
        assert maxdiff(logits(m), adapted) <= 1e-5
    for n, p in base.state_dict().items():
        assert maxdiff(m.state_dict()[n], p) <= 1e-6, n


def test_the_update_is_alpha_over_r_by_hand():
    """y = x W^T + b + (alpha / r) x A^T B^T, checked on numbers small enough to do by hand: r = 2, alpha = 8
    (scale 4), x = (1, 2, 3), A picks x's first two entries, B = [[1, 1], [0, 1]]: B A x = (3, 2), so the update
    is (12, 8). r / alpha (0.25) would give (0.75, 0.5); alpha alone (8), (24, 16). Merging adds the same."""
    base = torch.nn.Linear(3, 2)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
        base.bias.copy_(torch.tensor([0.5, -0.5]))
    layer = lora.LoRALinear(base, r=2, alpha=8, dropout=0.0)
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        layer.lora_B.copy_(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
    x = torch.tensor([[1.0, 2.0, 3.0]])
    expected = torch.tensor([[1.0 + 0.5 + 12.0, 3.0 - 0.5 + 8.0]])  # x W^T + b = (1.5, 2.5), plus the update
    assert torch.equal(layer(x).detach(), expected)
    layer.merge()
    assert torch.equal(layer(x).detach(), expected)
    assert torch.equal(layer.weight[0].detach(), torch.tensor([5.0, 4.0, 0.0]))  # W + 4 B A


def test_only_lora_parameters_train_and_counts():
    m, base = wrapped(r=8)
    trainable, total = lora.mark_only_lora_trainable(m)
    c = phi3.PRESETS["tiny"]
    qkv_out = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.hidden_size // c.num_attention_heads
    per_layer = 8 * ((c.hidden_size + qkv_out) + 2 * c.hidden_size + (c.hidden_size + 2 * c.intermediate_size)
                     + (c.intermediate_size + c.hidden_size))
    assert trainable == c.num_hidden_layers * per_layer
    assert total == sum(p.numel() for p in base.parameters()) + trainable
    randomize_B(m)  # with B = 0, dL/dA = 0
    m.train()
    loss = m(IDS, labels=IDS)
    loss.backward()
    for n, p in m.named_parameters():
        if ".lora_" in n:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n


def test_rank_64_on_phi3_mini_is_the_papers_share():
    with torch.device("meta"):
        m = phi3.Phi3(phi3.PRESETS["phi3-mini-4k"])
        llm = sum(p.numel() for p in m.parameters())
        lora.apply_lora(m, r=64)
    n = sum(p.numel() for p in lora.lora_state_dict(m).values())
    assert abs(n - 100.7e6) / 100.7e6 <= 0.005, n
    assert 0.024 <= n / llm <= 0.028, n / llm


def test_disabled_gives_the_base_model_inside_the_block():
    m, base = wrapped()
    randomize_B(m)
    ref, adapted = logits(base), logits(m)
    with lora.disabled(m):
        assert torch.equal(logits(m), ref)
    assert torch.equal(logits(m), adapted)
    lora.set_enabled(m, False)
    assert torch.equal(logits(m), ref)
    lora.set_enabled(m, True)
    assert torch.equal(logits(m), adapted)


def test_save_load_adapters_round_trip_and_mismatch(tmp_path):
    m, _ = wrapped(r=8)
    randomize_B(m)
    path = tmp_path / "adapters.safetensors"
    lora.save_adapters(m, path)
    fresh, _ = wrapped(r=8)
    assert not torch.equal(logits(fresh), logits(m))
    lora.load_adapters(fresh, path)
    assert torch.equal(logits(fresh), logits(m))
    other_rank, _ = wrapped(r=4)
    with pytest.raises(ValueError, match=r"lora_A has shape \(8, \d+\), the model's is \(4, \d+\)"):
        lora.load_adapters(other_rank, path)
    other_targets, _ = wrapped(r=8, targets=("qkv_proj", "o_proj"))
    with pytest.raises(ValueError, match=r"adapters .*(gate_up_proj|down_proj).* do not match the model's"):
        lora.load_adapters(other_targets, path)


def test_merged_state_dict_saves_a_plain_xgenmm(tmp_path):
    torch.manual_seed(0)
    m = model.XGenMM(model.preset("tiny")).eval()
    lora.apply_lora(m.lang_model, r=8, alpha=16)
    randomize_B(m.lang_model)
    ids = torch.tensor([[1, 2, 3, 40, 50]])
    with torch.no_grad():
        expected = m(ids)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    state = lora.merged_state_dict(m.lang_model, m.official_state_dict(), prefix="vlm.lang_model.")
    assert not any(".lora_" in k for k in state)
    m.save_pretrained(tmp_path, state_dict=state)
    again = model.XGenMM.from_pretrained(tmp_path)  # strict keys
    assert not lora.lora_modules(again)
    with torch.no_grad():
        assert maxdiff(again(ids), expected) <= 1e-5
        assert torch.equal(m(ids), expected)  # the LoRA model itself is untouched: not merged
    assert not any(mod.merged for _, mod in lora.lora_modules(m.lang_model))
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_apply_lora_without_matching_linears_raises():
    with pytest.raises(ValueError, match="no nn.Linear named"):
        lora.apply_lora(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    with pytest.raises(ValueError, match="no nn.Linear named"):
        lora.apply_lora(tiny_lm(), targets=("q_proj", "k_proj"))

# -----------------------------------------------------------------------------
def test_disabled_after_merge_gives_the_base_model():
    m, base = wrapped()
    randomize_B(m)
    adapted = logits(m)
    lora.merge(m)
    with lora.disabled(m):  # unmerged for the block
        assert maxdiff(logits(m), logits(base)) <= 1e-5
    assert maxdiff(logits(m), adapted) <= 1e-5
    with pytest.raises(RuntimeError, match="unmerge"):
        lora.set_enabled(m, False)


def test_lm_head_is_refused():
    with pytest.raises(ValueError, match="lm_head"):
        wrapped(targets=("lm_head",))
