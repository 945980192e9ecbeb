"""
The Perceiver Resampler ("vision token sampler"): xGen-MM's bridge from ViT features to LLM tokens.

A fixed set of learned latent vectors cross-attends to one group of image features, so any number of
patch features (729 per 384x384 view, some of them padding) comes out as the same 128 tokens, projected to
the LLM width. What is specific to this resampler:
- Keys and values are the media features AND the latents themselves (`to_kv(cat(X, L))`), queries the latents.
- Masked media keys (anyres padding) are hidden from every latent; latent keys are always visible, so even a
  fully masked group gives a finite output.
- Pre-LayerNorm residual layers (attention, then feed-forward), all Linear layers without bias, exact (erf)
  GELU and PyTorch's default LayerNorm eps 1e-5 -- unlike SigLIP's tanh-GELU and eps 1e-6.
- A final LayerNorm, then `projection` (with bias) from the ViT width 1152 to the LLM width 3072.
- The official attention subtracts the row max before its softmax; that is what softmax does anyway, so
  attention.py's fused attention with a key-keep vector (no per-query mask) computes the same thing.
- Initialization is the constructor's: latents ~ N(0, 1) as in the official code, PyTorch defaults for
  Linear and LayerNorm. A fresh `PerceiverResampler(config)` is ready for pretraining.

References: Flamingo (arXiv 2204.14198) section 2.1 and its OpenFlamingo `helpers.py`; xGen-MM / BLIP-3
(arXiv 2408.08872) and its code in salesforce/LAVIS branch `xgen-mm` (`vlm.py`, `PerceiverResampler`).
"""
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import weights
from attention import Mask, attention


@dataclass
class ResamplerConfig:
    dim: int = 1152  # input width = the ViT width (vis_feature_dim)
    dim_inner: int = 3072  # output width = the LLM width (lang_embedding_dim)
    num_latents: int = 128  # tokens per group (num_vis_tokens)
    depth: int = 6  # the official constructor defaults from here on: not in the released config.json
    heads: int = 16
    dim_head: int = 96
    ff_mult: int = 4
    instruction_dim: int = 0  # > 0: instruction-aware (an ablation, not the release): the LLM embedding width

    @classmethod
    def from_preset(cls, name):
        if name not in PRESETS:
            raise ValueError(f"unknown resampler preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]

    @classmethod
    def from_hf(cls, d):
        """An xGen-MM `vision_tokenizer_config` dict, plus this project's optional depth/heads/dim_head/ff_mult."""
        names = dict(dim="vis_feature_dim", dim_inner="lang_embedding_dim", num_latents="num_vis_tokens")
        return cls(**{f.name: d.get(names.get(f.name, f.name), f.default) for f in fields(cls)})

    def to_hf(self):
        """The inverse of from_hf: a `vision_tokenizer_config` dict, constructor fields included."""
        d = {"model_type": "xgenmm_vision_tokenizer", "vis_feature_dim": self.dim,
             "lang_embedding_dim": self.dim_inner, "num_vis_tokens": self.num_latents,
             "depth": self.depth, "heads": self.heads, "dim_head": self.dim_head, "ff_mult": self.ff_mult}
        return d | ({"instruction_dim": self.instruction_dim} if self.instruction_dim else {})


PRESETS = {
    "xgenmm": ResamplerConfig(),
    "small": ResamplerConfig(dim=384, dim_inner=768, num_latents=32, depth=2, heads=6, dim_head=64),
    "tiny": ResamplerConfig(dim=192, dim_inner=256, num_latents=16, depth=2, heads=4, dim_head=32),
}


# -----------------------------------------------------------------------------
# model: attention -> feed-forward -> resampler

class PerceiverAttention(nn.Module):
    """Latents attend to [media; latents]. No biases anywhere (official PerceiverAttention)."""

    def __init__(self, config):
        super().__init__()
        c, inner = config, config.heads * config.dim_head
        self.heads = c.heads
        self.norm_media = nn.LayerNorm(c.dim)
        self.norm_latents = nn.LayerNorm(c.dim)
        self.to_q = nn.Linear(c.dim, inner, bias=False)
        self.to_kv = nn.Linear(c.dim, 2 * inner, bias=False)  # [k | v] along the output
        self.to_out = nn.Linear(inner, c.dim, bias=False)

    def forward(self, x, latents, keep=None):  # x (G, N, D), latents (G, L, D), keep (G, N+L) bool
        G, L, _ = latents.shape
        x, latents = self.norm_media(x), self.norm_latents(latents)
        q = self.to_q(latents).view(G, L, self.heads, -1).transpose(1, 2)  # (G, H, L, Dh)
        kv = self.to_kv(torch.cat((x, latents), dim=1))  # (G, N+L, 2*H*Dh)
        k, v = kv.view(G, kv.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # 2 x (G, H, N+L, Dh)
        y = attention(q, k, v, Mask(key_keep=keep))  # (G, H, L, Dh), scale Dh^-0.5
        return self.to_out(y.transpose(1, 2).reshape(G, L, -1))


class FeedForward(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm = nn.LayerNorm(config.dim)
        self.fc1 = nn.Linear(config.dim, config.dim * config.ff_mult, bias=False)
        self.fc2 = nn.Linear(config.dim * config.ff_mult, config.dim, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.norm(x))))  # exact erf GELU (nn.GELU() in the official code)


class ResamplerLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn = PerceiverAttention(config)
        self.ff = FeedForward(config)

    def forward(self, x, latents, keep):
        latents = latents + self.attn(x, latents, keep)
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """Groups of media features (G, N, dim) -> (G, num_latents, dim_inner), one group resampled independently."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.latents = nn.Parameter(torch.randn(config.num_latents, config.dim))  # official init: N(0, 1)
        self.layers = nn.ModuleList(ResamplerLayer(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)
        self.projection = nn.Linear(config.dim, config.dim_inner)  # the only bias in the resampler
        if config.instruction_dim:  # the instruction-aware variant (not in the release): see forward
            self.instruction = nn.Linear(config.instruction_dim, config.dim, bias=False)

    def forward(self, x, mask=None, text=None, text_mask=None):
        """x (G, N, dim), mask (G, N) True = real feature, False = padding -> (G, num_latents, dim_inner).

        Instruction-aware (config.instruction_dim > 0, the ablation of paper section 7 after InstructBLIP):
        `text` (G, T, instruction_dim), the embeddings of the instruction that goes with each group, is
        projected to the ViT width and joins the media, so the latents can pick what the question asks for.
        """
        if text is not None:
            t = self.instruction(text.to(x.dtype))
            real = lambda m, n: m if m is not None else x.new_ones(x.shape[0], n, dtype=torch.bool)  # noqa: E731
            mask = torch.cat((real(mask, x.shape[1]), real(text_mask, t.shape[1])), dim=1)
            x = torch.cat((x, t), dim=1)
        G = x.shape[0]
        keep = None
        if mask is not None:  # latent keys are always visible, so even an all-padding group has keys
            keep = torch.cat((mask.bool(), mask.new_ones(G, self.config.num_latents, dtype=torch.bool)), dim=1)
        latents = self.latents.expand(G, -1, -1)  # (G, L, dim)
        for layer in self.layers:
            latents = layer(x, latents, keep)
        return self.projection(self.norm(latents))  # (G, L, dim_inner)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, prefix=""):
        """A local directory: config.json + safetensors with the official key names under `prefix`.

        config.json is either an xGen-MM config (its `vision_tokenizer_config` is read; pass
        prefix="vlm.vision_tokenizer." for the released checkpoint) or a dict of ResamplerConfig fields.
        Only keys under `prefix` are checked, so the other components of an xGen-MM checkpoint are ignored.
        """
        d = weights.read_config(path)
        if "vision_tokenizer_config" in d:
            config = ResamplerConfig.from_hf(d["vision_tokenizer_config"])
        else:
            unknown = sorted(set(d) - {f.name for f in fields(ResamplerConfig)})
            if unknown:
                raise weights.CheckpointError(f"{path}/config.json: neither an xGen-MM config (no "
                                              f"vision_tokenizer_config) nor ResamplerConfig fields: {unknown}")
            config = ResamplerConfig(**d)
        ckpt = weights.Checkpoint(path)
        if prefix + "latents" not in ckpt and "vlm.vision_tokenizer.latents" in ckpt:
            raise weights.CheckpointError(f"{path}: no '{prefix}latents', but an xGen-MM checkpoint's resampler: "
                                          "pass prefix='vlm.vision_tokenizer.'")
        weights.check_layers(ckpt, prefix + "layers.", config.depth, "depth")
        return weights.load_model(ckpt, lambda: cls(config), lambda c, _: convert_checkpoint(c, prefix, config),
                                  dtype, device, prefix)

    def official_state_dict(self):
        """Our weights under the official names (layers.{i}.0.*, layers.{i}.1.{0,1,3}.*), without a prefix."""
        return {official_name(k): v for k, v in self.state_dict().items()}


# -----------------------------------------------------------------------------
# loading

# ours -> official. The official layer is ModuleList([PerceiverAttention, FeedForward]) and its FeedForward
# is Sequential(LayerNorm, Linear, GELU, Linear): indices 0, 1, (2 has no weights), 3.
RENAMES = {".attn.": ".0.", ".ff.norm.": ".1.0.", ".ff.fc1.": ".1.1.", ".ff.fc2.": ".1.3."}


def official_name(name):  # e.g. layers.3.ff.fc1.weight -> layers.3.1.1.weight; latents, norm, projection stay
    for ours, theirs in RENAMES.items():
        name = name.replace(ours, theirs)
    return name


def convert_checkpoint(ckpt, prefix, config):
    """Every resampler tensor under `prefix` in the official names -> our state dict (shapes checked)."""
    with torch.device("meta"):
        model = PerceiverResampler(config)
    return weights.take_module(ckpt, model, prefix, {k: official_name(k) for k in model.state_dict()})
