"""
FSDP2 on 8 GPUs: the parameter counts of the real configs, and the memory per GPU of one training step of
train.py / dpo.py --fsdp --grad-checkpointing (SFT, and DPO with LoRA), term by term. No weights, no GPU.

    python -m bench.fsdp_memory                      # the same as python -m bench.full --memory (~1 minute)
    python -m bench.fsdp_memory --param-dtype bfloat16 --json out/full-memory.json

- Parameters are counted on meta-device models: nothing is allocated.
- The activation terms come from measurement, not a formula: the bytes autograd saves for backward, counted
  with saved_tensors_hooks on real-size bf16 modules on the CPU and fitted through two sizes.
- Every term is taken at its largest at once (an upper bound); the CUDA context and allocator slack are
  left out.
"""
import argparse
import math

import torch

import fused
import model
import phi3
import resampler
from bench.common import parse, pooling_head_shapes, report


def saved_bytes(fn, exclude):
    """Bytes autograd keeps for the backward of fn(): each storage once, those of `exclude` (parameters,
    inputs) left out."""
    skip, kept = {t.untyped_storage().data_ptr() for t in exclude}, {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            kept[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(kept.values())


def saved_per_unit(run, units=(16, 32)):
    """(fixed bytes, bytes per unit) of run(n) -> saved bytes, fitted through two sizes."""
    a, b = (run(n) for n in units)
    per = (b - a) / (units[1] - units[0])
    return a - per * units[0], per


def real_size(make, dtype=torch.bfloat16):
    """make() built on the meta device, then given CPU memory in `dtype` and filled as init_weights does
    (matrices N(0, 0.02), biases 0, other vectors 1): real sizes without a slow fp32 initialisation."""
    with torch.device("meta"):
        module = make()
    module = module.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.zero_() if name.endswith("bias") else p.fill_(1.0)
    return module


def activation_costs(cfg, lora_r=64):
    """Saved-for-backward bytes measured on real-size bf16 modules (CPU, SDPA's fused causal kernel, as on a
    GPU): per token of a Phi-3 block, the same with rank-`lora_r` LoRA (dropout 0.05, base frozen), the final
    norm + the fused loss (SFT, per supervised token, + its fp32 weight gradient), the final norm + per-sequence
    log-likelihoods (DPO, per supervised token), and per group of 729 features through the resampler."""
    import lora
    t, dt = cfg.text, torch.bfloat16
    inv, scale = phi3.rope_inv_freq(t)

    def block_run(block):
        def run(T):
            x = torch.randn(1, T, t.hidden_size, dtype=dt, requires_grad=True)
            cos, sin = phi3.rope_cos_sin(t, torch.arange(T)[None], dt, inv, None, scale)
            return saved_bytes(lambda: block(x, cos, sin, None, None), [x, *block.parameters()])
        return saved_per_unit(run)
    out = {"block": block_run(real_size(lambda: phi3.Block(t)).train())}
    b = real_size(lambda: phi3.Block(t))
    lora.apply_lora(b, r=lora_r, alpha=2 * lora_r, dropout=0.05)
    lora.mark_only_lora_trainable(b)
    out["block_lora"] = block_run(b.train())
    del b
    norm = phi3.RMSNorm(t.hidden_size, t.rms_norm_eps).to(dt)
    head = real_size(lambda: torch.nn.Linear(t.hidden_size, t.output_vocab_size or t.vocab_size))

    def head_run(loss, trained):
        head.requires_grad_(trained)

        def run(T):
            x = torch.randn(1, T, t.hidden_size, dtype=dt, requires_grad=True)
            y = torch.randint(0, head.out_features, (1, T))
            return saved_bytes(lambda: loss(norm(x), head.weight, head.bias, y), [x, *head.parameters(), norm.weight])
        return saved_per_unit(run)
    out["head_sft"] = head_run(lambda x, w, b, y: fused.linear_cross_entropy(x, w, b, y, "sum"), True)
    out["head_dpo"] = head_run(phi3.sequence_nll, False)
    del head
    res = real_size(lambda: resampler.PerceiverResampler(cfg.resampler)).train()
    P = cfg.vision.num_patches

    def res_run(G):
        x = torch.randn(G, P, cfg.resampler.dim, dtype=dt)
        return saved_bytes(lambda: res(x, torch.ones(G, P, dtype=torch.bool)), [x, *res.parameters()])
    out["resampler_group"] = saved_per_unit(res_run, (1, 2))
    return out


def parameter_counts(cfg, lora_r=64):
    """Parameters of each part, counted on a meta-device model of `cfg` (nothing allocated)."""
    import lora
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    with torch.device("meta"):
        m = model.XGenMM(cfg)
        lm = m.lang_model
        c = {"vit": n(m.vision_encoder), "pooling_head": sum(math.prod(s) for s in pooling_head_shapes(cfg.vision).values()),
             "resampler": n(m.vision_tokenizer), "embed": n(lm.model.embed_tokens), "blocks": n(lm.model.layers),
             "head": n(lm.lm_head) + n(lm.model.norm), "layers": len(lm.model.layers)}
        lora.apply_lora(lm, r=lora_r, alpha=2 * lora_r)
        c["lora"] = sum(p.numel() for k, p in lm.named_parameters() if ".lora_" in k)
    c["lm"] = c["embed"] + c["blocks"] + c["head"]
    c["model"] = c["vit"] + c["resampler"] + c["lm"]
    return c


def fsdp_plan(c, act, cfg, gpus, batch, T, groups, supervised, lora_run, master=4, grad_accum=1):
    """Bytes per GPU, term by term, of one training step of train.py/dpo.py --fsdp --grad-checkpointing on
    CUDA: the weights, gradients and AdamW's two states in --param-dtype (`master` bytes each; fp32 by default,
    even from the bf16 release), and the compute in bf16 under autocast. FSDP2 (fully_shard on each LLM block,
    then on the model) shards every tensor over the GPUs and gathers the shards in bf16; the root group (ViT,
    resampler, embeddings, final norm, head) stays gathered from forward to backward (FSDP2 does not reshard
    the root after forward), and up to two blocks are gathered at a time (the current one and the prefetched
    one). Gradients come out of backward in bf16 and are reduce-scattered in fp32 (a copy). Each term is
    taken at its largest at once: an upper bound. `batch` rows of T positions per GPU; for DPO the rows are
    chosen + rejected. With `grad_accum` > 1 the micro-batches before the last skip the reduce-scatter
    (distributed.sync_grads), so FSDP2 keeps every trained gradient unsharded, in fp32 (its reduce dtype),
    until the step's last backward."""
    C, L, bf16 = cfg.text.hidden_size, c["layers"], 2
    block, root = c["blocks"] / L, c["model"] - c["blocks"]
    lora_block = c["lora"] / L if lora_run else 0
    trained = c["lora"] if lora_run else c["model"] - c["vit"]
    root_trained = 0 if lora_run else root - c["vit"]
    rows = {"parameters, sharded": (c["model"] + (c["lora"] if lora_run else 0)) * master / gpus,
            "root group, gathered in bf16 (ViT, resampler, embeddings, head)": root * bf16,
            "2 LLM blocks gathered in bf16 (current + prefetched)": 2 * (block + lora_block) * bf16,
            "gradients, sharded": trained * master / gpus,
            "gradients before reduce-scatter (root group + 1 block; bf16 + fp32 copy)":
                (root_trained + block * (not lora_run) + lora_block) * (bf16 + 4),
            "AdamW exp_avg + exp_avg_sq, sharded": 2 * trained * master / gpus}
    if grad_accum > 1:
        rows["gradients kept unsharded between micro-batches (fp32, --grad-accum > 1)"] = trained * 4
    per_block = act["block_lora" if lora_run else "block"][1]
    fixed, per_sup = act["head_dpo" if lora_run else "head_sft"]
    rows[f"activations: {L} block inputs kept by checkpointing"] = L * batch * T * C * bf16
    rows["activations: one block recomputed in backward"] = batch * T * per_block
    if not lora_run:  # DPO trains nothing before the LLM: the resampler keeps no activations
        rows["activations: resampler"] = batch * groups * act["resampler_group"][1] + act["resampler_group"][0]
    rows["activations: final norm + loss"] = fixed + batch * supervised * per_sup
    return rows


def fsdp_memory(args):
    """Parameter counts of the real configs and the per-GPU memory of SFT and DPO-with-LoRA under FSDP2."""
    cfg = model.preset("xgenmm")
    c, act = parameter_counts(cfg), activation_costs(cfg)
    img = cfg.image_tokens((640, 480))
    groups = img // cfg.resampler.num_latents
    T, b, ans = args.seq_len, args.micro_batch, args.answer_tokens
    master = torch.finfo(getattr(torch, args.param_dtype)).bits // 8
    plans = {"sft": fsdp_plan(c, act, cfg, args.gpus, b, T, groups, T - img, False, master),
             "sft_accum": fsdp_plan(c, act, cfg, args.gpus, b, T, groups, T - img, False, master, args.grad_accum),
             "dpo": fsdp_plan(c, act, cfg, args.gpus, 2 * b, T, groups, ans, True, master, args.grad_accum)}
    r = {"params": c, "activation_costs": act, "plans": plans, "seq_len": T, "micro_batch": b, "gpus": args.gpus,
         "param_dtype": args.param_dtype}
    g, M = 1e9, 1e6
    print("| part | parameters | bf16 | fp32 |\n|---|---|---|---|")
    for k, name in (("vit", "ViT, SigLIP so400m (27 blocks; the pooling head not loaded)"),
                    ("pooling_head", "SigLIP pooling head (in the files only)"), ("resampler", "Perceiver resampler"),
                    ("embed", "LLM embeddings (32064 rows)"), ("blocks", f"LLM: {c['layers']} blocks"),
                    ("head", "LLM: final norm + head (with bias)"), ("model", "the model in memory"),
                    ("lora", "LoRA r=64 on qkv/o/gate_up/down (DPO)")):
        print(f"| {name} | {c[k] / M:,.1f}M | {c[k] * 2 / g:.2f} GB | {c[k] * 4 / g:.2f} GB |")
    files = c["model"] + c["pooling_head"]
    print(f"| the checkpoint's files | {files / M:,.1f}M | {files * 2 / g:.2f} GB | |")
    rows = [f"| {k} | " + " | ".join(f"{p.get(k, 0) / g:.2f} GB" for p in plans.values()) + " |"
            for k in dict.fromkeys([k for p in plans.values() for k in p])]
    rows.append("| **total per GPU** (of 80 GB) | " + " | ".join(f"**{sum(p.values()) / g:.1f} GB**"
                                                               for p in plans.values()) + " |")
    accum = f"--grad-accum {args.grad_accum}"
    report(f"| per GPU, {args.gpus} GPUs, FSDP2, grad. checkpointing, {args.param_dtype} weights, bf16 compute | "
           f"SFT: {b} x {T} positions (1 image = {img}) | the same, {accum} | DPO, LoRA: {b} pairs = {2 * b} x {T} "
           f"({ans} answer tokens), {accum} |", rows, r, args.json)


def memory_flags(p):
    """The arithmetic's flags, here and in `python -m bench.full --memory`."""
    g = p.add_argument_group("FSDP2 memory per GPU (python -m bench.full --memory)")
    g.add_argument("--gpus", type=int, default=8, help="GPUs sharing the model")
    g.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the trained weights' dtype, as train.py --param-dtype")
    g.add_argument("--seq-len", type=int, default=2048, help="positions per row (train.py --max-len)")
    g.add_argument("--micro-batch", type=int, default=4, help="rows (SFT) or pairs (DPO) per GPU")
    g.add_argument("--answer-tokens", type=int, default=512, help="supervised tokens per DPO row")
    g.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step (README's 8-GPU SFT: 2)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    memory_flags(p)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    fsdp_memory(parse(p))


if __name__ == "__main__":
    main()
