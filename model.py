"""
xGen-MM (BLIP-3): a frozen SigLIP ViT, a Perceiver Resampler and Phi-3, with images spliced into text.

- Any-resolution encoding, as released: each image is fitted to the best grid of 384-pixel crops (five
  grids from config.json), every crop and a squashed global view go through the ViT, the crop features
  are stitched into one map whose padded rows (or columns) are masked, and the map is cut into groups of
  729 tokens that the resampler turns into 128 tokens each: 384, 512 or 640 tokens per image.
- Two quirks of the release are reproduced because its weights were trained with them: small and square
  images tie on every grid, so "1 wide x 2 tall" wins; and the groups are bands of the whole stitched map
  in raster order, not one crop each, whenever the grid is more than one crop wide.
- The paper's two ablation strategies are here too, chosen by config: fixed resolution (one view, padded
  to a square, 128 tokens) and any-resolution with fixed sampling (all unpadded tokens resampled once).
- Interleaved text: each `<image>` token is replaced, in order, by its image's block of vision tokens;
  labels there are -100. Any number of images per sample, any number of crops per image.
- The three tokens xGen-MM adds (`<image>`, `<image placeholder>`, `<|endofchunk|>`) have their own small
  embedding and output tables in the official checkpoint ("decoupled embeddings"); they are folded into
  rows of the main tables on load (same results) and split out again on save.
- Generation reuses phi3.py's batched decode loop (left padding, static KV cache, greedy / top-k / top-p).

References: xGen-MM / BLIP-3 (arXiv 2408.08872); salesforce/LAVIS branch xgen-mm and the Hub release
Salesforce/xgen-mm-phi3-mini-instruct-r-v1.5 (modeling_xgenmm.py, image_processing_blip_3.py); LLaVA-NeXT
any-resolution (select_best_resolution, resize_and_pad_image, unpad_image); OpenFlamingo.
"""
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import phi3
import resampler
import vit
import weights
from tokenizer import Tokenizer

SIGLIP_SO400M = "google/siglip-so400m-patch14-384"
XGENMM_TOKENS = ("<image>", "<image placeholder>", "<|endofchunk|>")  # added in this order by the official factory
GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))  # (cols, rows): the release's anyres_grids, in crops
STRATEGIES = ("anyres", "anyres-fixed", "fixed")
DEFAULT_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")

# -----------------------------------------------------------------------------
# config


@dataclass
class XGenMMConfig:
    vision: vit.ViTConfig = field(default_factory=vit.ViTConfig)
    resampler: "resampler.ResamplerConfig" = field(default_factory=lambda: resampler.ResamplerConfig())
    text: phi3.Phi3Config = field(default_factory=lambda: phi3.Phi3Config(
        output_vocab_size=32015, lm_head_bias=True, pad_token_id=32011))
    image_aspect_ratio: str = "anyres"   # "anyres" or "pad" (fixed resolution), as config.json names it
    anyres_patch_sampling: bool = True   # anyres only: resample each group (True) or all tokens at once
    anyres_grids: list | None = None     # [[w, h], ...] in pixels; None = GRIDS x the ViT's image size
    model_name: str = SIGLIP_SO400M      # the SigLIP the vision tower came from
    initial_tokenizer_len: int = 32012   # tokenizer length before the three xGen-MM tokens

    @property
    def strategy(self):
        if self.image_aspect_ratio == "anyres":
            return "anyres" if self.anyres_patch_sampling else "anyres-fixed"
        return "fixed"

    @property
    def grids(self):
        S = self.vision.image_size
        return [tuple(g) for g in self.anyres_grids] if self.anyres_grids else [(c * S, r * S) for c, r in GRIDS]

    @property
    def image_token_id(self):  # the official factory adds <image> first, right after the initial vocabulary
        return self.initial_tokenizer_len

    def image_tokens(self, size):
        """How many vision tokens an image of size (W, H) becomes: what a data pipeline budgets for."""
        L = self.resampler.num_latents
        if self.strategy != "anyres":
            return L
        w, h = select_grid(size, self.grids)
        return (1 + (w // self.vision.image_size) * (h // self.vision.image_size)) * L

    @classmethod
    def from_strategy(cls, strategy, **kw):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown image strategy {strategy!r}; choose one of {STRATEGIES}")
        return cls(image_aspect_ratio="pad" if strategy == "fixed" else "anyres",
                   anyres_patch_sampling=strategy == "anyres", **kw)

    @classmethod
    def from_hf(cls, d):
        """An official xGen-MM config.json dict (plus this project's optional SigLIP / resampler fields)."""
        missing = [k for k in ("vision_encoder_config", "vision_tokenizer_config", "text_config") if k not in d]
        if missing:
            raise weights.CheckpointError(f"xGen-MM config.json lacks {', '.join(missing)}")
        ve, vt, tc = d["vision_encoder_config"], d["vision_tokenizer_config"], dict(d["text_config"])
        name = ve.get("model_name", SIGLIP_SO400M)
        if name != SIGLIP_SO400M and "hidden_size" not in ve:
            raise weights.CheckpointError(
                f"vision_encoder_config.model_name {name!r}: only {SIGLIP_SO400M} is known by name; put the "
                "SigLIP vision fields (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, "
                "image_size, patch_size, layer_norm_eps) into vision_encoder_config")
        initial = tc.pop("initial_tokenizer_len", None)
        if initial is None:
            raise weights.CheckpointError("text_config.initial_tokenizer_len is missing: it says where the "
                                          "decoupled rows of the three xGen-MM tokens start")
        aspect = ve.get("image_aspect_ratio", "anyres")
        if aspect not in ("anyres", "pad"):
            raise ValueError(f"vision_encoder_config.image_aspect_ratio {aspect!r} is not supported ('anyres', 'pad')")
        return cls(vision=vit.ViTConfig.from_hf(ve, base=vit.PRESETS["so400m"]),
                   resampler=resampler.ResamplerConfig.from_hf(vt), text=phi3.Phi3Config.from_hf(tc),
                   image_aspect_ratio=aspect, anyres_patch_sampling=bool(ve.get("anyres_patch_sampling", True)),
                   anyres_grids=ve.get("anyres_grids"), model_name=name, initial_tokenizer_len=initial)

    def to_hf(self):
        ve = {"model_type": "xgenmm_vision_encoder", "model_name": self.model_name,
              "anyres_grids": [list(g) for g in self.grids], "image_aspect_ratio": self.image_aspect_ratio,
              "anyres_patch_sampling": self.anyres_patch_sampling, **asdict(self.vision)}
        return {"model_type": "xgenmm", "architectures": ["XGenMMModelForConditionalGeneration"],
                "auto_map": {"AutoConfig": "configuration_xgenmm.XGenMMConfig",  # the release's remote code
                             "AutoModelForVision2Seq": "modeling_xgenmm.XGenMMModelForConditionalGeneration"},
                "vision_encoder_config": ve, "vision_tokenizer_config": self.resampler.to_hf(),
                "text_config": {**self.text.to_hf(), "initial_tokenizer_len": self.initial_tokenizer_len}}


PRESET_PARTS = {"xgenmm": ("so400m", "xgenmm", "phi3-mini-4k"), "small": ("small",) * 3, "tiny": ("tiny",) * 3}


def preset(name, strategy="anyres", tokenizer=None):
    """Named sizes from the component presets (vit / resampler / phi3); tiny and small are for CPU runs.

    The three xGen-MM tokens take the ids right after the initial vocabulary: 32012-32014 when the LM has
    Phi-3's 32064 rows (pad = 32011, as in the release), else the last three rows. With a `tokenizer`
    (extended by `extend_tokenizer`), the vocabulary and the special ids are sized to it instead: a new
    model for that tokenizer, such as the toy world's.
    """
    if name not in PRESET_PARTS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESET_PARTS)}")
    v, r, t = PRESET_PARTS[name]
    text = replace(phi3.PRESETS[t], lm_head_bias=True)
    text.output_vocab_size = min(32015, text.vocab_size)
    if text.vocab_size >= 32015:
        text.pad_token_id = 32011
    if tokenizer is not None:
        text.vocab_size, text.output_vocab_size = -(-len(tokenizer) // 64) * 64, len(tokenizer)  # x64 as Phi-3
        text.bos_token_id, text.pad_token_id = tokenizer.bos_id, tokenizer.pad_id
        end = [tokenizer.token_to_id("<|end|>")] if "<|end|>" in tokenizer.by_content else []
        text.eos_token_id = [tokenizer.eos_id] + end
    initial = tokenizer.token_to_id(XGENMM_TOKENS[0]) if tokenizer is not None else text.output_vocab_size - 3
    return XGenMMConfig.from_strategy(strategy, vision=vit.PRESETS[v], resampler=resampler.PRESETS[r], text=text,
                                      initial_tokenizer_len=initial)

# -----------------------------------------------------------------------------
# image preprocessing (PIL in, normalized views out)


def select_grid(size, grids):
    """LLaVA-NeXT's select_best_resolution: the (w, h) keeping the most pixels, ties -> least padding, then first.

    quirk (kept for parity): an image smaller than every grid keeps all its pixels on each, so the first
    grid with the least waste wins: 384x384 -> (384, 768), one crop wide and two tall.
    """
    W, H = size
    best, best_eff, best_waste = None, -1, math.inf
    for w, h in grids:
        s = min(w / W, h / H)
        eff = min(int(W * s) * int(H * s), W * H)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (w, h), eff, waste
    return best


def resize_and_pad(img, target, resample=Image.Resampling.BICUBIC):
    """Fit `img` into target (w, h) keeping its aspect (sides rounded up, capped), centred on black."""
    (W, H), (w, h) = img.size, target
    scale_w, scale_h = w / W, h / H  # the scale first, then the product, as the reference rounds
    if scale_w < scale_h:
        size = (w, min(math.ceil(H * scale_w), h))
    else:
        size = (min(math.ceil(W * scale_h), w), h)
    canvas = Image.new("RGB", target, (0, 0, 0))
    canvas.paste(img.resize(size, resample), ((w - size[0]) // 2, (h - size[1]) // 2))
    return canvas


def pad_to_square(img, colour=(127, 127, 127)):
    """LLaVA's expand2square: centre on a square of the mean colour (int(0.5 * 255) per channel)."""
    W, H = img.size
    canvas = Image.new("RGB", (max(W, H),) * 2, colour)
    canvas.paste(img, ((max(W, H) - W) // 2, (max(W, H) - H) // 2))
    return canvas


def to_pixels(img, S, resample=Image.Resampling.BICUBIC):
    """A PIL view -> (3, S, S) float: bicubic resize to S (a no-op for crops), [0, 1], mean 0.5, std 0.5."""
    if img.size != (S, S):
        img = img.resize((S, S), resample)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255.0
    return (x - 0.5) / 0.5


def preprocess(img, config, resample=Image.Resampling.BICUBIC, fill=(127, 127, 127)):
    """One image -> (views (V, 3, S, S), original size (W, H), grid (cols, rows)); V = 1 + cols * rows.

    anyres: the global view (the whole image squashed to S x S) first, then the crops row by row.
    fixed: one view, padded to a square; the grid is (0, 0). (`resample` and the square's `fill` let a
    label map follow the same geometry pixel for pixel, as toyvision.py's dense labels do.)
    """
    img, S = img.convert("RGB"), config.vision.image_size
    if config.strategy == "fixed":
        return to_pixels(pad_to_square(img, fill), S, resample)[None], img.size, (0, 0)
    w, h = select_grid(img.size, config.grids)
    canvas = resize_and_pad(img, (w, h), resample)
    crops = [canvas.crop((x, y, x + S, y + S)) for y in range(0, h, S) for x in range(0, w, S)]
    views = [to_pixels(v, S, resample) for v in [img.resize((S, S), resample)] + crops]
    return torch.stack(views), img.size, (w // S, h // S)


def load_image(path):
    """An image file as RGB, with the file named in the error if it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the image ({e})") from None


@dataclass
class Images:
    """Every image of a batch, preprocessed: the views of all images in one tensor, and how to cut it."""
    pixel_values: torch.Tensor  # (V, 3, S, S): all views of all images, image by image
    sizes: list                 # (W, H) original size per image
    grids: list                 # (cols, rows) crops per image; (0, 0) for fixed resolution
    counts: list                # images per sample, in order

    @classmethod
    def collate(cls, samples):
        """samples: per sample, a list of `preprocess` outputs -> one Images (DataLoader collate_fn helper)."""
        flat = [im for s in samples for im in s]
        S = flat[0][0].shape[-1] if flat else 1
        pixels = torch.cat([v for v, _, _ in flat]) if flat else torch.zeros(0, 3, S, S)
        return cls(pixels, [s for _, s, _ in flat], [g for _, _, g in flat], [len(s) for s in samples])

    @classmethod
    def from_pil(cls, samples, config):
        return cls.collate([[preprocess(im, config) for im in s] for s in samples])

    def to(self, device, dtype=None):
        return replace(self, pixel_values=self.pixel_values.to(device, dtype, non_blocking=True))


def unpad_mask(size, map_w, map_h):
    """(map_h, map_w) bool, False on the stitched feature rows (or columns) that fell on the black padding.

    LLaVA-NeXT's unpad_image: the scale is computed first, then the product (`int(H * (Wf / W))`, not
    `int(H * Wf / W)`, which differs on some sizes); the padding is split evenly, rounded down.
    """
    W, H = size
    keep = torch.ones(map_h, map_w, dtype=torch.bool)
    if W / H > map_w / map_h:
        pad = (map_h - int(H * (map_w / W))) // 2
        keep[:pad], keep[map_h - pad:] = False, False
    else:
        pad = (map_w - int(W * (map_h / H))) // 2
        keep[:, :pad], keep[:, map_w - pad:] = False, False
    return keep


def pad_groups(groups, masks):
    """Groups (N_g, D) with masks (N_g,) or None (= all real) -> (G, N, D) and a (G, N) mask or None."""
    N = max(g.shape[0] for g in groups)
    if all(g.shape[0] == N for g in groups):
        if all(m is None for m in masks):
            return torch.stack(groups), None
        return torch.stack(groups), torch.stack([torch.ones(N, dtype=torch.bool, device=g.device) if m is None
                                                 else m for g, m in zip(groups, masks)])
    x = groups[0].new_zeros(len(groups), N, groups[0].shape[-1])
    mask = torch.zeros(len(groups), N, dtype=torch.bool, device=x.device)
    for i, (g, m) in enumerate(zip(groups, masks)):
        x[i, : len(g)] = g
        mask[i, : len(g)] = True if m is None else m
    return x, mask


def pad_rows(rows, side, value):
    """Sequences (T_i, ...) -> (B, T, ...) padded with `value` on `side`, and the (B, T) 0/1 mask."""
    T = max(len(r) for r in rows)
    out = rows[0].new_full((len(rows), T, *rows[0].shape[1:]), value)
    mask = torch.zeros(len(rows), T, dtype=torch.long, device=out.device)
    for i, r in enumerate(rows):
        span = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        out[i, span], mask[i, span] = r, 1
    return out, mask


def chat_prompt(turns, system=DEFAULT_SYSTEM):
    """Phi-3's chat format for turns [user, assistant, user, ...], ending where the next answer starts."""
    out = f"<|system|>\n{system}<|end|>\n" if system else ""
    for i, text in enumerate(turns):
        out += f"<|{'user' if i % 2 == 0 else 'assistant'}|>\n{text}<|end|>\n"
    return out + "<|assistant|>\n"

# -----------------------------------------------------------------------------
# the model


class XGenMM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        # module names = the official checkpoint's prefixes (vlm.vision_encoder / vision_tokenizer / lang_model)
        self.vision_encoder = vit.ViT(config.vision).requires_grad_(False)  # frozen in every stage (paper 3)
        self.vision_tokenizer = resampler.PerceiverResampler(config.resampler)
        self.lang_model = phi3.Phi3(config.text)
        self.tokenizer = None  # set by the loaders when the checkpoint has tokenizer files
        self.vit_batch = 32    # views per ViT call: bounds activation memory for many-image batches

    # ---- images -> vision tokens -----------------------------------------------

    def encode_images(self, images, instructions=None):
        """Images -> one (tokens, C) block per image, in order: ViT on every view, grouping, resampler.

        `instructions`: per image, the (T, C) embeddings of its instruction, for an instruction-aware resampler.
        """
        if not images.sizes:
            return []
        feats = self.vit_features(images.pixel_values)  # (V, P, D)
        groups, masks, per_image, v = [], [], [], 0
        for size, (cols, rows) in zip(images.sizes, images.grids):
            g, m = self.group_features(feats[v: v + 1 + cols * rows], size, (cols, rows))
            groups, masks, v = groups + g, masks + m, v + 1 + cols * rows
            per_image.append(len(g))
        if v != len(feats):
            raise ValueError(f"Images has {len(feats)} views but its grids account for {v}")
        text = {}
        if instructions is not None:  # every group of an image reads that image's instruction
            per_group = [t for t, n in zip(instructions, per_image) for _ in range(n)]
            T = max(1, max(len(t) for t in per_group))
            text["text"] = torch.stack([F.pad(t, (0, 0, 0, T - len(t))) for t in per_group])
            text["text_mask"] = torch.stack([torch.arange(T, device=t.device) < len(t) for t in per_group])
        tokens = self.vision_tokenizer(*pad_groups(groups, masks), **text)  # (G, L, C)
        return [t.flatten(0, 1) for t in tokens.split(per_image)]

    def instructions(self, embeds, ids, limit=64):
        """Per `<image>` of one row: the embeddings of the text after it up to the end of the user's turn
        (`<|end|>`), never into an answer; empty when the turn does not end (plain documents)."""
        stops = torch.isin(ids, torch.tensor(self.stop_ids, device=ids.device)).nonzero().flatten().tolist()
        out = []
        for m in (ids == self.config.image_token_id).nonzero().flatten().tolist():
            end = next((s for s in stops if s > m), m + 1)
            span = ids[m + 1:end]
            later = (span == self.config.image_token_id).nonzero().flatten().tolist()
            start = m + 1 + (later[-1] + 1 if later else 0)  # images listed together share the words after the last
            out.append(embeds[start:end][-limit:])
        return out

    def vit_features(self, pixels):
        frozen = not any(p.requires_grad for p in self.vision_encoder.parameters())
        pixels = pixels.to(self.vision_encoder.post_layernorm.weight.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):  # a frozen ViT keeps no activations
            return torch.cat([self.vision_encoder(c) for c in pixels.split(self.vit_batch)])

    def group_features(self, views, size, grid):
        """One image's view features (V, P, D) -> the groups the resampler reads and their padding masks."""
        cols, rows = grid
        if cols * rows == 0:  # fixed resolution: one view, one group
            return [views[0]], [None]
        side, D = math.isqrt(views.shape[1]), views.shape[-1]
        fmap = views[1:].view(rows, cols, side, side, D).permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, D)
        keep = unpad_mask(size, cols * side, rows * side).to(views.device)
        if not self.config.anyres_patch_sampling:  # global + every unpadded token, resampled once
            return [torch.cat((views[0], fmap[keep]))], [None]
        # quirk (the released resampler was trained this way): groups of side*side tokens in raster order of
        # the whole stitched map, i.e. horizontal bands across the full width rather than one crop each
        n = rows * cols
        return [views[0], *fmap.reshape(n, side * side, D)], [None, *keep.reshape(n, side * side)]

    # ---- interleaving -----------------------------------------------------------

    def prepare_inputs(self, input_ids, images=None, attention_mask=None, labels=None, padding_side="right"):
        """Ids with `<image>` markers + their images -> (embeds (B, T', C), attention_mask or None, labels or None).

        `input_ids` (B, T) may be padded on either side (`attention_mask` 1 = token). Each `<image>` token is
        replaced, in order, by its image's block; labels there become -100. Rows are re-padded on
        `padding_side`; the mask is None when no row is padded (the LM then takes its causal fast path).
        """
        device = self.lang_model.lm_head.weight.device
        input_ids = input_ids.to(device)
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(device).bool()
        B = input_ids.shape[0]
        counts = images.counts if images is not None else [0] * B
        if len(counts) != B:
            raise ValueError(f"{B} token rows but images for {len(counts)} samples")
        is_image = (input_ids == self.config.image_token_id) & mask
        for b, (n, k) in enumerate(zip(is_image.sum(1).tolist(), counts)):
            if n != k:
                raise ValueError(f"sample {b}: {n} <image> marker(s) in the text but {k} image(s); put exactly one "
                                 "<image> token where each image goes")
        embeds = self.lang_model.model.embed_tokens(input_ids)
        instructions = None
        if images is not None and self.config.resampler.instruction_dim:
            instructions = [t for b in range(B) for t in self.instructions(embeds[b][mask[b]], input_ids[b][mask[b]])]
        blocks = iter(self.encode_images(images, instructions) if images is not None else [])
        rows_e, rows_l = [], []
        for b in range(B):
            e, ids = embeds[b][mask[b]], input_ids[b][mask[b]]
            lab = labels[b].to(device)[mask[b]] if labels is not None else None
            pieces_e, pieces_l, start = [], [], 0
            for m in (ids == self.config.image_token_id).nonzero().flatten().tolist():
                block = next(blocks).to(e.dtype)
                pieces_e += [e[start:m], block]
                if lab is not None:
                    pieces_l += [lab[start:m], lab.new_full((len(block),), -100)]
                start = m + 1
            rows_e.append(torch.cat(pieces_e + [e[start:]]))
            if lab is not None:
                rows_l.append(torch.cat(pieces_l + [lab[start:]]))
        embeds, mask = pad_rows(rows_e, padding_side, 0.0)
        labels = pad_rows(rows_l, padding_side, -100)[0] if labels is not None else None
        return embeds, (None if bool(mask.all()) else mask), labels

    def forward(self, input_ids, images=None, attention_mask=None, labels=None, reduction="mean", return_logits=True):
        """Logits (B, T', V) of the spliced sequence; with `labels` (aligned with input_ids) also the loss.

        T' counts each image's block instead of its `<image>` token. `reduction` and `return_logits` are
        Phi3.forward's ("sum" for a trainer that normalises over a whole step; False for the fused loss).
        """
        embeds, mask, labels = self.prepare_inputs(input_ids, images, attention_mask, labels)
        return self.lang_model(embeds=embeds, attention_mask=mask, labels=labels, reduction=reduction,
                               return_logits=return_logits)

    # ---- generation -------------------------------------------------------------

    @property
    def stop_ids(self):
        """Every eos id of the config, plus `<|end|>` (the chat turn end) when the tokenizer has it."""
        ids = self.config.text.eos_ids
        if self.tokenizer is not None and "<|end|>" in self.tokenizer.by_content:
            ids = ids + [self.tokenizer.token_to_id("<|end|>")]
        return list(dict.fromkeys(ids))

    @torch.no_grad()
    def generate(self, prompts, images=None, max_new_tokens=128, **options):
        """New tokens (B, n) for a batch of prompts, each with its own images; rows are padded after they stop.

        `prompts`: id lists (or strings, encoded with the tokenizer) with one `<image>` per image; `images`:
        an `Images`, or per prompt a list of PIL images. `options` are Phi3.decode_loop's: temperature,
        top_k, top_p, stop_ids (default `stop_ids`), pad_id, generator, callback (sees each step's tokens),
        compile. Batched results equal one-by-one results.
        """
        prompts = [self.tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
        if images is not None and not isinstance(images, Images):
            images = Images.from_pil(images, self.config)
        pad = self.config.text.pad_token_id
        ids, mask = phi3.left_pad(prompts, pad)
        embeds, mask, _ = self.prepare_inputs(ids, images, mask, padding_side="left")
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device) if mask is None else mask
        options.setdefault("stop_ids", self.stop_ids)
        options.setdefault("pad_id", pad)
        return self.lang_model.decode_loop(embeds, mask, max_new_tokens, **options)

    # ---- checkpoints --------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        """An official xGen-MM directory (or a Hub id found in the local Hugging Face cache), strict keys.

        Built on the meta device and filled by assignment, so the weights are never held twice.
        """
        path = weights.resolve_dir(path)
        d = weights.read_config(path)
        if d.get("model_type") != "xgenmm":
            raise weights.CheckpointError(
                f"{path}/config.json: model_type {d.get('model_type')!r}, not 'xgenmm'; to start a new model from "
                "a SigLIP and a Phi-3 checkpoint use XGenMM.from_components(siglip_path, phi3_path)")
        config = XGenMMConfig.from_hf(d)
        phi3.add_generation_stop_ids(config.text, path)
        ckpt = weights.Checkpoint(path)
        key = LM + DECOUPLED[0][1]
        if key not in ckpt:
            raise weights.CheckpointError(f"{path}: missing tensor '{key}' (the decoupled rows of the xGen-MM tokens)")
        config.text.output_vocab_size = config.initial_tokenizer_len + ckpt.shape(key)[0]
        config.text.lm_head_bias = LM + "lm_head.bias" in ckpt
        if config.text.output_vocab_size > config.text.vocab_size:
            raise weights.CheckpointError(f"{path}: initial_tokenizer_len + decoupled rows = "
                                          f"{config.text.output_vocab_size} > vocab_size {config.text.vocab_size}")
        with torch.device("meta"):
            model = cls(config)
        state = convert_checkpoint(ckpt, model)
        ckpt.finish()
        weights.assign(model, state, weights.resolve_dtype(dtype), device)
        if (path / "tokenizer.model").is_file():
            model.tokenizer = load_tokenizer(path, config)
        return model.eval()

    @classmethod
    def from_components(cls, siglip_path, phi3_path, strategy="anyres", grids=None, resampler_config=None,
                        dtype=None, device=None):
        """A new xGen-MM for pretraining: a SigLIP and a Phi-3 checkpoint, a fresh resampler, the extended tokenizer.

        As the official factory: `<pad>` is added when the pad token is the eos, then the three xGen-MM
        tokens. Their embedding and output rows start as the mean of the existing rows, and the output
        layer gets the zero bias the official decoupled head carries, so saved checkpoints have its layout.
        """
        dtype = weights.resolve_dtype(dtype)
        tower = vit.ViT.from_pretrained(siglip_path, dtype, device)
        lm = phi3.Phi3.from_pretrained(phi3_path, dtype, device)
        tok = Tokenizer.from_pretrained(weights.resolve_dir(phi3_path))
        initial = extend_tokenizer(tok)
        add_token_rows(lm, initial, len(tok))
        lm.config.pad_token_id = tok.pad_id
        rcfg = resampler_config or resampler.ResamplerConfig(dim=tower.config.hidden_size,
                                                             dim_inner=lm.config.hidden_size)
        if (rcfg.dim, rcfg.dim_inner) != (tower.config.hidden_size, lm.config.hidden_size):
            raise ValueError(f"resampler dims {rcfg.dim} -> {rcfg.dim_inner} do not join the ViT width "
                             f"{tower.config.hidden_size} to the LM width {lm.config.hidden_size}")
        name = SIGLIP_SO400M if tower.config == vit.PRESETS["so400m"] else str(siglip_path)
        config = XGenMMConfig.from_strategy(strategy, vision=tower.config, resampler=rcfg, text=lm.config,
                                            anyres_grids=grids, model_name=name, initial_tokenizer_len=initial)
        with torch.device("meta"):
            model = cls(config)
        model.vision_encoder, model.lang_model = tower.requires_grad_(False), lm
        model.vision_tokenizer = resampler.PerceiverResampler(rcfg).to(device=device, dtype=dtype)
        model.tokenizer = tok
        return model.eval()

    def official_state_dict(self):
        """Every tensor under its official name (`vlm.*`), the decoupled rows split out again."""
        out = {"vlm.vision_encoder." + k: v for k, v in self.vision_encoder.official_state_dict().items()}
        out |= {"vlm.vision_tokenizer." + k: v for k, v in self.vision_tokenizer.official_state_dict().items()}
        lm = self.lang_model.state_dict()
        i, n = self.config.initial_tokenizer_len, self.config.text.output_vocab_size - self.config.initial_tokenizer_len
        for ours, theirs in DECOUPLED:
            if ours in lm:
                out[LM + theirs] = lm[ours][i: i + n]
        return out | {LM + k: v for k, v in lm.items()}

    def save_pretrained(self, path, max_shard_size=5 * 2**30, state_dict=None):
        """The official layout: config.json, (sharded) safetensors under `vlm.*`, tokenizer and generation config.

        Loads with `from_pretrained` and, with the release's remote-code files beside it, in the official code.
        `state_dict` replaces `official_state_dict()` (e.g. with LoRA adapters merged in, see lora.py).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        weights.save_sharded(self.official_state_dict() if state_dict is None else state_dict, path, max_shard_size)
        (path / "config.json").write_text(json.dumps(self.config.to_hf(), indent=2) + "\n")
        t = self.config.text
        gen = {"bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id}
        (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)
        return path

# -----------------------------------------------------------------------------
# loading helpers


LM = "vlm.lang_model."
# quirk: the official DecoupledEmbedding / DecoupledLinear keep the added tokens' rows in separate tables;
# ours -> theirs, both under LM. Folded in at rows initial_tokenizer_len.. on load, split out on save.
DECOUPLED = (("model.embed_tokens.weight", "model.embed_tokens.additional_embedding.weight"),
             ("lm_head.weight", "lm_head.additional_fc.weight"),
             ("lm_head.bias", "lm_head.additional_fc.bias"))


def convert_checkpoint(ckpt, model):
    """The official xGen-MM tensors -> our state dict (shapes checked by each component's converter)."""
    cfg = model.config
    state = {"vision_encoder." + k: v for k, v in vit.convert_checkpoint(ckpt, "vlm.vision_encoder.", cfg.vision).items()}
    state |= {"vision_tokenizer." + k: v
              for k, v in resampler.convert_checkpoint(ckpt, "vlm.vision_tokenizer.", cfg.resampler).items()}
    lm = phi3.convert_checkpoint(ckpt, LM, model.lang_model)
    i, n = cfg.initial_tokenizer_len, cfg.text.output_vocab_size - cfg.initial_tokenizer_len
    for ours, theirs in DECOUPLED:
        if ours in lm:  # lm_head.bias only when the checkpoint has one
            lm[ours][i: i + n] = ckpt.take(LM + theirs, (n, *lm[ours].shape[1:]))
    return state | {"lang_model." + k: v for k, v in lm.items()}


def extend_tokenizer(tok):
    """Add xGen-MM's tokens as the official factory does; returns the length before the three (initial_tokenizer_len).

    `<pad>` first when the tokenizer pads with its eos (Phi-3 does), then `<image>`, `<image placeholder>`,
    `<|endofchunk|>`. Tokens already present keep their ids.
    """
    if tok.pad_id is None or tok.pad_id == tok.eos_id:
        tok.add_tokens(["<pad>"])
        tok.names["pad"] = "<pad>"
    return tok.add_tokens(list(XGENMM_TOKENS))[0]


def load_tokenizer(path, config):
    tok = Tokenizer.from_pretrained(path)
    extend_tokenizer(tok)
    ids = [tok.token_to_id(t) for t in XGENMM_TOKENS]
    want = list(range(config.initial_tokenizer_len, config.initial_tokenizer_len + len(XGENMM_TOKENS)))
    if ids != want or len(tok) > config.text.output_vocab_size:
        raise weights.CheckpointError(f"{path}: the tokenizer gives {list(XGENMM_TOKENS)} the ids {ids} and has "
                                      f"{len(tok)} tokens; the checkpoint's rows for them are {want}")
    return tok


@torch.no_grad()
def add_token_rows(lm, first, n_out):
    """Make room in a Phi-3 for the ids first..n_out-1: rows = mean of the rows before, zero bias, n_out logits."""
    cfg, C = lm.config, lm.config.hidden_size
    if n_out > cfg.vocab_size:  # grow both tables, to a multiple of 64 as Phi-3's are
        V, old = -(-n_out // 64) * 64, cfg.vocab_size
        w = lm.model.embed_tokens.weight
        emb, head = nn.Embedding(V, C, device=w.device, dtype=w.dtype), nn.Linear(C, V, lm.lm_head.bias is not None,
                                                                                 device=w.device, dtype=w.dtype)
        emb.weight[:old], head.weight[:old] = w, lm.lm_head.weight
        if head.bias is not None:
            head.bias[:old] = lm.lm_head.bias
        lm.model.embed_tokens, lm.lm_head, cfg.vocab_size = emb, head, V
    for w in (lm.model.embed_tokens.weight, lm.lm_head.weight):
        w[first:n_out] = w[:first].mean(0)
    if lm.lm_head.bias is None:
        lm.lm_head.bias = nn.Parameter(torch.zeros_like(lm.lm_head.weight[:, 0]))
    else:
        lm.lm_head.bias[first:n_out] = 0
    cfg.lm_head_bias, cfg.output_vocab_size = True, n_out
