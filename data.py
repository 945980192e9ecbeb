"""
Data for every stage: the public dataset formats read as published, the chat template with its loss mask,
mixtures of sources, and batches in the form model.py consumes.

    python data.py toyworld --out data/toy --size medium     # write the built-in synthetic world (toyworld.py)
    python data.py show --data data/toy/mixtures/sft.json     # print samples with their supervised tokens marked
    python data.py show --data path/to/llava_v1_5_mix665k.json --image-folder path/to/images --n 2

- Formats (SPEC section 6): caption webdataset shards (`{key}.jpg|png|webp` + `.txt` or `.json`), brace shard
  lists (`shard-{000..099}.tar`); MINT-1T / OBELICS interleaved documents (parallel `texts` / `images`
  lists, images as tar members or base64, or JSONL with paths); LLaVA SFT JSON; VLFeedback rows and
  already-paired preference JSONL; VLGuard rows. Tar shards are indexed by their headers and read by
  offset: nothing is extracted to disk, and any sample can be fetched at random.
- The chat template (SPEC section 3) is rendered once and encoded once; the loss mask comes from the
  character spans of the assistant answers (plus their `<|end|>\n`), mapped onto the tokens through the
  tokenizer's offsets. No "split and re-tokenize" step, so no tokenization mismatch can zero a sample.
- Truncation to a token budget counts each image as its vision tokens, never cuts an image block apart,
  and refuses (names) a sample left with nothing to learn instead of silently masking it.
- A mixture is named sources with weights. Position p of the global stream maps to one sample: blocks of
  positions hold the sources in exact proportion (shuffled by seed), and each source is read as a fresh
  permutation per pass. Rank r of w takes positions r, r + w, ...; DataLoader worker k of n builds batches
  k, k + n, ...; so an epoch is covered exactly once and a run resumes exactly from its batch index.
- Bad input (corrupt or truncated images, missing files, malformed JSON lines, marker/image mismatches,
  empty conversations, decompression bombs, unsafe tar member names) raises `BadSample` naming the file
  and the sample. Strict mode stops there; training mode skips, counts and reports, and `Tally` stops
  the run when the bad fraction passes a threshold.
"""
import argparse
import base64
import binascii
import json
import os
import re
import sys
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import model

IMAGE, END_CHUNK, END = "<image>", "<|endofchunk|>", "<|end|>"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_PIXELS = 64 * 2**20  # larger images are refused as decompression bombs (Pillow warns at 89M by default)

# -----------------------------------------------------------------------------
# bad input


class BadSample(ValueError):
    """One sample that cannot be used; the message names the file and the sample, `reason` is a short tag."""

    def __init__(self, where, message, reason):
        super().__init__(f"{where}: {message}")
        self.reason = reason


class Tally:
    """Bad samples seen in training mode: counted by reason, and a stop when they become too many."""

    def __init__(self, max_bad_fraction=0.05, min_seen=200):
        self.seen, self.bad = 0, Counter()
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
# images


def open_image(ref, where):
    """An image from a path or bytes as RGB; every failure is a BadSample naming `where`.

    16-bit images are scaled to 8 bits (a plain convert would clip them to white); palette, grey, alpha
    and CMYK images are converted; images above MAX_PIXELS are refused before they are decoded.
    """
    import io
    if isinstance(ref, (str, Path)) and not Path(ref).is_file():
        raise BadSample(where, f"image file {ref} does not exist", "missing image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref)
            if img.width * img.height > MAX_PIXELS:
                raise BadSample(where, f"image of {img.width}x{img.height} pixels is over the {MAX_PIXELS} pixel "
                                "limit (a decompression bomb or a mistake)", "image too large")
            img.load()  # decode now: a truncated file fails here, not later in a worker
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning, SyntaxError) as e:
        if isinstance(e, BadSample):
            raise
        raise BadSample(where, f"cannot decode the image ({type(e).__name__}: {e})", "bad image") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: keep the top 8 bits
        img = Image.fromarray((np.asarray(img, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8))
    return img.convert("RGB")

# -----------------------------------------------------------------------------
# shards


def expand_braces(pattern):
    """'shard-{000..002}.tar' -> ['shard-000.tar', 'shard-001.tar', 'shard-002.tar']; also {a,b} lists."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        width = len(r.group(1))
        options = [str(i).zfill(width) for i in range(int(r.group(1)), int(r.group(2)) + 1)]
    else:
        options = body.split(",")
    return [p for o in options for p in expand_braces(head + o + tail)]


def split_key(name):
    """webdataset convention: the key is the path up to the first dot of the file name, the rest the extension."""
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (d + "/" + stem if d else stem), ext.lower()


class TarShard:
    """A tar shard's samples (runs of members sharing a key), indexed by their headers, read by offset."""

    def __init__(self, path):
        self.path, self.samples, self.unsafe, self.handle = Path(path), {}, [], None
        try:
            with tarfile.open(self.path, "r:") as tf:  # uncompressed: headers are read, data is skipped
                for m in tf:
                    if m.isfile():
                        self.add(m)
        except (tarfile.TarError, OSError) as e:
            raise BadSample(str(path), f"cannot read the tar shard ({e}); shards must be uncompressed .tar files",
                            "bad shard") from None

    def add(self, m):
        if m.name.startswith("/") or ".." in m.name.split("/"):
            self.unsafe.append(m.name)  # a path like ../x: never followed, reported when its sample is read
            return
        key, ext = split_key(m.name)
        self.samples.setdefault(key, {})[ext] = (m.offset_data, m.size)

    def read(self, key, ext):
        if self.handle is None:  # opened lazily, so each DataLoader worker gets its own file handle
            self.handle = open(self.path, "rb")
        offset, size = self.samples[key][ext]
        self.handle.seek(offset)
        return self.handle.read(size)

    def __getstate__(self):  # workers reopen the file
        return {**self.__dict__, "handle": None}


def shard_items(pattern, base):
    """[(TarShard, key | None)] for every sample of every shard; key None = an unsafe member, reported on read."""
    items = []
    for name in expand_braces(pattern):
        shard = TarShard(base / name)
        items += [(shard, key) for key in shard.samples] + [(shard, None)] * len(shard.unsafe)
    return items

# -----------------------------------------------------------------------------
# sources: each turns its i-th item into a record (text or chat or preference pair, with image refs)


def read_json_rows(path):
    """A JSON list, or JSON lines; a malformed line becomes a BadSample item instead of ending the read."""
    text = Path(path).read_text()
    if path.suffix != ".jsonl":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadSample(str(path), f"not valid JSON ({e})", "bad json") from None
        return rows if isinstance(rows, list) else [rows]
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                rows.append(BadSample(f"{path}:{n}", f"malformed JSON line ({e})", "bad json"))
    return rows


class Source:
    """A list of items, each turned into a record on demand; `name` and `where(i)` label errors."""

    def __init__(self, name, items):
        self.name, self.items = name, items

    def __len__(self):
        return len(self.items)

    def record(self, i):
        item = self.items[i]
        if isinstance(item, BadSample):
            raise item
        return self.load(item, i)


class Captions(Source):
    """Webdataset caption shards -> `<image>{caption}<|endofchunk|>{eos}` (loss on the text)."""

    def __init__(self, name, pattern, base, eos):
        super().__init__(name, shard_items(pattern, base))
        self.eos = eos

    def load(self, item, i):
        shard, key = item
        where = f"{shard.path}:{key}"
        if key is None:
            raise BadSample(str(shard.path), f"unsafe member name {shard.unsafe[0]!r} skipped", "unsafe member")
        exts = shard.samples[key]
        image = next((e for e in IMAGE_EXTS if e in exts), None)
        if image is None:
            raise BadSample(where, f"no image member (.{'/.'.join(IMAGE_EXTS)}) for this key", "missing image")
        if "txt" in exts:
            caption = shard.read(key, "txt").decode("utf-8", "replace").strip()
        elif "json" in exts:
            meta = parse_json(shard.read(key, "json"), where)
            caption = str(meta.get("caption") or meta.get("text") or "").strip()
        else:
            caption = ""
        if not caption:
            raise BadSample(where, "no caption (.txt, or .json with a 'caption' field)", "missing text")
        return {"text": f"{IMAGE}{caption}{END_CHUNK}{self.eos}", "images": [shard.read(key, image)], "where": where}


def parse_json(data, where):
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadSample(where, f"malformed JSON ({e})", "bad json") from None


class Interleaved(Source):
    """MINT-1T / OBELICS documents: parallel `texts` / `images` lists -> OpenFlamingo-style text.

    `<image>` opens a chunk right before its text and `<|endofchunk|>` closes it; text before the first
    image is plain. Only the first `max_images` images are kept: the document ends before the next one.
    """

    def __init__(self, name, path, base, eos, max_images=8, image_folder=None):
        self.eos, self.max_images, self.folder = eos, max_images, image_folder or base
        items = read_json_rows(base / path) if path.endswith(".jsonl") else shard_items(path, base)
        super().__init__(name, items)

    def load(self, item, i):
        if isinstance(item, dict):  # a JSONL document: images are paths (or base64)
            doc, where = item, f"{self.name}[{i}]"
            fetch = lambda k, ref: decode_base64(ref) or self.folder / ref  # noqa: E731
        else:
            shard, key = item
            where = f"{shard.path}:{key}"
            if key is None or "json" not in shard.samples[key]:
                raise BadSample(where, "no .json document for this key" if key else
                                f"unsafe member name {shard.unsafe[0]!r} skipped", "bad document")
            doc = parse_json(shard.read(key, "json"), where)
            fetch = lambda k, ref: self.member(shard, key, k, ref, where)  # noqa: E731
        return self.render(doc, fetch, where)

    def render(self, doc, fetch, where):
        texts, images = doc.get("texts"), doc.get("images")
        if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
            raise BadSample(where, "a document needs parallel 'texts' and 'images' lists", "bad document")
        out, refs, open_chunk = [], [], False
        for k, (text, ref) in enumerate(zip(texts, images)):
            if ref is not None:
                if len(refs) == self.max_images:
                    break
                out.append((END_CHUNK if open_chunk else "") + IMAGE)
                refs.append(fetch(k, ref))
                open_chunk = True
            if text and text.strip():
                out.append(("" if not out or out[-1].endswith(IMAGE) else " ") + text.strip())
        if not out:
            raise BadSample(where, "an empty document", "bad document")
        return {"text": "".join(out) + (END_CHUNK if open_chunk else "") + self.eos, "images": refs, "where": where}

    @staticmethod
    def member(shard, key, k, ref, where):
        """Image k of a document in a shard: base64 in the list, the member it names, or `{key}.{k}.{ext}`."""
        raw = decode_base64(ref)
        if raw:
            return raw
        exts = shard.samples[key]
        stem, ext = split_key(str(ref).rpartition("/")[2])
        if stem == key.rpartition("/")[2] and ext in exts:
            return shard.read(key, ext)
        for ext in (f"{k}.{e}" for e in IMAGE_EXTS):
            if ext in exts:
                return shard.read(key, ext)
        raise BadSample(where, f"image {k} ({str(ref)[:60]!r}) is neither a member of the shard nor base64",
                        "missing image")


def decode_base64(ref):
    """Bytes of a 'data:image/...;base64,...' string or of a long plain base64 string, else None."""
    if not isinstance(ref, str) or (len(ref) < 200 and not ref.startswith("data:")):
        return None
    try:
        return base64.b64decode(ref.partition(",")[2] if ref.startswith("data:") else ref, validate=True)
    except (binascii.Error, ValueError):
        return None


ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class Llava(Source):
    """LLaVA SFT JSON: {"id", "image": str | [str] | absent, "conversations": [{"from", "value"}]}."""

    def __init__(self, name, path, base, image_folder=None, limit=None):
        rows = read_json_rows(base / path)
        super().__init__(name, rows[:limit] if limit else rows)
        self.path, self.folder = base / path, Path(image_folder) if image_folder else (base / path).parent

    def load(self, row, i):
        where = f"{self.path}[{i}] id={row.get('id', '?')}" if isinstance(row, dict) else f"{self.path}[{i}]"
        if not isinstance(row, dict) or not isinstance(row.get("conversations"), list):
            raise BadSample(where, "a LLaVA record needs a 'conversations' list", "bad record")
        image = row.get("image")
        refs = [] if image is None else [image] if isinstance(image, str) else list(image)
        turns = []
        for t in row["conversations"]:
            role = ROLES.get(t.get("from")) if isinstance(t, dict) else None
            if role is None or not isinstance(t.get("value"), str):
                raise BadSample(where, f"turn {t!r:.60} needs 'from' (human/gpt/system) and a string 'value'",
                                "bad record")
            turns.append((role, t["value"]))
        return {"turns": turns, "images": [self.folder / r for r in refs], "where": where}


class VLGuard(Llava):
    """VLGuard rows -> one two-turn conversation (instruction, response) per instr-resp entry."""

    def __init__(self, name, path, base, image_folder=None, limit=None):
        super().__init__(name, path, base, image_folder, limit)
        entries = lambda row: len(row["instr-resp"]) if isinstance(row, dict) and isinstance(  # noqa: E731
            row.get("instr-resp"), list) else 0
        self.items = [(row, k) for row in self.items for k in range(max(1, entries(row)))]  # no entries: reported

    def load(self, item, i):
        row, k = item if isinstance(item, tuple) else (item, 0)
        where = f"{self.path} id={row.get('id', '?') if isinstance(row, dict) else '?'} entry {k}"
        try:
            entry = row["instr-resp"][k]
            question = next(entry[f] for f in ("instruction", "safe_instruction", "unsafe_instruction") if f in entry)
            response = entry["response"]
        except (KeyError, IndexError, TypeError, StopIteration):
            raise BadSample(where, "a VLGuard entry needs an instruction (or safe_/unsafe_instruction) and a "
                            "response", "bad record") from None
        return {"turns": [("user", question), ("assistant", response)], "images": [self.folder / row["image"]],
                "where": where}


def rating_means(completion):
    """Mean of the three aspect ratings of one VLFeedback completion, or None if any is unparsable."""
    try:
        ratings = [float(a["Rating"]) for a in completion["annotations"].values()]
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return sum(ratings) / len(ratings) if ratings else None


class Preferences(Source):
    """VLFeedback rows (best vs worst mean rating; ties, unparsable ratings and scores below `min_score`
    skipped and counted in `self.counts`) or already-paired JSONL {"image", "prompt", "chosen", "rejected"}."""

    def __init__(self, name, path, base, image_folder=None, limit=None, min_score=None):
        self.path, self.folder = base / path, Path(image_folder) if image_folder else (base / path).parent
        self.counts, items = Counter(), []
        for n, row in enumerate(read_json_rows(self.path)):
            self.counts["rows"] += 1
            pair = row if isinstance(row, BadSample) else self.pair(row, n, min_score)
            if pair is not None:
                items.append(pair)
        self.counts["pairs"] = sum(not isinstance(p, BadSample) for p in items)
        super().__init__(name, items[:limit] if limit else items)

    def pair(self, row, n, min_score):
        if "chosen" in row:
            return {"image": row.get("image"), "prompt": row.get("prompt", ""), "chosen": row["chosen"],
                    "rejected": row.get("rejected"), "id": row.get("id", n)}
        scored = [(rating_means(c), c.get("response", "")) for c in row.get("completions", [])]
        if any(m is None for m, _ in scored):
            self.counts["unparsable rating"] += 1
            scored = [s for s in scored if s[0] is not None]
        if len(scored) < 2:
            self.counts["fewer than 2 rated completions"] += 1
            return None
        best, worst = max(scored, key=lambda s: s[0]), min(scored, key=lambda s: s[0])
        if best[0] == worst[0]:
            self.counts["tie"] += 1
            return None
        if min_score is not None and best[0] < min_score:
            self.counts["below min_score"] += 1
            return None
        return {"image": row.get("img_path"), "prompt": row.get("prompt", ""), "chosen": best[1],
                "rejected": worst[1], "id": row.get("id", n)}

    def load(self, p, i):
        where = f"{self.path} id={p['id']}"
        if not p["chosen"] or not p["rejected"] or p["chosen"].strip() == p["rejected"].strip():
            raise BadSample(where, "chosen and rejected must be two different non-empty responses", "bad pair")
        images = [self.folder / p["image"]] if p.get("image") else []
        prompt = p["prompt"] if IMAGE in p["prompt"] or not images else f"{IMAGE}\n{p['prompt']}"
        return {"turns": [("user", prompt)], "chosen": p["chosen"], "rejected": p["rejected"], "images": images,
                "where": where}

# -----------------------------------------------------------------------------
# records -> token ids, loss labels and preprocessed images


def render_chat(turns, system=model.DEFAULT_SYSTEM):
    """The Phi-3 chat text of [(role, text)] and the character spans that carry the loss (the answers).

    Same text as model.chat_prompt for inference. A span runs from the newline after `<|assistant|>` to the
    end of the answer's `<|end|>\\n`: Phi-3's tokens swallow those newlines (rstrip), so the loss lands on
    the answer and its `<|end|>`; with a tokenizer that keeps them, the newline goes with the answer.
    """
    out, spans = f"<|system|>\n{system}{END}\n" if system else "", []
    for role, text in turns:
        out += f"<|{role}|>\n"
        start = len(out) - 1
        out += f"{text}{END}\n"
        if role == "assistant":
            spans.append((start, len(out)))
    return out, spans


class Encoder:
    """Records -> {"input_ids", "labels" (-100 = no loss), "images" (model.preprocess outputs), "where"}.

    `max_len` is the budget of the spliced sequence: each image counts as its vision tokens.
    """

    def __init__(self, tokenizer, config, max_len=2048, system=model.DEFAULT_SYSTEM):
        self.tok, self.config, self.max_len, self.system = tokenizer, config, max_len, system
        self.image_id = tokenizer.token_to_id(IMAGE)

    def __call__(self, record):
        where = record["where"]
        images = [open_image(r, where) for r in record["images"]]
        if "chosen" in record:
            return {k: self.sample(*self.chat(record["turns"] + [("assistant", record[k])], len(images), where),
                                   images, where) for k in ("chosen", "rejected")}
        if "text" in record:
            ids = self.tok.encode(record["text"])
            ids_labels = ids, [-100 if i in (self.image_id, self.tok.bos_id) else i for i in ids]
            if sum(i == self.image_id for i in ids) != len(images):
                raise BadSample(where, f"{ids.count(self.image_id)} <image> marker(s) but {len(images)} image(s)",
                                "marker mismatch")
        else:
            ids_labels = self.chat(record["turns"], len(images), where)
        return self.sample(*ids_labels, images, where)

    def chat(self, turns, n_images, where):
        system, turns = self.system, list(turns)
        if turns and turns[0][0] == "system":
            system = turns.pop(0)[1]
        if not any(role == "assistant" and text.strip() for role, text in turns):
            raise BadSample(where, "an empty conversation: no assistant answer to learn from", "empty conversation")
        if any(role == "system" for role, _ in turns) or any(IMAGE in t for r, t in turns if r == "assistant"):
            raise BadSample(where, "a system turn after the first, or an <image> marker in an answer", "bad record")
        markers = sum(text.count(IMAGE) for _, text in turns)
        if markers == 0 and n_images:  # LLaVA: an image without a marker goes before the first question
            k = next(i for i, (role, _) in enumerate(turns) if role == "user")
            turns[k] = ("user", f"{IMAGE}\n" * n_images + turns[k][1])
        elif markers != n_images:
            raise BadSample(where, f"{markers} <image> marker(s) in the conversation but {n_images} image(s)",
                            "marker mismatch")
        text, spans = render_chat(turns, system)
        ids, starts = self.tok.encode(text, offsets=True)
        labels = [i if i != self.image_id and any(a <= s < b for a, b in spans) else -100 for i, s in zip(ids, starts)]
        return ids, labels

    def sample(self, ids, labels, images, where):
        """Truncate to the budget without cutting an image's tokens apart; refuse a sample left with no loss."""
        lens = [self.config.image_tokens(img.size) for img in images]
        total, keep, k = 0, 0, 0
        for i, t in enumerate(ids):
            n = lens[k] if t == self.image_id else 1
            if total + n > self.max_len:
                break
            total, keep, k = total + n, i + 1, k + (t == self.image_id)
        if all(x == -100 for x in labels[1:keep]):  # position 0 is never a target
            raise BadSample(where, f"nothing to learn within the first {self.max_len} tokens (images count as their "
                            f"{lens} vision tokens); raise the length budget", "too long")
        return {"input_ids": ids[:keep], "labels": labels[:keep], "where": where, "length": total,
                "images": [model.preprocess(img, self.config) for img in images[:k]]}


def collate(samples, pad_id):
    """Samples -> a batch for model.XGenMM: right-padded ids / labels / mask and all images as one Images.

    Preference samples ({"chosen", "rejected"}) become 2B rows: every chosen row, then every rejected row.
    """
    if samples and "chosen" in samples[0]:
        samples = [s["chosen"] for s in samples] + [s["rejected"] for s in samples]
    T = max((len(s["input_ids"]) for s in samples), default=0)
    ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), T), -100, dtype=torch.long)
    mask = torch.zeros((len(samples), T), dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[b, :n], labels[b, :n], mask[b, :n] = torch.tensor(s["input_ids"]), torch.tensor(s["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "images": model.Images.collate([s["images"] for s in samples])}

# -----------------------------------------------------------------------------
# sources from a mixture config or a single path


def open_sources(data, eos, image_folder=None):
    """[(Source, weight)] from a mixture JSON ({"sources": [...]}) or from one dataset path (weight 1)."""
    path = Path(data)
    if path.suffix == ".json" and path.is_file() and isinstance(spec := json.loads(path.read_text()), dict):
        if "sources" not in spec:
            raise ValueError(f"{path}: a mixture config needs a 'sources' list")
        return [(open_source(s, path.parent, eos), float(s.get("weight", 1.0))) for s in spec["sources"]]
    spec = {"name": path.name, "type": sniff(path), "path": path.name, "image_folder": image_folder}
    return [(open_source(spec, path.parent, eos), 1.0)]


def open_source(spec, base, eos):
    kind, name = spec.get("type"), spec.get("name", spec.get("path"))
    # both relative to the config's folder; normalised so messages read "sft/x.json", not "mixtures/../sft/x.json"
    folder = Path(os.path.normpath(Path(base) / spec["image_folder"])) if spec.get("image_folder") else None
    full = Path(os.path.normpath(Path(base) / spec["path"]))
    base, path = full.parent, full.name
    if kind == "captions":
        return Captions(name, path, base, eos)
    if kind == "interleaved":
        return Interleaved(name, path, base, eos, spec.get("max_images", 8), folder)
    if kind in ("llava", "vlguard"):
        return (Llava if kind == "llava" else VLGuard)(name, path, base, folder, spec.get("limit"))
    if kind in ("vlfeedback", "pairs"):
        return Preferences(name, path, base, folder, spec.get("limit"), spec.get("min_score"))
    raise ValueError(f"source {name!r}: unknown type {kind!r}; use captions, interleaved, llava, vlguard, "
                     "vlfeedback or pairs")


def sniff(path):
    """The dataset type of a single path, from its first sample: only the start of the file is read."""
    if ".tar" in path.name:
        first, exts = None, set()
        with tarfile.open(path.parent / expand_braces(path.name)[0], "r:") as tf:
            for m in tf:
                key, ext = split_key(m.name)
                if first is not None and key != first:
                    break
                first = key
                exts.add(ext)
        return "interleaved" if "json" in exts and not exts & set(IMAGE_EXTS) else "captions"
    first = first_record(path)
    for field, kind in (("texts", "interleaved"), ("completions", "vlfeedback"), ("chosen", "pairs"),
                        ("instr-resp", "vlguard"), ("conversations", "llava")):
        if isinstance(first, dict) and field in first:
            return kind
    raise ValueError(f"{path}: cannot tell the dataset type from its first record; use a mixture config with 'type'")


def first_record(path, head=1 << 20):
    """The first record of a JSON list or JSON-lines file, parsed from its first MiB (None if it is longer)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read(head).lstrip()
    if path.suffix == ".jsonl":
        text = text.split("\n", 1)[0]
    elif text.startswith("["):
        text = text[1:].lstrip()
    try:
        return json.JSONDecoder().raw_decode(text)[0]
    except json.JSONDecodeError:
        return None


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
        if len(w) == 0 or (w < 0).any() or w.sum() <= 0 or min(sizes, default=0) == 0:
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
    """

    def __init__(self, sources, encoder, batch_size, pad_id, seed=0, rank=0, world=1, start_batch=0, strict=False):
        super().__init__()
        self.sources = [s for s, _ in sources]
        self.schedule = Schedule([len(s) for s in self.sources], [w for _, w in sources], seed)
        self.encoder, self.batch_size, self.pad_id = encoder, batch_size, pad_id
        self.rank, self.world, self.start_batch, self.strict = rank, world, start_batch, strict
        self.reported = 0

    def positions(self, j):
        return [(j * self.batch_size + k) * self.world + self.rank for k in range(self.batch_size)]

    def batch(self, j):
        samples, bad, used, keys = [], Counter(), Counter(), []
        for p in self.positions(j):
            s, i = self.schedule(p)
            try:
                samples.append(self.encoder(self.sources[s].record(i)))
                used[self.sources[s].name] += 1
                keys.append((s, i))
            except BadSample as e:
                if self.strict:
                    raise
                bad[e.reason] += 1
                self.reported += 1
                if self.reported <= 20:  # the first few by name; Tally reports the counts
                    print(f"data: skipped {e}" + (" (further skips are only counted)" if self.reported == 20 else ""),
                          file=sys.stderr)
        where = [s["chosen"]["where"] if "chosen" in s else s["where"] for s in samples]
        rows = [r for s in samples for r in ([s["chosen"], s["rejected"]] if "chosen" in s else [s])]
        # plain dicts: the DataLoader copies a Counter with .update(), which would double its counts
        return collate(samples, self.pad_id) | {"batch_index": j, "bad": dict(bad), "sources": dict(used),
                                                "where": where, "keys": keys,  # (source, item) of each sample
                                                "samples": len(samples) + sum(bad.values()),
                                                "tokens": sum(r["length"] for r in rows)}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        k, n = (info.id, info.num_workers) if info else (0, 1)
        j = self.start_batch + k
        while True:
            yield self.batch(j)
            j += n


def loader(mixture, num_workers=2, prefetch=4):
    """The DataLoader for a Mixture: batches come back in index order, whichever worker built them."""
    kw = dict(num_workers=num_workers, prefetch_factor=prefetch, persistent_workers=True) if num_workers else {}
    return torch.utils.data.DataLoader(mixture, batch_size=None, **kw)

# -----------------------------------------------------------------------------
# command line


def world_tokenizer(path):
    """The `tokenizer/` folder of the toy world a dataset path lies in (the nearest folder above that has one)."""
    for folder in Path(path).resolve().parents:
        if (folder / "tokenizer" / "tokenizer.model").is_file():
            return folder / "tokenizer"
    raise SystemExit(f"no tokenizer/ folder above {path}: pass --tokenizer")


def show(args):
    """Print samples as the model sees them: each token's text, supervised spans marked with [[ ]]."""
    tok = model.Tokenizer.from_pretrained(args.tokenizer)
    model.extend_tokenizer(tok)
    config = model.preset(args.preset, args.strategy, tok)
    enc = Encoder(tok, config, args.max_len)
    for source, _ in open_sources(args.data, tok.id_to_token(tok.eos_id), args.image_folder):
        print(f"== {source.name}: {len(source)} items" + (f" {dict(source.counts)}" if hasattr(source, "counts") else ""))
        for i in range(min(args.n, len(source))):
            try:
                s = enc(source.record(i))
            except BadSample as e:
                if args.strict:
                    raise SystemExit(f"data.py: {e}")
                print(f"-- bad: {e}")
                continue
            for s in ([s["chosen"], s["rejected"]] if "chosen" in s else [s]):
                print(f"-- {s['where']}: {len(s['input_ids'])} ids, {len(s['images'])} image(s), {s['length']} tokens")
                print(marked(tok, s["input_ids"], s["labels"]))


def marked(tok, ids, labels):
    """The tokens as text, each run of supervised tokens inside [[ ]]."""
    out, on = [], False
    for i, lab in zip(ids, labels):
        if (lab != -100) != on:
            out.append("[[" if not on else "]]")
            on = not on
        piece = tok.id_to_token(i)
        if tok.is_byte(i) and int(piece[3:5], 16) < 0x80:
            piece = chr(int(piece[3:5], 16))
        out.append(piece if i in tok.added else piece.replace("▁", " "))
    return "".join(out) + ("]]" if on else "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("toyworld", help="write the built-in synthetic world in the real dataset formats")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    t.add_argument("--size", default="small", choices=["small", "medium"], help="small: tests; medium: the recipe")
    s = sub.add_parser("show", help="print encoded samples with their loss mask")
    s.add_argument("--data", required=True, help="a mixture config (JSON with 'sources') or one dataset path")
    s.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the tokenizer/ folder of the "
                                                      "toy world the data lies in)")
    s.add_argument("--image-folder", default=None, help="where relative image paths start (default: the data's folder)")
    s.add_argument("--n", type=int, default=3, help="samples per source")
    s.add_argument("--max-len", type=int, default=2048, help="token budget, images counted as their vision tokens")
    s.add_argument("--preset", default="tiny", choices=sorted(model.PRESET_PARTS), help="model sizes for the image tiling")
    s.add_argument("--strategy", default="anyres", choices=model.STRATEGIES, help="image strategy")
    s.add_argument("--strict", action=argparse.BooleanOptionalAction, default=False, help="stop at the first bad sample")
    args = p.parse_args(argv)
    if args.command == "toyworld":
        import toyworld
        toyworld.main(["--out", args.out, "--seed", str(args.seed), "--size", args.size])
    else:
        args.tokenizer = args.tokenizer or world_tokenizer(args.data)
        show(args)


if __name__ == "__main__":
    main()
