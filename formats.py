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

- The files themselves (tar shards read by offset, JSON lists and JSON lines) are read by datafiles.py.
- A mixture config ({"sources": [{"name", "type", "path", "weight", ...}]}) names its sources; one dataset
  path is recognised by its first record. Paths are relative to the config's folder.
- Every record is untrusted input (datasets are downloaded): a record of the wrong shape, a file that is not
  UTF-8, a malformed or absurdly nested JSON line, a tar shard cut short or holding duplicate, oversized or
  `../` members, a bad `data:` URI, an image path that leaves its image folder, a NaN rating: each is a
  `BadSample` naming the file, the record and what is wrong, raised when that sample is read, so training
  skips and counts it and one bad record never stops a run. What stops a dataset from opening at all (a
  broken mixture config, a NaN or negative weight, a JSON list that is not valid JSON) is a `DataError`.
- Image paths stay inside their image folder (absolute paths and `..` are refused) unless the mixture
  config's source says `"allow_outside_paths": true` (or `data.py show --allow-outside-paths`).
"""
import base64
import binascii
import json
import math
import os
import tarfile
from collections import Counter
from pathlib import Path, PurePosixPath

from datafiles import IMAGE_EXTS, expand_braces, first_sample, parse_json, read_json_rows, shard_items
from errors import BadSample, short
from tokenizer import END_CHUNK, IMAGE

UNTRUSTED = (TypeError, AttributeError, KeyError, IndexError, ValueError, StopIteration, UnicodeError,
             RecursionError)  # what reading a record of an unforeseen shape can raise


def ident(value):
    """A record's id as a message shows it: a short plain string as it is, anything else as `short`."""
    return value if isinstance(value, str) and len(value) <= 60 and value.isprintable() else short(value)

# -----------------------------------------------------------------------------
# sources: each turns its i-th item into a record (text or chat or preference pair, with image refs)


class Source:
    """A list of items, each turned into a record on demand; `name` and `where(i)` label errors."""

    def __init__(self, name, items):
        self.name, self.items = name, items

    def __len__(self):
        return len(self.items)

    def record(self, i):
        """Record i, or a BadSample naming it: a problem found when the source was indexed, or any failure to
        read the record (its fields are untrusted input; the readers check the common mistakes by name, and
        whatever shape they did not foresee is caught here rather than ending a run)."""
        item = self.items[i]
        if isinstance(item, BadSample):
            raise item.with_traceback(None)  # the same instance, raised again each pass: no growing traceback
        try:
            return self.load(item, i)
        except BadSample:
            raise
        except UNTRUSTED as e:
            raise BadSample(f"{self.name}[{i}]", f"malformed record ({type(e).__name__}: {short(str(e))})",
                            "bad record") from None


class Captions(Source):
    """Webdataset caption shards -> `<image>{caption}<|endofchunk|>{eos}` (loss on the text)."""

    def __init__(self, name, pattern, base, eos):
        super().__init__(name, shard_items(pattern, base))
        self.eos = eos

    def load(self, item, i):
        shard, key = item
        where = f"{shard.path}:{key}"
        exts, image = shard.samples[key], shard.image_member(key, where)
        if "txt" in exts:
            caption = shard.read(key, "txt").decode("utf-8", "replace").strip()
        elif "json" in exts:
            meta = parse_json(shard.read(key, "json"), where)
            caption = meta.get("caption") or meta.get("text") or "" if isinstance(meta, dict) else ""
            caption = caption.strip() if isinstance(caption, str) else ""
        else:
            caption = ""
        if not caption:
            raise BadSample(where, "no caption (.txt, or .json with a string 'caption' field)", "missing text")
        return {"text": f"{IMAGE}{caption}{END_CHUNK}{self.eos}", "images": [shard.read(key, image)], "where": where}


class Interleaved(Source):
    """MINT-1T / OBELICS documents: parallel `texts` / `images` lists -> OpenFlamingo-style text.

    `<image>` opens a chunk right before its text and `<|endofchunk|>` closes it; text before the first
    image is plain. Only the first `max_images` images are kept: the document ends before the next one.
    """

    def __init__(self, name, path, base, eos, max_images=8, image_folder=None, allow_outside=False):
        self.eos, self.max_images, self.folder = eos, max_images, image_folder or base
        self.allow_outside = allow_outside
        items = read_json_rows(base / path) if path.endswith(".jsonl") else shard_items(path, base)
        super().__init__(name, items)

    def load(self, item, i):
        if isinstance(item, tuple):  # a document in a tar shard: images are members (or base64)
            shard, key = item
            where = f"{shard.path}:{key}"
            if "json" not in shard.samples[key]:
                raise BadSample(where, "no .json document for this key", "bad document")
            doc = parse_json(shard.read(key, "json"), where)
            fetch = lambda k, ref: self.member(shard, key, k, ref, where)  # noqa: E731
        else:  # a JSONL document: images are paths (or base64)
            doc, where = item, f"{self.name}[{i}]"
            fetch = lambda k, ref: image_ref(ref, self.folder, f"{where} image {k}", self.allow_outside)  # noqa: E731
        return self.render(doc, fetch, where)

    def render(self, doc, fetch, where):
        texts, images = (doc.get("texts"), doc.get("images")) if isinstance(doc, dict) else (None, None)
        if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
            raise BadSample(where, "a document needs parallel 'texts' and 'images' lists", "bad document")
        if not all(t is None or isinstance(t, str) for t in texts):
            raise BadSample(where, f"'texts' must hold strings or null, not {short(texts)}", "bad document")
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
        """Image k of a document in a shard: base64 in the list, or a member of the shard (datafiles.py)."""
        if not isinstance(ref, str):
            raise BadSample(where, f"image {k} must be a member name or base64, not {short(ref)}", "bad document")
        raw = decode_base64(ref, f"{where} image {k}")
        return raw if raw is not None else shard.document_image(key, k, ref, where)


def decode_base64(ref, where):
    """Bytes of a 'data:image/...;base64,...' URI (a malformed one is a BadSample, never a file name) or of a
    long plain base64 string (MINT-1T's way); None for anything else (a path or a member name)."""
    if ref.startswith("data:"):
        head, comma, payload = ref.partition(",")
        try:
            if comma and head.endswith(";base64"):
                return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            pass
        raise BadSample(where, f"malformed data: URI {short(ref)} (expected data:image/...;base64,...)",
                        "bad data uri")
    if len(ref) < 200:
        return None
    try:
        return base64.b64decode(ref, validate=True)
    except (binascii.Error, ValueError):
        return None


def image_ref(ref, folder, where, allow_outside=False):
    """An image named by a JSON record -> its bytes (a data: URI or base64) or its path under `folder`.

    The path must stay inside the folder: a downloaded dataset must not make training read /etc/passwd or
    ../../secret.png. An absolute path or `..` is refused unless the source allows it (`allow_outside_paths`).
    """
    if not isinstance(ref, str) or not ref:
        raise BadSample(where, f"an image must be named by a non-empty string, not {short(ref)}", "bad record")
    raw = decode_base64(ref, where)
    if raw is not None:
        return raw
    if not allow_outside and leaves_folder(ref):
        raise BadSample(where, f"image path {short(ref)} leaves the image folder {folder}; set "
                        '"allow_outside_paths": true on the source to allow it', "unsafe path")
    return Path(folder) / ref


def leaves_folder(ref):
    """Does a file name taken from a record point outside the folder it is relative to (absolute, or `..`)?"""
    return os.path.isabs(ref) or ".." in PurePosixPath(ref.replace("\\", "/")).parts


ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class Llava(Source):
    """LLaVA SFT JSON: {"id", "image": str | [str] | absent, "conversations": [{"from", "value"}]}."""

    def __init__(self, name, path, base, image_folder=None, limit=None, allow_outside=False):
        rows = read_json_rows(base / path)
        super().__init__(name, rows[:limit] if limit else rows)
        self.path, self.folder = base / path, Path(image_folder) if image_folder else (base / path).parent
        self.allow_outside = allow_outside

    def where(self, row, i):
        return f"{self.path}[{i}]" + (f" id={ident(row.get('id', '?'))}" if isinstance(row, dict) else "")

    def images(self, image, where):
        """The record's image references -> bytes or paths inside the image folder (see image_ref)."""
        refs = [] if image is None else [image] if isinstance(image, str) else image
        if not isinstance(refs, list):
            raise BadSample(where, f"'image' must be a path or a list of paths, not {short(image)}", "bad record")
        return [image_ref(r, self.folder, where, self.allow_outside) for r in refs]

    def load(self, row, i):
        where = self.where(row, i)
        if not isinstance(row, dict) or not isinstance(row.get("conversations"), list):
            raise BadSample(where, "a LLaVA record needs a 'conversations' list", "bad record")
        turns = []
        for t in row["conversations"]:
            role = ROLES.get(t.get("from")) if isinstance(t, dict) and isinstance(t.get("from"), str) else None
            if role is None or not isinstance(t.get("value"), str):
                raise BadSample(where, f"turn {short(t)} needs 'from' (human/gpt/system) and a string 'value'",
                                "bad record")
            turns.append((role, t["value"]))
        return {"turns": turns, "images": self.images(row.get("image"), where), "where": where}


class VLGuard(Llava):
    """VLGuard rows -> one two-turn conversation (instruction, response) per instr-resp entry."""

    def __init__(self, name, path, base, image_folder=None, limit=None, allow_outside=False):
        super().__init__(name, path, base, image_folder, limit, allow_outside)
        entries = lambda row: len(row["instr-resp"]) if isinstance(row, dict) and isinstance(  # noqa: E731
            row.get("instr-resp"), list) else 0
        self.items = [row if isinstance(row, BadSample) else (row, k)  # a malformed line stays a BadSample
                      for row in self.items for k in range(1 if isinstance(row, BadSample) else max(1, entries(row)))]

    def load(self, item, i):
        row, k = item
        where = f"{self.path} id={ident(row.get('id', '?')) if isinstance(row, dict) else '?'} entry {k}"
        entry = row.get("instr-resp") if isinstance(row, dict) else None
        entry = entry[k] if isinstance(entry, list) and k < len(entry) and isinstance(entry[k], dict) else {}
        fields = ("instruction", "safe_instruction", "unsafe_instruction")
        question = next((entry[f] for f in fields if f in entry), None)
        response = entry.get("response")
        if not isinstance(question, str) or not isinstance(response, str):
            raise BadSample(where, "a VLGuard entry needs a string instruction (or safe_/unsafe_instruction) and a "
                            "string response", "bad record")
        if not isinstance(row.get("image"), str):
            raise BadSample(where, f"a VLGuard row needs an 'image' path, not {short(row.get('image'))}", "bad record")
        return {"turns": [("user", question), ("assistant", response)], "images": self.images(row["image"], where),
                "where": where}


def rating_means(completion):
    """Mean of the aspect ratings of one VLFeedback completion; None if any is unparsable or not finite (NaN)."""
    try:
        ratings = [float(a["Rating"]) for a in completion["annotations"].values()]
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    if not ratings or not all(math.isfinite(r) for r in ratings):
        return None
    return sum(ratings) / len(ratings)


class Preferences(Source):
    """VLFeedback rows (best vs worst mean rating; ties, unparsable or NaN ratings, a best below `min_score` and a
    lead below `min_margin` skipped and counted in `self.counts`) or already-paired JSONL {"image", "prompt",
    "chosen", "rejected"}.
    A row of the wrong shape stays an item and is a BadSample when read, so training counts it."""

    def __init__(self, name, path, base, image_folder=None, limit=None, min_score=None, min_margin=None,
                 allow_outside=False):
        self.path, self.folder = base / path, Path(image_folder) if image_folder else (base / path).parent
        self.allow_outside = allow_outside
        self.counts, items = Counter(), []
        for n, row in enumerate(read_json_rows(self.path)):
            self.counts["rows"] += 1
            try:
                pair = row if isinstance(row, BadSample) else self.pair(row, n, min_score, min_margin)
            except BadSample as e:
                pair = e
            except UNTRUSTED as e:
                pair = BadSample(f"{self.path}[{n}]", f"malformed preference row ({type(e).__name__}: "
                                 f"{short(str(e))})", "bad record")
            if pair is not None:
                items.append(pair)
        self.counts["pairs"] = sum(not isinstance(p, BadSample) for p in items)
        super().__init__(name, items[:limit] if limit else items)

    def pair(self, row, n, min_score, min_margin):
        if not isinstance(row, dict):
            raise BadSample(f"{self.path}[{n}]", f"a preference row must be a JSON object, not {short(row)}",
                            "bad record")
        if "chosen" in row:
            return {"image": row.get("image"), "prompt": row.get("prompt", ""), "chosen": row["chosen"],
                    "rejected": row.get("rejected"), "id": row.get("id", n)}
        completions = row.get("completions")
        if not isinstance(completions, list):
            raise BadSample(f"{self.path}[{n}]", f"'completions' must be a list, not {short(completions)}",
                            "bad record")
        scored = [(rating_means(c), c.get("response", "") if isinstance(c, dict) else None) for c in completions]
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
        if min_margin is not None and best[0] - worst[0] < min_margin:
            self.counts["below min_margin"] += 1
            return None
        return {"image": row.get("img_path"), "prompt": row.get("prompt", ""), "chosen": best[1],
                "rejected": worst[1], "id": row.get("id", n)}

    def load(self, p, i):
        where = f"{self.path} id={ident(p['id'])}"
        texts = (p["prompt"], p["chosen"], p["rejected"])
        if not all(isinstance(t, str) for t in texts):
            raise BadSample(where, f"prompt, chosen and rejected must be strings, not {short(texts)}", "bad pair")
        if not p["chosen"] or not p["rejected"] or p["chosen"].strip() == p["rejected"].strip():
            raise BadSample(where, "chosen and rejected must be two different non-empty responses", "bad pair")
        images = [image_ref(p["image"], self.folder, where, self.allow_outside)] if p.get("image") else []
        # data.py puts a marker-less image first
        return {"turns": [("user", p["prompt"])], "chosen": p["chosen"], "rejected": p["rejected"], "images": images,
                "where": where}

# -----------------------------------------------------------------------------
# sources from a mixture config or a single path


class DataError(ValueError):
    """A mixture config or a dataset that cannot be opened at all: the message names the file and what is wrong."""


def open_sources(data, eos, image_folder=None, allow_outside_paths=False):
    """[(Source, weight)] from a mixture JSON ({"sources": [...]}) or from one dataset path (weight 1).

    Whatever stops a dataset from opening at all (a missing file, a config that is not JSON, a source
    without a path or with an unknown type, a weight that is not a finite number >= 0, no readable shard)
    is a DataError naming the file. `allow_outside_paths` lets a single dataset's image paths leave its
    image folder (a mixture config says it per source).
    """
    path = Path(data)
    try:
        if path.suffix == ".json" and path.is_file() and first_char(path) == "{":
            sources = [(open_source(s, path.parent, eos), weight) for s, weight in mixture_spec(path)]
        else:
            spec = {"name": path.name, "type": sniff(path), "path": path.name, "image_folder": image_folder,
                    "allow_outside_paths": allow_outside_paths}
            sources = [(open_source(spec, path.parent, eos), 1.0)]
        for source, weight in sources:
            if len(source) == 0:
                raise DataError(f"source {source.name!r} has no records")
        return sources
    except DataError as e:
        raise e if str(path) in str(e) else DataError(f"{path}: {e}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to parse") from None
    except BadSample as e:  # a file of a source that cannot be read at all: the message names it
        raise DataError(f"{path}: {e}") from None
    except (OSError, UnicodeDecodeError, tarfile.TarError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: cannot open the data ({type(e).__name__}: {str(e)[:300]})") from None


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
        weight = s.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise DataError(f"{path}: source {k} ({short(s.get('name'))}): 'weight' must be a finite number >= 0, "
                            f"not {short(weight)}")
        out.append((s, float(weight)))
    if not any(w > 0 for _, w in out):
        raise DataError(f"{path}: every source has weight 0")
    return out


def open_source(spec, base, eos):
    kind, name, outside = spec.get("type"), spec.get("name", spec.get("path")), spec.get("allow_outside_paths") is True
    # both relative to the config's folder; normalised so messages read "sft/x.json", not "mixtures/../sft/x.json"
    folder = Path(os.path.normpath(Path(base) / spec["image_folder"])) if spec.get("image_folder") else None
    full = Path(os.path.normpath(Path(base) / spec["path"]))
    base, path = full.parent, full.name
    if kind == "captions":
        return Captions(name, path, base, eos)
    if kind == "interleaved":
        return Interleaved(name, path, base, eos, spec.get("max_images", 8), folder, outside)
    if kind in ("llava", "vlguard"):
        return (Llava if kind == "llava" else VLGuard)(name, path, base, folder, spec.get("limit"), outside)
    if kind in ("vlfeedback", "pairs"):
        return Preferences(name, path, base, folder, spec.get("limit"), spec.get("min_score"),
                           spec.get("min_margin"), outside)
    raise DataError(f"source {name!r}: unknown type {kind!r}; use captions, interleaved, llava, vlguard, "
                    "vlfeedback or pairs")


def sniff(path):
    """The dataset type of a single path, from its first sample: only the start of the file is read."""
    if ".tar" in path.name:
        exts = first_sample(path.parent / expand_braces(path.name)[0])
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
    except (json.JSONDecodeError, RecursionError):
        return None
