"""
Fused paths that are not the lesson of a model file, each tested against the plain math it replaces.

- `linear_cross_entropy`: the language-model loss, cross-entropy(x @ W.T + b, targets), computed chunk
  by chunk over the tokens without ever materialising the (tokens, vocab) logits. The gradients for x, W
  and b are computed in the same pass (softmax - one-hot is the gradient of the summed loss with respect
  to the logits) and returned by backward, so no logit recomputation is needed. With Phi-3's 32k
  vocabulary the full logits of one 8x4096 batch are 4 GB in fp32; a chunk is a few MB, and on CPU the
  many page faults of those huge short-lived buffers disappear too.
- Under autocast (bf16 on a GPU) the fp32 weight is cast once per call, not once per chunk (autocast's
  weight cache does not apply to the slice of the head the loss reads), the chunks are a few thousand rows
  (a GPU wants large products), and the weight gradient of each chunk is a bf16 product on the tensor
  cores, summed in fp32.
"""
import torch
import torch.nn.functional as F


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, targets, chunk, need):
        """Summed loss; x (N, C), weight (V, C), bias (V,) or None, targets (N,) all != -100.

        `need` = which of x, weight, bias want a gradient (grad mode included: inside forward,
        ctx.needs_input_grad would ignore a surrounding torch.no_grad()).
        """
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if need[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need[1] else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need[2] else None
        for s in range(0, x.shape[0], chunk):
            xs, ts = x[s:s + chunk], targets[s:s + chunk]
            logits = F.linear(xs, weight, bias).float()  # (n, V), in fp32 as the plain loss computes it
            lse = logits.logsumexp(-1)
            rows = torch.arange(len(ts), device=x.device)
            loss += (lse - logits[rows, ts]).sum()
            if any(need):
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                g[rows, ts] -= 1.0  # (n, V) d(summed loss)/d(logits), fp32
                if grad_x is not None:
                    grad_x[s:s + chunk] = g.to(x.dtype) @ weight
                if grad_w is not None and x.is_cuda and x.dtype != torch.float32:
                    grad_w.add_(g.to(x.dtype).t() @ xs)  # the product on the tensor cores, the sum in fp32
                elif grad_w is not None:
                    grad_w.addmm_(g.t(), xs.float())  # fp32 products and sum
                if grad_b is not None:
                    grad_b += g.sum(0)
        ctx.save_for_backward(grad_x, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (None if grad_x is None else grad_x * grad_loss.to(grad_x.dtype),
                None if grad_w is None else (grad_w * grad_loss).to(w_dtype),
                None if grad_b is None else (grad_b * grad_loss).to(b_dtype), None, None, None)


def linear_cross_entropy(x, weight, bias, targets, reduction="mean", chunk=None):
    """cross_entropy(F.linear(x, weight, bias).float(), targets, ignore_index=-100) without the logits.

    x (..., C) and targets (...) are flattened; reduction is "mean" (over targets != -100) or "sum".
    `chunk` tokens at a time; on a CPU the default (256 to 1024 rows, ~2M logits) was the fastest measured
    at vocabularies of 4k and 32k: smaller chunks starve the matmuls, larger ones bring the page faults back.
    On a GPU, ~4k rows at a 32k vocabulary (0.5 GB of fp32 logits per chunk).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    x, targets = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    keep = targets != -100  # rows without a target cost nothing (most rows of an SFT batch)
    x, targets = x[keep], targets[keep]
    if chunk is None:  # rows per chunk: ~2M logits on a CPU (faster than more or fewer), ~128M on a GPU
        chunk = max(1024, 2**27 // weight.shape[0]) if x.is_cuda else min(1024, max(256, 2**21 // weight.shape[0]))
    device = x.device.type
    if torch.is_autocast_enabled(device):  # cast once, then no autocast inside: it would cast every chunk again
        dtype = torch.get_autocast_dtype(device)
        x, weight, bias = (None if t is None else t.to(dtype) for t in (x, weight, bias))
    grad = torch.is_grad_enabled()
    need = tuple(grad and t is not None and t.requires_grad for t in (x, weight, bias))
    with torch.autocast(device, enabled=False):
        total = _LinearCrossEntropy.apply(x, weight, bias, targets, chunk, need)
    return total if reduction == "sum" else total / keep.sum()
