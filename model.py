"""
xGen-MM (BLIP-3): a frozen SigLIP ViT, a Perceiver Resampler and Phi-3, with images spliced into text.

- Any-resolution encoding, as released (images.py cuts the views and groups their features): every crop
  and a squashed global view go through the ViT, and the resampler turns each group of 729 features into
  128 tokens: 384, 512 or 640 tokens per image. The paper's two ablation strategies are chosen by config:
  fixed resolution (one padded view) and any-resolution with fixed sampling (all features resampled once).
- Splicing by expansion: each `<image>` in the ids is first repeated as often as its image has vision tokens
  (`XGenMMConfig.expand_images`, which data.py and `generate` call while the ids are still lists), so the
  splice is one masked scatter of the vision tokens into the text embeddings, with no per-row loop; labels
  there are -100. Any number of images per sample, any number of crops per image.
- The three tokens xGen-MM adds (`<image>`, `<image placeholder>`, `<|endofchunk|>`) have their own small
  embedding and output tables in the official checkpoint ("decoupled embeddings"); they are folded into
  rows of the main tables on load (same results) and split out again on save: release.py, the release's
  checkpoint I/O, which `from_pretrained` / `save_pretrained` / `from_components` call. Generation is
  generate.py's.

References: xGen-MM / BLIP-3 (arXiv 2408.08872); salesforce/LAVIS branch xgen-mm and the Hub release
Salesforce/xgen-mm-phi3-mini-instruct-r-v1.5 (modeling_xgenmm.py); LLaVA-NeXT any-resolution (unpad_image);
OpenFlamingo; docs/release.md (the facts this file implements).
"""
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn

import generate
import phi3
import resampler
import vit
import weights
from images import Images, group_features, pad_groups, select_grid
from tokenizer import XGENMM_TOKENS, Tokenizer, pad_batch, round_up

SIGLIP_SO400M = "google/siglip-so400m-patch14-384"
GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))  # (cols, rows): the release's anyres_grids, in crops
STRATEGIES = ("anyres", "anyres-fixed", "fixed")

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
        """How many vision tokens an image of size (W, H) becomes: 128 per group the resampler reads."""
        L = self.resampler.num_latents
        if self.strategy != "anyres":
            return L
        w, h = select_grid(size, self.grids)
        return (1 + (w // self.vision.image_size) * (h // self.vision.image_size)) * L

    def expand_images(self, ids, sizes, labels=None):
        """Ids with one `<image>` per image -> each marker repeated as often as its image has vision tokens (the
        places XGenMM.embed fills with them, in order); `labels`, when given, get -100 there and come back too.

        `sizes`: (W, H) of each image, in the order of the markers. A count mismatch is a ValueError.
        """
        marks = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(marks) != len(sizes):
            raise ValueError(f"{len(marks)} <image> marker(s) in the text but {len(sizes)} image(s); put exactly "
                             "one <image> token where each image goes")
        out, lab, start = [], [], 0
        for m, size in zip(marks + [len(ids)], [*sizes, None]):
            out += ids[start:m]
            lab += [] if labels is None else labels[start:m]
            if size is not None:
                n = self.image_tokens(size)
                out, lab, start = out + [self.image_token_id] * n, lab + [-100] * n, m + 1
        return out if labels is None else (out, lab)

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


PRESET_PARTS = {"xgenmm": ("so400m", "xgenmm", "phi3-mini-4k"), "small": ("small",) * 3, "tiny": ("tiny",) * 3,
                "toy": ("toy", "tiny", "tiny")}  # the toy world's: tiny, with 96-pixel views
# The toy world's anyres_grids, in crops: its scenes are square (one crop, the cells on the patches) or tall
# signs of small text (a column of crops). The release's grids would pad a square scene into a 1x2 grid,
# half black, its cells straddling the crops' patches.
TOY_GRIDS = ((1, 1), (1, 2), (1, 3))


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
        text.vocab_size, text.output_vocab_size = round_up(len(tokenizer), 64), len(tokenizer)  # as Phi-3
        text.bos_token_id, text.pad_token_id = tokenizer.bos_id, tokenizer.pad_id
        end = [tokenizer.token_to_id("<|end|>")] if "<|end|>" in tokenizer.by_content else []
        text.eos_token_id = [tokenizer.eos_id] + end
    initial = tokenizer.token_to_id(XGENMM_TOKENS[0]) if tokenizer is not None else text.output_vocab_size - 3
    S = vit.PRESETS[v].image_size
    grids = [[c * S, r * S] for c, r in TOY_GRIDS] if name == "toy" else None
    return XGenMMConfig.from_strategy(strategy, vision=vit.PRESETS[v], resampler=resampler.PRESETS[r], text=text,
                                      initial_tokenizer_len=initial, anyres_grids=grids)

# -----------------------------------------------------------------------------
# the model


class XGenMM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        # module names = the official checkpoint's prefixes (vlm.vision_encoder / vision_tokenizer / lang_model):
        # `vision_tokenizer` is the release's name for the resampler, kept so that loading is a copy by name
        self.vision_encoder = vit.ViT(config.vision).requires_grad_(False)  # frozen in every stage (paper 3)
        self.vision_tokenizer = resampler.build(config.resampler)
        self.lang_model = phi3.Phi3(config.text)
        self.tokenizer = None  # set by the loaders when the checkpoint has tokenizer files
        self.vit_batch = 32    # views per ViT call: bounds activation memory for many-image batches

    # ---- interleaving: the splice ------------------------------------------------

    def embed(self, input_ids, images=None):
        """Expanded ids (B, T) -> input embeddings (B, T, C), the vision tokens of `images` scattered, in order,
        into the positions that hold `<image>` (config.expand_images put one per vision token there)."""
        is_image, per_row = self.image_positions(input_ids, images)  # (B, T), vision tokens of each row's images
        device = self.lang_model.lm_head.weight.device
        input_ids = input_ids.to(device, non_blocking=True)
        embeds = self.lang_model.model.embed_tokens(input_ids)
        if not any(per_row):
            return self.keep_in_graph(embeds)
        vision = torch.cat(self.encode_images(images, self.instructions(embeds, input_ids, per_row)))  # (n, C)
        return embeds.masked_scatter(is_image.to(device)[..., None], vision.to(embeds.dtype))

    def image_positions(self, input_ids, images):
        """(ids == <image> (B, T), per row the vision tokens of each of its images); a row whose `<image>` count is
        not its images' token count (ids not expanded by config.expand_images) is a ValueError."""
        sizes = iter(images.sizes if images is not None else [])
        counts = images.counts if images is not None else [0] * len(input_ids)
        per_row = [[self.config.image_tokens(next(sizes)) for _ in range(n)] for n in counts]
        is_image = input_ids == self.config.image_token_id
        for b, (have, want) in enumerate(zip(is_image.sum(1).tolist(), per_row)):
            if have != sum(want):
                raise ValueError(f"sample {b}: {have} <image> positions for {sum(want)} vision tokens: expand each "
                                 "<image> with config.expand_images (data.py and XGenMM.encode_batch do)")
        return is_image, per_row

    def instructions(self, embeds, ids, per_row):
        """Per image, in order, its instruction's embeddings for an instruction-aware resampler; else None."""
        if not self.config.resampler.instruction_dim:
            return None
        find = self.vision_tokenizer.instructions  # resampler.InstructionAwareResampler's
        return [t for b, n in enumerate(per_row)
                for t in find(embeds[b], ids[b], n, self.config.image_token_id, self.stop_ids)]

    # ---- images -> vision tokens -----------------------------------------------

    def encode_images(self, images, instructions=None, feats=None):
        """Images -> one (tokens, C) block per image, in order: ViT on every view, grouping, resampler.

        `instructions`: per image, the (T, C) embeddings of its instruction, for an instruction-aware resampler;
        `feats`: the ViT's features of images.pixel_values, when the caller has them already.
        """
        if not images.sizes:
            return []
        feats = self.vit_features(images.pixel_values) if feats is None else feats  # (V, P, D)
        groups, masks, per_image, v = [], [], [], 0
        for size, (cols, rows) in zip(images.sizes, images.grids):
            g, m = group_features(feats[v: v + 1 + cols * rows], size, (cols, rows), self.config.anyres_patch_sampling)
            groups, masks, v = groups + g, masks + m, v + 1 + cols * rows
            per_image.append(len(g))
        if v != len(feats):
            raise ValueError(f"Images has {len(feats)} views but its grids account for {v}")
        x, mask = pad_groups(groups, masks)
        if instructions is None:
            tokens = self.vision_tokenizer(x, mask)  # (G, L, C)
        else:  # resampler.InstructionAwareResampler: every group of an image reads that image's instruction
            tokens = self.vision_tokenizer.resample(x, mask, instructions, per_image)
        return [t.flatten(0, 1) for t in tokens.split(per_image)]

    def vit_features(self, pixels):
        frozen = not any(p.requires_grad for p in self.vision_encoder.parameters())
        pixels = pixels.to(self.vision_encoder.post_layernorm.weight.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):  # a frozen ViT keeps no activations
            return torch.cat([self.vision_encoder(c) for c in pixels.split(self.vit_batch)])

    # ---- the loss -------------------------------------------------------------------

    def forward(self, input_ids, images=None, attention_mask=None, labels=None, reduction="mean"):
        """Logits (B, T, V) of expanded ids (B, T) with their images spliced in; with `labels`, the loss instead.

        `attention_mask` (B, T): 1 = token, 0 = padding, either side. `reduction` is Phi3.forward's: "mean",
        "sum" (a trainer that normalises over a whole step) or "sequence" (per row, for DPO).
        """
        embeds = self.embed(input_ids, images)
        device = embeds.device
        mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.to(device, non_blocking=True)
        if labels is not None:  # never a loss on a vision token, whatever the caller's labels say
            is_image = (input_ids == self.config.image_token_id).to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True).masked_fill(is_image, -100)
        return self.lang_model(embeds=embeds, attention_mask=mask, labels=labels, reduction=reduction)

    def keep_in_graph(self, embeds):
        """A text-only batch gives the trainable vision path no gradient, but DDP and FSDP2 expect one for every
        trainable parameter on every rank: they join the graph with a zero weight (x + 0.0 == x)."""
        if not (self.training and torch.is_grad_enabled()):
            return embeds
        vision = [p.sum() for m in (self.vision_encoder, self.vision_tokenizer) for p in m.parameters() if p.requires_grad]
        return embeds + 0.0 * torch.stack(vision).sum().to(embeds.dtype) if vision else embeds

    # ---- generation -------------------------------------------------------------

    @property
    def stop_ids(self):
        """Every eos id of the config, plus `<|end|>` (the chat turn end) when the tokenizer has it."""
        ids = self.config.text.eos_ids
        if self.tokenizer is not None and "<|end|>" in self.tokenizer.by_content:
            ids = ids + [self.tokenizer.token_to_id("<|end|>")]
        return list(dict.fromkeys(ids))

    def encode_batch(self, prompts, images=None, padding_side="right"):
        """Prompts (strings, or id lists with one `<image>` per image) and their images (an `Images`, or per
        prompt a list of PIL images) -> (expanded ids (B, T), attention_mask (B, T), Images or None)."""
        if images is not None and not isinstance(images, Images):
            images = Images.from_pil(images, self.config)
        counts, sizes, rows = images.counts if images else [0] * len(prompts), iter(images.sizes if images else []), []
        if len(counts) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but images for {len(counts)}")
        for b, (p, n) in enumerate(zip(prompts, counts)):
            try:
                ids = self.tokenizer.encode(p) if isinstance(p, str) else list(p)
                rows.append(self.config.expand_images(ids, [next(sizes) for _ in range(n)]))
            except ValueError as e:
                raise ValueError(f"sample {b}: {e}") from None
        pad = self.config.text.pad_token_id
        ids, mask = generate.left_pad(rows, pad) if padding_side == "left" else pad_batch(rows, pad)
        return ids, mask, images

    @torch.no_grad()
    def generate(self, prompts, images=None, max_new_tokens=128, **options):
        """New tokens (B, n) for a batch of prompts, each with its own images; rows are padded after they stop.

        `prompts`: strings or id lists, with one `<image>` per image; `images`: an `Images`, or per prompt a
        list of PIL images. `options` are generate.decode's: temperature, top_k, top_p, stop_ids (default
        `stop_ids`), pad_id, generator, callback (sees each step's tokens), compile. Batched results equal
        one-by-one results.
        """
        ids, mask, images = self.encode_batch(prompts, images, padding_side="left")
        embeds = self.embed(ids, images)
        options.setdefault("stop_ids", self.stop_ids)
        options.setdefault("pad_id", self.config.text.pad_token_id)
        return generate.decode(self.lang_model, embeds, mask.to(embeds.device), max_new_tokens, **options)

    # ---- checkpoints: release.py's, the release's checkpoint I/O -------------------
    # (imported where used: release.py builds on this file)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        """An official xGen-MM directory (or a Hub id found in the local Hugging Face cache), strict keys;
        built on the meta device and filled by assignment, so the weights are never held twice."""
        import release
        return release.from_pretrained(path, dtype, device)

    @classmethod
    def from_components(cls, siglip_path, phi3_path, strategy="anyres", grids=None, resampler_config=None,
                        dtype=None, device=None):
        """A new xGen-MM for pretraining from a SigLIP and a Phi-3 checkpoint (release.from_components)."""
        import release
        return release.from_components(siglip_path, phi3_path, strategy, grids, resampler_config, dtype, device)

    @classmethod
    def from_tokenizer(cls, tokenizer, size="tiny", strategy="anyres"):
        """A new model to train from scratch, of preset `size`, its vocabulary sized to `tokenizer` (a tokenizer
        directory, or a Tokenizer already extended by `extend_tokenizer`): the toy world's models start here."""
        if not isinstance(tokenizer, Tokenizer):
            import release
            tokenizer = release.read_tokenizer(tokenizer)
        m = cls(preset(size, strategy, tokenizer))
        m.lang_model.init_weights()
        m.vision_encoder.init_weights()
        m.tokenizer = tokenizer
        return m

    def official_state_dict(self):
        """Every tensor under its official name (`vlm.*`), the decoupled rows split out again."""
        import release
        return release.official_state_dict(self)

    def save_pretrained(self, path, max_shard_size=5 * 2**30, state_dict=None):
        """The official layout (release.save_pretrained): loads with `from_pretrained` and, with the release's
        remote-code files beside it, in the official code. `state_dict` replaces `official_state_dict()`."""
        import release
        return release.save_pretrained(self, path, max_shard_size, state_dict)
