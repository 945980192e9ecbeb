"""toy/toyvision.py: labels drawn under the pixels, cell labels from the scene, a short run gives a loadable model."""
import io
import json

import torch
from PIL import Image

import model
from images import preprocess
from toy import scenes
from toy import toyvision as tv


def test_patch_labels_sit_under_their_pixels():
    """At every patch centre labelled with a shape, the view's pixel there has that shape's colour."""
    for strategy in model.STRATEGIES:
        config = model.preset("tiny", strategy)
        s, hits, total = scenes.Sampler(0, 7), 0, 0
        colours = list(scenes.COLOURS.values())
        for _ in range(15):
            scene = tv.draw_scene(s)
            views = preprocess(Image.open(io.BytesIO(scene.png())), config)[0]
            labels = tv.patch_labels(tv.label_map(scene), config)
            assert labels.shape == (len(views), config.vision.num_patches, 3)
            p = config.vision.patch_size
            pixels = ((views * 0.5 + 0.5) * 255)[:, :, p // 2::p, p // 2::p].flatten(2).transpose(1, 2)
            colour, _ = tv.factor(labels[..., 0])
            for v, k in (colour > 0).nonzero().tolist():
                want = torch.tensor(colours[colour[v, k] - 1], dtype=torch.float)
                hits += int((pixels[v, k] - want).abs().max() < 40)
                total += 1
        assert total > 50 and hits / total > 0.9, (strategy, hits, total)  # bicubic blurs a few edges


def test_factor_and_cell_labels():
    what = torch.tensor([0, 1, 4, 5, 12, tv.HAZARD, tv.LABEL])
    colour, shape = tv.factor(what)
    assert colour.tolist() == [0, 1, 4, 1, 4, 0, 0] and shape.tolist() == [0, 1, 1, 2, 3, 4, 5]
    s = scenes.Sampler(0, 8)
    for _ in range(20):
        scene = s.scene(text="word" if s.chance(0.5) else None)
        cells = tv.cell_labels(scene)
        assert cells[tv.CELLS + 1, 0] == len(scene.objects)
        for o in scene.objects:
            c = scenes.POSITIONS.index(o.position)
            assert tv.factor(cells[c, 0])[0] == list(scenes.COLOURS).index(o.colour) + 1
        assert (cells[tv.CELLS, 0] > 0) == bool(scene.text)


def test_a_short_run_writes_a_loadable_checkpoint(world, tmp_path):
    tv.main(["--data", str(world), "--out", str(tmp_path / "v"), "--steps", "3", "--images", "2", "--log-every", "1"])
    m = model.XGenMM.from_pretrained(tmp_path / "v")
    assert m.tokenizer is not None and m.config.strategy == "anyres"
    log = [json.loads(x) for x in (tmp_path / "v" / "vision_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["loss"] > 0 for r in log)
    assert set(json.loads((tmp_path / "v" / "vision_eval.json").read_text())["patch_accuracy"]) >= set(tv.HEADS)
