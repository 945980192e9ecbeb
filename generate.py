"""
Decoding, for Phi-3 alone and for the whole xGen-MM: a static KV cache, prefill, one-token steps, sampling.

- The cache is preallocated per layer, (B, kv_heads, max_len, head_dim), and written in place at the slots
  being decoded: every step has the same shapes, so torch.compile can take the step (gpt-fast's way).
- Prompts of different lengths are left-padded, so every row's next token lands in the same slot. Padding
  slots are hidden from every query, and a row's positions count its own tokens only (position = slot -
  its padding): each row decodes as if it were alone, which the tests check.
- Greedy at temperature 0, else top-k / top-p sampling. Each row stops at its own stop token and is filled
  with the pad id after it; the loop ends when every row has stopped.
- LongRoPE (Phi-3's 128k models) switches frequencies once a sequence passes the original context: the
  cached keys are then recomputed once, as the reference does.
- `decode_layout`: a memory-layout trick for batch-1 decoding on a CPU, in fp32.

phi3.Phi3.generate (token ids in) and model.XGenMM.generate (ids with the images spliced in, as embeddings)
are thin methods over `generate` and `decode` below. References: gpt-fast's generate.py; transformers'
generate (the numerical reference in the tests).
"""
import torch
import torch.nn as nn

from tokenizer import pad_batch

# -----------------------------------------------------------------------------
# the cache


class KVCache(nn.Module):
    """Preallocated keys and values (B, kv_heads, max_len, head_dim), written in place at `input_pos`."""

    def __init__(self, batch, n_kv_heads, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


def setup_cache(lm, batch, max_len, dtype=None, device=None):
    """Give every attention layer of the Phi-3 `lm` a fresh cache of `max_len` slots."""
    p, cfg = lm.lm_head.weight, lm.config
    for block in lm.model.layers:
        block.self_attn.kv_cache = KVCache(batch, cfg.num_key_value_heads, max_len, cfg.head_dim,
                                           dtype or p.dtype, device or p.device)


def clear_cache(lm):
    for block in lm.model.layers:
        block.self_attn.kv_cache = None

# -----------------------------------------------------------------------------
# one step, and the next token


def decode_step(lm, tok, input_pos, valid, offset):
    """One cached step: tokens (B, 1) at slot input_pos (1,) -> logits (B, V). Static shapes (compilable).

    valid (B, max_len): the slots that hold a row's tokens; offset (B,): each row's left padding.
    """
    pos = (input_pos[None, :] - offset[:, None]).clamp(min=0)
    return lm(tok, input_pos=input_pos, attention_mask=valid, position_ids=pos)[:, -1]


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

# -----------------------------------------------------------------------------
# the loop


def left_pad(prompts, pad_id):
    """Id lists -> (ids (B, T) left-padded, attention_mask (B, T)); an empty prompt is an error."""
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
    return pad_batch(prompts, pad_id, side="left")


@torch.no_grad()
def generate(lm, prompts, max_new_tokens, attention_mask=None, **options):
    """Continue a batch of prompts with the Phi-3 `lm`; returns the new tokens (B, n), n <= max_new_tokens.

    `prompts` is a list of id lists (left-padded here) or a left-padded tensor with its `attention_mask`.
    `options` are `decode`'s.
    """
    if isinstance(prompts, (list, tuple)):
        prompts, attention_mask = left_pad(prompts, lm.config.pad_token_id)
    idx = prompts.to(lm.lm_head.weight.device)
    mask = torch.ones_like(idx) if attention_mask is None else attention_mask
    return decode(lm, lm.model.embed_tokens(idx), mask, max_new_tokens, **options)


def check_left_padded(mask):
    """(B, T) 0/1 mask -> (B,) padding per row; each row must read 0...0 1...1."""
    offset = (mask == 0).sum(1)
    if not torch.equal(mask.bool(), torch.arange(mask.shape[1], device=mask.device)[None] >= offset[:, None]):
        raise ValueError("generation needs left padding: each attention_mask row must be 0…0 1…1")
    return offset


@torch.no_grad()
def decode(lm, embeds, attention_mask, max_new_tokens, temperature=0.0, top_k=None, top_p=None, stop_ids=None,
           pad_id=None, generator=None, callback=None, compile=False):
    """Prefill the left-padded `embeds` (B, T, C) of the Phi-3 `lm`, then decode token by token.

    Greedy when temperature == 0. A row stops after emitting any of `stop_ids` (default: every eos id of the
    config and generation_config.json) and is filled with `pad_id` afterwards. `callback(tokens)` sees each
    step's (B,) tokens; `compile` runs the static-shape step through torch.compile.
    """
    cfg = lm.config
    B, T, _ = embeds.shape
    device = embeds.device
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    max_len = T + max_new_tokens - 1  # the last sampled token is never fed back
    if max_len > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"{cfg.max_position_embeddings} positions")
    if compile:  # the compiled step has static shapes: round the cache up so most calls reuse one graph
        max_len = min(-(-max_len // 256) * 256, cfg.max_position_embeddings)
    stop = torch.tensor(stop_ids if stop_ids is not None else cfg.eos_ids, dtype=torch.long, device=device)
    pad_id = cfg.pad_token_id if pad_id is None else pad_id
    offset = check_left_padded(attention_mask.cpu())  # on the host, once: the loop below never waits on it
    longrope_at = cfg.original_max_position_embeddings + int(offset.min()) if cfg.rope_scaling else None
    offset = offset.to(device)
    valid = torch.ones(B, max_len, dtype=torch.bool, device=device)  # slots holding a row's own tokens
    valid[:, :T] = attention_mask.to(device).bool()
    slots = torch.arange(max_len, device=device)  # step i writes slot T + i: a view, no copy from the host
    # a GPU step takes milliseconds, and asking "has every row stopped?" makes the host wait for the device:
    # there it asks every 8 steps (the extra steps' tokens are hidden as padding and trimmed), on a CPU every step
    every = 1 if device.type == "cpu" or callback is not None else 8
    setup_cache(lm, B, max_len, dtype=embeds.dtype, device=device)
    mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs: one launch per step
    step = torch.compile(decode_step, mode=mode, dynamic=False) if compile else decode_step
    try:
        prompt_pos = (slots[None, :T] - offset[:, None]).clamp(min=0)
        logits = lm(embeds=embeds, input_pos=slots[:T], attention_mask=valid, position_ids=prompt_pos,
                    last_only=True)[:, -1]
        fed, out, done = [], [], torch.zeros(B, dtype=torch.bool, device=device)
        for i in range(max_new_tokens):
            tok = sample(logits, temperature, top_k, top_p, generator)
            fed.append(tok)  # finished rows keep decoding (static batch); their tokens are hidden below
            out.append(torch.where(done, torch.full_like(tok, pad_id), tok))
            if callback is not None:
                callback(out[-1])
            done = done | torch.isin(tok, stop)
            if i == max_new_tokens - 1 or ((i + 1) % every == 0 and bool(done.all())):
                break
            pos = T + i
            if pos == longrope_at:
                # LongRoPE switches to its long factors here: recompute every cached key, as the reference does
                seq = torch.cat([embeds, lm.model.embed_tokens(torch.stack(fed, 1))], 1)
                logits = lm(embeds=seq, input_pos=slots[:pos + 1], attention_mask=valid,
                            position_ids=(slots[None, :pos + 1] - offset[:, None]).clamp(min=0))[:, -1]
            else:
                logits = step(lm, tok[:, None], slots[pos:pos + 1], valid, offset)
        return trim(torch.stack(out, dim=1), torch.stack(fed, dim=1), stop)
    finally:
        clear_cache(lm)


def trim(out, fed, stop):
    """Drop the trailing steps in which every row had already stopped (on a GPU the loop asks only now and then)."""
    stopped = torch.isin(fed, stop)
    ends = torch.where(stopped.any(1), stopped.int().argmax(1) + 1, fed.shape[1])  # each row's length
    return out[:, :int(ends.max())]

# -----------------------------------------------------------------------------
# a CPU memory layout for batch-1 decoding


def decode_layout(lm, enable=True):
    """Lay out each wide Linear weight of `lm` column-major (a contiguous transpose viewed back as (out, in)).

    Batch-1 decoding is one matrix-vector product per weight, bound by how fast the weights stream from
    memory, and the CPU kernels stream fastest along the longer side of the matrix: measured on a 2-core
    machine, qkv_proj / gate_up_proj / lm_head (out > in) ran at 19-25 GB/s column-major against 13-16
    GB/s as stored; down_proj (in > out) is faster as stored, so it stays. Names, shapes and values are
    unchanged. fp32 only: bf16 products take a slow path on column-major weights on such a CPU (~36x slower
    per step). Training GEMMs are ~15% slower in this layout, so it is opt-in, for sampling;
    `decode_layout(lm, False)` restores it (do that before saving: safetensors wants contiguous tensors).
    """
    for m in lm.modules():
        if isinstance(m, nn.Linear) and m.out_features > m.in_features:
            w = m.weight.data
            m.weight.data = w.t().contiguous().t() if enable else w.contiguous()
    return lm
