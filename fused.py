"""
Fused paths that are not the lesson of a model file, each tested against the plain math it replaces.

- `linear_cross_entropy`: the language-model loss, cross-entropy(x @ W.T + b, targets), computed chunk
  by chunk over the tokens without ever materialising the (tokens, vocab) logits. The gradients for x, W
  and b are computed in the same pass (softmax - one-hot is the gradient of the summed loss with respect
  to the logits) and returned by backward, so no logit recomputation is needed. With Phi-3's 32k
  vocabulary the full logits of one 8x4096 batch are 4 GB in fp32; a chunk is a few MB, and on CPU the
  many page faults of those huge short-lived buffers disappear too.
"""
import torch
import torch.nn.functional as F


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, targets, chunk):
        """Summed loss over the targets != -100; x (N, C), weight (V, C), bias (V,) or None, targets (N,)."""
        need_grad = any(ctx.needs_input_grad[:3])
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if need_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_grad and bias is not None else None
        for s in range(0, x.shape[0], chunk):
            xs, ts = x[s:s + chunk], targets[s:s + chunk]
            logits = F.linear(xs, weight, bias).float()  # (n, V), in fp32 as the plain loss computes it
            lse = logits.logsumexp(-1)
            valid = ts != -100
            rows = torch.arange(len(ts), device=x.device)[valid]
            loss += (lse[valid] - logits[rows, ts[valid]]).sum()
            if need_grad:
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                g[rows, ts[valid]] -= 1.0
                g = (g * valid[:, None]).to(x.dtype)  # (n, V) d(summed loss)/d(logits)
                grad_x[s:s + chunk] = g @ weight
                grad_w.add_(g.t() @ xs)  # accumulated in fp32 across chunks
                if grad_b is not None:
                    grad_b += g.float().sum(0)
        ctx.save_for_backward(grad_x, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (grad_x * grad_loss.to(grad_x.dtype), (grad_w * grad_loss).to(w_dtype),
                None if grad_b is None else (grad_b * grad_loss).to(b_dtype), None, None)


def linear_cross_entropy(x, weight, bias, targets, reduction="mean", chunk=None):
    """cross_entropy(F.linear(x, weight, bias).float(), targets, ignore_index=-100) without the logits.

    x (..., C) and targets (...) are flattened; reduction is "mean" (over targets != -100) or "sum".
    `chunk` tokens at a time; the default (256 to 1024 rows, ~2M logits) was the fastest measured on CPU
    at vocabularies of 4k and 32k: smaller chunks starve the matmuls, larger ones bring the page faults back.
    """
    x, targets = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    chunk = chunk or min(1024, max(256, 2**21 // weight.shape[0]))
    total = _LinearCrossEntropy.apply(x, weight, bias, targets, chunk)
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return total / (targets != -100).sum()
