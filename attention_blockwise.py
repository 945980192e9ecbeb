"""
attention.py's second path: FlashAttention's algorithm in plain PyTorch, forward and backward.

- Query blocks against key blocks with an online softmax (a running max m, sum l and accumulator per query
  row): only a block of scores exists at a time, and only the blocks the mask can reach are visited
  (attention.blocks).
- A query block of the G heads sharing a kv head is one (B, Hkv, G*bq, D) matrix, so every product is a plain
  batched matmul against that head's k and v: no copy of k or v per query head.
- Backward recomputes the scores per block from the saved log-sum-exp (O(T) memory), FlashAttention-2 §3.2.
- fp32 arithmetic whatever the inputs' dtype; the results are cast back.

The same algorithm as attention_triton.py's kernel, one operator at a time: the version to read first. It is
never chosen by attention.choose (SDPA was as fast or faster on a CPU: docs/benchmarks.md, Attention); force
it with `attention.use("blockwise")`. References: FlashAttention (arXiv 2205.14135) §3.1; FlashAttention-2
(arXiv 2307.08691) Algorithms 1-2; Online normalizer calculation for softmax (arXiv 1805.02867).
"""
import torch

from attention import blocks, visible

BLOCK = 256  # the tile, queries and keys (why 256: docs/benchmarks.md, Attention)


class Blockwise(torch.autograd.Function):
    """FlashAttention in PyTorch. A query block of the G heads sharing a kv head is one (B, Hkv, G*bq, D)
    matrix, so every product is a plain batched matmul against that head's k and v (B, Hkv, bk, D)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, block):
        B, Hkv = k.shape[:2]
        q5 = q.unflatten(1, (Hkv, -1))  # (B, Hkv, G, Tq, D)
        o = torch.zeros_like(q5)
        lse = torch.full(q5.shape[:-1], float("inf"), device=q.device)  # +inf: a row that sees no key
        for i0, i1, keys in blocks(mask, q.shape[2], k.shape[2], block):
            qb = q5[..., i0:i1, :].flatten(2, 3).float() * scale  # (B, Hkv, G*bq, D)
            m = torch.full(qb.shape[:-1], float("-inf"), device=q.device)  # running max
            l = torch.zeros_like(m)                                          # running sum of exp(s - m)
            acc = torch.zeros_like(qb)                                       # running P @ V
            for j0, j1 in keys:
                s = scores(qb, k, mask, i0, i1, j0, j1)  # (B, Hkv, G*bq, bk), -inf where hidden
                m_new = torch.maximum(m, s.amax(-1))
                m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)  # a row with no key yet: exp(-inf) = 0
                p = s.sub_(m_safe[..., None]).exp_()
                alpha = torch.exp(m - m_safe)  # rescales what was summed under the old max
                l = l * alpha + p.sum(-1)
                acc = acc.mul_(alpha[..., None]).add_(p @ v[:, :, j0:j1].float())
                m = m_new
            seen = l > 0
            o[..., i0:i1, :] = (acc / torch.where(seen, l, 1.0)[..., None]).unflatten(2, (-1, i1 - i0))
            lse[..., i0:i1] = torch.where(seen, m + l.log(), float("inf")).unflatten(2, (-1, i1 - i0))
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.mask, ctx.scale, ctx.block = mask, scale, block
        return o.flatten(1, 2)

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        mask, scale = ctx.mask, ctx.scale
        q5, do = q.unflatten(1, o.shape[1:3]), do.unflatten(1, o.shape[1:3])
        delta = (do.float() * o.float()).sum(-1)  # rowsum(dO * O) = rowsum(P * dP): the softmax's Jacobian term
        dq = torch.zeros(q5.shape, device=q.device)
        dk, dv = torch.zeros(k.shape, device=q.device), torch.zeros(v.shape, device=q.device)
        for i0, i1, keys in blocks(mask, q.shape[2], k.shape[2], ctx.block):
            rows = lambda t: t[..., i0:i1, :].flatten(2, 3).float()  # noqa: E731  (B, Hkv, G*bq, D)
            qb, dob = rows(q5), rows(do)
            qs = qb * scale
            lse_b, delta_b = lse[..., i0:i1].flatten(2, 3)[..., None], delta[..., i0:i1].flatten(2, 3)[..., None]
            dqb = torch.zeros_like(qb)
            for j0, j1 in keys:
                kb, vb = k[:, :, j0:j1].float(), v[:, :, j0:j1].float()
                p = scores(qs, k, mask, i0, i1, j0, j1).sub_(lse_b).exp_()  # P, recomputed
                dv[:, :, j0:j1] += p.transpose(-2, -1) @ dob  # sums over the G heads: they share this v
                ds = p * (dob @ vb.transpose(-2, -1) - delta_b)  # dS = P * (dP - delta)
                dqb += ds @ kb * scale
                dk[:, :, j0:j1] += ds.transpose(-2, -1) @ qb * scale
            dq[..., i0:i1, :] = dqb.unflatten(2, (-1, i1 - i0))
        return dq.flatten(1, 2).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def scores(qb, k, mask, i0, i1, j0, j1):
    """Scores of the query rows qb (already scaled) against keys j0:j1, -inf where hidden: (B, Hkv, G*bq, bk)."""
    s = qb @ k[:, :, j0:j1].float().transpose(-2, -1)
    if all_visible(mask, i0, i1, j0, j1):  # most blocks: no mask to build
        return s
    ok = visible(mask, torch.arange(i0, i1, device=qb.device), torch.arange(j0, j1, device=qb.device))
    s5 = s.view(*s.shape[:2], -1, i1 - i0, j1 - j0)  # (B, Hkv, G, bq, bk): the mask is the same for all G
    s5.masked_fill_(~ok[:, :, None], float("-inf"))
    return s


def all_visible(mask, i0, i1, j0, j1):
    """Every query i0..i1-1 sees every key j0..j1-1 (checked on the block's corners and the row ranges)."""
    if mask.key_keep is not None or mask.q_pos is not None:
        return False
    if mask.causal and j1 - 1 > i0 or mask.window is not None and i1 - 1 - j0 >= mask.window:
        return False
    return ((mask.key_start is None or j0 >= int(mask.key_start.max()))
            and (mask.key_end is None or j1 <= int(mask.key_end.min())))
