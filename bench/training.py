"""
Benchmark: a training step against the same step composed from transformers' modules, on the same weights.

    python -m bench.training                        # a training step, tiny and small presets, fp32, CPU
    python -m bench.training --presets tiny --repeats 1 --no-compile   # a quick look

It times a training step (forward + backward, no optimizer step; ViT frozen; resampler + LLM trained; loss
= next-token cross-entropy summed over the supervised tokens) in tokens/s of the spliced sequence (text + vision
tokens), on a fixed batch (4 samples at tiny, 2 at small: one 320x240 noise image each, 5 anyres views, and 96
supervised text tokens), against the same step composed from `xgenmm_pair`'s reference on the same weights and
batched as a transformers user would: SigLIP on all views at once (no_grad), the official resampler math on all
groups at once (weights as leaf Parameters), the blocks spliced into right-padded inputs_embeds, and
Phi3ForCausalLM(labels=...), its mean loss x the supervised tokens. Both sides get images preprocessed once,
outside the step (a DataLoader's work: bench.pipeline). transformers' lm_head has no bias and all vocab_size rows
(ours the first output_vocab_size): negligible, but the mean losses, which must agree within 1e-4 relative
first, take the reference's through the decoupled head. FLOP/s (fraction of the matmul peak) counts 6 per
trainable weight per token (embedding table out) + 2 per ViT weight per patch. Compiled rows compile the LLM
blocks in place (train.py --compile).
"""
import argparse
import tempfile
from pathlib import Path

import torch

import model
from bench.common import (CPU, alternate, common_flags, parse, peak_matmul_flops, report, train_batch, train_flops,
                          xgenmm_pair)

TRAIN_BATCH = {"tiny": 4, "small": 2}  # samples per step


def ref_pixels(ref, imgs):
    """The official processor, image by image, once (a DataLoader's work): all views and (size, grid) per image."""
    from tests.reference import divide_to_patches, processor, resize_and_pad_image, select_best_resolution
    S, views, meta = ref.S, [], []
    for img in imgs:
        best = select_best_resolution(img.size, ref.grids)
        crops = divide_to_patches(resize_and_pad_image(img, best), S)
        views += [processor(v, S) for v in [img.resize((S, S))] + crops]
        meta.append((img.size, (best[0] // S, best[1] // S)))
    return torch.stack(views), meta


def ref_groups(ref, feats, size, grid):
    """One image's view features (1 + cols*rows, P, D) -> resampler groups and masks, as in
    XGenMMReference.image_tokens (which runs one image under no_grad)."""
    from tests.reference import unpad_image
    (nw, nh), h, D = grid, ref.side, feats.shape[-1]
    f = feats[1:].view(nh, nw, h, h, D).permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)  # (D, H, W)
    f, mask = unpad_image(f, size, keep_original_shape=True)
    f = f.flatten(1, 2).transpose(0, 1)  # (H*W, D)
    return (torch.cat((feats[:1], f.reshape(-1, h * h, D))),
            torch.cat((torch.ones(1, h * h, dtype=torch.bool), mask.flatten().view(-1, h * h))))


def ref_inputs(ref, res, pixels, meta, ids):
    """Batched: SigLIP once on every view (frozen), the official resampler math once on every group, each
    sample's <image> replaced by its block, rows right-padded -> (inputs_embeds, attention_mask, labels)."""
    from tests.reference import resampler_reference
    with torch.no_grad():
        feats = ref.siglip(pixel_values=pixels).last_hidden_state  # (V, P, D)
    per_image = feats.split([1 + c * r for _, (c, r) in meta])
    grouped = [ref_groups(ref, f, size, grid) for f, (size, grid) in zip(per_image, meta)]
    tokens = resampler_reference(res, ref.rcfg, *(torch.cat(t) for t in zip(*grouped)))  # (G, L, C)
    blocks = iter(t.flatten(0, 1) for t in tokens.split([len(g) for g, _ in grouped]))
    extra = ref.extra["model.embed_tokens.additional_embedding.weight"]  # decoupled rows: ids >= initial
    embeds = torch.where((ids >= ref.initial)[..., None], extra[(ids - ref.initial).clamp(0, len(extra) - 1)],
                         ref.lm.model.embed_tokens(ids.clamp(max=ref.initial - 1)))  # (B, T, C)
    rows_e, rows_l = [], []
    for e, x in zip(embeds, ids):
        i, blk = (x == ref.image_id).nonzero().item(), next(blocks)  # one image per sample here
        rows_e.append(torch.cat((e[:i], blk, e[i + 1:])))
        rows_l.append(torch.cat((x[:i], x.new_full((len(blk),), -100), x[i + 1:])))
    pad = lambda rows, v: torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=v)  # noqa: E731
    return pad(rows_e, 0.0), pad([torch.ones(len(r), dtype=torch.long) for r in rows_l], 0), pad(rows_l, -100)


def train_parity(m, ref, res, batch, tol=1e-4):
    """Mean loss of ours and of the reference. transformers' lm_head has no bias and all vocab_size rows, so the
    reference's loss here goes from its hidden states through the decoupled head, as XGenMMReference.logits."""
    (ids, images, pixels, meta, expanded), x = batch, ref.extra
    with torch.no_grad():
        ours = m(expanded, images, labels=expanded).item()
        embeds, mask, labels = ref_inputs(ref, res, pixels, meta, ids)
        h = ref.lm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        w = torch.cat((ref.lm.lm_head.weight[: ref.initial], x["lm_head.additional_fc.weight"]))
        b = torch.cat((x["lm_head.bias"][: ref.initial], x["lm_head.additional_fc.bias"]))
        logits = (h @ w.T + b)[:, :-1]
        theirs = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten()).item()
    if abs(ours - theirs) > tol * abs(theirs):
        raise AssertionError(f"training loss: ours {ours:.6f}, reference {theirs:.6f} (relative tolerance {tol})")
    return {"ours": ours, "reference": theirs}


def train_steps(m, ref, res, batch):
    """The two steps timed: zero the grads (set to None), forward, backward of the summed loss."""
    ids, images, pixels, meta, expanded = batch
    n_sup = int((ref_inputs(ref, res, pixels, meta, ids)[2][:, 1:] != -100).sum())

    def ours():
        m.zero_grad(set_to_none=True)
        m(expanded, images, labels=expanded, reduction="sum").backward()

    def reference():
        ref.lm.zero_grad(set_to_none=True)
        for p in res.values():
            p.grad = None
        embeds, mask, labels = ref_inputs(ref, res, pixels, meta, ids)
        loss = ref.lm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        (loss * n_sup).backward()  # its mean -> the sum ours takes (the same cost either way)
    return ours, reference


def train_preset(preset, args, peak, tmp):
    """Tokens/s of forward + backward (no optimizer step) of ours and of the reference on one fixed batch."""
    m, ref = xgenmm_pair(preset, tmp)
    m.train(), ref.lm.train(), ref.siglip.requires_grad_(False)
    res = {k: torch.nn.Parameter(v.clone()) for k, v in ref.res_sd.items()}  # the trainable resampler, as leaves
    ids, imgs = train_batch(m, TRAIN_BATCH[preset])
    expanded, _, images = m.encode_batch(ids.tolist(), [[im] for im in imgs])  # ours: each <image> -> its block
    batch = (ids, images, *ref_pixels(ref, imgs), expanded)
    B, T = ref_inputs(ref, res, *batch[2:4], ids)[0].shape[:2]
    flops = train_flops(m, B * T, len(batch[2]))
    out = {"parity_loss": train_parity(m, ref, res, batch), "samples": B, "tokens_per_sample": T,
           "flops_per_step": flops}
    for comp in [False, True] if args.compile else [False]:
        for block in m.lang_model.model.layers if comp else ():
            block.compile()  # in place, as train.py --compile
        a, r = alternate(*train_steps(m, ref, res, batch), CPU, args.repeats, B * T)
        util = flops / (B * T) / peak
        out["train" + "_compiled" * comp] = {"ours": a, "reference": r, "ours_frac": a * util,
                                             "reference_frac": r * util}
    return out


def train_row(preset, key, r):
    x, name = r[key], f"train step fwd+bwd ({r['samples']} samples x {r['tokens_per_sample']} tokens)"
    name += ", ours compiled" if key.endswith("compiled") else ""
    return (f"| {preset} | {name} | {x['ours']:,.0f} tok/s ({x['ours_frac']:.0%} of peak) | "
            f"{x['reference']:,.0f} tok/s ({x['reference_frac']:.0%}) | {x['ours'] / x['reference']:.2f}x |")


def train_bench(args):
    peak = peak_matmul_flops(CPU, torch.float32)
    print(f"cpu float32, {torch.get_num_threads()} threads; matmul peak {peak / 1e9:.0f} GFLOP/s")
    results, rows = {"device": "cpu", "dtype": "float32", "peak_flops": peak}, []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for preset in args.presets:
            r = results[preset] = train_preset(preset, args, peak, Path(tmp))
            print(f"{preset}: mean training loss, ours {r['parity_loss']['ours']:.6f}, "
                  f"reference {r['parity_loss']['reference']:.6f}")
            rows += [train_row(preset, k, r) for k in ("train", "train_compiled") if k in r]
    report("| preset | measure | ours | transformers-composed | ours / reference |", rows, results, args.json)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_flags(p, "model sizes to time (model.preset)",
                 "also time ours with the LLM blocks compiled in place, as train.py --compile", bandwidth=False)
    train_bench(parse(p))


if __name__ == "__main__":
    main()
