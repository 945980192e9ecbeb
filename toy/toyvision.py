"""
The toy world's stand-in for SigLIP's pretraining: a `tiny` ViT taught to see the toy world, then frozen.

    python -m toy.toyvision --data data/toy --out out/vision          # ~2 minutes on 2 CPU cores
    python train.py --stage pretrain --init out/vision --data data/toy/mixtures/pretrain.json

xGen-MM starts from a SigLIP that has already learned to see from billions of image-text pairs, and keeps it
frozen in every stage (paper section 3). The toy world has no such encoder, and a random frozen ViT would
hand the resampler random projections of pixels; training the ViT through the language model instead is
slow, because the decoder must first learn to bind a question to the right image tokens before any useful
gradient reaches the pixels. So this script does the job of SigLIP's pretraining, cheaply: each patch of
each view (the global view and the any-resolution crops, exactly as images.preprocess cuts them) learns to
name what lies under its centre:

    what   background | one of 12 (colour, shape) | hazard sign | text label      (15 classes)
    size   none | small | big                                                       (3)
    text   none | one of the 24 words | a number 0-99                               (125)

The labels are drawn, not annotated: every scene is drawn twice with the same geometry, once in colour and
once as a label map (class ids as pixel values), and the label map goes through images.preprocess with
nearest-neighbour resampling, so each view's labels sit under its pixels. Scenes are drawn fresh for every
batch from their own random stream (never the test streams).

The output is a whole xGen-MM checkpoint for the world's tokenizer: this ViT, a fresh resampler and a fresh
language model, which `train.py --init` starts from (the ViT then stays frozen, as in the paper).
"""
import argparse
import io
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

from images import preprocess
from model import STRATEGIES, XGenMM
from toy import scenes

WHAT = 1 + len(scenes.SHAPES) * len(scenes.COLOURS) + 2  # background, (colour, shape)s, hazard, text
HAZARD, LABEL = WHAT - 2, WHAT - 1
TEXTS = list(scenes.WORDS) + [str(i) for i in range(100)]
HEADS = {"colour": 1 + len(scenes.COLOURS), "shape": 1 + len(scenes.SHAPES) + 2, "size": 1 + len(scenes.SIZES),
         "text": 1 + len(TEXTS)}


def factor(what):
    """A `what` class -> (colour, shape) classes: shape 4 = hazard sign, 5 = text label; 0 = nothing."""
    obj = (what >= 1) & (what < HAZARD)
    colour = torch.where(obj, (what - 1) % len(scenes.COLOURS) + 1, 0)
    shape = torch.where(obj, (what - 1) // len(scenes.COLOURS) + 1, 0)
    shape = torch.where(what == HAZARD, len(scenes.SHAPES) + 1,
                        torch.where(what == LABEL, len(scenes.SHAPES) + 2, shape))
    return colour, shape
CELLS, MAX_SHAPES = 9, 4  # latents 0-8 name the 3x3 cells of the global view, 9 the text, 10 the shape count


def label_map(scene):
    """The scene's label image: (what, size, text) class ids as the R, G, B values of each pixel."""
    img = Image.new("RGB", (scene.width, scene.height), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        scenes.draw_shape(draw, o.shape, scene.pixels(o.box), (what_of(o), 1 + list(scenes.SIZES).index(o.size), 0))
    if scene.text:
        draw.rectangle(scene.pixels(scene.text_box), fill=(LABEL, 0, 1 + TEXTS.index(scene.text)))
    if scene.hazard_box:
        scenes.draw_shape(draw, "triangle", scene.pixels(scene.hazard_box), (HAZARD, 0, 0))
    return img


def what_of(o):
    colours = list(scenes.COLOURS)
    return 1 + scenes.SHAPES.index(o.shape) * len(colours) + colours.index(o.colour)


def cell_labels(scene):
    """(11, 2) long: per cell (what, size), then (text, 0) and (shape count, 0), from the scene itself."""
    cells = [[0, 0] for _ in range(CELLS)]
    for o in scene.objects:
        cells[scenes.POSITIONS.index(o.position)] = [what_of(o), 1 + list(scenes.SIZES).index(o.size)]
    if scene.hazard_box:
        cells[scenes.POSITIONS.index(scene.hazard_position)] = [HAZARD, 0]
    if scene.text and scene.small_text:
        cells[scenes.POSITIONS.index(scene.text_position)] = [LABEL, 0]
    elif scene.text:
        row = scenes.ROWS.index(scene.text_position)
        for c in range(3 * row, 3 * row + 3):
            cells[c] = [LABEL, 0]
    text = 1 + TEXTS.index(scene.text) if scene.text else 0
    return torch.tensor(cells + [[text, 0], [len(scene.objects), 0]])


def patch_labels(label_img, config):
    """(V, P, 3) long: each view's patch-centre labels, the views cut as images.preprocess cuts the image."""
    views, _, _ = preprocess(label_img, config, Image.Resampling.NEAREST, fill=(0, 0, 0))
    ids = ((views * 0.5 + 0.5) * 255).round().long()  # undo to_pixels' normalisation: exact for nearest
    p = config.vision.patch_size
    centres = ids[:, :, p // 2::p, p // 2::p]  # (V, 3, g, g)
    return centres.flatten(2).transpose(1, 2)


def draw_scene(s):
    """A scene mixed like the caption data: some text (half of it small), now and then a hazard sign."""
    text = s.pick(["word", "number"]) if s.chance(0.35) else None
    return s.scene(text=text, small_text=bool(text) and s.chance(0.5), hazard=s.chance(0.1))


def batch(s, config, n):
    """n fresh scenes -> pixels (V, 3, S, S), patch labels (V, P, 3), global-view index (n,), cell labels (n, 11, 2)."""
    pixels, labels, first, cells = [], [], [], []
    for _ in range(n):
        scene = draw_scene(s)
        first.append(sum(len(p) for p in pixels))
        pixels.append(preprocess(Image.open(io.BytesIO(scene.png())), config)[0])
        labels.append(patch_labels(label_map(scene), config))
        cells.append(cell_labels(scene))
    return torch.cat(pixels), torch.cat(labels), torch.tensor(first), torch.stack(cells)


class Probe(nn.Module):
    """Linear heads: on the ViT's patch features (per patch), and on the resampler's latents of the global view
    (latent i < 9 names cell i, latent 9 the text, latent 10 the number of shapes)."""

    def __init__(self, width, latent_width):
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(width, n) for k, n in HEADS.items()})
        self.cell = nn.ModuleDict({"what": nn.Linear(latent_width, WHAT), "size": nn.Linear(latent_width, 3)})
        self.text = nn.Linear(latent_width, 1 + len(TEXTS))
        self.count = nn.Linear(latent_width, MAX_SHAPES + 1)

    def forward(self, feats, labels, latents, cells):
        """Summed cross-entropy of every head, and accuracies (patches: where something is drawn)."""
        loss, acc = 0.0, {}
        shown = labels[..., 0] > 0
        targets = dict(zip(HEADS, (*factor(labels[..., 0]), labels[..., 1], labels[..., 2])))
        for name, head in self.heads.items():
            logits = head(feats)
            loss = loss + F.cross_entropy(logits.flatten(0, 1), targets[name].flatten())
            hit = logits.argmax(-1) == targets[name]
            acc[name] = (hit[shown].float().mean() if shown.any() else hit.float().mean()).item()
        outs = [(self.cell[k](latents[:, :CELLS]), cells[:, :CELLS, j], f"cell_{k}") for j, k in enumerate(self.cell)]
        outs += [(self.text(latents[:, CELLS]), cells[:, CELLS, 0], "latent_text"),
                 (self.count(latents[:, CELLS + 1]), cells[:, CELLS + 1, 0], "latent_count")]
        for logits, target, name in outs:
            loss = loss + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
            acc[name] = (logits.argmax(-1) == target).float().mean().item()
        return loss, acc


def step_loss(m, probe, b):
    pixels, labels, first, cells = b
    feats = m.vision_encoder(pixels)
    return probe(feats, labels, m.vision_tokenizer(feats[first]), cells)


def evaluate(m, probe, seed, n=64):
    with torch.no_grad():
        return step_loss(m, probe, batch(scenes.Sampler(seed, 399), m.config, n))[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/toy", help="the toy world (for its tokenizer; default: data/toy)")
    p.add_argument("--out", default="out/vision", help="where the xGen-MM checkpoint goes (default: out/vision)")
    p.add_argument("--strategy", default="anyres", choices=STRATEGIES, help="image strategy of the model")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps")
    p.add_argument("--images", type=int, default=16, help="scenes per step (each cut into 1-5 views)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=25)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    m = XGenMM.from_tokenizer(Path(args.data) / "tokenizer", "tiny", args.strategy)  # as train.py builds one
    vit, config = m.vision_encoder.requires_grad_(True).train(), m.config
    probe = Probe(config.vision.hidden_size, config.text.hidden_size)
    params = list(vit.parameters()) + list(m.vision_tokenizer.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    s, t0, log = scenes.Sampler(args.seed, 300), time.time(), out / "vision_metrics.jsonl"
    log.unlink(missing_ok=True)
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(
            torch.pi * step / args.steps)).item()))
        for g in opt.param_groups:
            g["lr"] = lr
        loss, acc = step_loss(m, probe, batch(s, config, args.images))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            rec = {"step": step + 1, "loss": round(loss.item(), 4), **{k: round(v, 4) for k, v in acc.items()},
                   "elapsed_s": round(time.time() - t0, 1)}
            with open(log, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(" | ".join(f"{k} {v}" for k, v in rec.items()), flush=True)
    vit.eval().requires_grad_(False)
    held = evaluate(m, probe, args.seed)
    print("held-out scenes, accuracy: "
          + ", ".join(f"{k} {v:.3f}" for k, v in held.items()))
    m.save_pretrained(out)
    (out / "vision_eval.json").write_text(json.dumps({"patch_accuracy": held, "steps": args.steps,
                                                      "seconds": round(time.time() - t0, 1)}) + "\n")
    print(f"{out}: an xGen-MM checkpoint (this ViT, fresh resampler and LM) in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
