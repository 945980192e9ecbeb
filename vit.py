"""
The SigLIP so400m/14-384 vision tower: xGen-MM's image encoder, kept frozen in every training stage.

An image of 384x384 pixels is cut into 27x27 = 729 patches of 14x14, each patch is embedded by a strided
convolution, and 27 pre-LayerNorm transformer blocks turn the 729 patch tokens into 729 features of width 1152.
What is specific to this ViT:
- No CLS token: every output token is a patch; xGen-MM's resampler consumes all 729 of them.
- Learned absolute position embedding, one row per patch (no interpolation: anyres crops are all 384x384).
- MLP activation is tanh-approximated GELU; LayerNorm eps is 1e-6 (not PyTorch's 1e-5).
- `post_layernorm` is applied to the last block's output; those normalized features are what xGen-MM uses.
- The checkpoints carry an attention-pooling `head.*` (SigLIP's contrastive image embedding); xGen-MM never
  uses it, so the loader names and skips it and this module does not build it.
- Attention is attention.py's, unmasked: every image is full size.
- q, k and v live in one fused Linear (`qkv_proj`): one matmul instead of three. The checkpoints store them
  separately; the loader concatenates them and `official_state_dict` splits them again.

References: SigLIP, "Sigmoid Loss for Language Image Pre-Training" (arXiv 2303.15343);
weights and names from Hugging Face `google/siglip-so400m-patch14-384` (transformers' SiglipVisionTransformer).
"""
import re
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import weights
from attention import attention

# -----------------------------------------------------------------------------
# building blocks: attention -> MLP -> encoder layer

class Attention(nn.Module):
    """Bidirectional multi-head self-attention over the patch tokens (no mask: every image is full size)."""

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size)  # [q | k | v] along the output
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x):  # (N, P, D)
        N, P, D = x.shape
        qkv = self.qkv_proj(x).view(N, P, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (N, H, P, Dh): views, no copies
        y = attention(q, k, v)  # (N, H, P, Dh), scale Dh^-0.5: no mask, so PyTorch's SDPA (attention.py)
        return self.out_proj(y.transpose(1, 2).reshape(N, P, D))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # SigLIP's gelu_pytorch_tanh


class EncoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Attention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x):  # (N, P, D)
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))

# -----------------------------------------------------------------------------
# config


@dataclass
class ViTConfig:
    image_size: int = 384
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16  # head_dim 72
    layer_norm_eps: float = 1e-6

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, d, base=None):  # see "loading" at the end
        return config_from_hf(d, base)


PRESETS = {
    "so400m": ViTConfig(),
    "small": ViTConfig(image_size=224, patch_size=14, hidden_size=384, intermediate_size=1536,
                       num_hidden_layers=6, num_attention_heads=6),
    "tiny": ViTConfig(image_size=64, patch_size=8, hidden_size=192, intermediate_size=768,
                      num_hidden_layers=4, num_attention_heads=3),
    # the toy world's: 96-pixel views of 3x3 patches, one per cell of its scenes (toy/scenes.py)
    "toy": ViTConfig(image_size=96, patch_size=32, hidden_size=192, intermediate_size=768,
                     num_hidden_layers=4, num_attention_heads=3),
}

# -----------------------------------------------------------------------------
# the vision tower


class ViT(nn.Module):
    """pixels (N, 3, S, S), normalized with mean 0.5 / std 0.5 -> post-LayerNorm patch features (N, P, D)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        c = config
        # module names equal the checkpoint's (HF SiglipVisionTransformer), so loading is a copy loop
        self.embeddings = nn.ModuleDict(dict(
            patch_embedding=nn.Conv2d(c.num_channels, c.hidden_size, kernel_size=c.patch_size, stride=c.patch_size),
            position_embedding=nn.Embedding(c.num_patches, c.hidden_size),
        ))
        self.encoder = nn.ModuleDict(dict(layers=nn.ModuleList(EncoderLayer(c) for _ in range(c.num_hidden_layers))))
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def init_weights(self):
        """SigLIP's initialisation, for a tower trained from scratch (loading a checkpoint overwrites it).

        The one that matters: nn.Embedding's default N(0, 1) position table would drown the patch
        embeddings (std ~0.3); SigLIP draws it with std 1/sqrt(width).
        """
        D = self.config.hidden_size
        nn.init.normal_(self.embeddings.position_embedding.weight, std=D ** -0.5)
        conv = self.embeddings.patch_embedding
        nn.init.trunc_normal_(conv.weight, std=(conv.weight[0].numel()) ** -0.5)  # lecun normal
        nn.init.zeros_(conv.bias)
        for module in self.encoder.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        return self

    def forward(self, pixel_values):  # (N, C, S, S)
        S = self.config.image_size
        if pixel_values.shape[-2:] != (S, S):
            raise ValueError(f"ViT expects {S}x{S} images, got {tuple(pixel_values.shape[-2:])} "
                             f"(pixel_values of shape {tuple(pixel_values.shape)})")
        patch_embedding = self.embeddings.patch_embedding
        x = patch_embedding(pixel_values.to(patch_embedding.weight.dtype))  # (N, D, S/p, S/p)
        # contiguous once here, or the residual stream inherits the conv's channels-first strides and every
        # LayerNorm and Linear below pays a hidden copy
        x = x.flatten(2).transpose(1, 2).contiguous()  # (N, P, D)
        # position ids are simply 0..P-1, so the "lookup" is the whole table, broadcast over the batch
        x = x + self.embeddings.position_embedding.weight
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)  # (N, P, D); for so400m (N, 729, 1152)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        """A local SigLIP directory as on the Hub: a full SigLIP (model_type "siglip") or a SiglipVisionModel."""
        hf = weights.read_config(path)
        if hf.get("model_type") not in ("siglip", "siglip_vision_model"):
            raise weights.CheckpointError(f"{path}: config.json model_type {hf.get('model_type')!r} is not a "
                                          "SigLIP ('siglip' or 'siglip_vision_model')")
        config = config_from_hf(hf)
        ckpt = weights.Checkpoint(path)
        # transformers 4.x saves the vision tower under "vision_model."; a 5.x SiglipVisionModel save drops it
        prefix = "vision_model." if "vision_model.embeddings.patch_embedding.weight" in ckpt else ""
        if hf["model_type"] == "siglip":  # a full SigLIP: its text tower and contrastive logit scale/bias
            ckpt.skip(r"text_model\.|logit_scale$|logit_bias$")
        weights.check_layers(ckpt, prefix + "encoder.layers.", config.num_hidden_layers, "num_hidden_layers")
        return weights.load_model(ckpt, lambda: cls(config), convert_checkpoint, dtype, device, prefix)

    def official_state_dict(self):
        """Our weights in HF SiglipVisionTransformer names (q, k, v split again), without a prefix."""
        out = {}
        for name, t in self.state_dict().items():
            if ".qkv_proj." in name:
                for which, part in zip("qkv", t.chunk(3)):  # views of the fused tensor, no copies
                    out[name.replace("qkv_proj", f"{which}_proj")] = part
            else:
                out[name] = t
        return out

# -----------------------------------------------------------------------------
# loading: config.json and the checkpoint's names

# transformers SiglipVisionConfig defaults (siglip-base-patch16-224), used only for fields a config.json omits
HF_DEFAULTS = ViTConfig(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072,
                        num_hidden_layers=12, num_attention_heads=12)


def config_from_hf(d, base=None):
    """A HF SigLIP vision config dict (or a full SigLIP config, whose `vision_config` is read).

    Fields the dict omits come from `base` (a ViTConfig), by default transformers' SiglipVisionConfig
    defaults, as transformers would fill them. Unknown fields are ignored. model.py reads an xGen-MM
    `vision_encoder_config` with base=PRESETS["so400m"] (docs/release.md §2: its SigLIP fields win).
    """
    d = d.get("vision_config", d)
    act = d.get("hidden_act", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ValueError(f"SigLIP hidden_act {act!r} is not supported; this ViT implements gelu_pytorch_tanh")
    base = base or HF_DEFAULTS
    return ViTConfig(**{f.name: d.get(f.name, getattr(base, f.name)) for f in fields(ViTConfig)})


def convert_checkpoint(ckpt, module, prefix=""):
    """Every tensor of the vision tower `module` (built on the meta device) from its HF SigLIP name under
    `prefix` -> our state dict (shapes checked)."""
    state = {}
    for name, t in module.state_dict().items():
        if ".qkv_proj." in name:  # the checkpoint has q_proj, k_proj, v_proj: stack them along the output dim
            part_shape = (t.shape[0] // 3, *t.shape[1:])
            parts = [ckpt.take(prefix + name.replace("qkv_proj", f"{w}_proj"), part_shape) for w in "qkv"]
            state[name] = torch.cat(parts)
        else:
            state[name] = ckpt.take(prefix + name, t.shape)
    ckpt.skip(re.escape(prefix) + r"head\.")  # attention-pooling head: in the checkpoint, unused by xGen-MM
    return state
