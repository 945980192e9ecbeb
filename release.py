"""
The release's checkpoint I/O: xGen-MM in and out of the official layout (Hugging Face
Salesforce/xgen-mm-phi3-mini-instruct-r-v1.5), and a new xGen-MM assembled from a SigLIP and a Phi-3.

- Reading: config.json -> XGenMMConfig (sizes checked, layer counts checked against the tensors before
  anything is built), then model.XGenMM built on the meta device and filled by assignment from the lazily
  read safetensors, so the weights are never held twice. Every tensor is taken by name with its shape
  checked; one nobody takes is an error (weights.py).
- The official names are `vlm.vision_encoder.*`, `vlm.vision_tokenizer.*` and `vlm.lang_model.*`; each
  component converts its own part (vit.py, resampler.py, phi3.py).
- Decoupled embeddings (a quirk of the release): the three tokens xGen-MM adds have their own small
  embedding and output tables (`additional_embedding`, `additional_fc`). They are folded into rows
  initial_tokenizer_len.. of the main tables on load (same results) and split out again on save.
- Writing: the same layout back (sharded safetensors under `vlm.*`, config.json, generation_config.json,
  the tokenizer files), loadable here and, with the release's remote-code files beside it, by the official code.
- A new model (`from_components`): the vocabulary surgery of the official factory: `<pad>` and the three
  tokens added to the tokenizer, their rows the mean of the existing rows, a zero output bias.

model.XGenMM.from_pretrained / save_pretrained / from_components / official_state_dict are thin entry
points over the functions here. References: docs/release.md; the release's modeling_xgenmm.py.
"""
import json
from pathlib import Path

import torch
import torch.nn as nn

import phi3
import resampler
import vit
import weights
from model import SIGLIP_SO400M, XGenMM, XGenMMConfig
from tokenizer import XGENMM_TOKENS, TokenizerError, extended_tokenizer, round_up

LM = "vlm.lang_model."
# ours -> theirs, both under LM: the official DecoupledEmbedding / DecoupledLinear keep the added tokens' rows
# in separate tables. Folded in at rows initial_tokenizer_len.. on load, split out on save.
DECOUPLED = (("model.embed_tokens.weight", "model.embed_tokens.additional_embedding.weight"),
             ("lm_head.weight", "lm_head.additional_fc.weight"),
             ("lm_head.bias", "lm_head.additional_fc.bias"))

# -----------------------------------------------------------------------------
# reading


def from_pretrained(path, dtype=None, device=None):
    """An official xGen-MM directory (or a Hub id found in the local Hugging Face cache) -> XGenMM, strict keys."""
    path = weights.resolve_dir(path)
    d = weights.read_config(path)
    if d.get("model_type") != "xgenmm":
        raise weights.CheckpointError(
            f"{path}/config.json: model_type {d.get('model_type')!r}, not 'xgenmm'; to start a new model from "
            "a SigLIP and a Phi-3 checkpoint use XGenMM.from_components(siglip_path, phi3_path)")
    config = read_config(d, path)
    phi3.add_generation_stop_ids(config.text, path)
    ckpt = weights.Checkpoint(path)
    check_layers(ckpt, config)
    key = LM + DECOUPLED[0][1]
    if key not in ckpt:
        raise weights.CheckpointError(f"{path}: missing tensor '{key}' (the decoupled rows of the xGen-MM tokens)")
    config.text.output_vocab_size = config.initial_tokenizer_len + ckpt.shape(key)[0]
    config.text.lm_head_bias = LM + "lm_head.bias" in ckpt
    if config.text.output_vocab_size > config.text.vocab_size:
        raise weights.CheckpointError(f"{path}: initial_tokenizer_len + decoupled rows = "
                                      f"{config.text.output_vocab_size} > vocab_size {config.text.vocab_size}")
    model = weights.load_model(ckpt, lambda: XGenMM(config), convert_checkpoint, dtype, device)
    if (path / "tokenizer.model").is_file():
        model.tokenizer = load_tokenizer(path, config)
    return model


def convert_checkpoint(ckpt, model, prefix=""):
    """The official xGen-MM tensors (under `prefix` + `vlm.`) -> our state dict: each component converts its
    part (names and shapes checked), then the decoupled rows are folded in."""
    cfg, lm_prefix = model.config, prefix + LM
    parts = {"vision_encoder": vit.convert_checkpoint, "vision_tokenizer": resampler.convert_checkpoint}
    state = {f"{name}.{k}": v for name, convert in parts.items()
             for k, v in convert(ckpt, getattr(model, name), f"{prefix}vlm.{name}.").items()}
    lm = phi3.convert_checkpoint(ckpt, model.lang_model, lm_prefix)
    i, n = cfg.initial_tokenizer_len, cfg.text.output_vocab_size - cfg.initial_tokenizer_len
    for ours, theirs in DECOUPLED:
        if ours in lm:  # lm_head.bias only when the checkpoint has one
            lm[ours][i: i + n] = ckpt.take(lm_prefix + theirs, (n, *lm[ours].shape[1:]))
    return state | {"lang_model." + k: v for k, v in lm.items()}


def read_config(d, path):
    """config.json's dict -> XGenMMConfig, its sizes checked; anything unreadable is a CheckpointError."""
    try:
        config = XGenMMConfig.from_hf(d)
    except weights.CheckpointError as e:
        raise weights.CheckpointError(f"{path}/config.json: {e}") from None
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # a field of the wrong type or value
        raise weights.CheckpointError(f"{path}/config.json: cannot read it ({type(e).__name__}: {e})") from None
    sizes = {"vision_encoder_config": (config.vision, ("image_size", "patch_size", "hidden_size", "intermediate_size",
                                                       "num_hidden_layers", "num_attention_heads")),
             "vision_tokenizer_config": (config.resampler, ("dim", "dim_inner", "num_latents", "depth", "heads",
                                                            "dim_head", "ff_mult")),
             "text_config": (config.text, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads", "num_key_value_heads"))}
    for part, (cfg, names) in sizes.items():
        for name in names:
            v = getattr(cfg, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= 2**24:
                raise weights.CheckpointError(f"{path}/config.json: {part}.{name} = {v!r} is not a size")
    for part, cfg, heads in (("vision_encoder_config", config.vision, config.vision.num_attention_heads),
                             ("text_config", config.text, config.text.num_attention_heads)):
        if cfg.hidden_size % heads:
            raise weights.CheckpointError(f"{path}/config.json: {part}.hidden_size {cfg.hidden_size} is not a "
                                          f"multiple of num_attention_heads {heads}")
    return config


def check_layers(ckpt, config):
    """Each part's layer count against the checkpoint's, before anything is built (see weights.check_layers)."""
    for prefix, n, field in (("vlm.vision_encoder.encoder.layers.", config.vision.num_hidden_layers,
                              "vision_encoder_config.num_hidden_layers"),
                             ("vlm.vision_tokenizer.layers.", config.resampler.depth, "vision_tokenizer_config.depth"),
                             (LM + "model.layers.", config.text.num_hidden_layers, "text_config.num_hidden_layers")):
        weights.check_layers(ckpt, prefix, n, field)


def read_tokenizer(path):
    """The tokenizer files at `path` with xGen-MM's tokens added (tokenizer.extended_tokenizer); unreadable
    files (a corrupt tokenizer.model...) are a CheckpointError."""
    try:
        return extended_tokenizer(path)
    except TokenizerError as e:
        raise weights.CheckpointError(str(e)) from None


def load_tokenizer(path, config):
    """A checkpoint's tokenizer, its xGen-MM tokens checked against the rows the checkpoint holds for them."""
    tok = read_tokenizer(path)
    ids = [tok.token_to_id(t) for t in XGENMM_TOKENS]
    want = list(range(config.initial_tokenizer_len, config.initial_tokenizer_len + len(XGENMM_TOKENS)))
    if ids != want or len(tok) > config.text.output_vocab_size:
        raise weights.CheckpointError(f"{path}: the tokenizer gives {list(XGENMM_TOKENS)} the ids {ids} and has "
                                      f"{len(tok)} tokens; the checkpoint's rows for them are {want}")
    return tok

# -----------------------------------------------------------------------------
# a new model from a SigLIP and a Phi-3


def from_components(siglip_path, phi3_path, strategy="anyres", grids=None, resampler_config=None, dtype=None,
                    device=None):
    """A new xGen-MM for pretraining: a SigLIP and a Phi-3 checkpoint, a fresh resampler, the extended tokenizer.

    As the official factory: `<pad>` is added when the pad token is the eos, then the three xGen-MM tokens.
    Their embedding and output rows start as the mean of the existing rows, and the output layer gets the
    zero bias the official decoupled head carries, so saved checkpoints have its layout.
    """
    dtype = weights.resolve_dtype(dtype)
    try:
        tower = vit.ViT.from_pretrained(siglip_path, dtype, device)
        lm = phi3.Phi3.from_pretrained(phi3_path, dtype, device)
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # a config.json these files cannot read
        raise weights.CheckpointError(f"{siglip_path} / {phi3_path}: cannot read the config "
                                      f"({type(e).__name__}: {e})") from None
    tok = read_tokenizer(weights.resolve_dir(phi3_path))
    initial = tok.token_to_id(XGENMM_TOKENS[0])  # the length before the three tokens
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
        model = XGenMM(config)
    model.vision_encoder, model.lang_model = tower.requires_grad_(False), lm
    model.vision_tokenizer = resampler.PerceiverResampler(rcfg).to(device=device, dtype=dtype)
    model.tokenizer = tok
    return model.eval()


@torch.no_grad()
def add_token_rows(lm, first, n_out):
    """Make room in a Phi-3 for the ids first..n_out-1: rows = mean of the rows before, zero bias, n_out logits."""
    cfg, C = lm.config, lm.config.hidden_size
    if n_out > cfg.vocab_size:  # grow both tables, to a multiple of 64 as Phi-3's are
        V, old = round_up(n_out, 64), cfg.vocab_size
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

# -----------------------------------------------------------------------------
# writing


def official_state_dict(model):
    """Every tensor of an XGenMM under its official name (`vlm.*`), the decoupled rows split out again."""
    out = {"vlm.vision_encoder." + k: v for k, v in model.vision_encoder.official_state_dict().items()}
    out |= {"vlm.vision_tokenizer." + k: v for k, v in model.vision_tokenizer.official_state_dict().items()}
    lm, cfg = model.lang_model.state_dict(), model.config
    i, n = cfg.initial_tokenizer_len, cfg.text.output_vocab_size - cfg.initial_tokenizer_len
    for ours, theirs in DECOUPLED:
        if ours in lm:
            out[LM + theirs] = lm[ours][i: i + n]
    return out | {LM + k: v for k, v in lm.items()}


def save_pretrained(model, path, max_shard_size=5 * 2**30, state_dict=None):
    """The official layout: config.json, (sharded) safetensors under `vlm.*`, tokenizer and generation config.

    `state_dict` replaces `official_state_dict(model)` (e.g. with LoRA adapters merged in, see lora.py).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights.save_sharded(official_state_dict(model) if state_dict is None else state_dict, path, max_shard_size)
    (path / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2) + "\n")
    t = model.config.text
    gen = {"bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(path)
    return path
