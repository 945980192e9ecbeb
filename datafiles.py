"""
Dataset files read as untrusted bytes, before any format gives them a meaning (formats.py does): tar shards
as webdataset writes them, JSON lists and JSON lines.

- A tar sample is a run of members sharing a key: the path up to the first dot of the file name
  (`000017.jpg` + `000017.txt`); the rest of the name is the member's extension.
- A shard is indexed once by its headers (tarfile skips the data of an uncompressed archive) and a member is
  read by offset when its sample is asked for: nothing is extracted to disk, any sample can be fetched at
  random, and each DataLoader worker opens its own file handle. Brace lists (`shard-{000..099}.tar`) expand.
- Downloaded files are untrusted: an unsafe member name (`../x`, `/x`), a duplicate member, one over
  MAX_MEMBER_BYTES or past the end of the file, a shard cut short, a JSON line that is not UTF-8, malformed
  or absurdly nested: each is a `BadSample` naming the file and the sample, raised when that sample is read,
  so training counts it. A shard that cannot be read at all is counted like one bad sample.
"""
import json
import re
import tarfile
from pathlib import Path

from errors import BadSample, short

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the image members a sample may hold
MAX_MEMBER_BYTES = 256 * 2**20  # a larger tar member is refused unread (images are capped at MAX_PIXELS anyway)

# -----------------------------------------------------------------------------
# tar shards


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
    """A tar shard's samples (runs of members sharing a key), indexed by their headers, read by offset.

    Members that cannot be used are kept as `problems` (BadSamples, counted when read): unsafe names
    (`../x`, `/x`: never followed), a (key, extension) seen twice (the first is kept), a member over
    MAX_MEMBER_BYTES or running past the end of the file, and a shard cut short or corrupt after its last
    good member (tarfile would just stop there, silently dropping every later sample).
    """

    def __init__(self, path):
        self.path, self.samples, self.problems, self.handle = Path(path), {}, [], None
        self.refused = set()  # keys with a member too large or cut short: the whole sample is one problem
        self.cut_short = False  # a member ran past the end of the file (already reported)
        try:
            size = self.path.stat().st_size
            tf = tarfile.open(self.path, "r:")  # uncompressed: headers are read, data is skipped
        except (tarfile.TarError, OSError) as e:
            raise BadSample(str(path), f"cannot read the tar shard ({e}); shards must be uncompressed .tar files",
                            "bad shard") from None
        with tf:
            try:
                for m in tf:
                    if m.isfile():
                        self.add(m, size)
                self.check_end(tf.offset, size)
            except (tarfile.TarError, OSError) as e:  # the samples indexed so far stay usable
                if not self.cut_short:
                    self.problem(f"unreadable after byte {tf.offset} of {size} ({e}): the shard is truncated or "
                                 "corrupt there, and any samples after it are lost", "bad shard")

    def add(self, m, size):
        key, ext = split_key(m.name)
        if m.name.startswith("/") or ".." in m.name.split("/"):
            return self.problem(f"unsafe member name {short(m.name)} skipped", "unsafe member")
        if key in self.refused:
            return None
        if m.size > MAX_MEMBER_BYTES or m.offset_data + m.size > size:
            self.refused.add(key)
            self.samples.pop(key, None)
            if m.size > MAX_MEMBER_BYTES:
                return self.problem(f"member {short(m.name)} of {m.size} bytes is over the {MAX_MEMBER_BYTES} byte "
                                    "limit", "member too large")
            self.cut_short = True
            return self.problem(f"member {short(m.name)} runs past the end of the file (a truncated shard)",
                                "bad shard")
        if ext in self.samples.get(key, {}):
            return self.problem(f"member {short(m.name)} appears twice; the first is used", "duplicate key")
        self.samples.setdefault(key, {})[ext] = (m.offset_data, m.size)

    def check_end(self, offset, size):
        """tarfile stops at the first unreadable header: unless the rest is the zero blocks that end an archive,
        the shard was cut short or is corrupt there, and the samples after it are lost."""
        with open(self.path, "rb") as f:
            f.seek(offset)
            tail = f.read(1024)
        if tail.strip(b"\0"):
            self.problem(f"unreadable tar header at byte {offset} of {size}: the shard is truncated or corrupt "
                         "there, and any samples after it are lost", "bad shard")

    def problem(self, message, reason):
        self.problems.append(BadSample(str(self.path), message, reason))

    def read(self, key, ext):
        if self.handle is None:  # opened lazily, so each DataLoader worker gets its own file handle
            self.handle = open(self.path, "rb")
        offset, size = self.samples[key][ext]
        self.handle.seek(offset)
        data = self.handle.read(size)
        if len(data) != size:  # the file shrank since it was indexed
            raise BadSample(f"{self.path}:{key}", f"member .{ext} is truncated", "bad shard")
        return data

    def image_member(self, key, where):
        """The extension of a caption sample's image member (`{key}.jpg`, ...)."""
        image = next((e for e in IMAGE_EXTS if e in self.samples[key]), None)
        if image is None:
            raise BadSample(where, f"no image member (.{'/.'.join(IMAGE_EXTS)}) for this key", "missing image")
        return image

    def document_image(self, key, k, ref, where):
        """The bytes of image k of a document (MINT-1T, OBELICS): the member `ref` names, or `{key}.{k}.{ext}`."""
        exts = self.samples[key]
        stem, ext = split_key(ref.rpartition("/")[2])
        if stem == key.rpartition("/")[2] and ext in exts:
            return self.read(key, ext)
        for ext in (f"{k}.{e}" for e in IMAGE_EXTS):
            if ext in exts:
                return self.read(key, ext)
        raise BadSample(where, f"image {k} ({short(ref)}) is neither a member of the shard nor base64",
                        "missing image")

    def __getstate__(self):  # workers reopen the file
        return {**self.__dict__, "handle": None}


def shard_items(pattern, base):
    """[(TarShard, key)] for every sample of every shard, then each shard's problems and each unreadable shard
    (BadSamples, raised when read)."""
    items, unreadable = [], []
    for name in expand_braces(pattern):
        try:
            shard = TarShard(base / name)
        except BadSample as e:  # one unreadable shard among many is counted, like a bad sample
            unreadable.append(e)
            continue
        items += [(shard, key) for key in shard.samples] + shard.problems
    if unreadable and len(unreadable) == len(expand_braces(pattern)):
        raise unreadable[0]  # none can be read: the source cannot be opened at all
    return items + unreadable


def first_sample(path):
    """The member extensions of a shard's first sample (what `formats.sniff` tells the dataset type by)."""
    first, exts = None, set()
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            key, ext = split_key(m.name)
            if first is not None and key != first:
                break
            first = key
            exts.add(ext)
    return exts

# -----------------------------------------------------------------------------
# JSON rows


def read_json_rows(path):
    """A JSON list, or JSON lines. A JSON-lines file is read line by line: a line that is not UTF-8, not valid
    JSON or nested too deeply for the parser (a partial last line too) becomes a BadSample item instead of
    ending the read. A JSON list is one value: if it cannot be parsed, the whole file is refused."""
    raw = Path(path).read_bytes()
    if path.suffix != ".jsonl":
        rows = parse_json(raw, str(path))
        return rows if isinstance(rows, list) else [rows]
    rows = []
    for n, line in enumerate(raw.split(b"\n"), 1):
        if line.strip():
            try:
                rows.append(parse_json(line, f"{path}:{n}"))
            except BadSample as e:
                rows.append(e)
    return rows


def parse_json(data, where):
    """One JSON value from bytes or text; anything unparsable is a BadSample naming `where`."""
    try:
        return json.loads(data)
    except UnicodeDecodeError:
        raise BadSample(where, "not UTF-8 text", "bad json") from None
    except json.JSONDecodeError as e:
        raise BadSample(where, f"malformed JSON ({e})", "bad json") from None
    except RecursionError:
        raise BadSample(where, "JSON nested too deeply to parse", "bad json") from None
