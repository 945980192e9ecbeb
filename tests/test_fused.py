"""fused.linear_cross_entropy equals the plain F.linear + F.cross_entropy, values and gradients."""
import pytest
import torch
import torch.nn.functional as F

from fused import linear_cross_entropy


def plain(x, w, b, t, reduction):
    return F.cross_entropy(F.linear(x, w, b).float(), t, ignore_index=-100, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_gradients_equal_the_plain_loss(reduction, bias):
    torch.manual_seed(0)
    x = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    b = torch.randn(50, requires_grad=True) if bias else None
    t = torch.randint(0, 50, (37,))
    t[::5] = -100
    args = [x, w] + ([b] if bias else [])
    ref = plain(x, w, b, t, reduction)
    g_ref = torch.autograd.grad(ref * 1.7, args)  # an upstream gradient other than 1 is scaled through
    got = linear_cross_entropy(x, w, b, t, reduction, chunk=8)  # several chunks, the last one short
    g_got = torch.autograd.grad(got * 1.7, args)
    assert torch.allclose(got, ref, atol=1e-5)
    for a, r in zip(g_got, g_ref):
        assert torch.allclose(a, r, atol=1e-5)


def test_no_grad_computes_only_the_loss(monkeypatch):
    torch.manual_seed(0)
    x, w = torch.randn(10, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    t = torch.randint(0, 20, (10,))
    calls = []
    for name in ("zeros_like", "empty_like"):  # the gradient buffers are allocated with these
        orig = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _o=orig, _n=name, **k: calls.append(_n) or _o(*a, **k))
    with torch.no_grad():
        loss = linear_cross_entropy(x, w, None, t, chunk=3)
    assert calls == [] and torch.allclose(loss, plain(x, w, None, t, "mean"))
    linear_cross_entropy(x, w, None, t, chunk=3)  # with grad mode on, both buffers exist
    assert sorted(set(calls)) == ["empty_like", "zeros_like"]


def test_frozen_head_gives_only_the_input_gradient():
    torch.manual_seed(0)
    x, w = torch.randn(12, 8, requires_grad=True), torch.randn(30, 8)  # a frozen lm_head, as under LoRA
    t = torch.randint(0, 30, (12,))
    (gx,) = torch.autograd.grad(linear_cross_entropy(x, w, None, t, chunk=5), [x])
    (rx,) = torch.autograd.grad(plain(x, w, None, t, "mean"), [x])
    assert torch.allclose(gx, rx, atol=1e-6)


def test_bf16_gradients_stay_close_to_fp32():
    torch.manual_seed(0)
    x, w = torch.randn(300, 32), torch.randn(500, 32) * 0.1
    t = torch.randint(0, 500, (300,))
    xb, wb = x.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    loss = linear_cross_entropy(xb, wb, None, t, chunk=64)
    loss.backward()
    x.requires_grad_(), w.requires_grad_()
    ref = plain(x, w, None, t, "mean")
    ref.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 1e-2
    assert xb.grad.dtype == wb.grad.dtype == torch.bfloat16
    assert (wb.grad.float() - w.grad).abs().max() < 2e-3 * w.grad.abs().max() + 1e-4


def test_under_autocast_the_head_is_cast_once_and_the_fp32_master_gets_fp32_gradients(monkeypatch):
    """On a GPU the loss runs under bf16 autocast with fp32 master weights: the weight is cast once per call,
    not once per chunk (autocast's cache does not see a slice of the head), every chunk's product is bf16, and
    the gradients come back to the fp32 tensors. Checked here with the CPU's bf16 autocast."""
    torch.manual_seed(0)
    x, w, b = torch.randn(600, 32, requires_grad=True), (torch.randn(50, 32) * 0.1).requires_grad_(), \
        torch.zeros(50, requires_grad=True)
    t = torch.randint(0, 50, (600,))
    real, seen = F.linear, []

    def spy(x_, w_, b_=None):
        seen.append((x_.dtype, w_.dtype, w_.data_ptr(), torch.is_autocast_enabled("cpu")))
        return real(x_, w_, b_)
    monkeypatch.setattr(F, "linear", spy)
    with torch.autocast("cpu", torch.bfloat16):
        loss = linear_cross_entropy(x, w, b, t, chunk=256)  # 3 chunks
    monkeypatch.setattr(F, "linear", real)
    loss.backward()
    assert len(seen) == 3 and {d for s in seen for d in s[:2]} == {torch.bfloat16}
    assert len({s[2] for s in seen}) == 1 and not any(s[3] for s in seen)  # one cast; no autocast inside
    assert x.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = b.grad = None
    ref = plain(x.bfloat16().float(), w.bfloat16().float(), b, t, "mean")  # the same rounding of the inputs
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-2
    assert (gw - w.grad).abs().max() < 2e-2 * w.grad.abs().max() and (gx - x.grad).abs().max() < 2e-2 * x.grad.abs().max()


def test_phi3_fused_loss_equals_logits_loss():
    import phi3
    torch.manual_seed(0)
    m = phi3.Phi3(phi3.Phi3Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=2, output_vocab_size=90)).init_weights()
    idx = torch.randint(0, 90, (2, 9))
    labels = idx.masked_fill(torch.rand(2, 9) < 0.3, -100)
    logits = m(idx)  # the plain math on the full logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 90).float(), labels[:, 1:].reshape(-1), ignore_index=-100)
    ref.backward()
    g_ref = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    got = m(idx, labels)  # forward with labels: the fused loss, no logits
    got.backward()
    assert got.dim() == 0 and torch.allclose(got, ref, atol=1e-5)
    assert all(torch.allclose(p.grad, g, atol=1e-5) for p, g in zip(m.parameters(), g_ref))
