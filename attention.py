"""
Attention, once for the whole model: the decoder (phi3.py), the ViT (vit.py) and the resampler (resampler.py)
all call `attention(q, k, v, mask)` here, with q (B, H, Tq, D) and k, v (B, Hkv, Tk, D).

- The mask is a description, never a T x T tensor: `Mask(causal, window, key_start, key_end, key_keep)`.
  Query i sees key j when j <= i (causal), i - window < j (Phi-3's sliding window, docs/release.md §1),
  key_start[b] <= j < key_end[b] (left / right padding as per-row ranges) and key_keep[b, j] (the
  resampler's padded media keys). A query that sees no key gives 0, as SDPA does.
- Grouped-query heads: H query heads share Hkv = H / G key/value heads; no path copies k or v G times.
- Three paths that give the same numbers, forced with `use(...)`:
  1. `reference`: scores, mask, softmax: the math to read first; builds the (B, 1, Tq, Tk) mask.
  2. `blockwise`: FlashAttention's algorithm in plain PyTorch (attention_blockwise.py): query blocks against
     key blocks with an online softmax; only a block of scores exists at a time, and only the blocks the
     mask can reach are visited. Backward recomputes the scores per block from the saved log-sum-exp.
  3. `triton`: the same algorithm as a FlashAttention-2 Triton kernel, forward and backward
     (attention_triton.py); CUDA tensors, or CPU ones under TRITON_INTERPRET=1 (the tests).
  and `sdpa`, PyTorch's fused kernels given the smallest mask they need: none, one row of keys, or, where
  queries see different keys, one mask per chunk of 512 queries over the keys the chunk reaches.
- `choose` picks per call: SDPA with no mask for right-padded causal batches inside the window (pad keys lie
  to the right of every real query); the Triton kernel on CUDA where queries see different keys (left
  padding, a binding window); SDPA elsewhere (on a CPU the fastest: docs/benchmarks.md, Attention).
- Under autocast q, k and v are cast to autocast's dtype first, as SDPA casts them: fp32 master weights can
  hand over fp32 q, k and bf16 v, which the Triton kernel refuses.
- Cached decoding keeps its static KV cache: `Mask.q_pos` places the queries at cache slots, and that call
  goes to SDPA with a (B, 1, Tq, slots) mask (one row per decoded token).

References: FlashAttention (arXiv 2205.14135) §3.1; FlashAttention-2 (arXiv 2307.08691) Algorithms 1-2;
Online normalizer calculation for softmax (arXiv 1805.02867); Triton's fused-attention tutorial.
"""
import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

CHUNK = 512  # queries per SDPA call where queries see different keys: its mask is CHUNK x (CHUNK + window)

# -----------------------------------------------------------------------------
# the mask, described


@dataclass
class Mask:
    causal: bool = False
    window: int | None = None              # with causal: query i sees keys i - window < j <= i
    key_start: torch.Tensor | None = None  # (B,) long: first key row b may see (left padding)
    key_end: torch.Tensor | None = None    # (B,) long: one past its last key (right padding)
    key_keep: torch.Tensor | None = None   # (B, Tk) bool: False hides a key (any pattern)
    q_pos: torch.Tensor | None = None      # (Tq,) long: the queries' slots among the keys; None = 0..Tq-1
    right_only: bool = False               # from_padding: every row starts at key 0 (padding on the right only)
    sdpa_keys: tuple | None = field(default=None, init=False, repr=False, compare=False)  # sdpa()'s, per Tk

    def __post_init__(self):
        if self.window is not None and not self.causal:
            raise ValueError("a sliding window needs causal=True (query i sees keys i - window < j <= i)")

    @classmethod
    def from_padding(cls, attention_mask, causal=False, window=None):
        """(B, T) 0/1 attention mask, one run of 1s per row (left or right padding) -> key_start, key_end."""
        T = attention_mask.shape[1]
        real = attention_mask.bool()
        start = torch.where(real.any(1), real.int().argmax(1), 0)            # first 1, or 0 for an empty row
        end = torch.where(real.any(1), T - real.flip(1).int().argmax(1), 0)  # one past the last 1
        slots = torch.arange(T, device=real.device)
        bad = (real != ((slots >= start[:, None]) & (slots < end[:, None]))).any(1)
        if bad.any():
            row = int(bad.int().argmax())
            raise ValueError(f"attention_mask rows must be one run of 1s (left or right padding); row {row} is "
                             f"{attention_mask[row].tolist()}")
        return cls(causal, window, start, end, right_only=not bool(start.any()))  # read once, not per layer

    def binding_window(self, Tq):
        """True when the window hides some key: some query sits `window` or more slots after a key."""
        return self.window is not None and Tq > self.window

    def causal_suffices(self, Tq, Tk):
        """Right padding only, causal self-attention, the window not binding: a real query never reaches a pad
        key (pad keys lie to its right), so plain causal attention gives every real query its output. Pad
        queries then see pad keys too; nothing reads them (their labels are -100; decoding pads on the left)."""
        return (self.right_only and self.causal and self.key_keep is None and self.q_pos is None and Tq == Tk
                and not self.binding_window(Tq))

    def per_query(self, Tq):
        """True when different queries see different keys: then SDPA would need a (B, 1, Tq, Tk) mask."""
        padded = self.key_start is not None or self.key_end is not None or self.key_keep is not None
        return self.q_pos is not None or (self.causal and (padded or self.binding_window(Tq)))


def visible(mask, qi, kj):
    """Bool (B or 1, 1, len(qi), len(kj)): which of the keys kj (slot indices) the queries qi may see."""
    pos = qi if mask.q_pos is None else mask.q_pos[qi]
    ok = torch.ones(len(qi), len(kj), dtype=torch.bool, device=kj.device)
    if mask.causal:
        d = pos[:, None] - kj[None, :]  # (Tq, Tk): how far the key lies behind the query
        ok = (d >= 0) if mask.window is None else (d >= 0) & (d < mask.window)
    ok = ok[None, None]
    if mask.key_start is not None:
        ok = ok & (kj >= mask.key_start[:, None])[:, None, None, :]
    if mask.key_end is not None:
        ok = ok & (kj < mask.key_end[:, None])[:, None, None, :]
    if mask.key_keep is not None:
        ok = ok & mask.key_keep[:, kj][:, None, None, :]
    return ok


def key_only(mask, Tk, device):
    """The keys a row may see as a (B, 1, 1, Tk) mask (None if all): enough when no query differs."""
    if mask.key_start is None and mask.key_end is None:  # kept keys only (a decoding step, the resampler)
        return None if mask.key_keep is None else mask.key_keep[:, None, None, :]
    return visible(Mask(key_start=mask.key_start, key_end=mask.key_end, key_keep=mask.key_keep),
                   torch.zeros(1, dtype=torch.long, device=device), torch.arange(Tk, device=device))

# -----------------------------------------------------------------------------
# path 1: the reference


def reference(q, k, v, mask, scale=None):
    """softmax(q k^T * scale, over the visible keys) v, in fp32; a row with no visible key gives 0."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # (B, H, Tk, D)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    ok = visible(mask, torch.arange(q.shape[2], device=q.device), torch.arange(k.shape[2], device=q.device))
    p = s.masked_fill(~ok, float("-inf")).softmax(-1).nan_to_num(0.0)  # all -inf row: NaN -> 0
    return (p @ v.float()).to(q.dtype)

# -----------------------------------------------------------------------------
# blocks: the keys each block of queries can reach (the blockwise path's loops, SDPA's chunks)


def key_range(mask, i0, i1, Tk, bounds):
    """The keys [lo, hi) that queries i0..i1-1 can reach; bounds = (min key_start, max key_end) over rows."""
    lo, hi = bounds
    if mask.causal:
        hi = min(hi, i1)  # the last query, i1 - 1, sees up to itself
    if mask.window is not None:
        lo = max(lo, i0 - mask.window + 1)
    return lo, min(hi, Tk)


def blocks(mask, Tq, Tk, block):
    """(i0, i1, [(j0, j1), ...]): each query block with the key blocks its mask can reach."""
    bounds = (0 if mask.key_start is None else int(mask.key_start.min()),
              Tk if mask.key_end is None else int(mask.key_end.max()))
    for i0 in range(0, Tq, block):
        i1 = min(i0 + block, Tq)
        lo, hi = key_range(mask, i0, i1, Tk, bounds)
        yield i0, i1, [(j0, min(j0 + block, hi)) for j0 in range(lo, hi, block)]

# -----------------------------------------------------------------------------
# path 2: blockwise online softmax in PyTorch (attention_blockwise.py); path 3: the Triton kernel
# (attention_triton.py); and PyTorch's own SDPA


def blockwise(q, k, v, mask, scale=None, block=None):
    import attention_blockwise  # its own file, as the kernel's: the algorithm to read beside attention_triton.py
    if mask.q_pos is not None:
        raise ValueError("the blockwise path serves training and prefill; cached decoding (q_pos) goes to SDPA")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return attention_blockwise.Blockwise.apply(q, k, v, mask, scale, block or attention_blockwise.BLOCK)


def triton(q, k, v, mask, scale=None):
    import attention_triton  # imported on first use: Triton is optional, and TRITON_INTERPRET is read then
    if mask.q_pos is not None:
        raise ValueError("the Triton kernel serves training and prefill; cached decoding (q_pos) goes to SDPA")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return attention_triton.attention(q, k, v, mask, scale)


def sdpa(q, k, v, mask, scale=None, dropout_p=0.0, chunk=None):
    """F.scaled_dot_product_attention with the smallest mask it needs: none (its flash kernels), one row per
    key (B, 1, 1, Tk), or, where queries see different keys, a (B, 1, chunk, keys) mask for each chunk of
    queries over the keys that chunk can reach. Only decoding (q_pos) gets one (B, 1, Tq, slots) mask."""
    Tq, Tk = q.shape[2], k.shape[2]

    def run(q, k, v, allowed, seen, causal=False):
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p, is_causal=causal,
                                           scale=scale, enable_gqa=k.shape[1] != q.shape[1])
        return y if seen is None else y * seen  # a row with no key: 0 on every backend (some give NaN)
    if not mask.per_query(Tq):
        if mask.sdpa_keys is None or mask.sdpa_keys[0] != Tk:  # once per forward, not once per layer
            mask.sdpa_keys = (Tk, *sdpa_mask(key_only(mask, Tk, q.device)))
        return run(q, k, v, *mask.sdpa_keys[1:], mask.causal)
    if mask.q_pos is not None:
        ok = visible(mask, torch.arange(Tq, device=q.device), torch.arange(Tk, device=q.device))
        return run(q, k, v, *sdpa_mask(ok))
    out = []
    for i0, i1, keys in blocks(mask, Tq, Tk, chunk or CHUNK):
        if not keys:  # no query of the chunk sees a key (a chunk of left padding)
            out.append(q.new_zeros(*q.shape[:2], i1 - i0, v.shape[-1]))
            continue
        lo, hi = keys[0][0], keys[-1][1]
        ok = visible(mask, torch.arange(i0, i1, device=q.device), torch.arange(lo, hi, device=q.device))
        out.append(run(q[:, :, i0:i1], k[:, :, lo:hi], v[:, :, lo:hi], *sdpa_mask(ok)))
    return torch.cat(out, 2)


def sdpa_mask(ok):
    """A visibility mask `ok` (None: all) -> (what SDPA is given, the rows that see some key (B, 1, Tq, 1)): a
    row that sees no key is given every key, then zeroed, since backends differ there (some give NaN)."""
    if ok is None:
        return None, None
    seen = ok.any(-1, keepdim=True)
    return ok | ~seen, seen


def triton_ready():
    """Triton importable (the CUDA wheels ship it; a CPU install may lack it)."""
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False

# -----------------------------------------------------------------------------
# choosing a path


PATHS = {"reference": reference, "blockwise": blockwise, "triton": triton, "sdpa": sdpa}
_forced = None  # set by `use`


@contextlib.contextmanager
def use(path):
    """Run every attention call inside on one path ("reference", "blockwise", "triton", "sdpa")."""
    global _forced
    if path is not None and path not in PATHS:
        raise ValueError(f"unknown attention path {path!r}; choose one of {sorted(PATHS)}")
    saved, _forced = _forced, path
    try:
        yield
    finally:
        _forced = saved


def choose(q, k, mask, dropout_p=0.0):
    """(path, mask) for this call. A right-padded causal batch inside the window goes to SDPA as plain causal
    attention (its flash kernel; see Mask.causal_suffices). Otherwise the Triton kernel on CUDA where queries
    see different keys (left padding, a binding window), where SDPA would need a mask and so could not run its
    flash kernel; SDPA everywhere else, and for decoding and dropout. The blockwise path is never chosen (on a
    CPU SDPA per chunk was as fast or faster: docs/benchmarks.md); it is there to be read. `use` overrides the
    choice, and keeps the mask as given."""
    if mask.causal_suffices(q.shape[2], k.shape[2]):
        return "sdpa", Mask(causal=True)
    if mask.per_query(q.shape[2]) and mask.q_pos is None and dropout_p == 0 and q.is_cuda and triton_ready():
        return "triton", mask
    return "sdpa", mask


def autocast_inputs(q, k, v):
    """q, k, v in the dtype SDPA would compute in: autocast's where it is on (fp32 master weights can hand over
    fp32 q, k and bf16 v), else as given. The custom paths then see what SDPA sees."""
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        return q.to(dtype), k.to(dtype), v.to(dtype)
    return q, k, v


def attention(q, k, v, mask=None, dropout_p=0.0, scale=None):
    """q (B, H, Tq, D), k and v (B, Hkv, Tk, D) with H a multiple of Hkv -> (B, H, Tq, D); `mask` a Mask
    (None: every query sees every key), scale D^-0.5 unless given."""
    mask = Mask() if mask is None else mask
    q, k, v = autocast_inputs(q, k, v)
    path, mask = (_forced, mask) if _forced else choose(q, k, mask, dropout_p)
    if dropout_p > 0 and path != "sdpa":
        raise ValueError(f"attention dropout runs on the sdpa path only, not {path!r}")
    if path == "sdpa":
        return sdpa(q, k, v, mask, scale, dropout_p)
    return PATHS[path](q, k, v, mask, scale)
