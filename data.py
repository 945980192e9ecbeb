"""
Data for every stage: records from the public formats (formats.py) encoded as the model reads them, mixtures
of sources split over ranks and workers, and batches.

    python data.py show --data data/toy/mixtures/sft.json     # print samples with their supervised tokens marked
    python data.py show --data path/to/llava_v1_5_mix665k.json --image-folder path/to/images --n 2

- The chat template (tokenizer.render_chat) is rendered once and encoded once; the loss mask comes from the
  character spans of the assistant answers (plus their `<|end|>`), mapped onto the tokens through the
  tokenizer's offsets. No "split and re-tokenize" step, so no tokenization mismatch can zero a sample.
- Each `<image>` is expanded here to as many ids as its image has vision tokens (384-640 with
  any-resolution), so a sample's length is its length in the model, and model.py splices by one masked
  scatter. Truncation to the token budget never cuts an image block apart, and a sample left with nothing
  to learn is refused by name, not silently masked.
- A mixture is named sources with weights. Position p of the global stream maps to one sample: blocks of
  positions hold the sources in exact proportion (shuffled by seed), and each source is read as a fresh
  permutation per pass. Rank r of w takes positions r, r + w, ...; DataLoader worker k of n builds batches
  k, k + n, ...; so an epoch is covered exactly once and a run resumes exactly from its batch index.
- Bad input (any record of a downloaded dataset: wrong shapes, broken JSON, images and shards, paths out of
  their folder; formats.py and docs/data.md list them) raises `BadSample` naming the file, the record and
  the reason. Strict mode stops there; training mode skips, counts and reports, and `Tally` stops the run
  when the bad fraction passes a threshold.
"""
import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from errors import BadSample, fail
from formats import DataError, open_sources  # noqa: F401  (data.open_sources: what the scripts call)
from images import Images, open_image, preprocess
from model import PRESET_PARTS, STRATEGIES, preset
from tokenizer import DEFAULT_SYSTEM, IMAGE, TokenizerError, extended_tokenizer, pad_batch, place_images, render_chat

# -----------------------------------------------------------------------------
# bad samples, counted


class Tally:
    """Bad samples seen in training mode: counted by reason, and a stop when they become too many."""

    def __init__(self, max_bad_fraction=0.05, min_seen=200, seen=0, bad=None):
        self.seen, self.bad = seen, Counter(bad or {})  # a resumed run goes on from its checkpoint's counts
        self.max_bad_fraction, self.min_seen = max_bad_fraction, min_seen

    def update(self, seen, bad):
        self.seen += seen
        self.bad.update(bad)
        n = sum(self.bad.values())
        if self.seen >= self.min_seen and n > self.max_bad_fraction * self.seen:
            raise RuntimeError(f"{n} of {self.seen} samples were bad ({self.report()}), more than the allowed "
                               f"{self.max_bad_fraction:.0%}: check the data (python data.py show --strict)")

    def report(self):
        return ", ".join(f"{k}: {v}" for k, v in self.bad.most_common()) or "none"

# -----------------------------------------------------------------------------
# records -> token ids, loss labels and preprocessed images


class Encoder:
    """Records -> {"input_ids", "labels" (-100 = no loss), "images" (images.preprocess outputs), "where", "length"}.

    `max_len` is the budget of the spliced sequence: each image counts as its vision tokens.
    """

    def __init__(self, tokenizer, config, max_len=2048, system=DEFAULT_SYSTEM):
        self.tok, self.config, self.max_len, self.system = tokenizer, config, max_len, system
        self.image_id = tokenizer.token_to_id(IMAGE)

    def __call__(self, record):
        where = record["where"]
        texts = [record.get("text", "")] + [t for _, t in record.get("turns", [])] + [record.get("chosen", ""),
                                                                                      record.get("rejected", "")]
        if not all(map(is_unicode, texts)):  # JSON's "\ud800" escapes give strings no tokenizer can take
            raise BadSample(where, "text that is not valid Unicode (a lone surrogate such as \\ud800)", "bad text")
        images = [open_image(r, where) for r in record["images"]]
        if "chosen" in record:
            return {k: self.sample(*self.chat(record["turns"] + [("assistant", record[k])], len(images), where),
                                   images, where) for k in ("chosen", "rejected")}
        if "text" in record:  # pretraining text: the loss on everything but <image> and <s>
            ids = self.tok.encode(record["text"])
            ids_labels = ids, [-100 if i in (self.image_id, self.tok.bos_id) else i for i in ids]
        else:
            ids_labels = self.chat(record["turns"], len(images), where)
        return self.sample(*ids_labels, images, where)

    def chat(self, turns, n_images, where):
        """A conversation [(role, text)] -> (ids, labels): one `<image>` per image, the loss on the answers."""
        system, turns = self.system, list(turns)
        if turns and turns[0][0] == "system":
            system = turns.pop(0)[1]
        if not any(role == "assistant" and text.strip() for role, text in turns):
            raise BadSample(where, "an empty conversation: no assistant answer to learn from", "empty conversation")
        if any(role == "system" for role, _ in turns) or any(IMAGE in t for r, t in turns if r == "assistant"):
            raise BadSample(where, "a system turn after the first, or an <image> marker in an answer", "bad record")
        if turns[0][0] != "user":
            raise BadSample(where, "a conversation must open with a user turn (after an optional system prompt)",
                            "bad record")
        users = [k for k, (role, _) in enumerate(turns) if role == "user"]
        markers = sum(text.count(IMAGE) for _, text in turns)
        if markers == 0 and n_images and users:  # LLaVA: an image without a marker goes before the first question
            turns[users[0]] = ("user", place_images(turns[users[0]][1], n_images))
        elif markers != n_images:
            raise BadSample(where, f"{markers} <image> marker(s) in the conversation but {n_images} image(s)",
                            "marker mismatch")
        text, spans = render_chat(turns, system)
        ids, starts = self.tok.encode(text, offsets=True)
        labels = [i if i != self.image_id and any(a <= s < b for a, b in spans) else -100 for i, s in zip(ids, starts)]
        return ids, labels

    def sample(self, ids, labels, images, where):
        """Expand each `<image>` to its vision tokens, truncate to the budget without cutting an image's block
        apart, and refuse a sample left with nothing to learn."""
        sizes = [img.size for img in images]
        try:
            ids, labels = self.config.expand_images(ids, sizes, labels)
        except ValueError as e:
            raise BadSample(where, str(e), "marker mismatch") from None
        blocks, start = [], 0  # (first, end) position of each image's block
        for n in (self.config.image_tokens(s) for s in sizes):
            start = ids.index(self.image_id, start)
            blocks, start = blocks + [(start, start + n)], start + n
        keep = min(len(ids), self.max_len)
        for first, end in blocks:
            if first < keep < end:
                keep = first
        if all(x == -100 for x in labels[1:keep]):  # position 0 is never a target
            raise BadSample(where, f"nothing to learn within the first {self.max_len} tokens (images count as their "
                            f"{[e - f for f, e in blocks]} vision tokens); raise the length budget", "too long")
        n = sum(end <= keep for _, end in blocks)
        return {"input_ids": ids[:keep], "labels": labels[:keep], "where": where, "length": keep,
                "images": [preprocess(img, self.config) for img in images[:n]]}


def is_unicode(text):
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def collate(samples, pad_id):
    """Samples -> a batch for model.XGenMM: right-padded ids / labels / mask and all images as one Images.

    Preference samples ({"chosen", "rejected"}) become 2B rows: every chosen row, then every rejected row.
    """
    if samples and "chosen" in samples[0]:
        samples = [s["chosen"] for s in samples] + [s["rejected"] for s in samples]
    ids, mask = pad_batch([s["input_ids"] for s in samples], pad_id)
    labels, _ = pad_batch([s["labels"] for s in samples], -100)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "images": Images.collate([s["images"] for s in samples])}

# -----------------------------------------------------------------------------
# mixtures: which sample sits at each position of the stream, split over ranks and workers


class Schedule:
    """Global position p -> (source, index). Deterministic by seed, O(1) per position, so resuming is exact.

    Each block of `block` positions holds every source in its exact share (largest remainder), shuffled
    by (seed, block). A source's k-th draw is item perm(seed, source, k // len)[k % len]: every pass over a
    source is a fresh permutation, so within a pass no item repeats and none is skipped.
    """

    def __init__(self, sizes, weights, seed=0, block=1000):
        w = np.asarray(weights, dtype=np.float64)
        if len(w) == 0 or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0 or min(sizes, default=0) == 0:
            raise ValueError(f"a mixture needs non-empty sources and positive weights (sizes {sizes}, weights {weights})")
        share = w / w.sum() * block
        counts = np.floor(share).astype(np.int64)
        counts[np.argsort(-(share - counts), kind="stable")[: block - counts.sum()]] += 1
        self.sizes, self.seed, self.block, self.counts = list(sizes), seed, block, counts
        self.base = np.repeat(np.arange(len(w)), counts)
        self._order, self._perm = {}, {}

    def order(self, b):
        if b not in self._order:
            self._order = {b: np.random.default_rng([self.seed, 0, b]).permutation(self.base)}  # keep one block
        return self._order[b]

    def perm(self, s, epoch):
        if (s, epoch) not in self._perm:
            if len(self._perm) > 4 * len(self.sizes):
                self._perm.clear()
            self._perm[s, epoch] = np.random.default_rng([self.seed, 1, s, epoch]).permutation(self.sizes[s])
        return self._perm[s, epoch]

    def __call__(self, p):
        b, r = divmod(p, self.block)
        order = self.order(b)
        s = int(order[r])
        k = b * int(self.counts[s]) + int((order[:r] == s).sum())
        epoch, j = divmod(k, self.sizes[s])
        return s, int(self.perm(s, epoch)[j])


class Mixture(torch.utils.data.IterableDataset):
    """Batches of a mixture for one data-parallel rank; use with DataLoader(batch_size=None, num_workers=n).

    Rank `rank` of `world` owns global positions rank, rank + world, ...; its batch j holds its samples
    j*B .. j*B + B - 1, and DataLoader worker k of n builds batches start + k, start + k + n, ... which the
    loader returns in order. Bad samples are dropped from their batch (strict=False) and reported in
    batch["bad"]; a batch carries its index, so a run resumes with start_batch = last index + 1.

    Length grouping (`group` = G > 1): the samples of G consecutive batches are sorted by length and cut into
    G batches of similar lengths, handed out in an order shuffled by (seed, group). A batch then wastes little
    on padding (the toy's pretraining mixture: 57% of a padded batch is real tokens without it, 94% with G =
    16), and every batch index still maps to the same samples, so resuming stays exact. A worker encodes the
    whole group of a batch it builds once and keeps it for its next batches of the group; so with n workers
    each group is encoded n times (the toy's loader still waits only 1-2% of a run's time).
    """

    def __init__(self, sources, encoder, batch_size, pad_id, seed=0, rank=0, world=1, start_batch=0, strict=False,
                 group=1):
        super().__init__()
        self.sources = [s for s, _ in sources]
        self.schedule = Schedule([len(s) for s in self.sources], [w for _, w in sources], seed)
        self.encoder, self.batch_size, self.pad_id, self.seed = encoder, batch_size, pad_id, seed
        self.rank, self.world, self.start_batch, self.strict = rank, world, start_batch, strict
        self.group, self.cached = max(1, group), (None, None)
        self.reported = 0

    def positions(self, j, n=1):
        """This rank's positions of the global stream for batches j .. j + n - 1."""
        return [(j * self.batch_size + k) * self.world + self.rank for k in range(n * self.batch_size)]

    def encode(self, positions):
        """(samples, their (source, item) keys, bad-sample reasons) of the given stream positions."""
        samples, keys, bad = [], [], Counter()
        for p in positions:
            s, i = self.schedule(p)
            try:
                samples.append(self.encoder(self.sources[s].record(i)))
                keys.append((s, i))
            except BadSample as e:
                if self.strict:
                    raise
                bad[e.reason] += 1
                self.reported += 1
                if self.reported <= 20:  # the first few by name; Tally reports the counts
                    print(f"data: skipped {e}" + (" (further skips are only counted)" if self.reported == 20 else ""),
                          file=sys.stderr)
        return samples, keys, bad

    def grouped(self, j):
        """Batch j's share of its length group: (samples, keys, bad), the group's bad samples on its first batch."""
        g, i = divmod(j, self.group)
        if self.cached[0] != g:
            samples, keys, bad = self.encode(self.positions(g * self.group, self.group))
            order = sorted(range(len(samples)), key=lambda i: length(samples[i]))
            cuts = np.array_split(np.array(order, dtype=np.int64), self.group)
            slots = np.random.default_rng([self.seed, 2, self.rank, g]).permutation(self.group)
            self.cached = (g, [([samples[i] for i in cuts[slot]], [keys[i] for i in cuts[slot]],
                                bad if k == 0 else Counter()) for k, slot in enumerate(slots)])
        return self.cached[1][i]

    def batch(self, j):
        samples, keys, bad = self.grouped(j) if self.group > 1 else self.encode(self.positions(j))
        used = Counter(self.sources[s].name for s, _ in keys)
        where = [s["chosen"]["where"] if "chosen" in s else s["where"] for s in samples]
        rows = [r for s in samples for r in ([s["chosen"], s["rejected"]] if "chosen" in s else [s])]
        # plain dicts: the DataLoader copies a Counter with .update(), which would double its counts
        return collate(samples, self.pad_id) | {"batch_index": j, "bad": dict(bad), "sources": dict(used),
                                                "where": where, "keys": keys,  # (source, item) of each sample
                                                "samples": len(samples) + sum(bad.values()),
                                                "tokens": sum(r["length"] for r in rows),
                                                "positions": len(rows) * max((r["length"] for r in rows), default=0)}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        k, n = (info.id, info.num_workers) if info else (0, 1)
        j = self.start_batch + k
        while True:
            yield self.batch(j)
            j += n


def length(sample):
    """A sample's length in the model (a preference pair: its longer answer's row)."""
    return max(sample["chosen"]["length"], sample["rejected"]["length"]) if "chosen" in sample else sample["length"]


def loader(mixture, num_workers=2, prefetch=4, pin_memory=False):
    """The DataLoader for a Mixture: batches come back in index order, whichever worker built them; in pinned
    memory when asked (for a GPU: its copies then need not wait for the host).

    It gets a generator of its own: a DataLoader otherwise draws its base seed from the global RNG each time
    an iterator starts, so a resumed run (which restores the RNG, then starts its iterator) would draw its
    dropout masks one step off the uninterrupted run's. The batches themselves use no torch RNG.
    """
    kw = dict(num_workers=num_workers, prefetch_factor=prefetch, persistent_workers=True) if num_workers else {}
    return torch.utils.data.DataLoader(mixture, batch_size=None, pin_memory=pin_memory,
                                       generator=torch.Generator().manual_seed(0), **kw)

# -----------------------------------------------------------------------------
# command line


def dataset_tokenizer(path):
    """The `tokenizer/` folder that ships with a dataset (the nearest folder above `path` that has one), as
    the toy world's does; None if there is none."""
    for folder in Path(path).resolve().parents:
        if (folder / "tokenizer" / "tokenizer.model").is_file():
            return folder / "tokenizer"
    return None


def show(args):
    """Print samples as the model sees them: each token's text, supervised spans marked with [[ ]]."""
    tok = extended_tokenizer(args.tokenizer)
    enc = Encoder(tok, preset(args.preset, args.strategy, tok), args.max_len)
    for source, _ in open_sources(args.data, tok.id_to_token(tok.eos_id), args.image_folder, args.allow_outside_paths):
        print(f"== {source.name}: {len(source)} items" + (f" {dict(source.counts)}" if hasattr(source, "counts") else ""))
        for i in range(min(args.n, len(source))):
            try:
                s = enc(source.record(i))
            except BadSample as e:
                if args.strict:
                    raise DataError(str(e)) from None
                print(f"-- bad ({e.reason}): {e}")
                continue
            for s in ([s["chosen"], s["rejected"]] if "chosen" in s else [s]):
                print(f"-- {s['where']}: {len(s['input_ids'])} tokens, {len(s['images'])} image(s)")
                print(marked(tok, s["input_ids"], s["labels"]))


def marked(tok, ids, labels):
    """The tokens as text, each run of supervised tokens inside [[ ]], a block of n image positions as <image>xn."""
    out, on, image, k = [], False, tok.token_to_id(IMAGE), 0
    while k < len(ids):
        if (labels[k] != -100) != on:
            out.append("[[" if not on else "]]")
            on = not on
        if ids[k] == image:  # never supervised, so a block never straddles a [[ ]] mark
            n = next((j for j in range(k, len(ids)) if ids[j] != image), len(ids)) - k
            out.append(f"{IMAGE}x{n}")
            k += n
            continue
        piece = tok.id_to_token(ids[k])
        if tok.is_byte(ids[k]) and int(piece[3:5], 16) < 0x80:
            piece = chr(int(piece[3:5], 16))
        out.append(piece if ids[k] in tok.added else piece.replace("▁", " "))
        k += 1
    return "".join(out) + ("]]" if on else "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("show", help="print encoded samples with their loss mask")
    s.add_argument("--data", required=True, help="a mixture config (JSON with 'sources') or one dataset path")
    s.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the tokenizer/ folder that "
                                                      "ships with the data, as the toy world's does)")
    s.add_argument("--image-folder", default=None, help="where relative image paths start (default: the data's folder)")
    s.add_argument("--n", type=int, default=3, help="samples per source")
    s.add_argument("--max-len", type=int, default=2048, help="token budget, images counted as their vision tokens")
    s.add_argument("--preset", default="tiny", choices=sorted(PRESET_PARTS), help="model sizes for the image tiling")
    s.add_argument("--strategy", default="anyres", choices=STRATEGIES, help="image strategy")
    s.add_argument("--strict", action=argparse.BooleanOptionalAction, default=False, help="stop at the first bad sample")
    s.add_argument("--allow-outside-paths", action=argparse.BooleanOptionalAction, default=False,
                   help="let a single dataset's image paths be absolute or leave the image folder (..); a mixture "
                        'config says it per source: "allow_outside_paths": true')
    args = p.parse_args(argv)
    args.tokenizer = args.tokenizer or dataset_tokenizer(args.data)
    if args.tokenizer is None:
        p.error(f"no tokenizer/ folder above {args.data}: pass --tokenizer")
    try:
        show(args)
    except (DataError, TokenizerError) as e:  # bad data, or tokenizer files that cannot be read: one line, exit 2
        fail("data.py", e)


if __name__ == "__main__":
    main()
