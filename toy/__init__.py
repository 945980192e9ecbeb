"""
The toy world: tooling, not the model. A small procedurally drawn world written in the real public data
formats, so the whole xGen-MM recipe runs on a CPU with a tiny model, and the suite that scores it.

    scenes.py     the scene model: shapes, pictures, and every caption, question and answer about them
    toyworld.py   writes the world: every dataset format, the held-out test splits, mixtures
    toytokenizer.py  the world's SentencePiece tokenizer, in Phi-3's Hub layout
    toyvision.py  the stand-in for SigLIP's pretraining: a tiny ViT taught to see the world, then frozen
    tasks.py      the evaluation suite: test items, prompts, scoring, the stages x metrics table
    run_toy.sh    the whole recipe in miniature, in one command; ablations.sh: the paper's ablations on it

Run the Python modules from the repository root, e.g. `python -m toy.toyworld --out data/toy --size medium`.
"""
from pathlib import Path

WORLD = Path("data/toy")  # where train.py looks for the world when no --data is given
STEPS = 200  # default optimiser steps on the toy world


def ensure_world(path=WORLD):
    """Write the medium toy world at `path` unless it is there (its world.json is written last)."""
    if not (Path(path) / "world.json").is_file():
        from toy import toyworld
        print(f"writing the toy world to {path} (once, ~30 s)", flush=True)
        toyworld.write_world(path, seed=0, size="medium")
