"""
LoRA (Hu et al., arXiv 2106.09685), hand-rolled: a frozen Linear plus a trainable low-rank update.

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T,    A: (r, in) kaiming-uniform,  B: (out, r) zeros

- B starts at zero, so a freshly wrapped model computes exactly what the base model does.
- `LoRALinear` keeps the base `weight` and `bias` under their own names, so a wrapped model's state dict
  still has every original key (plus `lora_A` / `lora_B`), and loaders keep working.
- Applied in place, by module name: xGen-MM's post-training (paper section 4.3) puts rank 64 on the LLM's
  `qkv_proj`, `o_proj`, `gate_up_proj` and `down_proj`, about 2.6% of Phi-3-mini's weights.
- The adapters can be switched off (the reference policy of DPO: the same model, no second copy), merged
  into the base weights and unmerged, and saved or loaded alone as safetensors.
"""
import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r=64, alpha=128, dropout=0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the base layer's own parameters: same names
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as the paper's code
        self.scale, self.dropout, self.r = alpha / r, dropout, r
        self.enabled, self.merged = True, False

    def delta(self):
        return (self.lora_B @ self.lora_A) * self.scale  # (out, in)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.enabled and not self.merged:
            h = F.dropout(x, self.dropout, self.training) if self.dropout else x
            y = y + F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scale
        return y

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight += self.delta().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= self.delta().to(self.weight.dtype)
            self.merged = False

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale:g}"


def apply_lora(model, targets=TARGETS, r=64, alpha=128, dropout=0.0):
    """Wrap every nn.Linear whose name ends with one of `targets`, in place; returns the wrapped names."""
    if "lm_head" in targets:  # Phi3.logits reads lm_head's weight directly: an adapter there would never run
        raise ValueError("LoRA on lm_head is not supported (the output layer is applied through its weight)")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
    if not names:
        raise ValueError(f"no nn.Linear named {targets} in {type(model).__name__}")
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, LoRALinear(getattr(owner, leaf), r, alpha, dropout))
    return names


def lora_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def settings(model):
    """The apply_lora arguments that wrapped `model` (targets, r, alpha, dropout), to wrap a copy of it alike."""
    mods = lora_modules(model)
    first = mods[0][1]
    return dict(targets=tuple(sorted({n.rpartition(".")[2] for n, _ in mods})), r=first.r,
                alpha=first.scale * first.r, dropout=first.dropout)


def mark_only_lora_trainable(model):
    """Freeze everything but the adapters; returns (trainable, total) parameter counts."""
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n or n.startswith("lora_"))
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def set_enabled(model, enabled):
    for _, m in lora_modules(model):
        if m.merged and not enabled:
            raise RuntimeError("the adapters are merged into the weights: unmerge() before disabling them")
        m.enabled = enabled


@contextmanager
def disabled(model):
    """The base model inside the block (e.g. DPO's reference policy), the adapters again after it.
    Merged adapters are unmerged for the block and merged again after it."""
    merged = [m for _, m in lora_modules(model) if m.merged]
    for m in merged:
        m.unmerge()
    set_enabled(model, False)
    try:
        yield model
    finally:
        set_enabled(model, True)
        for m in merged:
            m.merge()


def merge(model):
    for _, m in lora_modules(model):
        m.merge()


def unmerge(model):
    for _, m in lora_modules(model):
        m.unmerge()


def merged_state_dict(model, state, prefix=""):
    """`state` (a state dict of the model, keys under `prefix`) with each adapter folded into its weight and
    the lora_A / lora_B entries removed: the plain model's layout, without touching the model. Each merged
    weight goes to the CPU as soon as it is made, so a GPU holds one extra weight at a time, not the LLM."""
    out = {k: v for k, v in state.items() if ".lora_" not in k}
    with torch.no_grad():
        for name, m in lora_modules(model):
            w = m.weight if m.merged else m.weight + m.delta().to(m.weight.dtype)
            out[f"{prefix}{name}.weight"] = w.cpu()
    return out


def lora_state_dict(model):
    return {n: p.detach() for n, p in model.named_parameters() if ".lora_" in n}


def save_adapters(model, path):
    save_file({k: v.contiguous() for k, v in lora_state_dict(model).items()}, str(path), metadata={"format": "pt"})


def load_adapters(model, path):
    """Load adapters saved by save_adapters into a model wrapped with the same targets and rank (strict)."""
    state, own = load_file(str(path)), dict(model.named_parameters())
    expected = set(lora_state_dict(model))
    if set(state) != expected:
        raise ValueError(f"{path}: adapters {sorted(set(state) ^ expected)[:4]} do not match the model's")
    for k, v in state.items():  # check everything before copying anything
        if own[k].shape != v.shape:
            raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, the model's is {tuple(own[k].shape)}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
