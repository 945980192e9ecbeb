"""
Decoding, for Phi-3 alone and for the whole xGen-MM: a static KV cache, prefill, one-token steps, sampling.

- The cache is preallocated per layer, (B, kv_heads, max_len, head_dim), and written in place at the slots
  being decoded: every step has the same shapes, so torch.compile can take the step (gpt-fast's way). The
  cache and the compiled step outlive a call: the next call of the same batch and length reuses both, so an
  evaluation loop under CUDA graphs records its step once (`clear_cache` frees the cache).
- Prompts of different lengths are left-padded, so every row's next token lands in the same slot. Padding
  slots are hidden from every query, and a row's positions count its own tokens only (position = slot -
  its padding): each row decodes as if it were alone, which the tests check.
- Greedy at temperature 0, else top-k / top-p sampling. Each row stops at its own stop token and is filled
  with the pad id after it; the loop ends when every row has stopped.
- LongRoPE (Phi-3's 128k models) switches frequencies once a sequence passes the original context: the
  cached keys are then recomputed once, as the reference does.
- `decode_layout`: a memory-layout trick for batch-1 decoding on a CPU, in fp32.

The order of a call: `generate` (ids) or `decode` (embeddings) -> `setup_cache` -> `prefill` ->
`decode_n_tokens`, which calls `decode_one_token` and `sample` once per new token. phi3.Phi3.generate
(token ids in) and model.XGenMM.generate (ids with the images spliced in, as embeddings) are thin methods
over `generate` and `decode`. References: gpt-fast's generate.py; transformers' generate (the numerical
reference in the tests).
"""
import functools
from dataclasses import dataclass

import torch
import torch.nn as nn

from tokenizer import pad_batch, round_up

COMPILED_LEN = 256  # a compiled step has static shapes: its cache length is a multiple of this, so calls share it

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
    """Give every attention layer of the Phi-3 `lm` a cache of `max_len` slots, keeping the one it has when
    that one has the same shape, dtype and device (stale slots are never read: a query sees only the slots
    written before it). Returns whether the cache was kept."""
    p, cfg = lm.lm_head.weight, lm.config
    shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
    dtype, device = dtype or p.dtype, torch.device(device or p.device)
    old = lm.model.layers[0].self_attn.kv_cache
    if old is not None and old.k.shape == shape and old.k.dtype == dtype and old.k.device == device:
        return True
    for block in lm.model.layers:
        block.self_attn.kv_cache = None  # free the old cache before the new one is allocated
    for block in lm.model.layers:
        block.self_attn.kv_cache = KVCache(batch, cfg.num_key_value_heads, max_len, cfg.head_dim, dtype, device)
    return False


def clear_cache(lm):
    """Free the cache (a later call allocates a new one)."""
    for block in lm.model.layers:
        block.self_attn.kv_cache = None


@dataclass
class Placement:
    """Where a left-padded batch sits in the cache: slots 0..T-1 hold the prompts, new token i goes to slot T + i."""
    valid: torch.Tensor      # (B, max_len) bool: the slots that hold a row's own tokens (padding is hidden)
    positions: torch.Tensor  # (B, max_len) long: each slot's position in its row, slot - padding (>= 0)
    slots: torch.Tensor      # (max_len,) 0, 1, ...: input_pos of any step is a view of it, no host copy
    prompt_len: int          # T
    longrope_at: int | None  # the slot at which LongRoPE switches to its long factors, if it does


def check_left_padded(mask):
    """(B, T) 0/1 mask -> (B,) padding per row; each row must read 0...0 1...1."""
    offset = (mask == 0).sum(1)
    if not torch.equal(mask.bool(), torch.arange(mask.shape[1], device=mask.device)[None] >= offset[:, None]):
        raise ValueError("generation needs left padding: each attention_mask row must be 0…0 1…1")
    return offset


def place(cfg, attention_mask, max_len, device):
    """The Placement of a left-padded batch with mask (B, T) in a cache of `max_len` slots."""
    B, T = attention_mask.shape
    offset = check_left_padded(attention_mask.cpu())  # on the host, once: the loop never waits on it
    longrope_at = cfg.original_max_position_embeddings + int(offset.min()) if cfg.rope_scaling else None
    offset = offset.to(device)
    valid = torch.ones(B, max_len, dtype=torch.bool, device=device)
    valid[:, :T] = attention_mask.to(device).bool()
    slots = torch.arange(max_len, device=device)
    positions = (slots[None, :] - offset[:, None]).clamp(min=0)
    return Placement(valid, positions, slots, T, longrope_at)

# -----------------------------------------------------------------------------
# prefill, one step, the next token


def prefill(lm, embeds, placed):
    """The prompts' embeddings (B, T, C) into the cache at slots 0..T-1 -> the logits (B, V) of the next token."""
    T = placed.prompt_len
    return lm(embeds=embeds, input_pos=placed.slots[:T], attention_mask=placed.valid,
              position_ids=placed.positions[:, :T], last_only=True)[:, -1]


def decode_one_token(lm, tok, input_pos, valid, pos):
    """One cached step: tokens (B, 1) at slot input_pos (1,), positions pos (B, 1) -> logits (B, V).

    valid (B, max_len): the slots that hold a row's tokens. Static shapes: this is what torch.compile takes.
    """
    return lm(tok, input_pos=input_pos, attention_mask=valid, position_ids=pos)[:, -1]


@functools.cache
def compiled_step(mode):
    """`decode_one_token` through torch.compile, built once per process and mode and kept across calls."""
    return torch.compile(decode_one_token, mode=mode, dynamic=False)


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


def relayout_longrope(lm, embeds, fed, placed, slot):
    """LongRoPE switches to its long factors at `slot`: recompute every cached key, as the reference does, from
    the prompts' embeddings and the tokens fed so far -> the logits (B, V) at `slot`."""
    seq = torch.cat([embeds, lm.model.embed_tokens(torch.stack(fed, 1))], 1)
    return lm(embeds=seq, input_pos=placed.slots[:slot + 1], attention_mask=placed.valid,
              position_ids=placed.positions[:, :slot + 1])[:, -1]

# -----------------------------------------------------------------------------
# the loop


def decode_n_tokens(lm, logits, embeds, placed, n, stop, step=decode_one_token, every=1, callback=None, **sampling):
    """From the prefill's logits, up to `n` tokens per row: (tokens (B, k) as fed, k <= n).

    A row has stopped once it emitted one of `stop` (a tensor of ids); its later tokens are still decoded
    (the batch is static) and masked by the caller. The loop ends after `n` tokens or once every row has
    stopped, asked every `every` steps (asking makes the host wait for the device). `callback(tok, done)`
    sees each step's tokens and which rows had stopped before it.
    """
    T, fed = placed.prompt_len, []
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    for i in range(n):
        tok = sample(logits, **sampling)
        fed.append(tok)  # finished rows keep decoding (static batch); their tokens are hidden by the caller
        if callback is not None:
            callback(tok, done)
        done = done | torch.isin(tok, stop)
        if i == n - 1 or ((i + 1) % every == 0 and bool(done.all())):
            break
        s = T + i
        if s == placed.longrope_at:
            logits = relayout_longrope(lm, embeds, fed, placed, s)
        else:
            logits = step(lm, tok[:, None], placed.slots[s:s + 1], placed.valid, placed.positions[:, s:s + 1])
    return torch.stack(fed, dim=1)


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


@torch.no_grad()
def decode(lm, embeds, attention_mask, max_new_tokens, temperature=0.0, top_k=None, top_p=None, stop_ids=None,
           pad_id=None, generator=None, callback=None, compile=False):
    """Prefill the left-padded `embeds` (B, T, C) of the Phi-3 `lm`, then decode token by token.

    Greedy when temperature == 0. A row stops after emitting any of `stop_ids` (default: every eos id of the
    config and generation_config.json) and is filled with `pad_id` afterwards. `callback(tokens)` sees each
    step's (B,) tokens; `compile` runs the static-shape step through torch.compile.
    """
    cfg, (B, T, _), device = lm.config, embeds.shape, embeds.device
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    max_len = T + max_new_tokens - 1  # the last sampled token is never fed back
    if max_len > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"{cfg.max_position_embeddings} positions")
    if compile:  # round the length up so that most calls share one cache and one graph
        max_len = min(round_up(max_len, COMPILED_LEN), cfg.max_position_embeddings)
    stop = torch.tensor(stop_ids if stop_ids is not None else cfg.eos_ids, dtype=torch.long, device=device)
    pad_id = cfg.pad_token_id if pad_id is None else pad_id
    placed = place(cfg, attention_mask, max_len, device)
    setup_cache(lm, B, max_len, dtype=embeds.dtype, device=device)
    # a GPU step takes milliseconds, and asking "has every row stopped?" makes the host wait for the device:
    # there it asks every 8 steps (the extra steps' tokens are hidden as padding and trimmed), on a CPU every step
    every = 1 if device.type == "cpu" or callback is not None else 8
    step = compiled_step("reduce-overhead" if device.type == "cuda" else None) if compile else decode_one_token
    shown = None if callback is None else lambda tok, done: callback(tok.masked_fill(done, pad_id))
    fed = decode_n_tokens(lm, prefill(lm, embeds, placed), embeds, placed, max_new_tokens, stop, step, every, shown,
                          temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    return trim(fed, stop, pad_id)


def trim(fed, stop, pad_id):
    """Tokens as fed (B, n) -> each row padded after its first stop token, and the trailing steps in which every
    row had already stopped dropped (on a GPU the loop asks only now and then)."""
    stopped = torch.isin(fed, stop)
    after = stopped.cumsum(1) - stopped.long() > 0  # steps after a row's first stop token
    ends = torch.where(stopped.any(1), stopped.int().argmax(1) + 1, fed.shape[1])  # each row's length
    return fed.masked_fill(after, pad_id)[:, :int(ends.max())]

# -----------------------------------------------------------------------------
# beam search: the paper's decoding for its few-shot benchmarks (OpenFlamingo's evaluation: 3 beams)


@torch.no_grad()
def beam_search(lm, embeds, attention_mask, max_new_tokens, num_beams=3, length_penalty=0.0, stop_ids=None,
                pad_id=None):
    """The best of `num_beams` beams per row of the left-padded `embeds` (B, T, C): (tokens (B, n), scores (B,)).

    As transformers' beam search (its defaults: no early stopping): each row keeps its beams in one batch of
    B * num_beams sequences with one cache, reordered after every step. Each step ranks every beam's
    continuations by summed log-probability, keeps max(2, 1 + stops) * num_beams of them; those that emit a
    stop token (or reach max_new_tokens), if among the top num_beams, become finished hypotheses scored
    sum / length ** length_penalty (length counts the new tokens, the stop token too; OpenFlamingo's
    evaluation uses 0: no normalisation); the best num_beams of the rest run on. A row is done once its best
    running beam can no longer beat its worst finished one.
    """
    cfg, (B, T, _), device, K = lm.config, embeds.shape, embeds.device, num_beams
    stop = torch.tensor(stop_ids if stop_ids is not None else cfg.eos_ids, dtype=torch.long, device=device)
    pad_id = cfg.pad_token_id if pad_id is None else pad_id
    embeds, attention_mask = embeds.repeat_interleave(K, 0), attention_mask.repeat_interleave(K, 0)
    placed = place(cfg, attention_mask, T + max_new_tokens - 1, device)
    setup_cache(lm, B * K, T + max_new_tokens - 1, dtype=embeds.dtype, device=device)
    logits, keep = prefill(lm, embeds, placed), max(2, 1 + len(stop)) * K
    run_seq = torch.full((B, K, max_new_tokens), pad_id, dtype=torch.long, device=device)
    run_score = torch.zeros(B, K, device=device)
    run_score[:, 1:] = -1e9  # the K copies start equal: the first step draws from the first only
    fin_seq, fin_score = run_seq.clone(), torch.full((B, K), -1e9, device=device)
    fin_done = torch.zeros(B, K, dtype=torch.bool, device=device)
    improvable, top_k_mask = torch.ones(B, 1, dtype=torch.bool, device=device), torch.arange(keep, device=device) < K
    for g in range(max_new_tokens):
        logp = logits.float().log_softmax(-1).view(B, K, -1) + run_score[..., None]
        V = logp.shape[-1]
        top, idx = logp.view(B, K * V).topk(keep)  # (B, keep) candidates: beam idx // V, token idx % V
        cand = run_seq.gather(1, (idx // V)[..., None].expand(-1, -1, max_new_tokens)).clone()
        cand[:, :, g] = idx % V
        hits = torch.isin(idx % V, stop) | (g + 1 >= max_new_tokens)
        run_score, best = (top + hits.float() * -1e9).topk(K)  # the best K that go on
        run_seq, parent = cand.gather(1, best[..., None].expand(-1, -1, max_new_tokens)), (idx // V).gather(1, best)
        fin_seq, fin_score, fin_done = finish(fin_seq, fin_score, fin_done, cand, top, hits & top_k_mask,
                                              improvable, (g + 1) ** length_penalty, K)
        best_possible = run_score[:, :1] / (g + 1) ** length_penalty
        worst = torch.where(fin_done, fin_score.min(1, keepdim=True).values, -1e9)
        improvable = improvable & (best_possible > worst).any(-1, keepdim=True)
        if not bool(improvable.any()) or bool(hits.all()):
            break
        reorder_cache(lm, (parent + torch.arange(B, device=device)[:, None] * K).flatten())
        s = T + g
        logits = decode_one_token(lm, run_seq[:, :, g].reshape(-1, 1), placed.slots[s:s + 1], placed.valid,
                                  placed.positions[:, s:s + 1])
    return trim(fin_seq[:, 0], stop, pad_id), fin_score[:, 0]


def finish(seq, score, done, cand, top, just_done, improvable, norm, K):
    """Merge the candidates that just finished (scored top / norm) into each row's K finished hypotheses."""
    new = top / norm + (~improvable).float() * -1e9 + (~just_done).float() * -1e9
    order = torch.cat([score, new], 1).topk(K).indices
    seq = torch.cat([seq, cand], 1).gather(1, order[..., None].expand(-1, -1, seq.shape[-1]))
    return seq, torch.cat([score, new], 1).gather(1, order), torch.cat([done, just_done], 1).gather(1, order)


def reorder_cache(lm, rows):
    """Each beam's cache follows the beam it continues: rows (B * K,) of the new order."""
    for block in lm.model.layers:
        cache = block.self_attn.kv_cache
        cache.k.copy_(cache.k.index_select(0, rows))
        cache.v.copy_(cache.v.index_select(0, rows))

# -----------------------------------------------------------------------------
# a CPU memory layout for batch-1 decoding


def decode_layout(lm, enable=True):
    """Lay out each wide Linear weight of `lm` column-major (a contiguous transpose viewed back as (out, in)).

    Batch-1 decoding is one matrix-vector product per weight, bound by how fast the weights stream from
    memory, and a CPU's kernels stream fastest along the longer side of the matrix: qkv_proj, gate_up_proj
    and lm_head (out > in) read faster column-major; down_proj (in > out) is faster as stored, so it stays
    (docs/benchmarks.md has the figures). Names, shapes and values are unchanged. fp32 only: bf16 products
    take a slow path on column-major weights on a CPU. Training GEMMs are slower in this layout, so it is
    opt-in, for sampling; `decode_layout(lm, False)` restores it (do that before saving: safetensors wants
    contiguous tensors).
    """
    for m in lm.modules():
        if isinstance(m, nn.Linear) and m.out_features > m.in_features:
            w = m.weight.data
            m.weight.data = w.t().contiguous().t() if enable else w.contiguous()
    return lm
