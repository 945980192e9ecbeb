"""
The toy recipe's report: what each stage learned, how long it took, and what the model answers.

    python -m toy.report out/toy          # toy/run_toy.sh runs this last

Reads a run folder written by toy/run_toy.sh (eval/<stage>.json and .predictions.jsonl, <stage>/metrics.jsonl,
vision/vision_metrics.jsonl, probes/<stage>.json, times.tsv) and writes beside them:
  results.json   {stage: {metric: fraction}}, as eval.py --summarize
  results.md     the table of stages x metrics, VQA by kind of question and by the shapes in the scene, the
                 feature probes, the time and
                 throughput of each stage, the training curves, and held-out test images with the question,
                 the model's answer at each stage and whether it is right
  curves.png     the training loss of every stage (and the vision stage's accuracies), drawn with Pillow
"""
import argparse
import json
import os
from pathlib import Path

from PIL import Image, ImageDraw

from toy import tasks

EXAMPLES = {"vqa": 4, "ocr": 2, "ocr_small": 2, "grounding": 2, "multi_image": 2, "fewshot_8": 2, "safety": 2}
PROBES = ("colour", "shape", "size", "glyph", "cell_colour", "cell_shape", "cell_glyph", "count")


def read_jsonl(path):
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()] if Path(path).is_file() else []


def stage_times(run):
    """(stage, seconds, tokens/s, padded fill, share of the time waiting for data) from times.tsv and the logs."""
    rows = []
    for line in (run / "times.tsv").read_text().splitlines() if (run / "times.tsv").is_file() else []:
        name, seconds = line.split("\t")
        last = (read_jsonl(run / name / "metrics.jsonl") or [{}])[-1]
        wait = last.get("data_wait_s", 0) / last["elapsed_s"] if last.get("elapsed_s") else None
        rows.append((name, float(seconds), last.get("tokens_per_s"), last.get("fill"), wait))
    return rows


def times_table(rows):
    merged = {}
    for name, sec, tps, fill, wait in rows:  # eval and probe run once per stage: summed
        old = merged.get(name)
        merged[name] = (sec + (old[0] if old else 0), tps, fill, wait)
    out = ["| step | minutes | tokens/s | real tokens / padded | waiting for data |", "|---|---|---|---|---|"]
    for name, (sec, tps, fill, wait) in merged.items():
        out.append(f"| {name} | {sec / 60:.1f} | " + " | ".join(
            "-" if v is None else fmt.format(v) for v, fmt in ((tps, "{:,.0f}"), (fill, "{:.0%}"), (wait, "{:.0%}")))
            + " |")
    out.append(f"| all | {sum(v[0] for v in merged.values()) / 60:.1f} | | | |")
    return "\n".join(out)


def probes_table(run):
    found = {p.stem: json.loads(p.read_text()) for p in sorted((run / "probes").glob("*.json"))}
    vision = run / "vision" / "vision_eval.json"
    if vision.is_file():
        found = {"vision": json.loads(vision.read_text())["accuracy"], **found}
    if not found:
        return ""
    order = [s for s in ("vision",) + tasks.RECIPE if s in found]
    head = "| features of | " + " | ".join(PROBES) + " |"
    lines = [head, "|" + "---|" * (len(PROBES) + 1)]
    for s in order:
        lines.append(f"| {s} | " + " | ".join(f"{100 * found[s][k]:.0f}" if k in found[s] else "-" for k in PROBES)
                     + " |")
    return "\n".join(lines)


def curves(run, stages, path, size=(360, 220)):
    """One panel per stage: its loss against the step (the vision stage: its loss and cell accuracies)."""
    series = {"vision": read_jsonl(run / "vision" / "vision_metrics.jsonl")}
    series.update({s: read_jsonl(run / s / "metrics.jsonl") for s in stages})
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    W, H = size
    img = Image.new("RGB", (W * min(3, len(series)), H * ((len(series) + 2) // 3)), "white")
    for k, (name, recs) in enumerate(series.items()):
        x0, y0 = (k % 3) * W, (k // 3) * H
        panel(ImageDraw.Draw(img), (x0, y0, x0 + W, y0 + H), name, recs)
    img.save(path)
    return path


def panel(draw, box, name, recs):
    x0, y0, x1, y1 = box
    left, top, right, bottom = x0 + 40, y0 + 22, x1 - 10, y1 - 22
    draw.rectangle((left, top, right, bottom), outline=(160, 160, 160))
    steps = [r["step"] for r in recs]
    lines = [("loss", (200, 40, 40), max(r["loss"] for r in recs))]
    lines += [(k, c, 1.0) for k, c in (("cell_colour", (40, 80, 220)), ("cell_glyph", (40, 160, 60)))
              if k in recs[0]]
    draw.text((left, y0 + 4), f"{name}: " + ", ".join(k for k, _, _ in lines) + f" (loss max {lines[0][2]:.2f})",
              fill="black")
    draw.text((left, bottom + 4), f"step 0 .. {steps[-1]}", fill="black")
    for key, colour, top_value in lines:
        pts = [(left + (right - left) * s / steps[-1], bottom - (bottom - top) * r[key] / top_value)
               for s, r in zip(steps, recs) if isinstance(r.get(key), (int, float))]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)


def examples(run, data_rel, stages):
    """Per task: a few held-out images, the question, and each stage's answer with a mark."""
    preds = {s: {(p["metric"], p["id"]): p for p in read_jsonl(run / "eval" / f"{s}.predictions.jsonl")}
             for s in stages}
    first = next((preds[s] for s in stages if preds[s]), {})
    out = []
    for metric, n in EXAMPLES.items():
        keys = [k for k in first if k[0] == metric][:n]
        if not keys:
            continue
        out.append(f"### {metric}\n")
        for key in keys:
            p = first[key]
            pictures = " ".join(f"![]({data_rel}/{im})" for im in p["images"][-3:])
            question = p["prompt"].split("<|user|>")[-1].replace("<|end|>", "").replace("<|assistant|>", "")
            question = question.replace("<image>", "").replace("\n", " ").strip()[-160:]
            out.append(f"{pictures}\n\n**{question}** (reference: `{p['reference']}`)\n")
            for s in stages:
                q = preds[s].get(key)
                if q:
                    mark = {True: "right", False: "wrong"}.get(q["right"], f"F1 {q['right']:.2f}")
                    out.append(f"- {s}: `{q['answer'].strip()[:140]}` ({mark})")
            out.append("")
    return "\n".join(out)


def binding_table(run, stages):
    """VQA by kind and by the shapes in the scene: with one shape a question needs no lookup; with several it
    names the one it means ("What colour is the triangle?"), and only a model that finds a shape by what it is
    answers it. Read from eval/<stage>.predictions.jsonl and the world's test/vqa.json."""
    path = run / "data" / "test" / "vqa.json"
    if not path.is_file():
        return ""
    records = json.loads(path.read_text())
    shapes, kinds = {r["id"]: len(r.get("objects", [])) for r in records}, {r["id"]: r.get("task") for r in records}
    cols = [(k, one) for k in ("colour", "count", "position", "existence") for one in (True, False)]
    out = ["| | " + " | ".join(f"{k}, {'one shape' if one else '2-4 shapes'}" for k, one in cols) + " |",
           "|" + "---|" * (len(cols) + 1)]
    for s in stages:
        preds = [p for p in read_jsonl(run / "eval" / f"{s}.predictions.jsonl") if p["metric"] == "vqa"]
        if not preds:
            continue
        cells = []
        for k, one in cols:
            v = [float(p["right"]) for p in preds if kinds.get(p["id"]) == k and (shapes.get(p["id"]) == 1) == one]
            lo, hi = tasks.interval(v)
            cells.append(f"{100 * tasks.mean(v):.0f} ({100 * lo:.0f}-{100 * hi:.0f}, n={len(v)})" if v else "-")
        out.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(out) if len(out) > 2 else ""


def report(run):
    run = Path(run)
    results = tasks.summarize(run)  # results.json, results.md's first table
    stages = list(results)
    parts = [(s, {k: v for k, v in results[s].items() if k in tasks.VQA_PARTS}) for s in stages]
    ci = {s: json.loads((run / "eval" / f"{s}.json").read_text()).get("intervals", {}) for s in stages}
    md = [(run / "results.md").read_text().strip(), "", "VQA by kind of question:", "",
          tasks.table(parts, metrics=tasks.VQA_PARTS, ci=ci), ""]
    binding = binding_table(run, stages)
    if binding:
        md += ["VQA by the shapes in the scene (% right, 95% interval, items): one shape needs no lookup; with "
               "several, the question names the shape it means, and only finding a shape by what it is answers "
               "it:", "", binding, ""]
    probes = probes_table(run)
    if probes:
        md += ["Linear probes of the frozen features (held-out scenes, %): the ViT's patches (colour, shape, size, "
               "glyph) and the resampler's latents (cell i of the global view; the count):", "", probes, ""]
    md += ["Time and throughput:", "", times_table(stage_times(run)), ""]
    if curves(run, stages, run / "curves.png"):
        md += ["Training curves:", "", "![training curves](curves.png)", ""]
    data = run / "data"
    if data.exists():
        md += ["## Held-out examples", "", examples(run, os.path.relpath(data, run), stages)]
    (run / "results.md").write_text("\n".join(md) + "\n")
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder of toy/run_toy.sh")
    report(p.parse_args(argv).run)


if __name__ == "__main__":
    main()
