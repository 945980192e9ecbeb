"""
attention.py's third path: FlashAttention-2 as a Triton kernel, forward and backward.

- Forward: one program per (block of BLOCK_M queries, batch row, head). It keeps its queries in registers
  and walks the key blocks its mask can reach, keeping a running max m, sum l and accumulator acc (the
  online softmax); it writes O and the log-sum-exp of each query row. Scores live in registers only.
- Backward (FlashAttention-2 §3.2): delta = rowsum(dO * O) in PyTorch, then two kernels that recompute
  P = exp(S - lse) tile by tile: one per key block accumulates dK and dV (over the G query heads that share
  the key/value head, so no atomics), one per query block accumulates dQ.
- The mask is never stored: a tile tests causal (j <= i), the window (i - window < j), the row's key range
  [key_start, key_end) and, if given, the key-keep vector. Loop bounds skip the tiles that causality, the
  window or the range hide entirely, and split the rest as FlashAttention-2 does: the tiles the mask shows
  whole run without it, only those on its edges (the diagonal, the window's edge, the range's ends, every
  tile under a key-keep vector) test it.
- exp2 with log2(e) folded into the scale; the log-sum-exp is kept in that base. A row that sees no key
  gets O = 0 and lse = +inf, so its P is 0 in backward.
- fp32 inputs multiply in IEEE fp32 (exact, for the tests); bf16/fp16 use the tensor cores.

Runs on CUDA tensors, or on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1 set before triton is
first imported), which is how the tests check it. Reference: Triton's fused-attention tutorial.
"""
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
WIDEN_BF16 = tl.constexpr(INTERPRET)  # see `dot`


def configs(*tiles):
    """Tile sizes to try on a GPU, (BLOCK_M, BLOCK_N, warps) each, autotuned per head size and mask kind: two
    per kernel, as each one tried is a compile per key (a cold check would spend minutes on more); one small
    tile in the interpreter."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16})]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=3) for m, n, w in tiles]


KEY = ["BLOCK_D", "CAUSAL", "WINDOW", "HAS_KEEP"]

# -----------------------------------------------------------------------------
# the pieces every kernel shares


@triton.jit
def visible(i, j, kstart, kend, keep_ptr, window, Tq,
            CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KEEP: tl.constexpr):
    """(len(i), len(j)) bool tile: may query i see key j. attention.visible, tile by tile."""
    ok = (i[:, None] < Tq) & (j[None, :] >= kstart) & (j[None, :] < kend)
    if CAUSAL:
        ok = ok & (j[None, :] <= i[:, None])
    if WINDOW:
        ok = ok & (j[None, :] > i[:, None] - window)
    if HAS_KEEP:
        keep = tl.load(keep_ptr + j, mask=j < kend, other=0)
        ok = ok & (keep[None, :] != 0)
    return ok


@triton.jit
def whole(lo, hi, first, end, BLOCK: tl.constexpr):
    """(a, b), lo <= a <= b <= hi: the tiles of `range(lo, hi, BLOCK)` (lo a multiple of BLOCK) that lie inside
    [first, end), where the mask shows every pair. Those run without it and only the tiles before a and from b
    on test it, as FlashAttention-2 (§3.1.1) masks only the blocks on the causal diagonal: a block of queries
    meets one of those and up to T / BLOCK - 1 whole ones."""
    a = tl.minimum(tl.maximum((first + BLOCK - 1) // BLOCK * BLOCK, lo), hi)
    return a, tl.maximum(tl.minimum(end, hi) // BLOCK * BLOCK, a)


@triton.jit
def key_blocks(m0, kstart, kend, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KEEP: tl.constexpr):
    """(lo, a, b, hi): the keys lo .. hi that queries m0 .. m0 + BLOCK_M - 1 can reach, lo a multiple of BLOCK_N,
    and the tiles a .. b that every one of them sees whole."""
    lo, hi = kstart, kend
    first, end = kstart, kend
    if CAUSAL:
        hi = tl.minimum(hi, m0 + BLOCK_M)
        end = tl.minimum(end, m0 + 1)  # keys at or before the first query
    if WINDOW:
        lo = tl.maximum(lo, m0 - window + 1)
        first = tl.maximum(first, m0 + BLOCK_M - window)  # keys inside the last query's window
    if HAS_KEEP:
        end = first  # the key-keep vector may hide any key: every tile tests it
    lo = (lo // BLOCK_N) * BLOCK_N
    a, b = whole(lo, hi, first, end, BLOCK_N)
    return lo, a, b, hi


@triton.jit
def query_blocks(n0, kstart, kend, window, Tq, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KEEP: tl.constexpr):
    """(lo, a, b, hi): the queries lo .. hi that can see keys n0 .. n0 + BLOCK_N - 1, and the tiles a .. b that
    see all of them."""
    lo, hi = 0, Tq
    first, end = 0, Tq
    if CAUSAL:
        lo = (n0 // BLOCK_M) * BLOCK_M
        first = n0 + BLOCK_N - 1  # queries at or after the last key
    if WINDOW:
        hi = tl.minimum(hi, n0 + BLOCK_N - 1 + window)
        end = n0 + window  # queries whose window holds the first key
    hi = tl.where((n0 >= kend) | (n0 + BLOCK_N <= kstart), lo, hi)  # a block of padding: nothing to do
    if HAS_KEEP:
        end = first  # every tile tests the key-keep vector
    end = tl.where((kstart <= n0) & (n0 + BLOCK_N <= kend), end, first)  # keys across the row's range edge: too
    a, b = whole(lo, hi, first, end, BLOCK_M)
    return lo, a, b, hi


@triton.jit
def dot(a, b, DOT: tl.constexpr):
    """tl.dot of two tiles of one dtype. Triton's interpreter multiplies bf16 tiles as their raw 16-bit integers,
    so there they are widened to fp32 first; a GPU multiplies them on its tensor cores as they are."""
    tl.static_assert(a.dtype == b.dtype, "attention_triton: dot operands must share one dtype")
    if WIDEN_BF16 and a.dtype == tl.bfloat16:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT)


@triton.jit
def load_tile(ptr, rows, n_rows, stride, cols, D):  # int64 row offsets: a long batch passes 2^31 elements
    return tl.load(ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :],
                   mask=(rows[:, None] < n_rows) & (cols[None, :] < D), other=0.0)


@triton.jit
def store_tile(ptr, x, rows, n_rows, stride, cols, D):
    tl.store(ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :], x,
             mask=(rows[:, None] < n_rows) & (cols[None, :] < D))

# -----------------------------------------------------------------------------
# forward


@triton.autotune(configs((128, 64, 4), (128, 128, 8)), key=KEY)
@triton.jit
def forward_kernel(Q, K, V, O, LSE, KS, KE, KEEP, qk_scale, window, sq_b, sq_h, sq_t, sk_b, sk_h, sk_t,
                   sv_b, sv_h, sv_t, H, G, Tq, Tk, D, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                   WINDOW: tl.constexpr, HAS_KEEP: tl.constexpr, DOT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64 offsets, as load_tile's
    b, h = bh // H, bh % H
    hk = h // G  # the key/value head this query head reads
    i = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    q = load_tile(Q + b * sq_b + h * sq_h, i, Tq, sq_t, d, D)  # (BLOCK_M, BLOCK_D)
    kstart, kend = tl.load(KS + b), tl.load(KE + b)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (base 2)
    l = tl.zeros([BLOCK_M], tl.float32)                 # running sum of exp2(s - m)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)      # running P @ V
    edges = key_blocks(pid * BLOCK_M, kstart, kend, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW, HAS_KEEP)
    for part in tl.static_range(3):  # edge tiles (masked), whole tiles (no mask), edge tiles (masked)
        for n0 in range(edges[part], edges[part + 1], BLOCK_N):
            j = n0 + tl.arange(0, BLOCK_N)
            k = load_tile(K + b * sk_b + hk * sk_h, j, Tk, sk_t, d, D)  # (BLOCK_N, BLOCK_D)
            v = load_tile(V + b * sv_b + hk * sv_h, j, Tk, sv_t, d, D)
            s = dot(q, tl.trans(k), DOT) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
            if part != 1:
                ok = visible(i, j, kstart, kend, KEEP + b * Tk, window, Tq, CAUSAL, WINDOW, HAS_KEEP)
                s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: keep exp2 finite
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m - m_safe)  # rescales what was summed under the old max
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT)
            m = m_new
    seen = l > 0
    o = acc / tl.where(seen, l, 1.0)[:, None]
    store_tile(O + bh * Tq * D, o.to(O.dtype.element_ty), i, Tq, D, d, D)
    tl.store(LSE + bh * Tq + i, tl.where(seen, m + tl.math.log2(tl.where(seen, l, 1.0)), float("inf")), mask=i < Tq)

# -----------------------------------------------------------------------------
# backward


@triton.autotune(configs((32, 128, 4), (64, 64, 4)), key=KEY)
@triton.jit
def backward_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, KS, KE, KEEP, qk_scale, scale, window,
                         sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, H, G, Tq, Tk, D,
                         BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KEEP: tl.constexpr,
                         DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid, bhk = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, hk = bhk // (H // G), bhk % (H // G)
    n0 = pid * BLOCK_N
    j = n0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    k = load_tile(K + b * sk_b + hk * sk_h, j, Tk, sk_t, d, D)  # (BLOCK_N, BLOCK_D)
    v = load_tile(V + b * sv_b + hk * sv_h, j, Tk, sv_t, d, D)
    kstart, kend = tl.load(KS + b), tl.load(KE + b)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    edges = query_blocks(n0, kstart, kend, window, Tq, BLOCK_M, BLOCK_N, CAUSAL, WINDOW, HAS_KEEP)
    for g in range(0, G):  # every query head that reads this key/value head
        h = hk * G + g
        for part in tl.static_range(3):  # edge tiles (masked), whole tiles (no mask), edge tiles (masked)
            for m0 in range(edges[part], edges[part + 1], BLOCK_M):
                i = m0 + tl.arange(0, BLOCK_M)
                q = load_tile(Q + b * sq_b + h * sq_h, i, Tq, sq_t, d, D)  # (BLOCK_M, BLOCK_D)
                do = load_tile(DO + (b * H + h) * Tq * D, i, Tq, D, d, D)
                lse = tl.load(LSE + (b * H + h) * Tq + i, mask=i < Tq, other=float("inf"))
                delta = tl.load(DELTA + (b * H + h) * Tq + i, mask=i < Tq, other=0.0)
                s = dot(q, tl.trans(k), DOT) * qk_scale
                p = tl.math.exp2(s - lse[:, None])  # P, recomputed: (BLOCK_M, BLOCK_N)
                if part != 1:
                    p = tl.where(visible(i, j, kstart, kend, KEEP + b * Tk, window, Tq, CAUSAL, WINDOW, HAS_KEEP),
                                 p, 0.0)
                dv += dot(tl.trans(p).to(do.dtype), do, DOT)
                dp = dot(do, tl.trans(v), DOT)
                ds = p * (dp - delta[:, None])  # dS = P * (dP - rowsum(dO * O))
                dk += dot(tl.trans(ds).to(q.dtype), q, DOT)
    store_tile(DK + bhk * Tk * D, (dk * scale).to(DK.dtype.element_ty), j, Tk, D, d, D)
    store_tile(DV + bhk * Tk * D, dv.to(DV.dtype.element_ty), j, Tk, D, d, D)


@triton.autotune(configs((128, 32, 4), (64, 64, 4)), key=KEY)
@triton.jit
def backward_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, KS, KE, KEEP, qk_scale, scale, window,
                       sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, H, G, Tq, Tk, D,
                       BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KEEP: tl.constexpr,
                       DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64 offsets, as load_tile's
    b, h = bh // H, bh % H
    hk = h // G
    i = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    q = load_tile(Q + b * sq_b + h * sq_h, i, Tq, sq_t, d, D)
    do = load_tile(DO + bh * Tq * D, i, Tq, D, d, D)
    lse = tl.load(LSE + bh * Tq + i, mask=i < Tq, other=float("inf"))
    delta = tl.load(DELTA + bh * Tq + i, mask=i < Tq, other=0.0)
    kstart, kend = tl.load(KS + b), tl.load(KE + b)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    edges = key_blocks(pid * BLOCK_M, kstart, kend, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW, HAS_KEEP)
    for part in tl.static_range(3):  # edge tiles (masked), whole tiles (no mask), edge tiles (masked)
        for n0 in range(edges[part], edges[part + 1], BLOCK_N):
            j = n0 + tl.arange(0, BLOCK_N)
            k = load_tile(K + b * sk_b + hk * sk_h, j, Tk, sk_t, d, D)
            v = load_tile(V + b * sv_b + hk * sv_h, j, Tk, sv_t, d, D)
            s = dot(q, tl.trans(k), DOT) * qk_scale
            p = tl.math.exp2(s - lse[:, None])
            if part != 1:
                p = tl.where(visible(i, j, kstart, kend, KEEP + b * Tk, window, Tq, CAUSAL, WINDOW, HAS_KEEP), p, 0.0)
            dp = dot(do, tl.trans(v), DOT)
            ds = p * (dp - delta[:, None])
            dq += dot(ds.to(k.dtype), k, DOT)
    store_tile(DQ + bh * Tq * D, (dq * scale).to(DQ.dtype.element_ty), i, Tq, D, d, D)

# -----------------------------------------------------------------------------
# the autograd function


def last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def strides(x):  # (batch, head, token) strides; the feature stride is 1
    return x.stride(0), x.stride(1), x.stride(2)


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        q, k, v = map(last_dim_contiguous, (q, k, v))
        B, H, Tq, D = q.shape
        Tk = k.shape[2]
        ks = mask.key_start if mask.key_start is not None else torch.zeros(B, device=q.device)
        ke = mask.key_end if mask.key_end is not None else torch.full((B,), Tk, device=q.device)
        ks, ke = ks.to(torch.int32).contiguous(), ke.to(torch.int32).contiguous()
        keep = (mask.key_keep if mask.key_keep is not None else ks).to(torch.int8).contiguous()
        o = torch.empty(B, H, Tq, D, device=q.device, dtype=q.dtype)
        lse = torch.empty(B, H, Tq, device=q.device, dtype=torch.float32)
        flags = dict(BLOCK_D=max(16, triton.next_power_of_2(D)), CAUSAL=mask.causal, WINDOW=mask.window is not None,
                     HAS_KEEP=mask.key_keep is not None, DOT="ieee" if q.dtype == torch.float32 else "tf32")
        window = mask.window or 0
        grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * H)  # noqa: E731
        forward_kernel[grid](q, k, v, o, lse, ks, ke, keep, scale * LOG2E, window, *strides(q), *strides(k),
                             *strides(v), H, H // k.shape[1], Tq, Tk, D, **flags)
        ctx.save_for_backward(q, k, v, o, lse, ks, ke, keep)
        ctx.scale, ctx.window, ctx.flags = scale, window, flags
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, ks, ke, keep = ctx.saved_tensors
        B, H, Tq, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        do = do.to(o.dtype).contiguous()
        delta = (do.float() * o.float()).sum(-1)  # (B, H, Tq): rowsum(dO * O)
        dq = torch.empty(B, H, Tq, D, device=q.device, dtype=q.dtype)
        dk = torch.empty(B, Hkv, Tk, D, device=q.device, dtype=k.dtype)
        dv = torch.empty(B, Hkv, Tk, D, device=q.device, dtype=v.dtype)
        common = (ctx.scale * LOG2E, ctx.scale, ctx.window, *strides(q), *strides(k), *strides(v), H, H // Hkv,
                  Tq, Tk, D)
        grid = lambda meta: (triton.cdiv(Tk, meta["BLOCK_N"]), B * Hkv)  # noqa: E731
        backward_dkdv_kernel[grid](q, k, v, do, lse, delta, dk, dv, ks, ke, keep, *common, **ctx.flags)
        grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * H)  # noqa: E731
        backward_dq_kernel[grid](q, k, v, do, lse, delta, dq, ks, ke, keep, *common, **ctx.flags)
        return dq, dk, dv, None, None


def attention(q, k, v, mask, scale):
    """q (B, H, Tq, D), k and v (B, Hkv, Tk, D) -> (B, H, Tq, D); `mask` an attention.Mask without q_pos."""
    if q.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("the Triton kernel runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1 set "
                           "before triton is imported")
    if not q.dtype == k.dtype == v.dtype:  # tl.dot refuses mixed operands, deep inside the backward otherwise
        raise TypeError(f"attention_triton: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; "
                        "cast them (attention.attention does under autocast)")
    return FlashAttention.apply(q, k, v, mask, scale)
