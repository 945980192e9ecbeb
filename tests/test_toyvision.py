"""toy/toyvision.py: labels drawn under the pixels, latent labels from the scene's cells, a short run gives a
loadable model, and the probe of a checkpoint."""
import io
import json

import torch
from PIL import Image

import model
from images import preprocess
from toy import scenes
from toy import toyvision as tv


def colour_of(what):
    """The colour index (1-4) of an object class, 0 for anything else."""
    return torch.where((what >= 1) & (what <= tv.OBJECTS), (what - 1) % len(scenes.COLOURS) + 1, 0)


def test_patch_labels_sit_under_their_pixels():
    """Where a patch is labelled with a shape, most of its pixels have that shape's colour."""
    for strategy in model.STRATEGIES:
        config = model.preset("toy", strategy)
        s, hits, total = scenes.Sampler(0, 7), 0, 0
        colours = torch.tensor(list(scenes.COLOURS.values()), dtype=torch.float)
        for _ in range(30):
            scene = tv.draw_scene(s)
            views = preprocess(Image.open(io.BytesIO(scene.png())), config)[0]
            labels = tv.patch_labels(tv.label_map(scene), config)
            assert labels.shape == (len(views), config.vision.num_patches, 3)
            p, g = config.vision.patch_size, config.vision.image_size // config.vision.patch_size
            pixels = ((views * 0.5 + 0.5) * 255).view(len(views), 3, g, p, g, p).permute(0, 2, 4, 3, 5, 1)
            pixels = pixels.reshape(len(views), g * g, p * p, 3)
            colour = colour_of(labels[..., 0])
            for v, k in (colour > 0).nonzero().tolist():
                near = (pixels[v, k] - colours[colour[v, k] - 1]).abs().amax(-1) < 40
                hits += int(near.float().mean() >= 0.2)  # the label needs a quarter of the patch covered
                total += 1
        assert total > 25 and hits / total > 0.9, (strategy, hits, total)


def test_glyph_labels_spell_the_text_and_latents_name_the_cells():
    """A row of normal text puts one glyph per patch of the global view, in order; latent i of the global view
    is asked what patch i shows (and where a shape sits in it), latent 9 the count of shapes."""
    config = model.preset("toy", "anyres")
    s, checked = scenes.Sampler(0, 8), 0
    for _ in range(30):
        scene = s.scene(text="word")
        views, size, grid = preprocess(Image.open(io.BytesIO(scene.png())), config)
        labels = tv.patch_labels(tv.label_map(scene), config)
        glyphs = [tv.CHARS[w - tv.GLYPH] for w in labels[0, :, 0].tolist() if w >= tv.GLYPH]
        assert "".join(glyphs) == scene.text, (glyphs, scene.text)
        latents = tv.group_labels(labels, size, grid, len(scene.objects), config)
        assert latents[0, :tv.CELLS].tolist() == labels[0].tolist() and latents[0, tv.COUNT, 0] == len(scene.objects)
        for o in scene.objects:  # a big shape fills its cell: the cell's patch names it, and where it sits
            if o.size == "big":
                cell = scenes.POSITIONS.index(o.position)
                assert latents[0, cell, 0] == tv.what_of(o) and latents[0, cell, 2] == tv.offset_of(o) == 1
                checked += 1
        assert (latents[1:, :, 2] == -100).all()  # crops are not asked where a shape sits in its cell
    assert checked > 5


def test_a_short_run_writes_a_loadable_checkpoint_and_probes_it(world, tmp_path):
    tv.main(["--data", str(world), "--out", str(tmp_path / "v"), "--steps", "3", "--images", "2", "--log-every", "1"])
    m = model.XGenMM.from_pretrained(tmp_path / "v")
    assert m.tokenizer is not None and m.config.strategy == "anyres" and m.config.vision.patch_size == 32
    log = [json.loads(x) for x in (tmp_path / "v" / "vision_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["loss"] > 0 for r in log)
    held = json.loads((tmp_path / "v" / "vision_eval.json").read_text())["accuracy"]
    assert {"colour", "shape", "glyph", "cell_colour", "cell_glyph", "count"} <= set(held)
    acc = tv.main(["--probe", str(tmp_path / "v"), "--steps", "2", "--json", str(tmp_path / "p.json")])
    assert json.loads((tmp_path / "p.json").read_text()).keys() == acc.keys()
