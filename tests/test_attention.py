"""attention.py: every path (blockwise, SDPA, the Triton kernel) equals the reference math, outputs and
gradients, for every mask the model uses; the decoder on each path; no (T, T) mask. Without a GPU the Triton
kernel runs on CPU tensors in Triton's interpreter; with one, compiled, on CUDA tensors."""
import os
import subprocess
import sys
from dataclasses import replace

import torch  # does not import triton: TRITON_INTERPRET below is read when triton is first imported

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the Triton kernel's tests run
if KERNEL_DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import attention  # noqa: E402
import phi3  # noqa: E402
from attention import Mask  # noqa: E402

B, H, D, T = 2, 4, 24, 40  # D = 24: not a power of two, so the kernel's feature masking is exercised


def lengths(start, end):
    return dict(key_start=torch.tensor(start), key_end=torch.tensor(end))


# name: (mask, kv heads, queries, keys). Tiles of 16 below: 40 tokens make three blocks, the last one short.
CASES = {
    "unmasked": (Mask(), H, T, T),
    "causal": (Mask(causal=True), H, T, T),
    "window": (Mask(causal=True, window=11), H, T, T),
    "left padding": (Mask(causal=True, window=11, **lengths([0, 17], [T, T])), H, T, T),
    "right padding": (Mask(causal=True, **lengths([0, 0], [T, 23])), H, T, T),
    "all-masked rows": (Mask(causal=True, window=5, **lengths([0, 30], [0, T])), H, T, T),  # row 0, row 1's first 30
    "gqa": (Mask(causal=True, window=11, **lengths([0, 9], [T, T])), 2, T, T),  # 4 query heads on 2 kv heads
    "cross, key padding": (Mask(key_keep=torch.tensor([[True] * 20 + [False] * 16 + [True] * 8,
                                                      [False] * 19 + [True] + [False] * 16 + [True] * 8])), H, 8, 44),
}
# the last case is the resampler's: 8 latents read [36 media; 8 latents], padded media hidden, latents visible


def inputs(kv_heads, Tq, Tk, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g)
    k, v = torch.randn(2, B, kv_heads, Tk, D, generator=g)
    return [t.to(device).requires_grad_() for t in (q, k, v)], torch.randn(B, H, Tq, D, generator=g).to(device)


def on(mask, device):
    """The mask with its tensors moved to `device`."""
    return replace(mask, **{f: t.to(device) for f, t in vars(mask).items() if torch.is_tensor(t)})


def run(path, mask, qkv, grad_out):
    with attention.use(path):
        out = attention.attention(*qkv, mask)
    return (out.detach(), *torch.autograd.grad(out, qkv, grad_out))


def errors(case, path, device="cpu", cases=CASES):
    """(max |output - reference|, max relative gradient error over q, k, v)."""
    mask, kv_heads, Tq, Tk = cases[case]
    mask = on(mask, device)
    qkv, grad_out = inputs(kv_heads, Tq, Tk, device=device)
    ref = run("reference", mask, qkv, grad_out)
    got = run(path, mask, qkv, grad_out)
    assert got[0].shape == ref[0].shape and all(torch.isfinite(t).all() for t in got)
    grad_err = max(((a - r).abs().max() / r.abs().max()).item() for a, r in zip(got[1:], ref[1:]))
    return (got[0] - ref[0]).abs().max().item(), grad_err


@pytest.fixture
def small_tiles(monkeypatch):
    import attention_blockwise
    monkeypatch.setattr(attention_blockwise, "BLOCK", 16)
    monkeypatch.setattr(attention, "CHUNK", 16)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("path", ["blockwise", "sdpa"])
def test_pytorch_paths_equal_the_reference(case, path, small_tiles):
    out_err, grad_err = errors(case, path)
    assert out_err <= 1e-5 and grad_err <= 1e-4


@pytest.mark.parametrize("case", CASES)
def test_triton_kernel_equals_the_reference(case):
    pytest.importorskip("triton")
    out_err, grad_err = errors(case, "triton", KERNEL_DEVICE)
    assert out_err <= 1e-5 and grad_err <= 1e-4


# The kernel runs the tiles the mask shows whole without it and the tiles on its edges with it. Each case below
# has both: 4 x 4 tiles of TILE, the interpreter's tile (on a GPU, the largest the autotuner tries).
TILE = 16 if KERNEL_DEVICE == "cpu" else 128
N = 4 * TILE
KEEP = torch.ones(B, N, dtype=torch.bool)
KEEP[0, TILE + 3] = KEEP[1, 5] = False
TILE_CASES = {
    "causal": (Mask(causal=True), H, N, N),
    "window": (Mask(causal=True, window=5 * TILE // 2), H, N, N),  # wider than two tiles: a whole one fits
    "left padding": (Mask(causal=True, **lengths([0, TILE + 5], [N, N])), H, N, N),
    "right padding": (Mask(causal=True, **lengths([0, 0], [N, 2 * TILE + 13])), 2, N, N),
    "key keep": (Mask(causal=True, key_keep=KEEP), H, N, N),
}


def tiles(mask):
    """(whole, edge): how many TILE x TILE tiles over the batch the mask shows whole, and how many in part."""
    seen = attention.visible(mask, torch.arange(N), torch.arange(N))[:, 0].expand(B, N, N)
    seen = seen.reshape(B, 4, TILE, 4, TILE).sum((2, 4))
    return (seen == TILE ** 2).sum().item(), ((seen > 0) & (seen < TILE ** 2)).sum().item()


@pytest.mark.parametrize("case", TILE_CASES)
def test_triton_kernel_masks_edge_tiles_and_skips_whole_ones(case):
    pytest.importorskip("triton")
    mask = TILE_CASES[case][0]
    whole, edge = tiles(mask)
    if mask.key_keep is not None:  # the keep vector cuts into tiles the rest shows whole: every tile tests it
        whole = tiles(replace(mask, key_keep=None))[0] - whole
    assert whole > 0 and edge > 0
    out_err, grad_err = errors(case, "triton", KERNEL_DEVICE, TILE_CASES)
    assert out_err <= 1e-5 and grad_err <= 1e-4


def test_reference_rules():
    mask, kv_heads, Tq, Tk = CASES["all-masked rows"]
    (q, k, v), _ = inputs(kv_heads, Tq, Tk)
    out = attention.reference(q, k, v, mask)
    assert out[0].abs().max() == 0 and out[1, :, :30].abs().max() == 0 and out[1, :, 30:].abs().min() > 0
    ok = attention.visible(CASES["window"][0], torch.arange(T), torch.arange(T))[0, 0]
    assert ok[20].nonzero().flatten().tolist() == list(range(10, 21))  # i - window < j <= i
    with pytest.raises(ValueError, match="one run of 1s"):
        Mask.from_padding(torch.tensor([[1, 0, 1]]))
    with pytest.raises(ValueError, match="needs causal"):
        Mask(window=4)
    got = Mask.from_padding(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]]))
    assert got.key_start.tolist() == [2, 0, 0] and got.key_end.tolist() == [4, 3, 0]


def test_dispatch():
    q = torch.zeros(1, 1, 5, 8)
    assert attention.choose(q, q, Mask(causal=True, window=4))[0] == "sdpa"  # CPU: SDPA, per query chunk
    right, left = (Mask.from_padding(torch.tensor(m), causal=True, window=5) for m in ([[1] * 5, [1, 1, 1, 0, 0]],
                                                                                       [[1] * 5, [0, 0, 1, 1, 1]]))
    assert attention.choose(q, q, right) == ("sdpa", Mask(causal=True))  # no mask: SDPA's flash kernel
    assert attention.choose(q, q, left)[1] is left  # left padding: the mask as given
    assert attention.choose(q, q, replace(right, window=4))[1].key_end is not None  # a binding window too
    assert not Mask(causal=True, window=5).per_query(5) and Mask(causal=True, window=4).per_query(5)
    assert not Mask(key_keep=torch.ones(1, 5, dtype=torch.bool)).per_query(5)  # the resampler: one row of keys
    with pytest.raises(ValueError, match="unknown attention path"):
        with attention.use("flash"):
            pass

# -----------------------------------------------------------------------------
# the decoder on each path


CFG = replace(phi3.PRESETS["tiny"], vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, sliding_window=8)


def padded_step(path, device="cpu", autocast=False):
    """Loss and every gradient of a training step on rows full, left-padded and right-padded, T > window; with
    `autocast`, fp32 weights under bf16 autocast (the one-GPU default: fp32 master weights)."""
    torch.manual_seed(0)
    model = phi3.Phi3(CFG).init_weights(std=0.2).to(device)
    idx = torch.randint(3, 64, (3, 24))
    mask = torch.ones(3, 24, dtype=torch.long)
    mask[1, :7], mask[2, 15:] = 0, 0
    idx, mask = idx.to(device), mask.to(device)
    with attention.use(path), torch.autocast(torch.device(device).type, torch.bfloat16, enabled=autocast):
        loss = model(idx, idx.masked_fill(mask == 0, -100), attention_mask=mask)
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


@pytest.mark.parametrize("path", ["blockwise", "sdpa", "triton"])
def test_decoder_training_step_equals_the_reference_path(path, small_tiles):
    device = KERNEL_DEVICE if path == "triton" else "cpu"
    if path == "triton":
        pytest.importorskip("triton")
    ref_loss, ref_grads = padded_step("reference", device)
    loss, grads = padded_step(path, device)
    assert (loss - ref_loss).abs() <= 1e-5
    assert max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(grads, ref_grads)) <= 1e-4


@pytest.mark.parametrize("path", ["reference", "blockwise", "sdpa", "triton"])
def test_fp32_weights_under_bf16_autocast_train_on_every_path(path, small_tiles):
    """fp32 weights give fp32 cos/sin while autocast gives bf16 q, k, v: rope must keep q and k in bf16, and
    each path must see one dtype (the kernel's backward refused fp32 q with bf16 v). Within bf16's error of
    the fp32 step; the fp32 tests above hold each path to the exact mask."""
    device = KERNEL_DEVICE if path == "triton" else "cpu"
    if path == "triton":
        pytest.importorskip("triton")
    ref_loss, ref_grads = padded_step("reference", device)
    loss, grads = padded_step(path, device, autocast=True)
    assert (loss - ref_loss).abs() <= 1e-2 and all(g.dtype == torch.float32 for g in grads)
    assert max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(grads, ref_grads)) <= 0.1  # ~0.05 seen


def test_triton_kernel_refuses_mixed_dtypes():
    pytest.importorskip("triton")
    import attention_triton
    mask, kv_heads, Tq, Tk = CASES["causal"]
    q, k, v = (t.detach() for t in inputs(kv_heads, Tq, Tk, device=KERNEL_DEVICE)[0])
    with pytest.raises(TypeError, match="must share one dtype, got torch.float32, torch.float32, torch.bfloat16"):
        attention_triton.attention(q, k, v.bfloat16(), mask, D ** -0.5)


def test_right_padded_batches_inside_the_window_train_as_plain_causal(monkeypatch):
    """Right padding, T within the window: the default choice runs SDPA with is_causal and no mask, and gives
    the masked reference's loss and gradients (real queries never reach the pad keys on their right)."""
    calls, sdpa = [], attention.F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append((kw["attn_mask"], kw["is_causal"])) or sdpa(*a, **kw))
    cfg = replace(CFG, sliding_window=32)

    def step(path):
        torch.manual_seed(0)
        model = phi3.Phi3(cfg).init_weights(std=0.2)
        idx, mask = torch.randint(3, 64, (3, 24)), torch.ones(3, 24, dtype=torch.long)
        mask[1, 15:], mask[2, 5:] = 0, 0
        with attention.use(path):
            loss = model(idx, idx.masked_fill(mask == 0, -100), attention_mask=mask)
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()]
    ref_loss, ref_grads = step("reference")
    loss, grads = step(None)
    assert calls and all(m is None and causal for m, causal in calls)
    assert (loss - ref_loss).abs() <= 1e-5
    assert max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(grads, ref_grads)) <= 1e-4


def test_padded_windowed_training_builds_no_full_mask(monkeypatch, small_tiles):
    """The 4k-token target in small: every mask the default path builds is a chunk of queries by the keys
    that chunk reaches, never (T, T)."""
    shapes, visible = [], attention.visible
    monkeypatch.setattr(attention, "visible", lambda m, qi, kj: shapes.append((len(qi), len(kj))) or visible(m, qi, kj))
    torch.manual_seed(0)
    model = phi3.Phi3(replace(CFG, num_hidden_layers=1)).init_weights()
    idx, mask = torch.randint(3, 64, (2, 64)), torch.ones(2, 64, dtype=torch.long)
    mask[1, 40:] = 0
    model(idx, idx, attention_mask=mask).backward()
    assert shapes and max(q for q, _ in shapes) <= 16 and max(k for _, k in shapes) <= 16 + 8


@pytest.mark.slow
def test_triton_kernels_compile_for_hopper():
    """Compiled for sm_90 (H100 / H200) without a GPU: what the interpreter does not check (types, layouts)."""
    pytest.importorskip("triton")
    script = """
import triton, attention_triton as at
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
ptr = dict(Q='*bf16', K='*bf16', V='*bf16', O='*bf16', DO='*bf16', DQ='*bf16', DK='*bf16', DV='*bf16',
           LSE='*fp32', DELTA='*fp32', KS='*i32', KE='*i32', KEEP='*i8', qk_scale='fp32', scale='fp32')
for kernel, (bm, bn) in ((at.forward_kernel, (128, 64)), (at.backward_dkdv_kernel, (32, 128)),
                         (at.backward_dq_kernel, (128, 32))):
    for causal, window, keep in ((True, True, False), (False, False, True)):
        c = dict(BLOCK_D=128, CAUSAL=causal, WINDOW=window, HAS_KEEP=keep, DOT='tf32', BLOCK_M=bm, BLOCK_N=bn)
        sig = {n: 'constexpr' if n in c else ptr.get(n, 'i32') for n in kernel.fn.arg_names}
        triton.compile(ASTSource(kernel.fn, sig, c), target=GPUTarget('cuda', 90, 32), options=dict(num_warps=4))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(os.path.dirname(__file__)), env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a GPU check: bf16 error as SDPA's own")
@pytest.mark.parametrize("case", ["causal", "left padding", "gqa", "cross, key padding"])
def test_triton_bf16_on_gpu_errs_as_sdpa_does(case):
    mask, kv_heads, Tq, Tk = CASES[case]
    mask = on(mask, "cuda")
    q, k, v = (t.detach() for t in inputs(kv_heads, Tq, Tk, device="cuda")[0])
    ref = attention.reference(q, k, v, mask)
    low = [t.bfloat16() for t in (q, k, v)]
    sdpa_err = (attention.sdpa(*low, mask).float() - ref).abs().max()
    assert (attention.triton(*low, mask).float() - ref).abs().max() <= 2 * sdpa_err + 1e-3
