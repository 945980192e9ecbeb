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
- `InstructionAwareResampler`: an ablation of the paper (not the release): the user's instruction joins the
  media keys. The whole variant is that class: finding each image's instruction in the ids, grouping, keys.

References: Flamingo (arXiv 2204.14198) section 2.1 and its OpenFlamingo `helpers.py`; xGen-MM / BLIP-3
(arXiv 2408.08872) and its code in salesforce/LAVIS branch `xgen-mm` (`vlm.py`, `PerceiverResampler`).
"""
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import weights
from attention import Mask, attention

# -----------------------------------------------------------------------------
# building blocks: attention -> feed-forward -> layer

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

# -----------------------------------------------------------------------------
# config


@dataclass
class ResamplerConfig:
    dim: int = 1152  # input width = the ViT width (vis_feature_dim)
    dim_inner: int = 3072  # output width = the LLM width (lang_embedding_dim)
    num_latents: int = 128  # tokens per group (num_vis_tokens)
    depth: int = 6  # the official constructor defaults from here on: not in the released config.json
    heads: int = 16
    dim_head: int = 96
    ff_mult: int = 4
    instruction_dim: int = 0  # > 0: InstructionAwareResampler (an ablation, not the release): the LLM width

    @classmethod
    def from_hf(cls, d):  # see "loading" at the end
        return config_from_hf(d)

    def to_hf(self):
        return config_to_hf(self)


PRESETS = {
    "xgenmm": ResamplerConfig(),
    "small": ResamplerConfig(dim=384, dim_inner=768, num_latents=32, depth=2, heads=6, dim_head=64),
    "tiny": ResamplerConfig(dim=192, dim_inner=256, num_latents=16, depth=2, heads=4, dim_head=32),
}

# -----------------------------------------------------------------------------
# the resampler


class PerceiverResampler(nn.Module):
    """Groups of media features (G, N, dim) -> (G, num_latents, dim_inner), one group resampled independently."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.latents = nn.Parameter(torch.randn(config.num_latents, config.dim))  # official init: N(0, 1)
        self.layers = nn.ModuleList(ResamplerLayer(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)
        self.projection = nn.Linear(config.dim, config.dim_inner)  # the only bias in the resampler

    def forward(self, x, mask=None):
        """x (G, N, dim), mask (G, N) True = real feature, False = padding -> (G, num_latents, dim_inner)."""
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
        config = read_config(path)
        ckpt = weights.Checkpoint(path)
        if prefix + "latents" not in ckpt and "vlm.vision_tokenizer.latents" in ckpt:
            raise weights.CheckpointError(f"{path}: no '{prefix}latents', but an xGen-MM checkpoint's resampler: "
                                          "pass prefix='vlm.vision_tokenizer.'")
        weights.check_layers(ckpt, prefix + "layers.", config.depth, "depth")
        return weights.load_model(ckpt, lambda: build(config), convert_checkpoint, dtype, device, prefix, scope=prefix)

    def official_state_dict(self):
        """Our weights under the official names (layers.{i}.0.*, layers.{i}.1.{0,1,3}.*), without a prefix."""
        return {official_name(k): v for k, v in self.state_dict().items()}


class InstructionAwareResampler(PerceiverResampler):
    """The instruction-aware resampler, an ablation of paper section 7 after InstructBLIP (not the release).

    Each image's instruction (the embeddings of the user's words that follow it) is projected to the ViT
    width and joins that image's media as extra keys, so the latents can pick what the question asks for.
    Every group of an image reads the image's instruction.
    """

    def __init__(self, config):
        super().__init__(config)
        self.instruction = nn.Linear(config.instruction_dim, config.dim, bias=False)

    @classmethod
    def from_resampler(cls, r, instruction_dim):
        """The resampler `r` made instruction-aware: its weights kept, a fresh projection from `instruction_dim`.
        r.config (the model's config.resampler) records instruction_dim, so the checkpoint builds this class."""
        r.config.instruction_dim = instruction_dim
        projection = nn.Linear(instruction_dim, r.config.dim, bias=False)
        with torch.device("meta"):  # no second initialisation: r's tensors are assigned below
            new = cls(r.config)
        new.load_state_dict(r.state_dict() | {"instruction.weight": projection.weight}, assign=True)
        return new

    def forward(self, x, mask=None, text=None, text_mask=None):
        """x (G, N, dim) and mask (G, N) as PerceiverResampler's; `text` (G, T, instruction_dim) the instruction
        of each group, `text_mask` (G, T) its real tokens -> (G, num_latents, dim_inner)."""
        if text is not None:
            t = self.instruction(text.to(x.dtype))
            mask = torch.cat((ones_if_none(mask, x), ones_if_none(text_mask, t)), dim=1)
            x = torch.cat((x, t), dim=1)
        return super().forward(x, mask)

    def resample(self, groups, masks, instructions, per_image):
        """Padded groups (G, N, dim) and masks (G, N), each image's instruction (T_i, instruction_dim) and how
        many groups each image has -> (G, num_latents, dim_inner)."""
        per_group = [t for t, n in zip(instructions, per_image) for _ in range(n)]
        T = max(1, max(len(t) for t in per_group))
        text = torch.stack([F.pad(t, (0, 0, 0, T - len(t))) for t in per_group])
        text_mask = torch.stack([torch.arange(T, device=t.device) < len(t) for t in per_group])
        return self(groups, masks, text, text_mask)

    @staticmethod
    def instructions(embeds, ids, tokens, image_id, stop_ids, limit=64):
        """Per image of one row (`tokens`: how many `image_id` positions each fills, in order): the embeddings
        of the text after its block up to the end of the user's turn (any of `stop_ids`), never into an answer;
        empty when the turn does not end (plain documents). Images listed together share the words after the
        last of them."""
        stops = torch.isin(ids, torch.tensor(stop_ids, device=ids.device)).nonzero().flatten().tolist()
        where = (ids == image_id).nonzero().flatten().tolist()
        out, k = [], 0
        for n in tokens:
            last, k = where[k + n - 1], k + n
            end = next((s for s in stops if s > last), last + 1)
            later = [p for p in where if last < p < end]
            start = (later[-1] if later else last) + 1
            out.append(embeds[start:end][-limit:])
        return out


def ones_if_none(mask, x):
    """A (G, N) keep-mask, or all True for the N rows of x (G, N, D) when there is none."""
    return mask if mask is not None else x.new_ones(x.shape[0], x.shape[1], dtype=torch.bool)


def build(config):
    """The resampler a config describes: instruction-aware when config.instruction_dim > 0."""
    return (InstructionAwareResampler if config.instruction_dim else PerceiverResampler)(config)

# -----------------------------------------------------------------------------
# loading: config.json and the official names


def config_from_hf(d):
    """An xGen-MM `vision_tokenizer_config` dict, plus this project's optional depth/heads/dim_head/ff_mult."""
    names = dict(dim="vis_feature_dim", dim_inner="lang_embedding_dim", num_latents="num_vis_tokens")
    return ResamplerConfig(**{f.name: d.get(names.get(f.name, f.name), f.default) for f in fields(ResamplerConfig)})


def config_to_hf(c):
    """The inverse of config_from_hf: a `vision_tokenizer_config` dict, constructor fields included."""
    d = {"model_type": "xgenmm_vision_tokenizer", "vis_feature_dim": c.dim, "lang_embedding_dim": c.dim_inner,
         "num_vis_tokens": c.num_latents, "depth": c.depth, "heads": c.heads, "dim_head": c.dim_head,
         "ff_mult": c.ff_mult}
    return d | ({"instruction_dim": c.instruction_dim} if c.instruction_dim else {})


def read_config(path):
    """config.json of a resampler checkpoint: an xGen-MM config or a dict of ResamplerConfig fields."""
    d = weights.read_config(path)
    if "vision_tokenizer_config" in d:
        return config_from_hf(d["vision_tokenizer_config"])
    unknown = sorted(set(d) - {f.name for f in fields(ResamplerConfig)})
    if unknown:
        raise weights.CheckpointError(f"{path}/config.json: neither an xGen-MM config (no "
                                      f"vision_tokenizer_config) nor ResamplerConfig fields: {unknown}")
    return ResamplerConfig(**d)


# ours -> official. The official layer is ModuleList([PerceiverAttention, FeedForward]) and its FeedForward
# is Sequential(LayerNorm, Linear, GELU, Linear): indices 0, 1, (2 has no weights), 3.
RENAMES = {".attn.": ".0.", ".ff.norm.": ".1.0.", ".ff.fc1.": ".1.1.", ".ff.fc2.": ".1.3."}


def official_name(name):  # e.g. layers.3.ff.fc1.weight -> layers.3.1.1.weight; latents, norm, projection stay
    for ours, theirs in RENAMES.items():
        name = name.replace(ours, theirs)
    return name


def convert_checkpoint(ckpt, module, prefix=""):
    """Every tensor of the resampler `module` (built on the meta device) from its official name under `prefix`."""
    return weights.take_module(ckpt, module, prefix, {k: official_name(k) for k in module.state_dict()})
