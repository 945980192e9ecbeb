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


def test_no_grad_computes_only_the_loss():
    x, w, t = torch.randn(10, 8), torch.randn(20, 8), torch.randint(0, 20, (10,))
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(x, w, None, t, chunk=3), plain(x, w, None, t, "mean"))


def test_phi3_fused_loss_equals_logits_loss():
    import phi3
    torch.manual_seed(0)
    m = phi3.Phi3(phi3.Phi3Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=2, output_vocab_size=90)).init_weights()
    idx = torch.randint(0, 90, (2, 9))
    labels = idx.masked_fill(torch.rand(2, 9) < 0.3, -100)
    _, ref = m(idx, labels)
    ref.backward()
    g_ref = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    logits, got = m(idx, labels, return_logits=False)
    got.backward()
    assert logits is None and torch.allclose(got, ref, atol=1e-5)
    assert all(torch.allclose(p.grad, g, atol=1e-5) for p, g in zip(m.parameters(), g_ref))
