"""The numerical references the tests (and bench/) compare against, written from the official code and docs/release.md.

- `resampler_reference`: the official OpenFlamingo / xgen-mm PerceiverResampler math (einsum, row-max softmax).
- `write_tokenizer`: a SentencePiece model trained here, with Phi-3's added tokens, in the Hub file layout.
- `write_xgenmm`: a tiny random xGen-MM checkpoint in the official layout, from transformers' SigLIP and
  Phi-3 plus a random official-layout resampler and the decoupled rows.
- `XGenMMReference`: the same checkpoint composed from transformers' modules, the resampler math above and
  the any-resolution tiling written from the LLaVA-NeXT / xgen-mm functions, one sample at a time.
"""
import io
import json
import math
import random

import sentencepiece as spm
import torch
import torch.nn.functional as F

WORDS = ("the a of to and in is it you that he was for on are with as his they be at one have this from "
         "or had by word but what some we can out other were all there when up use your how said an each "
         "she which do their time if will way about many then them write would like so these her long make "
         "thing see him two has look more day could go come did number sound no most people my over know "
         "water than call first who may down side been now find image picture red blue green circle square "
         "triangle left right above below count answer question assistant user system").split()

PHI3_ADDED = [("<|endoftext|>", False), ("<|assistant|>", True), ("<|placeholder1|>", True),
              ("<|placeholder2|>", True), ("<|placeholder3|>", True), ("<|placeholder4|>", True),
              ("<|system|>", True), ("<|end|>", True), ("<|placeholder5|>", True), ("<|placeholder6|>", True),
              ("<|user|>", True)]  # (content, rstrip) as in Phi-3's tokenizer_config.json
XGENMM_ADDED = ["<pad>", "<image>", "<image placeholder>", "<|endofchunk|>"]
LSTRIP = "<|lstrip|>"  # a test token with lstrip and rstrip, so both branches meet the reference


def perturb(module, seed=0, matrix_std=0.05):
    """Weights unlike transformers' defaults, so that a parity test sees every parameter: by default every
    norm weight is 1, every bias 0 and Phi-3's attention near uniform (std 0.02), so a swapped or dropped norm
    weight, a dropped bias or a wrong attention scale changes nothing. Here norm weights become U(0.5, 1.5),
    every 1-D parameter otherwise (biases, norm biases) N(0, 0.2), and every matrix gets N(0, matrix_std)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.add_(matrix_std * torch.randn(p.shape, generator=g))
    return module


def write_tokenizer(d, add_bos=False, xgenmm=False, lstrip=True, vocab_size=700):
    """Returns the SentencePiece size n; added tokens take ids n, n+1, ... (Phi-3's 11, then xGen-MM's 4 if asked)."""
    random.seed(0)
    lines = [" ".join(random.choice(WORDS) for _ in range(random.randint(3, 14))) + random.choice([".", "?", "!", ""])
             for _ in range(3000)]
    lines += [f"{random.randint(0, 99999)} plus {random.randint(0, 999)} is {random.randint(0, 99999)}" for _ in range(300)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size, byte_fallback=True,
        split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        minloglevel=2)
    (d / "tokenizer.model").write_bytes(model.getvalue())
    n = spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
    dec = {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                    "special": True} for i, c in enumerate(["<unk>", "<s>", "</s>"])}
    added = [(c, r) for c, r in PHI3_ADDED] + ([(c, False) for c in XGENMM_ADDED + [LSTRIP] * lstrip] if xgenmm else [])
    for k, (c, r) in enumerate(added):
        dec[str(n + k)] = {"content": c, "lstrip": c == LSTRIP, "normalized": False, "rstrip": r or c == LSTRIP,
                           "single_word": False, "special": True}
    cfg = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": add_bos, "add_eos_token": False, "legacy": False,
           "bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>",
           "pad_token": "<pad>" if xgenmm else "<|endoftext|>", "added_tokens_decoder": dec,
           "clean_up_tokenization_spaces": False, "model_max_length": 4096}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "added_tokens.json").write_text(json.dumps({c: n + k for k, (c, _) in enumerate(added)}))
    return n



def resampler_reference(sd, cfg, x, mask=None):
    """The official OpenFlamingo / xgen-mm PerceiverResampler math, on official-name weights `sd`."""
    def ln(t, name):  # nn.LayerNorm(dim), default eps 1e-5
        return F.layer_norm(t, (cfg.dim,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-5)

    def heads(t):  # "b n (h d) -> b h n d"
        return t.view(t.shape[0], t.shape[1], cfg.heads, cfg.dim_head).transpose(1, 2)

    b = x.shape[0]
    latents = sd["latents"].unsqueeze(0).repeat(b, 1, 1)
    for i in range(cfg.depth):
        p = f"layers.{i}."
        media, lat = ln(x, p + "0.norm_media"), ln(latents, p + "0.norm_latents")
        q = lat @ sd[p + "0.to_q.weight"].T
        k, v = (torch.cat((media, lat), dim=-2) @ sd[p + "0.to_kv.weight"].T).chunk(2, dim=-1)
        q, k, v = heads(q) * cfg.dim_head ** -0.5, heads(k), heads(v)
        sim = torch.einsum("bhid,bhjd->bhij", q, k)
        if mask is not None:
            full = torch.cat((mask, torch.ones(b, cfg.num_latents, dtype=torch.bool)), dim=-1)
            bias = torch.zeros(full.shape).masked_fill(~full, float("-inf"))
            sim = sim + bias[:, None, None, :]
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        out = torch.einsum("bhij,bhjd->bhid", sim.softmax(dim=-1), v)
        out = out.transpose(1, 2).reshape(b, cfg.num_latents, -1)  # "b h n d -> b n (h d)"
        latents = out @ sd[p + "0.to_out.weight"].T + latents
        h = F.gelu(ln(latents, p + "1.0") @ sd[p + "1.1.weight"].T) @ sd[p + "1.3.weight"].T
        latents = h + latents
    return ln(latents, "norm") @ sd["projection.weight"].T + sd["projection.bias"]



# -----------------------------------------------------------------------------
# a tiny xGen-MM in the official layout, and the same model composed from transformers' modules

TINY_SIGLIP = dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, layer_norm_eps=1e-6)  # 4x4 = 16 patches per view
TINY_RESAMPLER = dict(num_latents=8, depth=2, heads=4, dim_head=16, ff_mult=2)
TINY_PHI3 = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=512, sliding_window=60, rms_norm_eps=1e-5)
GRIDS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]  # the release's grids, scaled to 32-pixel views
STRATEGY_FIELDS = {"anyres": ("anyres", True), "anyres-fixed": ("anyres", False), "fixed": ("pad", False)}


def write_xgenmm(d, seed=0, strategy="anyres", tokenizer="phi3", bias=True, shards=3):
    """A random tiny xGen-MM written as the Hub release is; returns the XGenMMReference of the same weights.

    tokenizer: "phi3" (Phi-3's added tokens only: the loader adds <pad> and the three xGen-MM tokens),
    "xgenmm" (the files already hold all of them) or None (no tokenizer files).
    """
    import transformers
    import resampler
    d.mkdir(parents=True, exist_ok=True)
    n = write_tokenizer(d, add_bos=True, xgenmm=tokenizer == "xgenmm", lstrip=False, vocab_size=300) \
        if tokenizer else 300
    initial = n + len(PHI3_ADDED) + 1  # Phi-3's tokens, then <pad>
    V = -(-(initial + 3) // 64) * 64
    torch.manual_seed(seed)
    siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY_SIGLIP, vision_use_head=True))
    lm = transformers.Phi3ForCausalLM(transformers.Phi3Config(
        vocab_size=V, **TINY_PHI3, bos_token_id=1, eos_token_id=n, pad_token_id=initial - 1,
        attn_implementation="eager"))
    rcfg = resampler.ResamplerConfig(dim=64, dim_inner=64, **TINY_RESAMPLER)
    res = resampler.PerceiverResampler(rcfg)
    with torch.no_grad():  # perturb the LayerNorm ones/zeros so a skipped or swapped norm shows
        for p in list(siglip.parameters()) + list(res.parameters()) + list(lm.parameters()):
            p.add_(torch.randn_like(p) * 0.05)
    C = TINY_PHI3["hidden_size"]
    extra = {"model.embed_tokens.additional_embedding.weight": torch.randn(3, C),
             "lm_head.additional_fc.weight": torch.randn(3, C) * 0.2}
    if bias:
        extra |= {"lm_head.bias": torch.randn(V) * 0.5, "lm_head.additional_fc.bias": torch.randn(3) * 0.5}
    sd = {"vlm.vision_encoder." + k.removeprefix("vision_model."): v for k, v in siglip.state_dict().items()}
    sd |= {"vlm.vision_tokenizer." + k: v for k, v in res.official_state_dict().items()}
    sd |= {"vlm.lang_model." + k: v for k, v in (lm.state_dict() | extra).items()}
    save_sharded({k: v.detach().clone().contiguous() for k, v in sd.items()}, d, shards)
    aspect, sampling = STRATEGY_FIELDS[strategy]
    text = json.loads(lm.config.to_json_string()) | {"initial_tokenizer_len": initial}
    config = {"model_type": "xgenmm", "architectures": ["XGenMMModelForConditionalGeneration"],
              "vision_encoder_config": {"model_type": "xgenmm_vision_encoder", "model_name":
                                        "google/siglip-so400m-patch14-384", "anyres_grids": GRIDS,
                                        "image_aspect_ratio": aspect, "anyres_patch_sampling": sampling,
                                        **TINY_SIGLIP},
              "vision_tokenizer_config": {"model_type": "xgenmm_vision_tokenizer", "vis_feature_dim": 64,
                                          "lang_embedding_dim": C, "num_vis_tokens": 8, "depth": 2, "heads": 4,
                                          "dim_head": 16, "ff_mult": 2},
              "text_config": text}
    (d / "config.json").write_text(json.dumps(config, indent=2))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [n, n + 1, n + 7], "pad_token_id": initial - 1}))
    return XGenMMReference(siglip.eval(), {k: v.detach() for k, v in res.official_state_dict().items()}, rcfg,
                           lm.eval(), extra, initial, strategy, n)


def save_sharded(sd, d, shards):
    from safetensors.torch import save_file
    keys = list(sd)
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {k: names[i * shards // len(keys)] for i, k in enumerate(keys)}
    for name in names:
        save_file({k: sd[k] for k in keys if weight_map[k] == name}, d / name, metadata={"format": "pt"})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# the LLaVA-NeXT / xgen-mm image functions, written from the official code


def select_best_resolution(original_size, possible_resolutions):
    original_width, original_height = original_size
    best_fit, max_effective, min_wasted = None, 0, float("inf")
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best_fit = effective, wasted, (width, height)
    return best_fit


def resize_and_pad_image(image, target_resolution):
    from PIL import Image
    original_width, original_height = image.size
    target_width, target_height = target_resolution
    scale_w, scale_h = target_width / original_width, target_height / original_height
    if scale_w < scale_h:
        new_width, new_height = target_width, min(math.ceil(original_height * scale_w), target_height)
    else:
        new_height, new_width = target_height, min(math.ceil(original_width * scale_h), target_width)
    resized = image.resize((new_width, new_height))
    new_image = Image.new("RGB", (target_width, target_height), (0, 0, 0))
    new_image.paste(resized, ((target_width - new_width) // 2, (target_height - new_height) // 2))
    return new_image


def divide_to_patches(image, patch_size):
    width, height = image.size
    return [image.crop((j, i, j + patch_size, i + patch_size))
            for i in range(0, height, patch_size) for j in range(0, width, patch_size)]


def expand2square(image, background):
    from PIL import Image
    width, height = image.size
    if width == height:
        return image
    size = max(width, height)
    result = Image.new(image.mode, (size, size), background)
    result.paste(image, ((size - width) // 2, 0) if height > width else (0, (size - height) // 2))
    return result


def unpad_image(tensor, original_size, keep_original_shape):
    original_width, original_height = original_size
    current_height, current_width = tensor.shape[1:]
    if original_width / original_height > current_width / current_height:
        scale_factor = current_width / original_width
        new_height = int(original_height * scale_factor)
        padding = (current_height - new_height) // 2
        if keep_original_shape:
            mask = torch.ones(current_height, current_width, dtype=torch.bool)
            mask[:padding, :] = False
            mask[current_height - padding:, :] = False
            return tensor, mask
        return tensor[:, padding: current_height - padding, :], None
    scale_factor = current_height / original_height
    new_width = int(original_width * scale_factor)
    padding = (current_width - new_width) // 2
    if keep_original_shape:
        mask = torch.ones(current_height, current_width, dtype=torch.bool)
        mask[:, :padding] = False
        mask[:, current_width - padding:] = False
        return tensor, mask
    return tensor[:, :, padding: current_width - padding], None


def processor(image, size):
    """The SigLIP / Blip3 image processor: RGB, bicubic resize, rescale 1/255, normalize mean 0.5 std 0.5."""
    import numpy as np
    from PIL import Image
    image = image.convert("RGB").resize((size, size), Image.BICUBIC)
    return (torch.tensor(np.array(image), dtype=torch.float32).permute(2, 0, 1) * (1 / 255) - 0.5) / 0.5


class XGenMMReference:
    """The checkpoint written by write_xgenmm, run one sample at a time from transformers' modules."""

    def __init__(self, siglip, res_sd, rcfg, lm, extra, initial, strategy, n_sp=None, grids=None):
        """siglip: transformers SiglipVisionModel; res_sd / rcfg: official-name resampler weights and sizes;
        lm: transformers Phi3ForCausalLM; extra: the decoupled rows and lm_head biases (official names under
        vlm.lang_model.); grids: anyres grids in pixels (default: GRIDS)."""
        self.siglip, self.res_sd, self.rcfg, self.lm, self.extra = siglip, res_sd, rcfg, lm, extra
        self.initial, self.strategy, self.n_sp = initial, strategy, n_sp
        self.grids = grids or GRIDS
        self.S = siglip.config.image_size
        self.side = self.S // siglip.config.patch_size

    @property
    def image_id(self):
        return self.initial

    @torch.no_grad()
    def image_tokens(self, image):
        image, S, h = image.convert("RGB"), self.S, self.side
        if self.strategy == "fixed":
            views = [processor(expand2square(image, (127, 127, 127)), S)]
            feats = self.siglip(pixel_values=torch.stack(views)).last_hidden_state
            return resampler_reference(self.res_sd, self.rcfg, feats[:1])[0]
        best = select_best_resolution(image.size, self.grids)
        patches = divide_to_patches(resize_and_pad_image(image, best), S)
        views = [processor(v, S) for v in [image.resize((S, S))] + patches]
        feats = self.siglip(pixel_values=torch.stack(views)).last_hidden_state  # (V, h*h, D)
        base, f = feats[0], feats[1:]
        nw, nh = best[0] // S, best[1] // S
        f = f.view(nh, nw, h, h, -1).permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)  # (D, H, W)
        sampling = self.strategy == "anyres"
        f, mask = unpad_image(f, image.size, keep_original_shape=sampling)
        f = f.flatten(1, 2).transpose(0, 1)  # (H*W, D)
        if not sampling:
            return resampler_reference(self.res_sd, self.rcfg, torch.cat((base, f))[None])[0]
        groups = torch.cat((base[None], f.reshape(-1, h * h, f.shape[-1])))
        masks = torch.cat((torch.ones(1, h * h, dtype=torch.bool), mask.flatten().view(-1, h * h)))
        return resampler_reference(self.res_sd, self.rcfg, groups, masks).flatten(0, 1)

    def embed(self, ids):
        main = self.lm.model.embed_tokens.weight
        add = self.extra["model.embed_tokens.additional_embedding.weight"]
        return torch.stack([main[i] if i < self.initial else add[i - self.initial] for i in ids])

    @torch.no_grad()
    def logits(self, ids, images):
        """(T', initial + 3) logits of one sample: ids with one <image> per image, images as PIL."""
        pieces, images = [], list(images)
        for i in ids:
            pieces.append(self.image_tokens(images.pop(0)) if i == self.image_id else self.embed([i]))
        assert not images
        h = self.lm.model(inputs_embeds=torch.cat(pieces)[None]).last_hidden_state[0]
        W, Wa = self.lm.lm_head.weight[: self.initial], self.extra["lm_head.additional_fc.weight"]
        b = self.extra.get("lm_head.bias", torch.zeros(W.shape[0] + 64))[: self.initial]
        ba = self.extra.get("lm_head.additional_fc.bias", torch.zeros(3))
        return torch.cat((h @ W.T + b, h @ Wa.T + ba), dim=-1)
