"""
Phi-3-mini, the language model of xGen-MM: the network, its loss, and its loader.

- A pre-norm decoder: RMSNorm (computed in fp32) -> attention -> residual, RMSNorm -> SiLU-gated MLP
  -> residual. q, k, v come from one fused `qkv_proj` and gate/up from one `gate_up_proj`, exactly as
  the checkpoints store them, so loading is a name-for-name copy.
- Rotary position embedding in the "rotate-half" layout of the Hugging Face checkpoints (the two halves
  of each head are the pair, not interleaved even/odd features).
- Sliding-window attention as Hugging Face applies it: query i sees keys j with i - window < j <= i.
  attention.py does the attention; this file only describes the mask (causal, window, each row's key
  range), so a padded batch or a sequence longer than the window never builds a (T, T) mask.
- The 128k model's LongRoPE ("longrope", formerly "su") is implemented: per-frequency short/long factors,
  chosen by the current length, plus the attention scaling on cos/sin (generate.py rebuilds the cache
  when a generation crosses the switch point, as the reference does).
- One `forward`, one kind of result per call: logits, or with `labels` the loss (the fused chunked
  cross-entropy of fused.py, which never builds the (B, T, vocab) logits; or per row, for DPO). The loss
  is computed inside `forward` because DDP and FSDP2 hook the module's forward.
- Decoding (the static KV cache, prefill, sampling, left padding) is generate.py's; `forward` only knows
  that with `input_pos` its queries sit at those slots of a cache. `Phi3.generate` is a thin method over it.
- The tokenizer lives in tokenizer.py and is re-exported here as `phi3.Tokenizer`.
- The file reads bottom-up: rotary embedding, building blocks, config, the decoder; config.json parsing and
  the checkpoint's names come last, under "loading".

References: Phi-3 technical report (arXiv 2404.14219); RoFormer (arXiv 2104.09864); LongRoPE (arXiv
2402.13753); microsoft/Phi-3-mini-4k-instruct; transformers' modeling_phi3.py (the numerical reference).
"""
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import generate
import weights
from attention import Mask, attention
from fused import linear_cross_entropy
from tokenizer import Tokenizer  # noqa: F401  (phi3.Tokenizer: the tokenizer lives in tokenizer.py)

# -----------------------------------------------------------------------------
# rotary position embedding


def rope_inv_freq(cfg, long=False):
    """Inverse frequencies (head_dim/2,) and the cos/sin scale; LongRoPE divides each frequency by a factor."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if cfg.rope_scaling is None:
        return inv_freq, 1.0
    s = cfg.rope_scaling
    ext = torch.tensor(s["long_factor"] if long else s["short_factor"], dtype=torch.float32)
    factor = s.get("factor") or cfg.max_position_embeddings / cfg.original_max_position_embeddings
    scale = s.get("attention_factor")
    if scale is None:  # LongRoPE paper: sqrt(1 + ln(s) / ln(L_original))
        scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(cfg.original_max_position_embeddings))
    return inv_freq / ext, scale


def rope_cos_sin(cfg, pos, dtype, inv_freq, long_freq, scale):
    """cos, sin of shape (B, 1, T, head_dim) for integer positions (B, T): once per forward, for every layer's
    heads to broadcast over."""
    if long_freq is not None:
        # reference rule: the long factors apply to the whole call once max(position)+1 passes the original length
        inv_freq = torch.where(pos.max() + 1 > cfg.original_max_position_embeddings, long_freq, inv_freq)
    freqs = pos[:, None, :, None].float() * inv_freq  # (B, 1, T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:  # LongRoPE's scale; 1 otherwise, where multiplying would change nothing
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x, cos, sin):
    """x: (B, n_heads, T, head_dim); cos/sin: (B, 1, T, head_dim). Rotate-half layout. The result keeps x's
    dtype: under autocast x is bf16 while fp32 weights give fp32 cos/sin, and q, k must stay in v's dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    y = x * cos + torch.cat((-x2, x1), dim=-1) * sin
    return y if y.dtype == x.dtype else y.to(x.dtype)


# -----------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # in fp32 whatever the activation dtype, then back, as the reference does (no casts when already fp32:
        # a cast to its own dtype is a no-op that still costs a dispatch, and decoding is dispatch-bound)
        if x.dtype == torch.float32:
            return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.n_head, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.n_head + 2 * self.n_kv) * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * cfg.head_dim, cfg.hidden_size, bias=False)
        self.kv_cache = None

    def forward(self, x, cos, sin, mask, input_pos):
        B, T, _ = x.shape
        qkv = self.qkv_proj(x).view(B, T, -1, self.cfg.head_dim).transpose(1, 2)  # (B, heads, T, head_dim)
        # q and k heads rotated in one go; the result is contiguous in the layout attention reads
        q, k = apply_rope(qkv[:, : self.n_head + self.n_kv], cos, sin).split((self.n_head, self.n_kv), dim=1)
        v = qkv[:, self.n_head + self.n_kv:]
        if input_pos is not None:  # cached decoding (a cache left from an earlier call is not touched otherwise)
            k, v = self.kv_cache.update(input_pos, k, v)
        p = self.cfg.attention_dropout if self.training else 0.0
        y = attention(q, k, v, mask, dropout_p=p)  # (B, heads, T, head_dim); kv heads shared by groups (GQA)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [gate | up] along features, as stored
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.p = cfg.resid_pdrop

    def forward(self, x, cos, sin, mask, input_pos):
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))

    def dropout(self, x):  # resid_pdrop is 0 in the released models: skip the call entirely then
        return F.dropout(x, self.p, True) if self.training and self.p > 0 else x

# -----------------------------------------------------------------------------
# config


@dataclass
class Phi3Config:
    vocab_size: int = 32064              # 32011 used ids, padded to a multiple of 64
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32        # Phi-3-mini has no GQA; Phi-3-medium does
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None     # None, or longrope: {"type", "short_factor", "long_factor"}
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    sliding_window: int | None = 2047
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attention_dropout: float = 0.0
    lm_head_bias: bool = False           # the xGen-MM head carries a bias; Phi-3's does not
    output_vocab_size: int | None = None  # logits only for ids < this (xGen-MM: 32015); None = vocab_size
    bos_token_id: int = 1
    eos_token_id: int | list = 32000     # Phi-3-instruct's generation_config.json: [32000, 32001, 32007]
    pad_token_id: int = 32000

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @property
    def eos_ids(self):
        return as_id_list(self.eos_token_id)

    @classmethod
    def from_hf(cls, d):  # see "loading" at the end
        return config_from_hf(d)

    def to_hf(self):
        return config_to_hf(self)


PRESETS = {
    "phi3-mini-4k": Phi3Config(),
    # bench / CPU presets (sizes shared with vit.py's and resampler.py's presets of the same name)
    "small": Phi3Config(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                        num_key_value_heads=12),
    "tiny": Phi3Config(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, eos_token_id=2, pad_token_id=0),
}

# -----------------------------------------------------------------------------
# the decoder


class Phi3(nn.Module):
    def __init__(self, cfg: Phi3Config):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias)
        self.gradient_checkpointing = False
        self._rope = {}

    def rope_freqs(self, device):
        """(inverse frequencies, LongRoPE's long ones or None, cos/sin scale), computed once per device: plain
        attributes, not buffers, so a model built on the meta device needs nothing re-initialised."""
        if device not in self._rope:
            (short, scale), cfg = rope_inv_freq(self.config), self.config
            long = rope_inv_freq(cfg, long=True)[0].to(device) if cfg.rope_scaling else None
            self._rope[device] = (short.to(device), long, scale)
        return self._rope[device]

    def init_weights(self, std=0.02):
        """Fresh initialisation (normal(0, std) linears and embeddings, unit norms), as the reference's _init_weights."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        return self

    def forward(self, idx=None, labels=None, *, embeds=None, attention_mask=None, position_ids=None,
                input_pos=None, reduction="mean", last_only=False):
        """Token ids (B, T) or input embeddings (B, T, C) -> logits (B, T, V); with `labels`, the loss instead.

        `attention_mask` (B, T), 1 = token, 0 = padding, allows padded batches on either side (positions
        then count real tokens only). `labels` are aligned with the inputs (shifted here), -100 is ignored;
        `reduction` "mean" or "sum" (a trainer normalising over a whole optimiser step) gives the fused
        loss, "sequence" the (B,) summed loss per row (the log-likelihood of each response, which DPO
        compares). `last_only` gives the logits of the last position only. Decoding (generate.py): after
        `generate.setup_cache`, the queries sit at the cache slots `input_pos` (T,); `attention_mask`
        (B, slots) then marks the slots that hold each row's tokens, `position_ids` (B, T) their positions.
        """
        x = self.model.embed_tokens(idx) if embeds is None else embeds
        B, T, _ = x.shape
        mask, pos = self.attention_layout(B, T, x.device, attention_mask, position_ids, input_pos)
        cos, sin = rope_cos_sin(self.config, pos, x.dtype, *self.rope_freqs(x.device))
        if self.training and self.config.embd_pdrop > 0:
            x = F.dropout(x, self.config.embd_pdrop, True)
        for block in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, input_pos, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, input_pos)
        if labels is None:
            return self.logits(self.model.norm(x[:, -1:] if last_only else x))
        x, targets = self.model.norm(x), shift_labels(labels)
        if reduction == "sequence":
            return sequence_nll(x, *self.head_weights(), targets)
        return linear_cross_entropy(x, *self.head_weights(), targets, reduction)

    def attention_layout(self, B, T, device, attention_mask, position_ids, input_pos):
        """(attention.Mask, positions (B, T)) for a forward call: the mask described, never a (T, T) tensor."""
        window = self.config.sliding_window
        if input_pos is not None:  # cached decoding: the queries sit at slots input_pos of the static cache
            if self.model.layers[0].self_attn.kv_cache is None:
                raise RuntimeError("forward with input_pos needs a KV cache: call setup_cache (generate.py) first")
            keep = None if attention_mask is None else attention_mask.bool()
            pos = input_pos[None, :].expand(B, T) if position_ids is None else position_ids
            if T == 1:  # one new token: the slots it sees, worked out here once rather than in every layer
                return Mask(key_keep=self.slots_seen(input_pos, keep)), pos
            return Mask(causal=True, window=window, key_keep=keep, q_pos=input_pos), pos
        if attention_mask is not None:  # padded rows, either side: one key range per row
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0) if position_ids is None else position_ids
            return Mask.from_padding(attention_mask, causal=True, window=window), pos  # real tokens count from 0
        pos = torch.arange(T, device=device)[None, :].expand(B, T) if position_ids is None else position_ids
        return Mask(causal=True, window=window), pos

    def slots_seen(self, input_pos, keep):
        """(B or 1, slots) bool: the cache slots a query at slot input_pos (1,) sees: those up to its own, within
        the sliding window, and among `keep` (the slots holding its row's tokens) when given."""
        d = input_pos - torch.arange(self.model.layers[0].self_attn.kv_cache.k.shape[2], device=input_pos.device)
        seen = (d >= 0) if self.config.sliding_window is None else (d >= 0) & (d < self.config.sliding_window)
        return seen[None] if keep is None else keep & seen

    def head_weights(self):
        """lm_head's weight and bias, restricted to the first `output_vocab_size` rows when the config asks."""
        n, w, b = self.config.output_vocab_size, self.lm_head.weight, self.lm_head.bias
        return (w, b) if n is None else (w[:n], None if b is None else b[:n])

    def logits(self, x):
        return F.linear(x, *self.head_weights())

    def generate(self, idx, max_new_tokens, attention_mask=None, **options):
        """Continue a batch of prompts (id lists, or a left-padded tensor and its mask): the new tokens (B, n).

        `options` are generate.decode's: temperature (0 = greedy), top_k, top_p, stop_ids, pad_id, generator,
        callback, compile.
        """
        return generate.generate(self, idx, max_new_tokens, attention_mask, **options)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        """A Hugging Face Phi-3 directory (config.json + single or sharded safetensors)."""
        cfg = config_from_hf(weights.read_config(path))
        path = weights.resolve_dir(path)
        add_generation_stop_ids(cfg, path)
        ckpt = weights.Checkpoint(path)
        cfg.lm_head_bias = "lm_head.bias" in ckpt
        weights.check_layers(ckpt, "model.layers.", cfg.num_hidden_layers, "num_hidden_layers")
        return weights.load_model(ckpt, lambda: cls(cfg), convert_checkpoint, dtype, device)



def shift_labels(labels):
    """Position t predicts labels[t+1]: shift the labels (not the logits, which a slice would copy)."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def sequence_nll(x, weight, bias, targets):
    """Per row of x (B, T, C): the summed next-token loss over targets != -100, logits only where needed."""
    keep = targets != -100
    logits = F.linear(x[keep], weight, bias).float()  # (n, V): supervised positions only
    nll = logits.logsumexp(-1) - logits.gather(-1, targets[keep][:, None])[:, 0]
    rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(targets)[keep]
    return torch.zeros(x.shape[0], device=x.device).index_add(0, rows, nll)

# -----------------------------------------------------------------------------
# loading: config.json, generation_config.json and the checkpoint's names


def config_from_hf(d):
    """From a Hugging Face Phi-3 config.json dict; refuses what this file does not implement."""
    if d.get("model_type", "phi3") != "phi3":
        raise ValueError(f"config model_type is {d['model_type']!r}, not 'phi3'"
                         + (": an xGen-MM checkpoint loads with model.py" if d["model_type"] == "xgenmm" else ""))
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Phi-3 config: hidden_act {d['hidden_act']!r} is not supported (only 'silu')")
    if d.get("tie_word_embeddings", False):
        raise ValueError("Phi-3 config: tie_word_embeddings=true is not supported (Phi-3 has a separate lm_head)")
    rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if float(rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ValueError("Phi-3 config: partial_rotary_factor != 1 is not supported (Phi-3 rotates whole heads)")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in ("su", "longrope"):
        scaling = {"type": "longrope", "short_factor": list(rope["short_factor"]),
                   "long_factor": list(rope["long_factor"])}
        half = d["hidden_size"] // d["num_attention_heads"] // 2
        for k in ("short_factor", "long_factor"):
            if len(scaling[k]) != half:
                raise ValueError(f"Phi-3 config: rope_scaling.{k} has {len(scaling[k])} entries, "
                                 f"head_dim / 2 = {half} expected")
        for k in ("factor", "attention_factor"):
            if rope.get(k) is not None:
                scaling[k] = float(rope[k])
    elif kind == "default":
        scaling = None
    else:
        raise ValueError(f"Phi-3 config: rope scaling type {kind!r} is not supported; this implementation "
                         "knows the default RoPE and 'longrope'/'su' (the 128k models)")
    known = {f.name for f in fields(Phi3Config)}
    kw = {k: v for k, v in d.items() if k in known and k not in ("rope_scaling",)}
    kw["rope_theta"] = float(d.get("rope_theta", rope.get("rope_theta", 10000.0)))
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if kw.get(k) is None:
            kw.pop(k, None)
    kw["sliding_window"] = d.get("sliding_window")  # absent means none, as in the reference
    if kw.get("num_key_value_heads") is None:
        kw["num_key_value_heads"] = d["num_attention_heads"]
    kw.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 4096))
    return Phi3Config(**kw, rope_scaling=scaling)


def config_to_hf(c):
    """The Hugging Face config.json dict (model.py writes it as an xGen-MM `text_config`)."""
    ours = ("lm_head_bias", "output_vocab_size")  # not config fields upstream: they follow from the weights
    d = {f.name: getattr(c, f.name) for f in fields(c) if f.name not in ours}
    return {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "hidden_act": "silu",
            "tie_word_embeddings": False, **d}


def as_id_list(ids):
    """An eos field of config.json or generation_config.json (None, one id or a list) as a list."""
    return [] if ids is None else list(ids) if isinstance(ids, (list, tuple)) else [ids]


def add_generation_stop_ids(cfg, path):
    """Add the eos ids of `path`/generation_config.json, if any, to cfg's: instruct models list more there."""
    gen = Path(path) / "generation_config.json"
    if gen.is_file():
        extra = as_id_list(weights.read_json(gen).get("eos_token_id"))
        cfg.eos_token_id = list(dict.fromkeys(cfg.eos_ids + extra))


def convert_checkpoint(ckpt, module, prefix=""):
    """Every tensor of the decoder `module` under `prefix` ('' for a Phi-3 checkpoint, 'vlm.lang_model.' in
    xGen-MM). Our names are the checkpoint's names; the (non-persistent) rotary tables are not stored."""
    return weights.take_module(ckpt, module, prefix)
