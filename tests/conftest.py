"""Shared by every test module: the repository root on the path (the components are top-level files), fixed
thread counts and seeds, and the fixtures several modules use.

- Threads: float results (and the bit-exact resume tests) depend on how many threads split a reduction, so
  every test runs with THREADS torch threads, whatever the machine has; a test that changes it restores it.
- Seeds: each test starts from torch / numpy / random seed 0, so a test that draws random inputs without
  its own generator still draws the same ones on every run and in any order.
- `world`: the toy world (`toy.toyworld`, seed 0, small), written once per session and shared read-only
  (about 2 s each time it was written per module before); `world_source` puts a few of its records in a
  dataset of a test's own.
"""
import json
import os
import random
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

THREADS = 2  # this project's CPU machines have 2 cores (docs/tests.md); fixed so results do not depend on the host
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def fixed_seeds_and_threads():
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """The small toy world of seed 0. Read it, never write into it: every module shares this one copy."""
    from toy import toyworld
    out = tmp_path_factory.mktemp("toy") / "world"
    toyworld.write_world(out, seed=0, size="small")
    return out


def world_source(world, folder, name, kind, rows):
    """`rows` (records that name their images relative to the toy world, as its own files do) as the one source
    of a mixture config folder/{name}.json whose image folder is the world: image paths stay relative, as
    formats.image_ref requires. kind "pairs" is JSON lines ({name}.pairs.jsonl), "llava" a JSON list."""
    path = folder / (f"{name}.pairs.jsonl" if kind == "pairs" else f"{name}.rows.json")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) if kind == "pairs" else json.dumps(rows))
    mix = {"sources": [{"name": name, "type": kind, "path": path.name, "image_folder": str(world)}]}
    (folder / f"{name}.json").write_text(json.dumps(mix))
    return folder / f"{name}.json"
