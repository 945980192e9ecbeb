"""
The toy world's stand-in for SigLIP's pretraining: a ViT, and the resampler on it, taught to see the world.

    python -m toy.toyvision --data data/toy --out out/vision             # the vision stage (~4 minutes, 2 cores)
    python -m toy.toyvision --probe out/toy/sft --data data/toy          # probes of a checkpoint's features
    python train.py --stage pretrain --init out/vision --data data/toy/mixtures/pretrain.json

xGen-MM starts from a SigLIP that learned to see from billions of image-text pairs and keeps it frozen (paper
section 3). The toy world has none, and a random frozen ViT would hand the resampler noise; teaching the ViT
through a randomly initialised decoder is slow. So this script does SigLIP's job, cheaply, on freshly drawn
scenes (their own random stream, never the test's). Every scene is drawn twice with the same geometry, once
in colour and once as label maps, both through images.preprocess, so each view's labels sit under its pixels:

    each patch of each view       what: background, one of 12 (colour, shape), the hazard sign, one of 36
                                  glyphs (A-Z, 0-9) -- whatever covers the most of it, if a quarter; size;
                                  where a shape sits in its cell (what a bounding box needs)
    latent i < 9 of a group       what patch i of the group shows (a one-crop-wide image's groups are its
                                  views: the global view's latents name its cells, a crop's its own)
    latent 9 of the global view   how many shapes

What it took (docs/toy.md has the measurements): the toy ViT's patches are the scenes' 3x3 cells (96-pixel
views, 32-pixel patches), so an object or a glyph is one patch and "where" is which patch; the position
table drawn N(0, 1), not SigLIP's N(0, 1/D), or "where" does not survive into the features (with the small
table the resampler's latents never left their prior); and labels on every patch a thing covers, not its
centre only. The result is a whole xGen-MM checkpoint, this ViT and resampler and a fresh language model,
which train.py --init starts from (the ViT frozen from then on, as in the paper).
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

from checkpoint import resolve
from images import Images, group_features, preprocess
from model import STRATEGIES, XGenMM
from toy import scenes

CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
OBJECTS = len(scenes.SHAPES) * len(scenes.COLOURS)
HAZARD, GLYPH = 1 + OBJECTS, 2 + OBJECTS  # what: 0 background, 1-12 (colour, shape), 13 hazard, 14-49 glyphs
WHAT = GLYPH + len(CHARS)
OFFSETS = 10  # 0: no shape, 1-9: where a shape sits in its cell
CELLS, COUNT, MAX_SHAPES = 9, 9, 4  # latents 0-8: a group's patches; latent 9 of the global view: the count

# -----------------------------------------------------------------------------
# labels, drawn with the scene's own geometry


def what_of(o):
    colours = list(scenes.COLOURS)
    return 1 + scenes.SHAPES.index(o.shape) * len(colours) + colours.index(o.colour)


def offset_of(o):
    """1 + where a shape sits in its cell (3 x 3 steps of one unit; a big shape fills its cell: 1): what a box
    needs beyond the cell and the size."""
    cell = scenes.POSITIONS.index(o.position)
    return 1 + (o.box[0] - 7 * (cell % 3)) + 3 * (o.box[1] - 7 * (cell // 3))


def label_map(scene):
    """The scene's labels as an image: (what, size, offset) class ids as the R, G, B values of each pixel."""
    img = Image.new("RGB", (scene.width, scene.height), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        labels = (what_of(o), 1 + list(scenes.SIZES).index(o.size), offset_of(o))
        scenes.draw_shape(draw, o.shape, scene.pixels(o.box), labels)
    for ch, (x1, y1, x2, y2) in zip(scene.text, scene.glyph_boxes() if scene.text else []):
        draw.rectangle((round(x1), round(y1), round(x2) - 1, round(y2) - 1), fill=(GLYPH + CHARS.index(ch), 0, 0))
    if scene.hazard_box:
        scenes.draw_shape(draw, "triangle", scene.pixels(scene.hazard_box), (HAZARD, 0, 0))
    return img


def patch_labels(label_img, config):
    """(V, P, 3) long: per patch of each view (cut as images.preprocess cuts the image) the what, size and
    offset of whatever covers the most of it, if it covers a quarter (-100: not asked)."""
    views, _, _ = preprocess(label_img, config, Image.Resampling.NEAREST, fill=(0, 0, 0))
    ids = ((views * 0.5 + 0.5) * 255).round().long()  # undo to_pixels' normalisation: exact for nearest
    p, g = config.vision.patch_size, config.vision.image_size // config.vision.patch_size
    ids = ids.view(len(ids), 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(len(ids), g * g, 3, p * p)
    out = []
    for c, n in ((0, WHAT), (1, 3), (2, OFFSETS)):
        counts = F.one_hot(ids[:, :, c], n).sum(2)  # (V, P, n): pixels of each class
        counts[..., 0] = 0
        out.append(torch.where(counts.max(-1).values * 4 >= p * p, counts.argmax(-1), 0))
    out = torch.stack(out, -1)
    out[1:, :, 2] = -100  # the offset is asked of the global view, whose patches are the cells, only
    return out


def group_labels(labels, size, grid, count, config):
    """(groups, 10, 3) long: per resampler group of one image, what latent i < 9 names (the group's patch i; -100
    where it is not asked: the groups of a many-crops-wide grid are bands across crops, whose patches a
    latent cannot tell apart by position) and the shape count on latent 9 of the global view."""
    groups, _ = group_features(labels.float(), size, grid, config.anyres_patch_sampling)
    out = torch.full((len(groups), CELLS + 1, labels.shape[-1]), -100)
    for k, g in enumerate(groups):
        if k == 0 or grid[0] == 1:
            out[k, :CELLS] = g[:CELLS].long()
    out[0, COUNT, 0] = count
    return out


def draw_scene(s, text_share=0.5):
    """A scene as the captions draw them, with more text (half of it small) and now and then a hazard sign."""
    text = s.pick(["word", "number"]) if s.chance(text_share) else None
    return s.scene(text=text, small_text=bool(text) and s.chance(0.5), hazard=s.chance(0.1))


def batch(s, config, n, text_share=0.5):
    """n fresh scenes -> (Images, patch labels (V, P, 2), latent labels (groups, 10, 2))."""
    views, labels, latents = [], [], []
    for _ in range(n):
        scene = draw_scene(s, text_share)
        views.append(preprocess(Image.open(io.BytesIO(scene.png())), config))
        labels.append(patch_labels(label_map(scene), config))
        latents.append(group_labels(labels[-1], *views[-1][1:], len(scene.objects), config))
    return Images.collate([views]), torch.cat(labels), torch.cat(latents)

# -----------------------------------------------------------------------------
# what the features are asked


class Probe(nn.Module):
    """Linear heads on the ViT's patch features and on the resampler's latents (see the module docstring)."""

    def __init__(self, width, latent_width):
        super().__init__()
        heads = {"what": WHAT, "size": 3, "offset": OFFSETS}  # in the order of the label channels
        self.patch = nn.ModuleDict({k: nn.Linear(width, n) for k, n in heads.items()})
        self.cell = nn.ModuleDict({k: nn.Linear(latent_width, n) for k, n in heads.items()})
        self.count = nn.Linear(latent_width, MAX_SHAPES + 1)

    def forward(self, feats, latents, b):
        """Summed cross-entropy of every head, and accuracies."""
        images, labels, targets = b
        loss, acc = 0.0, {}
        for k, (name, head) in enumerate(self.patch.items()):
            logits = head(feats)
            loss = loss + F.cross_entropy(logits.flatten(0, 1), labels[..., k].flatten())
            acc |= accuracy(name, logits.argmax(-1), labels[..., k])
        for k, (name, head) in enumerate(self.cell.items()):
            logits = head(latents[:, :CELLS])
            loss = loss + F.cross_entropy(logits.flatten(0, 1), targets[:, :CELLS, k].flatten(), ignore_index=-100)
            acc |= {f"cell_{n}": v for n, v in accuracy(name, logits.argmax(-1), targets[:, :CELLS, k]).items()}
        logits, count = self.count(latents[:, COUNT]), targets[:, COUNT, 0]
        loss = loss + F.cross_entropy(logits, count, ignore_index=-100)
        acc["count"] = (logits.argmax(-1) == count)[count >= 0].float().mean().item()
        return loss, acc


def accuracy(name, guess, target):
    """Accuracies where something is there (-100: not asked): size; colour and shape of the objects; glyphs."""
    def mean(hit, where):
        return hit[where].float().mean().item() if where.any() else float("nan")
    if name in ("size", "offset"):
        return {name: mean(guess == target, target > 0)}
    obj, glyph = (target >= 1) & (target <= OBJECTS), target >= GLYPH
    colour, shape = (lambda w: (w - 1) % len(scenes.COLOURS)), (lambda w: (w - 1) // len(scenes.COLOURS))
    return {"colour": mean(colour(guess) == colour(target), obj), "shape": mean(shape(guess) == shape(target), obj),
            "glyph": mean(guess == target, glyph), "empty": mean(guess == 0, target == 0)}


def step_loss(m, probe, b):
    images = b[0]
    feats = m.vision_encoder(images.pixel_values)
    blocks = m.encode_images(images, feats=feats)  # per image (groups x L, C)
    L = m.config.resampler.num_latents
    latents = torch.cat([t.view(-1, L, t.shape[-1]) for t in blocks])  # (groups, L, C)
    return probe(feats, latents, b)

# -----------------------------------------------------------------------------
# training, and probing a checkpoint


def train(m, probe, params, steps, lr, scenes_per_step, text_share, seed, log=None, every=50):
    """AdamW on `params` over fresh scenes: warm-up, cosine to 10%, clipping; metrics to `log` (JSONL)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    s, t0 = scenes.Sampler(seed, 300), time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.45 * (1 + torch.cos(torch.tensor(
                torch.pi * step / steps)).item()))
        loss, acc = step_loss(m, probe, batch(s, m.config, scenes_per_step, text_share))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if log and ((step + 1) % every == 0 or step + 1 == steps):
            rec = {"step": step + 1, "loss": round(loss.item(), 4), **{k: round(v, 4) for k, v in acc.items()},
                   "elapsed_s": round(time.time() - t0, 1)}
            with open(log, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(" | ".join(f"{k} {v}" for k, v in rec.items()), flush=True)


@torch.no_grad()
def held_out(m, probe, seed, n=96):
    """Accuracies on scenes of a stream training never draws."""
    return step_loss(m, probe, batch(scenes.Sampler(seed, 399), m.config, n))[1]


def probe_checkpoint(path, seed=0, steps=300):
    """Fresh linear heads on a checkpoint's frozen features (ViT patches, resampler latents), trained briefly:
    what its vision path carries at this stage (run_toy.sh calls it after every stage)."""
    m = XGenMM.from_pretrained(resolve(path)).eval().requires_grad_(False)
    probe = Probe(m.config.vision.hidden_size, m.config.text.hidden_size)
    train(m, probe, list(probe.parameters()), steps, 3e-3, 16, 0.5, seed + 1)
    return held_out(m, probe, seed)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/toy", help="the toy world (for its tokenizer; default: data/toy)")
    p.add_argument("--out", default="out/vision", help="where the xGen-MM checkpoint goes (default: out/vision)")
    p.add_argument("--probe", metavar="CKPT", help="instead: probe this checkpoint's features, print and --json them")
    p.add_argument("--json", help="with --probe: write the accuracies here")
    p.add_argument("--strategy", default="anyres", choices=STRATEGIES, help="image strategy of the model")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps")
    p.add_argument("--images", type=int, default=16, help="scenes per step (each cut into 1-5 views)")
    p.add_argument("--text-share", type=float, default=0.5, help="share of scenes with text (half of it small)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    if args.probe:
        acc = probe_checkpoint(args.probe, args.seed, args.steps)
        print(json.dumps({k: round(v, 4) for k, v in acc.items()}))
        if args.json:
            Path(args.json).write_text(json.dumps(acc, indent=1) + "\n")
        return acc
    m = XGenMM.from_tokenizer(Path(args.data) / "tokenizer", "toy", args.strategy)  # as train.py builds one
    # "where" must survive into the features: a position table as strong as the patches (SigLIP's is N(0, 1/D))
    nn.init.normal_(m.vision_encoder.embeddings.position_embedding.weight, std=1.0)
    m.vision_encoder.requires_grad_(True).train()
    probe = Probe(m.config.vision.hidden_size, m.config.text.hidden_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "vision_metrics.jsonl"
    log.unlink(missing_ok=True)
    t0 = time.time()
    params = [*m.vision_encoder.parameters(), *m.vision_tokenizer.parameters(), *probe.parameters()]
    train(m, probe, params, args.steps, args.lr, args.images, args.text_share, args.seed, log, args.log_every)
    m.vision_encoder.eval().requires_grad_(False)
    held = held_out(m, probe, args.seed)
    print("held-out scenes, accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in held.items()))
    m.save_pretrained(out)
    (out / "vision_eval.json").write_text(json.dumps({"accuracy": held, "steps": args.steps,
                                                      "seconds": round(time.time() - t0, 1)}) + "\n")
    print(f"{out}: an xGen-MM checkpoint (this ViT and resampler, a fresh LM) in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
