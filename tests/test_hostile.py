"""Hostile and broken input, as a user who downloads datasets and checkpoints meets it: small crafted files,
each with the outcome it must get.

- Training data: a record of the wrong shape, a file that is not UTF-8, absurdly nested JSON, a partial last
  line, bad or long `data:` URIs, image paths that leave their folder, tar shards cut inside a header or
  holding duplicate, oversized or `../` members, decompression bombs, NaN ratings: each is a BadSample
  naming the file, the record and the reason, skipped and counted in training (a run over a mixture of good
  records and every bad class finishes and reports the counts); NaN or negative mixture weights refuse to
  start.
- Checkpoints and tokenizers: index.json shard paths outside the checkpoint, a malformed safetensors header,
  a config.json claiming 20,000 layers, a tokenizer.model of 0xFF bytes (parsed in bounded time), a
  config.json that is not JSON: each a named error before anything is built.
- The command lines (data.py show, sample.py, eval.py, train.py and dpo.py at start-up): one line on
  stderr naming the file, exit status 2.
- Checkpoint folders: only `ckpt-NNNNNNN` is a checkpoint (resumed from, rotated); a partial last line of
  metrics.jsonl does not break a resume.
"""
import base64
import io
import json
import shutil
import struct
import tarfile
import time
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import checkpoint
import data
import datafiles
import dpo
import eval as ev
import formats
import images
import model
import sample
import tokenizer
import train
import weights

FAST = ["--workers", "0", "--max-len", "512", "--log-every", "1", "--save-every", "100", "--lr", "1e-3"]

# -----------------------------------------------------------------------------
# crafted files


def png(w=24, h=20, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def png_claiming(w, h):
    """A 1x1 PNG whose header claims w x h pixels: what a decompression bomb looks like before decoding."""
    raw = bytearray(png(1, 1))
    raw[16:24] = struct.pack(">II", w, h)  # IHDR's width and height, after the signature, length and type
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    return bytes(raw)


def grey16(value=40000):
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 6), value, dtype=np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def tar(members):
    """Tar bytes of [(name, payload)] and each member's header offset."""
    buf, offsets = io.BytesIO(), {}
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, payload in members:
            offsets.setdefault(name, buf.tell())
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue(), offsets


def chat(q="<image>\nWhat is it?", a="A picture."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


GOOD = 8  # good LLaVA records

# LLaVA records: id -> (the record's fields, the reason it is skipped for, words its message must hold)
LLAVA = {
    "from-list": ({"conversations": [{"from": ["human"], "value": "hi"}, {"from": "gpt", "value": "x"}]},
                  "bad record", "needs 'from'"),
    "image-int": ({"image": 5, "conversations": chat()}, "bad record", "'image' must be a path"),
    "image-list-of-int": ({"image": [5], "conversations": chat()}, "bad record", "named by a non-empty string"),
    "gpt-only": ({"conversations": [{"from": "gpt", "value": "hello"}]}, "bad record", "open with a user turn"),
    "value-dict": ({"conversations": [{"from": "human", "value": {"x": 1}}]}, "bad record", "a string 'value'"),
    "lone-surrogate": ({"conversations": chat(a="a\ud800b")}, "bad text", "not valid Unicode"),
    "escape-dotdot": ({"image": "../outside.png", "conversations": chat()}, "unsafe path", "leaves the image folder"),
    "escape-absolute": ({"image": "{outside}", "conversations": chat()}, "unsafe path", "leaves the image folder"),
    "data-uri-bad": ({"image": "data:image/png;base64,@@@@", "conversations": chat()}, "bad data uri",
                     "malformed data: URI"),
    "data-uri-long": ({"image": "data:image/png;base64," + "!" * 20000, "conversations": chat()}, "bad data uri",
                      "malformed data: URI"),
    "name-too-long": ({"image": "x" * 10000 + ".png", "conversations": chat()}, "missing image", "does not exist"),
    "bomb": ({"image": "bomb.png", "conversations": chat()}, "image too large", "decompression bomb"),
    "over-max-pixels": ({"image": "big.png", "conversations": chat()}, "image too large", "pixel limit"),
    "truncated-image": ({"image": "truncated.png", "conversations": chat()}, "bad image", "cannot decode"),
    "missing-image": ({"image": "nope.png", "conversations": chat()}, "missing image", "does not exist"),
}
# raw JSON lines of the same file: (line, reason, words), found by their line number
LLAVA_LINES = {
    "not-an-object": (b"5", "bad record", "'conversations' list"),
    "not-utf8": (b'{"id": "\xff\xfe", "conversations": []}', "bad json", "not UTF-8"),
    "deep-nesting": (b"[" * 100_000 + b"]" * 100_000, "bad json", "nested too deeply"),
    "partial-last-line": (b'{"id": "cut", "conversations": [{"from": "hu', "bad json", "malformed JSON"),
}
VLGUARD = {  # id -> (row, reason, words)
    "no-image": ({"instr-resp": [{"instruction": "How?", "response": "No."}]}, "bad record", "needs an 'image'"),
    "response-int": ({"image": "good.png", "instr-resp": [{"instruction": "How?", "response": 7}]}, "bad record",
                     "string response"),
}
DOCS = {  # id -> (document, reason, words)
    "texts-int": ({"texts": [5], "images": [None]}, "bad document", "'texts' must hold strings"),
    "not-parallel": ({"texts": ["a", "b"], "images": [None]}, "bad document", "parallel"),
    "image-int": ({"texts": [None, "a"], "images": [3, None]}, "bad record", "named by a non-empty string"),
}


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    """Every crafted file in one folder, plus a mixture config over the training data (mix.json)."""
    d = tmp_path_factory.mktemp("hostile")
    (d / "images").mkdir()
    (d / "outside.png").write_bytes(png())
    for name, payload in {"good.png": png(), "grey16.png": grey16(), "bomb.png": png_claiming(20000, 20000),
                          "big.png": png_claiming(9000, 9000), "truncated.png": png()[:80]}.items():
        (d / "images" / name).write_bytes(payload)
    lines = [json.dumps({"id": f"good-{k}", "image": "grey16.png" if k == 0 else "good.png",
                         "conversations": chat(a=f"Answer {k}.")}).encode() for k in range(GOOD)]
    for i, (fields, _, _) in LLAVA.items():
        fields = json.loads(json.dumps(fields).replace("{outside}", str(d / "outside.png")))
        lines.append(json.dumps({"id": i, **fields}).encode())
    lines += [line for line, _, _ in LLAVA_LINES.values()]  # the partial line last, without its newline
    (d / "sft.jsonl").write_bytes(b"\n".join(lines))
    vlguard = [{"id": "good", "image": "good.png", "instr-resp": [{"instruction": "What?", "response": "A sign."}]}]
    (d / "vlguard.json").write_text(json.dumps(vlguard + [{"id": i, **row} for i, (row, _, _) in VLGUARD.items()]))
    docs = [{"id": "good", "texts": [None, "A red circle."], "images": ["good.png", None]}]
    (d / "docs.jsonl").write_text("\n".join(json.dumps({"id": i, **doc}) for i, doc in
                                            [("good", docs[0])] + [(i, v[0]) for i, v in DOCS.items()]) + "\n")
    write_shards(d)
    mix = {"sources": [
        {"name": "sft", "type": "llava", "path": "sft.jsonl", "image_folder": "images", "weight": 4},
        {"name": "vlguard", "type": "vlguard", "path": "vlguard.json", "image_folder": "images", "weight": 1},
        {"name": "docs", "type": "interleaved", "path": "docs.jsonl", "image_folder": "images", "weight": 1},
        {"name": "captions", "type": "captions", "path": "cap-{000..003}.tar", "weight": 2}]}
    (d / "mix.json").write_text(json.dumps(mix))
    write_preferences(d)
    return d


BIG = 6000  # bytes of the oversized member; the tests lower datafiles.MAX_MEMBER_BYTES below it


def write_shards(d):
    """cap-000: good, a duplicate member, an oversized member, a ../ name; cap-001: cut inside the header of
    its third sample; cap-002: a member cut short by the end of the file; cap-003: not a tar at all."""
    ok = lambda k: [(f"{k}.png", png(seed=len(k))), (f"{k}.txt", f"caption {k}".encode())]  # noqa: E731
    raw, _ = tar(ok("a") + [("a.png", png(seed=9))] + ok("b") + [("c.png", b"\0" * BIG), ("c.txt", b"big")]
                 + [("../evil.txt", b"x")])  # c.txt follows its refused c.png: the sample is one problem
    (d / "cap-000.tar").write_bytes(raw)
    raw, offsets = tar(ok("d") + ok("e") + ok("f") + ok("g"))
    (d / "cap-001.tar").write_bytes(raw[: offsets["f.png"] + 100])  # inside f.png's header
    raw, offsets = tar(ok("h") + ok("i"))
    (d / "cap-002.tar").write_bytes(raw[: offsets["i.txt"] + 512 + 3])  # i.txt's data cut short
    (d / "cap-003.tar").write_bytes(b"this is not a tar file" * 40)


def vlf_row(i, ratings, responses=None):
    responses = responses or [f"response {k}" for k in range(len(ratings))]
    return {"id": i, "prompt": "Describe it.", "img_path": "good.png", "completions": [
        {"response": r, "annotations": {a: {"Rating": v} for a, v in zip("HEV", rs)}}
        for r, rs in zip(responses, ratings)]}


def write_preferences(d):
    pairs = [{"id": f"good-{k}", "image": "good.png", "prompt": "Describe it.", "chosen": f"A picture {k}.",
              "rejected": "Nothing."} for k in range(3)]
    pairs += [{"id": "chosen-int", "image": "good.png", "prompt": "Describe it.", "chosen": 5, "rejected": "No."},
              {"id": "escape", "image": "../outside.png", "prompt": "Q", "chosen": "a", "rejected": "b"}]
    (d / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs) + "[1, 2]\n")
    rows = [vlf_row("good", [("5", "5", "4"), ("2", "1", "1")]),
            vlf_row("completions-null", [])] + [
            vlf_row("nan-string", [("nan", "5", "5"), ("1", "1", "1")]),  # one completion left: no pair
            vlf_row("inf", [("inf", "5", "5"), ("1", "1", "1")])]
    rows[1]["completions"] = None
    text = "".join(json.dumps(r) + "\n" for r in rows)
    text += json.dumps(vlf_row("nan-literal", [(3, 3, 3), (1, 1, 1)])).replace("3", "NaN", 1) + "\n"
    (d / "vlf.jsonl").write_text(text)
    mix = {"sources": [{"name": "pairs", "type": "pairs", "path": "pairs.jsonl", "image_folder": "images"},
                       {"name": "vlf", "type": "vlfeedback", "path": "vlf.jsonl", "image_folder": "images"}]}
    (d / "dpo.json").write_text(json.dumps(mix))


@pytest.fixture(scope="module")
def enc(world):
    tok = tokenizer.extended_tokenizer(world / "tokenizer")
    return data.Encoder(tok, model.preset("tiny", tokenizer=tok), max_len=4096)


@pytest.fixture
def small_members(monkeypatch):
    monkeypatch.setattr(datafiles, "MAX_MEMBER_BYTES", BIG - 1)


def sources(d):
    return {s.name: s for s, _ in data.open_sources(d / "mix.json", "<|endoftext|>")}

# -----------------------------------------------------------------------------
# training data: each bad record is a BadSample naming the file, the record and the reason


def find(source, enc, needle):
    """The outcome (a sample dict or a BadSample) of the one item whose `where` or message holds `needle`."""
    found = []
    for i in range(len(source)):
        try:
            s = enc(source.record(i))
            if needle in s["where"]:
                found.append(s)
        except data.BadSample as e:
            if needle in str(e):
                found.append(e)
    assert len(found) == 1, (needle, found)
    return found[0]


@pytest.mark.parametrize("case", list(LLAVA))
def test_llava_record_of_the_wrong_shape_is_named(crafted, enc, case):
    _, reason, says = LLAVA[case]
    e = find(sources(crafted)["sft"], enc, f"id={case}:")
    assert isinstance(e, data.BadSample) and e.reason == reason and says in str(e), e
    assert str(crafted / "sft.jsonl") in str(e) and len(str(e)) < 500  # names the file; a long value is cut


@pytest.mark.parametrize("case", list(LLAVA_LINES))
def test_llava_line_that_is_not_a_record_is_named(crafted, enc, case):
    line = list(LLAVA_LINES).index(case)
    _, reason, says = LLAVA_LINES[case]
    src = sources(crafted)["sft"]
    n = GOOD + len(LLAVA) + line  # its index among the items; JSON lines count from 1
    with pytest.raises(data.BadSample) as e:
        enc(src.record(n))
    assert e.value.reason == reason and says in str(e.value), e.value
    where = f"sft.jsonl:{n + 1}" if reason == "bad json" else f"sft.jsonl[{n}]"
    assert where in str(e.value) and len(str(e.value)) < 500


def test_good_records_beside_bad_ones_read_and_16_bit_is_scaled(crafted, enc):
    src = sources(crafted)["sft"]
    good = [enc(src.record(i)) for i in range(GOOD)]
    assert [s["where"].rpartition("id=")[2] for s in good] == [f"good-{k}" for k in range(GOOD)]
    pixels = images.open_image(crafted / "images" / "grey16.png")
    assert np.asarray(pixels)[0, 0].tolist() == [156, 156, 156]  # 40000 >> 8, not clipped to white


@pytest.mark.parametrize("source, case", [("vlguard", c) for c in VLGUARD] + [("docs", c) for c in DOCS])
def test_vlguard_and_document_records_of_the_wrong_shape(crafted, enc, source, case):
    _, reason, says = (VLGUARD if source == "vlguard" else DOCS)[case]
    src = sources(crafted)[source]
    k = 1 + list(VLGUARD if source == "vlguard" else DOCS).index(case)  # after the one good record
    with pytest.raises(data.BadSample) as e:
        enc(src.record(k))
    assert e.value.reason == reason and says in str(e.value), e.value
    assert (source == "vlguard" and f"id={case}" in str(e.value)) or f"{source}[{k}]" in str(e.value)
    assert enc(src.record(0))["input_ids"]  # the good one reads


def test_image_paths_stay_inside_the_folder_unless_allowed(crafted, enc):
    spec = {"type": "llava", "path": "sft.jsonl", "image_folder": "images"}
    strict = formats.open_source(spec, crafted, "")
    loose = formats.open_source(spec | {"allow_outside_paths": True}, crafted, "")
    for case in ("escape-dotdot", "escape-absolute"):
        e = find(strict, enc, f"id={case}:")
        assert isinstance(e, data.BadSample) and "leaves the image folder" in str(e)
        assert find(loose, enc, f"id={case}").get("input_ids")  # allowed: ../outside.png is read
    single = data.open_sources(crafted / "sft.jsonl", "", crafted / "images", allow_outside_paths=True)[0][0]
    assert find(single, enc, "id=escape-dotdot").get("input_ids")


def test_tar_shards_cut_short_duplicated_oversized_or_unsafe(crafted, enc, small_members):
    src = sources(crafted)["captions"]
    good = {}
    bad = []
    for i in range(len(src)):
        try:
            good[src.record(i)["where"].rpartition(":")[2]] = enc(src.record(i))
        except data.BadSample as e:
            bad.append(e)
    assert sorted(good) == ["a", "b", "d", "e", "h"]  # every sample before the damage still reads
    reasons = Counter(e.reason for e in bad)
    assert reasons == Counter({"bad shard": 3, "duplicate key": 1, "member too large": 1, "unsafe member": 1})
    said = "\n".join(map(str, bad))
    assert "cap-001.tar: unreadable tar header at byte" in said and "samples after it are lost" in said
    assert "cap-002.tar: member 'i.txt' runs past the end" in said and "cap-003.tar: cannot read" in said
    assert "member 'a.png' appears twice" in said and "'../evil.txt'" in said and "over the 5999 byte limit" in said
    good_a = np.asarray(images.open_image(src.record(0)["images"][0]))
    assert np.array_equal(good_a, np.asarray(images.open_image(png(seed=1))))  # the first a.png is the one kept


def test_a_source_whose_every_shard_is_unreadable_does_not_open(crafted):
    mix = crafted / "only-003.json"
    mix.write_text(json.dumps({"sources": [{"name": "c", "type": "captions", "path": "cap-003.tar"}]}))
    with pytest.raises(data.DataError, match=r"cap-003\.tar: cannot read the tar shard"):
        data.open_sources(mix, "")


@pytest.mark.parametrize("content, says", [(b"[]", "has no records"), (b'["\xff"]', "not UTF-8"),
                                           (b"[" * 100_000, "nested too deeply"), (b"[{", "malformed JSON")])
def test_a_json_list_file_that_cannot_be_read_does_not_open(tmp_path, content, says):
    (tmp_path / "rows.json").write_bytes(content)
    (tmp_path / "mix.json").write_text(json.dumps({"sources": [{"name": "s", "type": "llava", "path": "rows.json"}]}))
    with pytest.raises(data.DataError, match=says):
        data.open_sources(tmp_path / "mix.json", "")


def test_data_uris_and_long_names(enc, tmp_path):
    (tmp_path / "images").mkdir()
    good = "data:image/png;base64," + base64.b64encode(png()).decode()
    assert formats.image_ref(good, tmp_path, "x") == png()
    for ref, reason in (("data:image/png;base64,%%%", "bad data uri"), ("data:text/plain,hello", "bad data uri"),
                        ("data:" + "A" * 100_000, "bad data uri")):
        with pytest.raises(data.BadSample) as e:
            formats.image_ref(ref, tmp_path, "rec 3")
        assert e.value.reason == reason and str(e.value).startswith("rec 3: ") and len(str(e.value)) < 300
    with pytest.raises(data.BadSample, match="does not exist") as e:  # ENAMETOOLONG is a missing file, cut short
        images.open_image(tmp_path / ("y" * 5000))
    assert len(str(e.value)) < 400


def test_preference_rows_of_the_wrong_shape_and_nan_ratings(crafted, enc):
    srcs = {s.name: s for s, _ in data.open_sources(crafted / "dpo.json", "")}
    pairs, vlf = srcs["pairs"], srcs["vlf"]
    outcome = {}
    for i in range(len(pairs)):
        try:
            where, reason = enc(pairs.record(i))["chosen"]["where"], "ok"
        except data.BadSample as e:
            where, reason = e.where, e.reason
        outcome[where.rpartition("id=")[2] or where] = reason
    assert Counter(outcome.values()) == Counter({"ok": 3, "bad pair": 1, "unsafe path": 1, "bad record": 1})
    assert outcome["chosen-int"] == "bad pair" and outcome["escape"] == "unsafe path"
    # VLFeedback: completions null is a counted bad record; NaN and inf ratings are unparsable, never a pair
    assert vlf.counts == Counter({"rows": 5, "pairs": 1, "unparsable rating": 3, "fewer than 2 rated completions": 3})
    assert len(vlf) == 2 and enc(vlf.record(0))["chosen"]["input_ids"]
    with pytest.raises(data.BadSample, match=r"vlf\.jsonl\[1\]: 'completions' must be a list") as e:
        vlf.record(1)
    assert e.value.reason == "bad record"


@pytest.mark.parametrize("weight", [float("nan"), -1.0, "1", None, 0.0])
def test_nan_or_negative_mixture_weights_refuse_to_start(crafted, tmp_path, weight):
    spec = {"name": "sft", "type": "llava", "path": str(crafted / "sft.jsonl"), "weight": weight}
    (tmp_path / "mix.json").write_text(json.dumps({"sources": [spec]}))  # json writes NaN as NaN
    says = "every source has weight 0" if weight == 0.0 else "'weight' must be a finite number >= 0"
    with pytest.raises(data.DataError, match=says):
        data.open_sources(tmp_path / "mix.json", "")
    with pytest.raises(ValueError, match="positive weights"):
        data.Schedule([3], [weight if isinstance(weight, float) else -1.0])


def test_a_bad_sample_pickles_for_dataloader_workers():
    import pickle
    e = pickle.loads(pickle.dumps(data.BadSample("f.json[3]", "what is wrong", "bad record")))
    assert (str(e), e.reason, e.where) == ("f.json[3]: what is wrong", "bad record", "f.json[3]")

# -----------------------------------------------------------------------------
# one training run over every bad class, and one DPO run over the bad preference rows


def reasons_of(text):
    """{reason: count} from train.py's closing line, `done: ... (bad samples: reason: n, ...)`."""
    line = [x for x in text.splitlines() if x.startswith("done:")][-1]
    counts = line.rpartition("(bad samples: ")[2].rstrip(")")
    return {k: int(v) for k, v in (part.rsplit(": ", 1) for part in counts.split(", "))}


def test_a_training_run_over_every_bad_class_finishes_and_reports_them(crafted, world, tmp_path, small_members,
                                                                      capsys):
    """64 samples: each source is read through at least once (sft about 32 draws of 27 items, captions 16 of 11,
    vlguard and docs 8 of 3 and 4), about half of them bad; under the 200 samples Tally needs to judge."""
    out = tmp_path / "run"
    train.main(["--data", str(crafted / "mix.json"), "--tokenizer", str(world / "tokenizer"), "--out-dir", str(out),
                "--batch-size", "8", "--max-steps", "8", *FAST])
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9)) and (out / "ckpt-0000008").is_dir()
    stdout, stderr = capsys.readouterr()
    counts = reasons_of(stdout)
    expected = {reason for _, reason, _ in [*LLAVA.values(), *LLAVA_LINES.values(), *VLGUARD.values(), *DOCS.values()]}
    expected |= {"bad shard", "duplicate key", "member too large", "unsafe member"}
    assert set(counts) == expected, counts
    assert log[-1]["bad_samples"] == sum(counts.values())
    assert "data: skipped" in stderr and "sft.jsonl" in stderr  # the first skips are named, file and record


def test_a_dpo_run_over_bad_preference_rows_finishes_and_reports_them(crafted, world, tmp_path, capsys):
    model.XGenMM.from_tokenizer(world / "tokenizer").save_pretrained(tmp_path / "init")
    out = tmp_path / "dpo"
    dpo.main(["--init", str(tmp_path / "init"), "--data", str(crafted / "dpo.json"), "--out-dir", str(out),
              "--batch-size", "4", "--max-steps", "4", "--lora-r", "4", *FAST])  # 8 draws each of 6 and 2 items
    stdout, _ = capsys.readouterr()
    vlf = [x for x in stdout.splitlines() if x.startswith("vlf: ")]
    assert vlf and all(s in vlf[0] for s in ("'rows': 5", "'pairs': 1", "'unparsable rating': 3")), stdout
    assert set(reasons_of(stdout)) == {"bad pair", "unsafe path", "bad record"}
    assert (out / "ckpt-0000004").is_dir()

# -----------------------------------------------------------------------------
# checkpoints and tokenizers


@pytest.fixture(scope="module")
def tiny_ckpt(world, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "ckpt"
    torch.manual_seed(0)
    model.XGenMM.from_tokenizer(world / "tokenizer").save_pretrained(d, max_shard_size=400_000)
    assert (d / "model.safetensors.index.json").is_file()
    return d


def copy_of(tiny_ckpt, tmp_path):
    return shutil.copytree(tiny_ckpt, tmp_path / "ckpt")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../x.safetensors"])
def test_index_shard_paths_outside_the_checkpoint_are_refused(tiny_ckpt, tmp_path, shard):
    d = copy_of(tiny_ckpt, tmp_path)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    shutil.move(d / first, tmp_path / "outside.safetensors")
    index["weight_map"] = {k: shard if v == first else v for k, v in index["weight_map"].items()}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(weights.CheckpointError, match="outside the checkpoint directory"):
        model.XGenMM.from_pretrained(d)
    if shard == "../outside.safetensors":  # only when the caller allows it explicitly
        assert weights.Checkpoint(d, allow_outside=True).keys()


@pytest.mark.parametrize("damage", ["header length", "header json", "truncated", "empty"])
def test_a_malformed_safetensors_header_names_the_file(tiny_ckpt, tmp_path, damage):
    d = copy_of(tiny_ckpt, tmp_path)
    f = sorted(d.glob("model-*.safetensors"))[1]
    raw = f.read_bytes()
    raw = {"header length": struct.pack("<Q", 2**60) + raw[8:], "header json": raw[:8] + b"{oops" + raw[13:],
           "truncated": raw[: len(raw) // 2], "empty": b""}[damage]
    f.write_bytes(raw)
    with pytest.raises(weights.CheckpointError, match=rf"{f.name}: not a readable safetensors file"):
        model.XGenMM.from_pretrained(d)


def test_config_sizes_are_checked_before_anything_is_built(tiny_ckpt, tmp_path):
    d = copy_of(tiny_ckpt, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    for part, field, value, says in [
            ("text_config", "num_hidden_layers", 20000, "layers = 20000, but the checkpoint holds layers 0-3"),
            ("vision_encoder_config", "num_hidden_layers", 20000, "vision_encoder_config.num_hidden_layers = 20000"),
            ("vision_tokenizer_config", "depth", 20000, "depth = 20000"),
            ("text_config", "hidden_size", -64, "text_config.hidden_size = -64 is not a size"),
            ("text_config", "num_attention_heads", 3, "not a multiple of num_attention_heads 3"),
            ("text_config", "vocab_size", "many", "vocab_size = 'many' is not a size")]:
        (d / "config.json").write_text(json.dumps({**cfg, part: {**cfg[part], field: value}}))
        t0 = time.perf_counter()
        with pytest.raises(weights.CheckpointError, match=says):
            model.XGenMM.from_pretrained(d)
        assert time.perf_counter() - t0 < 5  # 20,000 meta layers took 34 s before


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe", b"[" * 100_000])
def test_a_config_that_is_not_a_json_object_names_the_file(tiny_ckpt, tmp_path, content):
    d = copy_of(tiny_ckpt, tmp_path)
    (d / "config.json").write_bytes(content)
    with pytest.raises(weights.CheckpointError, match=r"config\.json: (not a valid JSON file|expected a JSON object)"):
        model.XGenMM.from_pretrained(d)


@pytest.mark.parametrize("content", [b"\xff" * 4096, b"", b"\x0a\x05hello", b"\x08" * 20])
def test_a_corrupt_tokenizer_model_is_a_clean_error(tiny_ckpt, tmp_path, content):
    d = copy_of(tiny_ckpt, tmp_path)
    (d / "tokenizer.model").write_bytes(content)
    with pytest.raises(tokenizer.TokenizerError, match=r"tokenizer\.model: not a SentencePiece model"):
        tokenizer.Tokenizer.from_pretrained(d)
    with pytest.raises(weights.CheckpointError, match=r"tokenizer\.model: not a SentencePiece model"):
        model.XGenMM.from_pretrained(d)


def best_time(f, repeat=3):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def test_tokenizer_model_parsing_time_grows_linearly():
    """The protobuf edit reads each field once: 8x the fields costs about 8x the time (a quadratic walk costs
    64x), and a varint longer than protobuf's 10 bytes is refused at once, however long the file (a run of
    0xFF bytes was once read as one ever longer varint: 0.05 s for 32 KiB, ~4x more per doubling)."""
    def parse(data):
        try:
            tokenizer.bare_processor(data)
        except tokenizer.TokenizerError:
            pass
    fields = lambda n: b"\x08\x01" * n  # noqa: E731  (n varint fields: field 1 = 1)
    small, large = best_time(lambda: parse(fields(20_000))), best_time(lambda: parse(fields(160_000)))
    assert large < 24 * small, (small, large)
    assert best_time(lambda: parse(b"\xff" * 2**18), 1) < 0.05  # refused at byte 10 (the old walk: ~4 s here)
    with pytest.raises(tokenizer.TokenizerError, match="varint longer than 10 bytes"):
        tokenizer.bare_processor(b"\xff" * 100)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "added_tokens.json"])
def test_tokenizer_json_files_that_are_not_json_name_the_file(tiny_ckpt, tmp_path, name):
    d = copy_of(tiny_ckpt, tmp_path)
    (d / name).write_text("{oops")
    with pytest.raises(weights.CheckpointError, match=rf"{name}: not a valid JSON file"):
        model.XGenMM.from_pretrained(d)


def test_only_numbered_checkpoints_are_resumed_from_and_rotated(world, tmp_path):
    run = tmp_path / "run"
    for name in ("ckpt-best", "ckpt-12", "ckpt-0000009x", "ckpt-0000001", "ckpt-0000003"):
        (run / name).mkdir(parents=True)
    (run / "ckpt-9999999").write_text("a file, not a checkpoint")
    assert checkpoint.newest(run).name == "ckpt-0000003"
    torch.manual_seed(0)
    m = model.XGenMM.from_tokenizer(world / "tokenizer")
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad])
    args = train.build_parser().parse_args([])
    checkpoint.save(run, 5, m, m, opt, {"step": 5}, args, keep=1)  # --keep 1
    left = sorted(p.name for p in run.iterdir())
    assert left == ["ckpt-0000005", "ckpt-0000009x", "ckpt-12", "ckpt-9999999", "ckpt-best"], left
    assert checkpoint.newest(run).name == "ckpt-0000005" and checkpoint.resolve(run).name == "ckpt-0000005"


def test_a_partial_last_metrics_line_does_not_break_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n\n{"step": 3, "loss": 1.8}\n'
                    '[1]\n{"loss": 5}\n{"step": 4, "lo')
    checkpoint.keep_metrics(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n'

# -----------------------------------------------------------------------------
# the command lines: one line on stderr naming the file, exit status 2


def one_line_exit_2(capsys, main, argv, *says):
    with pytest.raises(SystemExit) as e:
        main(argv)
    _, err = capsys.readouterr()
    lines = [x for x in err.splitlines() if x.strip()]
    assert e.value.code == 2 and "Traceback" not in err, err
    assert len([x for x in lines if "error:" in x]) == 1 and all(s in err for s in says), err


def test_data_show_strict_is_one_line_and_loose_prints_reasons(crafted, world, capsys):
    data.main(["show", "--data", str(crafted / "sft.jsonl"), "--image-folder", str(crafted / "images"),
               "--tokenizer", str(world / "tokenizer"), "--n", "50"])
    out = capsys.readouterr().out
    assert "-- bad (unsafe path):" in out and "-- bad (bad json):" in out
    assert out.count("-- bad") == len(LLAVA) + len(LLAVA_LINES) and out.count("-- ") == len(LLAVA) + 4 + GOOD
    one_line_exit_2(capsys, data.main, ["show", "--data", str(crafted / "vlguard.json"), "--image-folder",
                                        str(crafted / "images"), "--tokenizer", str(world / "tokenizer"), "--strict"],
                    "data.py: error:", "vlguard.json id=no-image")


def test_data_show_with_a_corrupt_tokenizer(crafted, world, tmp_path, capsys):
    shutil.copytree(world / "tokenizer", tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.model").write_bytes(b"\xff" * 1000)
    one_line_exit_2(capsys, data.main, ["show", "--data", str(crafted / "mix.json"), "--tokenizer",
                                        str(tmp_path / "tok")], "tokenizer.model: not a SentencePiece model")


def test_train_and_dpo_start_up_refuse_bad_input_in_one_line(crafted, world, tiny_ckpt, tmp_path, capsys):
    nan_mix = tmp_path / "nan.json"
    nan_mix.write_text(json.dumps({"sources": [{"type": "llava", "path": str(crafted / "sft.jsonl"),
                                                "weight": float("nan")}]}))
    bad_tok = shutil.copytree(world / "tokenizer", tmp_path / "tok")
    (bad_tok / "tokenizer.model").write_bytes(b"\xff" * 1000)
    bad_ckpt = shutil.copytree(tiny_ckpt, tmp_path / "bad-ckpt")
    sorted(bad_ckpt.glob("model-*.safetensors"))[0].write_bytes(b"\x00" * 7)
    base = ["--out-dir", str(tmp_path / "o"), *FAST]
    for main, argv, says in [
            (train.main, ["--data", str(nan_mix), "--tokenizer", str(world / "tokenizer")], "must be a finite"),
            (train.main, ["--data", str(world / "mixtures" / "sft.json"), "--tokenizer", str(bad_tok)],
             "not a SentencePiece model"),
            (train.main, ["--data", str(world / "mixtures" / "sft.json"), "--init", str(bad_ckpt)],
             "not a readable safetensors file"),
            (dpo.main, ["--data", str(nan_mix), "--init", str(tiny_ckpt)], "'weight' must be a finite")]:
        one_line_exit_2(capsys, main, argv + base, says)


def test_sample_refuses_a_bomb_and_reads_16_bit_as_training_does(crafted, tiny_ckpt, capsys):
    assert sample.load_image is images.open_image and ev.load_image is images.open_image  # the one reader
    base = ["--checkpoint", str(tiny_ckpt), "--prompt", "hi", "--max-new-tokens", "2"]
    for name, says in (("bomb.png", "decompression bomb"), ("big.png", "pixel limit"),
                       ("truncated.png", "cannot decode")):
        one_line_exit_2(capsys, sample.main, base + ["--image", str(crafted / "images" / name)], name, says)
    sample.main(base + ["--image", str(crafted / "images" / "grey16.png")])  # answers (no SystemExit)


def test_sample_and_eval_refuse_a_damaged_checkpoint(crafted, world, tiny_ckpt, tmp_path, capsys):
    d = copy_of(tiny_ckpt, tmp_path)
    f = sorted(d.glob("model-*.safetensors"))[0]
    f.write_bytes(struct.pack("<Q", 10) + b"not json!!")
    one_line_exit_2(capsys, sample.main, ["--checkpoint", str(d), "--prompt", "hi"], f.name, "sample.py: error:")
    one_line_exit_2(capsys, ev.main, ["--checkpoint", str(d), "--data", str(world)], f.name, "eval.py: error:")


def test_eval_refuses_a_broken_test_image_in_one_line(world, tiny_ckpt, tmp_path, capsys):
    records = json.loads((world / "test" / "vqa.json").read_text())[:1]
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "vqa.json").write_text(json.dumps(records))
    image = tmp_path / records[0]["image"]
    image.parent.mkdir(parents=True)
    image.write_bytes(png()[:70])
    one_line_exit_2(capsys, ev.main, ["--checkpoint", str(tiny_ckpt), "--data", str(tmp_path), "--splits", "vqa"],
                    "eval.py: error:", "cannot decode the image")


def test_eval_test_images_stay_inside_the_world_folder(world, tiny_ckpt, tmp_path, capsys):
    """A test split naming ../outside.png (a readable image, one folder up) is refused, not read."""
    records = json.loads((world / "test" / "vqa.json").read_text())[:1]
    (tmp_path / "w" / "test").mkdir(parents=True)
    (tmp_path / "outside.png").write_bytes(png())
    (tmp_path / "w" / "test" / "vqa.json").write_text(json.dumps([dict(records[0], image="../outside.png")]))
    one_line_exit_2(capsys, ev.main, ["--checkpoint", str(tiny_ckpt), "--data", str(tmp_path / "w"), "--splits",
                                      "vqa"], "eval.py: error:", "leaves the image folder")
