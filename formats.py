"""
The public dataset formats, read as published: each source turns its i-th item into a record (a text with
image references, a conversation, or a preference pair) that data.py encodes. docs/release.md §6 lists them.

    captions      webdataset shards: `{key}.jpg|png|jpeg|webp` + `{key}.txt` (or `.json` with a caption)
    interleaved   MINT-1T / OBELICS documents: parallel `texts` / `images` lists, in tar shards (images as
                  sibling members or base64) or JSON lines with image paths
    llava         LLaVA SFT JSON: {"id", "image": str | [str] | absent, "conversations": [{"from", "value"}]}
    vlguard       VLGuard rows -> one two-turn conversation per instruction
    vlfeedback    VLFeedback rows -> the best vs the worst mean-rated completion
    pairs         already-paired preference JSON lines {"image", "prompt", "chosen", "rejected"}

- Brace shard lists (`shard-{000..099}.tar`) expand to files. Tar shards are indexed by their headers and
  read by offset: nothing is extracted to disk, and any sample can be fetched at random.
- A mixture config ({"sources": [{"name", "type", "path", "weight", ...}]}) names its sources; one dataset
  path is recognised by its first record. Paths are relative to the config's folder.
- Bad input (missing files, malformed JSON lines, unsafe tar member names, a record without the fields
  its format needs) raises `BadSample` naming the file and the sample, when that sample is read.
"""
import base64
import binascii
import json
import os
import re
import tarfile
from collections import Counter
from pathlib import Path

from images import BadSample
from tokenizer import END_CHUNK, IMAGE

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

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
        images = [self.folder / p["image"]] if p.get("image") else []  # data.py puts a marker-less image first
        return {"turns": [("user", p["prompt"])], "chosen": p["chosen"], "rejected": p["rejected"], "images": images,
                "where": where}

# -----------------------------------------------------------------------------
# sources from a mixture config or a single path


class DataError(ValueError):
    """A mixture config or a dataset that cannot be opened at all: the message names the file and what is wrong."""


def open_sources(data, eos, image_folder=None):
    """[(Source, weight)] from a mixture JSON ({"sources": [...]}) or from one dataset path (weight 1).

    Whatever stops a dataset from opening at all (a missing file, a config that is not JSON, a source
    without a path or with an unknown type, an unreadable shard) is a DataError naming the file.
    """
    path = Path(data)
    try:
        if path.suffix == ".json" and path.is_file() and first_char(path) == "{":
            return [(open_source(s, path.parent, eos), weight) for s, weight in mixture_spec(path)]
        spec = {"name": path.name, "type": sniff(path), "path": path.name, "image_folder": image_folder}
        return [(open_source(spec, path.parent, eos), 1.0)]
    except DataError as e:
        raise e if str(path) in str(e) else DataError(f"{path}: {e}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    except (OSError, UnicodeDecodeError, tarfile.TarError, BadSample, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: cannot open the data ({type(e).__name__}: {e})") from None


def first_char(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read(4096).lstrip()[:1]


def mixture_spec(path):
    """[(source spec, weight)] of a mixture config, each spec checked for what open_source needs."""
    spec = json.loads(path.read_text())
    sources = spec.get("sources")
    if not isinstance(sources, list) or not sources:
        raise DataError(f"{path}: a mixture config needs a non-empty 'sources' list, e.g. "
                        '{"sources": [{"name": "sft", "type": "llava", "path": "sft.json", "weight": 1.0}]}')
    out = []
    for k, s in enumerate(sources):
        if not isinstance(s, dict) or not isinstance(s.get("path"), str):
            raise DataError(f"{path}: source {k} needs a 'path' (and a 'type')")
        out.append((s, float(s.get("weight", 1.0))))
    return out


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
    raise DataError(f"source {name!r}: unknown type {kind!r}; use captions, interleaved, llava, vlguard, "
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
    raise DataError(f"{path}: cannot tell the dataset type from its first record; use a mixture config with 'type'")


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
