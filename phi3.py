"""
Phi-3-mini, the language model of xGen-MM: training forward, KV-cached batched generation, loading.

- A pre-norm decoder: RMSNorm (computed in fp32) -> attention -> residual, RMSNorm -> SiLU-gated MLP
  -> residual. q, k, v come from one fused `qkv_proj` and gate/up from one `gate_up_proj`, exactly as
  the checkpoints store them, so loading is a name-for-name copy.
- Rotary position embedding in the "rotate-half" layout of the Hugging Face checkpoints (the two halves
  of each head are the pair, not interleaved even/odd features).
- Sliding-window attention as Hugging Face applies it: query i sees keys j with i - window < j <= i.
- The 128k model's LongRoPE ("longrope", formerly "su") is implemented: per-frequency short/long factors,
  chosen by the current length, plus the attention scaling on cos/sin; the cache is rebuilt when a
  generation crosses the switch point, as the reference does.
- One `forward` serves training (ids or input embeddings in, logits and an optional loss out) and decoding
  (a preallocated KV cache written at `input_pos`; static shapes, so `torch.compile` can take the step).
- `generate` batches prompts of different lengths with left padding; model.py reuses its decode loop.
- The tokenizer lives in tokenizer.py and is re-exported here as `phi3.Tokenizer`.

References: Phi-3 technical report (arXiv 2404.14219); RoFormer (arXiv 2104.09864); LongRoPE (arXiv
2402.13753); microsoft/Phi-3-mini-4k-instruct; transformers' modeling_phi3.py (the numerical reference).
"""
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import weights
from fused import linear_cross_entropy
from tokenizer import Tokenizer  # noqa: F401  (phi3.Tokenizer: the tokenizer lives in tokenizer.py)

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
    def from_hf(cls, d):
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
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known and k not in ("rope_scaling",)}
        kw["rope_theta"] = float(d.get("rope_theta", rope.get("rope_theta", 10000.0)))
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if kw.get(k) is None:
                kw.pop(k, None)
        kw["sliding_window"] = d.get("sliding_window")  # absent means none, as in the reference
        if kw.get("num_key_value_heads") is None:
            kw["num_key_value_heads"] = d["num_attention_heads"]
        kw.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 4096))
        return cls(**kw, rope_scaling=scaling)

    def to_hf(self):
        """The Hugging Face config.json dict (model.py writes it as an xGen-MM `text_config`)."""
        ours = ("lm_head_bias", "output_vocab_size")  # not config fields upstream: they follow from the weights
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ours}
        return {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "hidden_act": "silu",
                "tie_word_embeddings": False, **d}


def as_id_list(ids):
    """An eos field of config.json or generation_config.json (None, one id or a list) as a list."""
    return [] if ids is None else list(ids) if isinstance(ids, (list, tuple)) else [ids]


def add_generation_stop_ids(cfg, path):
    """Add the eos ids of `path`/generation_config.json, if any, to cfg's: instruct models list more there."""
    gen = Path(path) / "generation_config.json"
    if gen.is_file():
        extra = as_id_list(json.loads(gen.read_text()).get("eos_token_id"))
        cfg.eos_token_id = list(dict.fromkeys(cfg.eos_ids + extra))


PRESETS = {
    "phi3-mini-4k": Phi3Config(),
    # bench / CPU presets (sizes shared with vit.py's and resampler.py's presets of the same name)
    "small": Phi3Config(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                        num_key_value_heads=12),
    "tiny": Phi3Config(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, eos_token_id=2, pad_token_id=0),
}

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
    """cos, sin of shape (B, T, head_dim) for integer positions (B, T)."""
    if long_freq is not None:
        # reference rule: the long factors apply to the whole call once max(position)+1 passes the original length
        inv_freq = torch.where(pos.max() + 1 > cfg.original_max_position_embeddings, long_freq, inv_freq)
    freqs = pos[..., None].float() * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rope(x, cos, sin):
    """x: (B, n_heads, T, head_dim); cos/sin: (B, T, head_dim). Rotate-half layout."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def make_mask(q_pos, k_pos, key_valid, window):
    """Boolean mask (B, 1, Tq, Tk), True = may attend: causal, sliding window, keys that are not padding.

    q_pos (Tq,) and k_pos (Tk,) are slot indices; a query always sees its own slot, so padded queries
    (whose outputs are never used) still have one visible key and produce no NaN.
    """
    diff = q_pos[:, None] - k_pos[None, :]  # (Tq, Tk)
    allowed = diff >= 0
    if window is not None:
        allowed = allowed & (diff < window)
    if key_valid is not None:
        allowed = allowed & (key_valid[:, None, :] | (diff == 0))  # (B, Tq, Tk)
    return allowed.unsqueeze(-3) if allowed.dim() == 3 else allowed[None, None]

# -----------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # in fp32 whatever the activation dtype, then back, as the reference does
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class KVCache(nn.Module):
    """Preallocated keys and values (B, n_kv_heads, max_len, head_dim), written in place at `input_pos`."""

    def __init__(self, batch, n_kv_heads, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


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
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        if self.n_kv != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
        p = self.cfg.attention_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None)
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
        self.cache_valid = None   # (B, max_len) bool: which cache slots hold real tokens (not left padding)
        self.cache_offset = None  # (B,) left-padding length per row: position = slot - offset

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

    # ---- forward -------------------------------------------------------------

    def forward(self, idx=None, labels=None, *, embeds=None, attention_mask=None, input_pos=None,
                last_only=False, reduction="mean", return_logits=True):
        """Logits (B, T, V) for token ids (B, T) or input embeddings (B, T, C); with `labels` also the loss.

        Training / scoring (no cache): `attention_mask` (B, T), 1 = token, 0 = padding, allows padded
        batches on either side (positions then count real tokens only). `labels` are aligned with the
        inputs (shifted here); -100 is ignored; `reduction` "sum" lets a caller normalise over a whole
        optimiser step; `return_logits=False` returns (None, loss) from the fused chunked loss, which never
        builds the (B, T, V) logits. Decoding: after `setup_cache`, `input_pos` (T,) are the slots written.
        `reduction="sequence"` returns (None, (B,) summed loss per row), from the logits of the supervised
        positions only: the log-likelihood of each response, which DPO compares.
        """
        x = self.model.embed_tokens(idx) if embeds is None else embeds
        B, T, _ = x.shape
        cfg = self.config
        if input_pos is not None:  # cached decoding: attend over every slot of the static cache
            if self.cache_valid is None:
                raise RuntimeError("forward with input_pos needs a KV cache: call setup_cache(batch, max_len) first")
            slots = torch.arange(self.cache_valid.shape[1], device=x.device)
            mask = make_mask(input_pos, slots, self.cache_valid, cfg.sliding_window)
            pos = (input_pos[None, :] - self.cache_offset[:, None]).clamp(min=0)
        elif attention_mask is not None:
            slots = torch.arange(T, device=x.device)
            mask = make_mask(slots, slots, attention_mask.bool(), cfg.sliding_window)
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        else:
            # causal only; the window binds only once T > window (then an explicit mask is needed)
            slots = torch.arange(T, device=x.device)
            binding = cfg.sliding_window is not None and T > cfg.sliding_window
            mask = make_mask(slots, slots, None, cfg.sliding_window) if binding else None
            pos = slots[None, :].expand(B, T)
        cos, sin = rope_cos_sin(cfg, pos, x.dtype, *self.rope_freqs(x.device))
        if self.training and cfg.embd_pdrop > 0:
            x = F.dropout(x, cfg.embd_pdrop, True)
        for block in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, input_pos, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, input_pos)
        x = self.model.norm(x[:, -1:] if last_only else x)
        if labels is not None and reduction == "sequence":
            return None, sequence_nll(x, *self.head_weights(), shift_labels(labels))
        if labels is not None and not return_logits:
            w, b = self.head_weights()
            return None, linear_cross_entropy(x, w, b, shift_labels(labels), reduction)
        logits = self.logits(x)
        if labels is None:
            return logits
        return logits, lm_loss(logits, labels, reduction)

    def head_weights(self):
        """lm_head's weight and bias, restricted to the first `output_vocab_size` rows when the config asks."""
        n, w, b = self.config.output_vocab_size, self.lm_head.weight, self.lm_head.bias
        return (w, b) if n is None else (w[:n], None if b is None else b[:n])

    def logits(self, x):
        return F.linear(x, *self.head_weights())

    # ---- decoding ------------------------------------------------------------

    def decode_layout(self, enable=True):
        """Lay out each wide Linear weight column-major (a contiguous transpose viewed back as (out, in)).

        Batch-1 decoding is one matrix-vector product per weight, bound by how fast the weights stream
        from memory, and the CPU kernels stream fastest along the longer side of the matrix: measured on
        our 2-core machine, qkv_proj / gate_up_proj / lm_head (out > in) ran at 19-25 GB/s column-major
        against 13-16 GB/s as stored; down_proj (in > out) is faster as stored, so it stays. Names, shapes
        and values are unchanged. fp32 only: bf16 products take a slow path on column-major weights on such
        a CPU (~36x slower per step). Training GEMMs are ~15% slower in this layout, so it is opt-in, for
        sampling; `decode_layout(False)` restores it (do that before saving: safetensors wants contiguous).
        """
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.out_features > m.in_features:
                w = m.weight.data
                m.weight.data = w.t().contiguous().t() if enable else w.contiguous()
        return self

    def setup_cache(self, batch, max_len, attention_mask=None, dtype=None, device=None):
        """Allocate the static KV cache; `attention_mask` (B, T0) marks the left padding of the prompt."""
        p = self.lm_head.weight
        dtype, device = dtype or p.dtype, device or p.device
        for block in self.model.layers:
            block.self_attn.kv_cache = KVCache(batch, self.config.num_key_value_heads, max_len,
                                               self.config.head_dim, dtype, device)
        self.cache_valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.cache_offset = torch.zeros(batch, dtype=torch.long, device=device)
        if attention_mask is not None:
            am = attention_mask.to(device).bool()
            self.cache_valid[:, : am.shape[1]] = am
            self.cache_offset = (~am).sum(1)
            if not torch.equal(am, torch.arange(am.shape[1], device=device)[None] >= self.cache_offset[:, None]):
                raise ValueError("generation needs left padding: each attention_mask row must be 0…0 1…1")

    def clear_cache(self):
        for block in self.model.layers:
            block.self_attn.kv_cache = None
        self.cache_valid = self.cache_offset = None

    def decode_step(self, idx, input_pos):
        """One cached step: ids (B, 1) at slot input_pos (1,) -> logits (B, V). Static shapes (compilable)."""
        return self.forward(idx, input_pos=input_pos)[:, -1]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, attention_mask=None, **options):
        """Continue a batch of prompts; returns the new tokens (B, n), n <= max_new_tokens.

        `idx` is a list of id lists (left-padded here) or a left-padded tensor with its `attention_mask`.
        `options` are decode_loop's: temperature (0 = greedy), top_k, top_p, stop_ids, pad_id, generator,
        callback, compile.
        """
        if isinstance(idx, (list, tuple)):
            idx, attention_mask = left_pad(idx, self.config.pad_token_id)
        idx = idx.to(self.lm_head.weight.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(idx)
        return self.decode_loop(self.model.embed_tokens(idx), attention_mask, max_new_tokens, **options)

    @torch.no_grad()
    def decode_loop(self, embeds, attention_mask, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
                    stop_ids=None, pad_id=None, generator=None, callback=None, compile=False):
        """The decode loop shared with model.py: prefill left-padded `embeds` (B, T, C), then step token by token.

        Greedy when temperature == 0. A row stops after emitting any of `stop_ids` (default: every eos id,
        config.json's and generation_config.json's) and is filled with `pad_id` afterwards; the loop ends
        when all rows have stopped. `callback(tokens)` sees each step's (B,) tokens; `compile` runs the
        static-shape decode step through torch.compile.
        """
        cfg = self.config
        B, T, _ = embeds.shape
        device = embeds.device
        stop = torch.tensor(stop_ids if stop_ids is not None else cfg.eos_ids, dtype=torch.long, device=device)
        pad_id = cfg.pad_token_id if pad_id is None else pad_id
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        max_len = T + max_new_tokens - 1  # the last sampled token is never fed back
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                             f"{cfg.max_position_embeddings} positions")
        if compile:  # the compiled step has static shapes: round the cache up so most calls reuse one graph
            max_len = min(-(-max_len // 256) * 256, cfg.max_position_embeddings)
        self.setup_cache(B, max_len, attention_mask, dtype=embeds.dtype)
        step = torch.compile(self.decode_step, dynamic=False) if compile else self.decode_step
        try:
            logits = self.forward(embeds=embeds, input_pos=torch.arange(T, device=device), last_only=True)[:, -1]
            fed, out, done = [], [], torch.zeros(B, dtype=torch.bool, device=device)
            for i in range(max_new_tokens):
                tok = sample(logits, temperature, top_k, top_p, generator)
                fed.append(tok)  # finished rows keep decoding (static batch); their tokens are hidden below
                out.append(torch.where(done, torch.full_like(tok, pad_id), tok))
                if callback is not None:
                    callback(out[-1])
                done = done | torch.isin(tok, stop)
                if bool(done.all()) or i == max_new_tokens - 1:
                    break
                pos = T + i
                if cfg.rope_scaling and pos - int(self.cache_offset.min()) == cfg.original_max_position_embeddings:
                    # LongRoPE switches to its long factors here: recompute every cached key, as the reference does
                    all_embeds = torch.cat([embeds, self.model.embed_tokens(torch.stack(fed, 1))], 1)
                    logits = self.forward(embeds=all_embeds, input_pos=torch.arange(pos + 1, device=device))[:, -1]
                else:
                    logits = step(tok[:, None], torch.tensor([pos], device=device))
            return torch.stack(out, dim=1)
        finally:
            self.clear_cache()

    # ---- loading -------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        """A Hugging Face Phi-3 directory (config.json + single or sharded safetensors)."""
        cfg = Phi3Config.from_hf(weights.read_config(path))
        path = weights.resolve_dir(path)
        add_generation_stop_ids(cfg, path)
        ckpt = weights.Checkpoint(path)
        cfg.lm_head_bias = "lm_head.bias" in ckpt
        with torch.device("meta"):
            model = cls(cfg)
        sd = convert_checkpoint(ckpt, "", model)
        ckpt.finish()
        return weights.assign(model, sd, weights.resolve_dtype(dtype), device).eval()


def convert_checkpoint(ckpt, prefix, model):
    """Every tensor of the decoder under `prefix` ('' for a Phi-3 checkpoint, 'vlm.lang_model.' in xGen-MM).

    Our names are the checkpoint's names; the (non-persistent) rotary tables are not stored.
    """
    return weights.take_module(ckpt, model, prefix)


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


def lm_loss(logits, labels, reduction="mean"):
    """Next-token cross-entropy in fp32; -100 is ignored."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), shift_labels(labels).reshape(-1),
                           ignore_index=-100, reduction=reduction)


def left_pad(seqs, pad_id):
    """List of id lists -> (ids (B, T) left-padded, attention_mask (B, T))."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        idx[i, T - len(s):] = torch.as_tensor(s, dtype=torch.long)
        mask[i, T - len(s):] = 1
    return idx, mask


def sample(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Next token per row from logits (B, V): greedy at temperature 0, else top-k / top-p sampling."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
