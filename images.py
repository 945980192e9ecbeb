"""
Images in, vision-encoder views out, and after the ViT the groups of features the resampler reads: opening
an image file, and xGen-MM's three ways of cutting an image into views and its features into groups.

- One reader for training and inference (`open_image`): a path or bytes in, RGB out; 16-bit images are
  scaled to 8 bits (a plain convert would clip them to white), palette, grey, alpha and CMYK images are
  converted, and an image above MAX_PIXELS is refused before it is decoded (a decompression bomb). Every
  failure is a `BadSample` that names the file.
- Any-resolution, as released (docs/release.md §4): the image is fitted to the best of five grids of
  384-pixel crops, pasted centred on black, cut row by row, and a global view (the whole image squashed
  to 384x384) goes first. quirk, kept for parity: small and square images tie on every grid and get
  "1 wide x 2 tall".
- Fixed resolution (the paper's ablation): one view, the image padded to a square of the mean colour.
- Every view: bicubic resize to the ViT's size, [0, 1], mean 0.5, std 0.5.
- `Images` carries every view of every image of a batch in one tensor, with what model.py needs to cut it
  back into images: original sizes, grids, images per sample.
- After the ViT (`group_features`): the crop features are stitched into one map, the rows (or columns) that
  fell on the black padding are masked (LLaVA-NeXT's unpad rule, rounding included), and the map is cut
  into groups of 729 features. quirk, kept because the released resampler was trained with it: the groups
  are bands of the whole stitched map in raster order, not one crop each.

References: LLaVA-NeXT (select_best_resolution, resize_and_pad_image, expand2square); the release's
image_processing_blip_3.py.
"""
import io
import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from errors import BadSample

MAX_PIXELS = 64 * 2**20  # larger images are refused as decompression bombs (Pillow warns at 89M by default)


def shown(ref, n=120):
    """A path (or anything) as a message shows it: cut in the middle when long (a 10 kB bogus data: URI
    taken for a file name must not fill the screen)."""
    s = str(ref)
    return s if len(s) <= n else f"{s[: n // 2]}...{s[-n // 2:]} ({len(s)} characters)"


def open_image(ref, where=None):
    """An image from a path or bytes as RGB; every failure is a BadSample naming `where` (default: the path).

    The one reader of training and inference: sample.py and eval.py see the same pixels, limits and errors.
    """
    where = shown(ref) if where is None and not isinstance(ref, bytes) else where or "image"
    if not isinstance(ref, (str, Path, bytes)):
        raise BadSample(where, f"an image is a path or bytes, not {type(ref).__name__}", "bad record")
    if not isinstance(ref, bytes):
        try:
            exists = Path(ref).is_file()
        except (OSError, ValueError):  # a name too long for the file system, a NUL byte
            exists = False
        if not exists:
            raise BadSample(where, f"image file {shown(ref)} does not exist", "missing image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref)
            if img.width * img.height > MAX_PIXELS:
                raise BadSample(where, f"image of {img.width}x{img.height} pixels is over the {MAX_PIXELS} pixel "
                                "limit (a decompression bomb or a mistake)", "image too large")
            img.load()  # decode now: a truncated file fails here, not later in a worker
            img = to_8bit(img)
            return img.convert("RGB")
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadSample(where, f"refused as a decompression bomb ({e})", "image too large") from None
    except Exception as e:  # noqa: BLE001  crafted files make decoders raise anything (struct.error, IndexError...)
        raise BadSample(where, f"cannot decode the image ({type(e).__name__}: {shown(e)})", "bad image") from None


def to_8bit(img):
    """16-bit grey (and 32-bit integer) images scaled to 8 bits by keeping the top byte: a plain convert would
    clip every value above 255 to white (a 16-bit grey 40000 is 156, not 255)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return Image.fromarray((np.asarray(img, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8))
    return img


load_image = open_image  # the name inference code and the README use

# -----------------------------------------------------------------------------
# any-resolution geometry


def select_grid(size, grids):
    """LLaVA-NeXT's select_best_resolution: the (w, h) keeping the most pixels, ties -> least padding, then first.

    quirk (kept for parity): an image smaller than every grid keeps all its pixels on each, so the first
    grid with the least waste wins: 384x384 -> (384, 768), one crop wide and two tall.
    """
    W, H = size
    best, best_eff, best_waste = None, -1, math.inf
    for w, h in grids:
        s = min(w / W, h / H)
        eff = min(int(W * s) * int(H * s), W * H)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (w, h), eff, waste
    return best


def resize_and_pad(img, target, resample=Image.Resampling.BICUBIC):
    """Fit `img` into target (w, h) keeping its aspect (sides rounded up, capped), centred on black."""
    (W, H), (w, h) = img.size, target
    scale_w, scale_h = w / W, h / H  # the scale first, then the product, as the reference rounds
    if scale_w < scale_h:
        size = (w, min(math.ceil(H * scale_w), h))
    else:
        size = (min(math.ceil(W * scale_h), w), h)
    canvas = Image.new("RGB", target, (0, 0, 0))
    canvas.paste(img.resize(size, resample), ((w - size[0]) // 2, (h - size[1]) // 2))
    return canvas


def pad_to_square(img, colour=(127, 127, 127)):
    """LLaVA's expand2square: centre on a square of the mean colour (int(0.5 * 255) per channel)."""
    W, H = img.size
    canvas = Image.new("RGB", (max(W, H),) * 2, colour)
    canvas.paste(img, ((max(W, H) - W) // 2, (max(W, H) - H) // 2))
    return canvas


def to_pixels(img, S, resample=Image.Resampling.BICUBIC):
    """A PIL view -> (3, S, S) float: bicubic resize to S (a no-op for crops), [0, 1], mean 0.5, std 0.5."""
    if img.size != (S, S):
        img = img.resize((S, S), resample)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255.0
    return (x - 0.5) / 0.5


def preprocess(img, config, resample=Image.Resampling.BICUBIC, fill=(127, 127, 127)):
    """One image -> (views (V, 3, S, S), original size (W, H), grid (cols, rows)); V = 1 + cols * rows.

    `config` is an XGenMMConfig (its strategy, grids and ViT image size). anyres: the global view first,
    then the crops row by row. fixed: one view, padded to a square; the grid is (0, 0). (`resample` and the
    square's `fill` let a label map follow the same geometry pixel for pixel, as the toy vision stage's
    dense labels do.)
    """
    img, S = img.convert("RGB"), config.vision.image_size
    if config.strategy == "fixed":
        return to_pixels(pad_to_square(img, fill), S, resample)[None], img.size, (0, 0)
    w, h = select_grid(img.size, config.grids)
    canvas = resize_and_pad(img, (w, h), resample)
    crops = [canvas.crop((x, y, x + S, y + S)) for y in range(0, h, S) for x in range(0, w, S)]
    views = [to_pixels(v, S, resample) for v in [img.resize((S, S), resample)] + crops]
    return torch.stack(views), img.size, (w // S, h // S)


@dataclass
class Images:
    """Every image of a batch, preprocessed: the views of all images in one tensor, and how to cut it."""
    pixel_values: torch.Tensor  # (V, 3, S, S): all views of all images, image by image
    sizes: list                 # (W, H) original size per image
    grids: list                 # (cols, rows) crops per image; (0, 0) for fixed resolution
    counts: list                # images per sample, in order

    @classmethod
    def collate(cls, samples):
        """samples: per sample, a list of `preprocess` outputs -> one Images (DataLoader collate_fn helper)."""
        flat = [im for s in samples for im in s]
        S = flat[0][0].shape[-1] if flat else 1
        pixels = torch.cat([v for v, _, _ in flat]) if flat else torch.zeros(0, 3, S, S)
        return cls(pixels, [s for _, s, _ in flat], [g for _, _, g in flat], [len(s) for s in samples])

    @classmethod
    def from_pil(cls, samples, config):
        return cls.collate([[preprocess(im, config) for im in s] for s in samples])

    def to(self, device, dtype=None):
        return replace(self, pixel_values=self.pixel_values.to(device, dtype, non_blocking=True))

    def pin_memory(self):  # what DataLoader(pin_memory=True) calls on a batch's objects
        return replace(self, pixel_values=self.pixel_values.pin_memory())

# -----------------------------------------------------------------------------
# after the ViT: the stitched crop features, unpadded and cut into the groups the resampler reads


def unpad_mask(size, map_w, map_h):
    """(map_h, map_w) bool, False on the stitched feature rows (or columns) that fell on the black padding.

    LLaVA-NeXT's unpad_image: the scale is computed first, then the product (`int(H * (Wf / W))`, not
    `int(H * Wf / W)`, which differs on some sizes); the padding is split evenly, rounded down.
    """
    W, H = size
    keep = torch.ones(map_h, map_w, dtype=torch.bool)
    if W / H > map_w / map_h:
        pad = (map_h - int(H * (map_w / W))) // 2
        keep[:pad], keep[map_h - pad:] = False, False
    else:
        pad = (map_w - int(W * (map_h / H))) // 2
        keep[:, :pad], keep[:, map_w - pad:] = False, False
    return keep


def pad_groups(groups, masks):
    """Groups (N_g, D) with masks (N_g,) or None (= all real) -> (G, N, D) and a (G, N) mask or None."""
    N = max(g.shape[0] for g in groups)
    if all(g.shape[0] == N for g in groups):
        if all(m is None for m in masks):
            return torch.stack(groups), None
        return torch.stack(groups), torch.stack([torch.ones(N, dtype=torch.bool, device=g.device) if m is None
                                                 else m for g, m in zip(groups, masks)])
    x = groups[0].new_zeros(len(groups), N, groups[0].shape[-1])
    mask = torch.zeros(len(groups), N, dtype=torch.bool, device=x.device)
    for i, (g, m) in enumerate(zip(groups, masks)):
        x[i, : len(g)] = g
        mask[i, : len(g)] = True if m is None else m
    return x, mask


def group_features(views, size, grid, patch_sampling=True):
    """One image's view features (V, P, D) -> the groups the resampler reads and their padding masks (None = all real).

    anyres: the global view, then the stitched crop features cut into bands; `patch_sampling` False (the
    anyres-fixed ablation): the global view and every unpadded feature as one group; fixed: the one view.
    """
    cols, rows = grid
    if cols * rows == 0:  # fixed resolution: one view, one group
        return [views[0]], [None]
    side, D = math.isqrt(views.shape[1]), views.shape[-1]
    fmap = views[1:].view(rows, cols, side, side, D).permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, D)
    keep = unpad_mask(size, cols * side, rows * side).to(views.device)
    if not patch_sampling:  # global + every unpadded token, resampled once
        return [torch.cat((views[0], fmap[keep]))], [None]
    # quirk (the released resampler was trained this way): groups of side*side tokens in raster order of
    # the whole stitched map, i.e. horizontal bands across the full width rather than one crop each
    n = rows * cols
    return [views[0], *fmap.reshape(n, side * side, D)], [None, *keep.reshape(n, side * side)]
