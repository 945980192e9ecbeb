"""
Reading a benchmark's files as untrusted input: JSON (or JSON lines), one record at a time, each failure a
BadSample naming the file and the record, so that eval.py ends with one line, not a traceback. The formats
themselves are read in evals/open_formats.py and evals/choice_formats.py; evals/readers.py tells them apart.
"""
import csv
import json
from pathlib import Path

from datafiles import parse_json
from errors import BadSample, short
from formats import UNTRUSTED, leaves_folder


def read_json(path):
    """A JSON document, or JSON lines (POPE's .json files are JSON lines) as a list. Text that is not UTF-8 and
    JSON that is malformed or nested too deeply to parse are a BadSample naming the file (and line)."""
    raw = Path(path).read_bytes()
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":  # "Extra data": more than one value, so JSON lines, read below
            raise BadSample(str(path), f"not valid JSON ({e})", "bad json") from None
    except (UnicodeDecodeError, RecursionError):
        return parse_json(raw, str(path))  # raises the BadSample that says which
    return [parse_json(line, f"{path}:{n}") for n, line in enumerate(raw.split(b"\n"), 1) if line.strip()]


class named:
    """`with named(where):` around the reading of one record (or file): what a field of the wrong type or shape
    makes Python raise (a number where a list belongs, a list where a dict belongs, an index out of range, a
    TSV that is not UTF-8) becomes a BadSample naming it, so that eval.py ends with one line, not a traceback."""

    def __init__(self, where):
        self.where = where

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if e is None or isinstance(e, BadSample) or not isinstance(e, UNTRUSTED + (csv.Error,)):
            return False
        what = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else "a field of the wrong type or shape"
        raise BadSample(self.where, f"{what} ({type(e).__name__}: {short(str(e))})", "bad record") from None


def image_at(images, names, where):
    """The first of `names` (paths relative to the `images` folder) that exists; None when images is None
    (scoring needs no images). A name that leaves the folder (absolute, or `..`) is refused, not looked up."""
    if images is None:
        return None
    for name in names:
        if not isinstance(name, str) or leaves_folder(name):
            raise BadSample(where, f"image name {short(name)} is not a file name inside the image folder {images}",
                            "unsafe path")
    for name in names:
        if (Path(images) / name).is_file():
            return Path(images) / name
    raise BadSample(where, f"image file {Path(images) / names[0]} does not exist", "missing image")


def need(row, keys, where):
    if not isinstance(row, dict):
        raise BadSample(where, f"a record must be a JSON object, not {short(row)}", "bad record")
    missing = [k for k in keys if k not in row]
    if missing:
        raise BadSample(where, f"no {', '.join(map(repr, missing))} field", "missing field")
    return [row[k] for k in keys]
