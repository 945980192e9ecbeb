"""
RICES: demonstrations chosen by image similarity instead of at random (OpenFlamingo's --rices, after Yang et
al.'s retrieval-based in-context example selection). For each record, the k training records whose images are
nearest to its image, the nearest last (closest to the question).

- Image features come from the model's own ViT (OpenFlamingo uses a separate CLIP): the global view of each
  image at the ViT's resolution, its patch features averaged, scaled to unit length; similarity is the dot
  product. The whole training split is the pool (not the random query set).
- The pool's features are computed once per checkpoint and pool and cached in a file (`--rices-cache`),
  named by a hash of the checkpoint path and the pool's ids, so a rerun or another task on the same pool
  reads them back.

References: OpenFlamingo (arXiv 2308.01390), open_flamingo/eval/rices.py; Yang et al., "An Empirical Study of
GPT-3 for Few-Shot Knowledge-Based VQA" (arXiv 2109.05014), the selection rule.
"""
import hashlib
import json
from pathlib import Path

import torch

from images import load_image, to_pixels


@torch.no_grad()
def image_features(m, records, open_image=load_image, batch_size=32):
    """(N, D) unit-length features of the records' images: the ViT's patch features of the global view, averaged."""
    S, out = m.config.vision.image_size, []
    for i in range(0, len(records), batch_size):
        pixels = torch.stack([to_pixels(open_image(r["image"]).convert("RGB"), S) for r in records[i:i + batch_size]])
        feats = m.vit_features(pixels.to(m.vision_encoder.post_layernorm.weight.dtype)).float().mean(1)  # (b, D)
        out.append(torch.nn.functional.normalize(feats, dim=-1).cpu())
    return torch.cat(out)


def pool_features(m, pool, checkpoint, cache_dir, open_image=load_image):
    """The pool's features, from the cache when it holds them for this checkpoint and pool."""
    ids = [str(r["id"]) for r in pool]
    key = hashlib.sha256(json.dumps([str(checkpoint), ids]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"rices-{key}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved["ids"] == ids:
            return saved["features"]
    feats = image_features(m, pool, open_image)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"ids": ids, "features": feats}, path)
    return feats


def nearest(queries, pool, k):
    """Per query row, the indices of the k most similar pool rows, the most similar last: (Q, k)."""
    return (queries @ pool.T).argsort(dim=-1, descending=True)[:, :k].flip(-1)


def choose(m, records, pool, k, checkpoint, cache_dir, open_image=load_image):
    """{str(record id): its k demonstrations (pool records), the most similar last}."""
    if k == 0 or not records:
        return {str(r["id"]): [] for r in records}
    if k > len(pool):
        raise ValueError(f"{k} demonstrations asked for, but the training split gave {len(pool)}")
    index = nearest(image_features(m, records, open_image), pool_features(m, pool, checkpoint, cache_dir, open_image), k)
    return {str(r["id"]): [pool[i] for i in row] for r, row in zip(records, index.tolist())}
