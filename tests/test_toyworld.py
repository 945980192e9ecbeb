"""The toy world: byte-determinism, every format parses, text agrees with pixels, held-out splits, the tokenizer."""
import base64
import hashlib
import io
import json
import re
import tarfile
from collections import defaultdict

import pytest
from PIL import Image

import tokenizer
from toy import scenes, toytokenizer, toyworld

GRID = 0.05


def files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def load(out, rel):
    text = (out / rel).read_text()
    return [json.loads(line) for line in text.splitlines()] if rel.endswith(".jsonl") else json.loads(text)


def tar_samples(path):
    """{key: {ext: bytes}} with the webdataset convention (key = name up to the first dot)."""
    samples = defaultdict(dict)
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, _, ext = m.name.partition(".")
            samples[key][ext] = tf.extractfile(m).read()
    return samples


def png(data):
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    return img.convert("RGB")


def expand(pattern):  # "a-{000..002}.tar" -> three names (the mixture convention)
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    width = len(m.group(1))
    return [pattern[:m.start()] + str(i).zfill(width) + pattern[m.end():]
            for i in range(int(m.group(1)), int(m.group(2)) + 1)]


def test_same_seed_same_bytes_other_seed_differs(world, tmp_path):
    toyworld.main(["--out", str(tmp_path / "again")])
    toyworld.main(["--out", str(tmp_path / "seed1"), "--seed", "1"])
    ours, again, other = files(world), files(tmp_path / "again"), files(tmp_path / "seed1")
    assert sorted(ours) == sorted(again)
    assert [name for name in ours if ours[name] != again[name]] == []
    picture = min(n for n in ours if n.startswith("images/sft/") and n in other)  # an SFT picture in both worlds
    for name in ("captions/shard-000.tar", "interleaved/docs-001.tar", "sft/llava_sft.json", "dpo/vlfeedback.jsonl",
                 "safety/vlguard_train.json", "test/vqa.json", picture, "tokenizer/tokenizer.model"):
        assert other[name] != ours[name], name


def test_every_counted_file_exists_with_its_count(world):
    info = load(world, "world.json")
    assert info["image_folder"] == "." and info["size"] == "small" and info["seed"] == 0
    assert len(info["counts"]) >= 20
    for rel, n in info["counts"].items():
        if rel.endswith(".tar"):
            assert len(tar_samples(world / rel)) == n, rel
        else:
            assert len(load(world, rel)) == n, rel
    assert len(list((world / "images").rglob("*.png"))) == info["images"]


def test_caption_shards(world):
    kinds = defaultdict(int)
    for path in sorted((world / "captions").glob("shard-*.tar")):
        with tarfile.open(path) as tf:
            members = tf.getmembers()
        assert [m.name for m in members] == sorted(m.name for m in members)
        assert all((m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644) for m in members)
        for key, sample in tar_samples(path).items():
            assert set(sample) in ({"png", "txt"}, {"png", "json"}), (path, key)
            png(sample["png"])
            if "json" in sample:
                meta = json.loads(sample["json"])
                kinds[meta["kind"]] += 1
                assert meta["caption"].strip()
                if meta["kind"] == "ocr":
                    box = r"\[\d\.\d\d, \d\.\d\d\]"
                    assert re.match(rf'<ocr>"[A-Z0-9]+</ocr> {box}{box} There ', meta["caption"])
                else:
                    assert re.search(r"<bbox>\d\.\d\d, \d\.\d\d, \d\.\d\d, \d\.\d\d</bbox>", meta["caption"])
            else:
                kinds["dense"] += 1
                assert sample["txt"].decode().startswith("There ")
    assert min(kinds["dense"], kinds["ocr"], kinds["grounding"]) > 10, kinds


def check_document(doc, exists):
    texts, images = doc["texts"], doc["images"]
    assert len(texts) == len(images) and sum(i is not None for i in images) >= 2
    assert all((t is None) != (i is None) for t, i in zip(texts, images))
    for i, ref in enumerate(images):
        if ref is not None:
            assert texts[i + 1] is not None  # an image is followed by its text
            exists(ref)


def test_interleaved_documents(world):
    shards = sorted((world / "interleaved").glob("docs-*.tar"))
    embedded = 0
    for path in shards:
        samples = tar_samples(path)
        names = {f"{key}.{ext}" for key, s in samples.items() for ext in s}
        for key, sample in samples.items():
            def exists(ref):
                nonlocal embedded
                if ref.startswith("data:image/png;base64,"):
                    embedded += 1
                    png(base64.b64decode(ref.partition(",")[2], validate=True))
                else:
                    assert ref in names, (path, ref)
                    png(samples[ref.split(".")[0]][ref.partition(".")[2]])
            check_document(json.loads(sample["json"]), exists)
        is_last = path == shards[-1]
        assert all(set(s) == {"json"} for s in samples.values()) == is_last  # only the last shard embeds
    assert embedded > 0
    docs = load(world, "interleaved/docs.jsonl")
    for doc in docs:
        check_document(doc, lambda ref: png((world / ref).read_bytes()))
    qa = [t for d in docs for t in d["texts"] if t and t.startswith("Q: ")]
    assert qa and all(re.fullmatch(r"Q: .+\? A: .+|Q: .+\. A: .+", t) for t in qa)


def image_list(rec):
    return [] if "image" not in rec else [rec["image"]] if isinstance(rec["image"], str) else rec["image"]


def check_llava(world, records):
    for r in records:
        conv, images = r["conversations"], image_list(r)
        roles = [t["from"] for t in conv if t["from"] != "system"]
        assert roles == ["human", "gpt"] * (len(roles) // 2) and roles, r["id"]
        assert sum(t["value"].count("<image>") for t in conv if t["from"] == "human") == len(images), r["id"]
        first = next(t for t in conv if t["from"] == "human")["value"]
        assert first.count("<image>") == len(images)  # markers all in the first human turn
        if len(images) == 1:
            assert first.startswith("<image>\n")
        for p in images:
            png((world / p).read_bytes())


def test_sft_files_are_llava_records(world):
    sft = load(world, "sft/llava_sft.json")
    check_llava(world, sft)
    turns = [len(r["conversations"]) // 2 for r in sft if "image" in r and
             r["conversations"][-2]["value"].removeprefix("<image>\n") not in scenes.CAPTION_PROMPTS]
    assert sum(turns) / len(turns) > 2.5  # several questions per image (each a lesson for the same image)
    text_only = [r for r in sft if "image" not in r]
    assert 0.05 < len(text_only) / len(sft) < 0.35
    assert load(world, "sft/text_diverse.json") == text_only
    assert load(world, "sft/llava_images.json") == [r for r in sft if "image" in r]
    assert any(r["conversations"][0]["from"] == "system" for r in sft)
    assert any(len(r["conversations"]) >= 4 for r in sft)  # multi-turn
    chat = load(world, "sft/text_conversational.json")
    check_llava(world, chat)
    assert len(chat) == len(text_only)
    multi = load(world, "sft/llava_interleave.json")
    check_llava(world, multi)
    assert all(len(image_list(r)) >= 2 for r in multi)


def test_no_question_is_answered_by_an_earlier_turn():
    """A conversation's later questions keep clear of what its earlier turns said: "Is there a red circle?"
    after "Where is the red circle?" could be answered from the chat instead of the picture (a model taught on
    that learns to read the chat). Later existence questions are Yes as often as No; a chat holds one count at
    most, as its last question ("How many red shapes?" 0 answers "Is there a red circle?"); multi-image chats
    hold one count at most (two give the total and which has more away)."""
    s, later = scenes.Sampler(0, 99), defaultdict(int)
    for _ in range(600):
        scene = s.scene()
        if not scene.objects:
            continue
        turns = s.questions(scene, s.pick(scenes.VQA + ("grounding",)), 4)
        said = ""
        for q, a in turns:
            named = re.search(r"(?:Is there a|Where is the|bounding box of the) (\w+ \w+)[?.]", q)
            if named:
                assert named.group(1) not in said, (turns, q)
            colour_of = re.match(r"What colour is the (\w+)", q)
            if colour_of:
                assert f"{a} {colour_of.group(1)}" not in said, (turns, q)
            if q.startswith("Is there") and said:
                later[a] += 1
            said += f" {q} {a}."
        counts = [k for k, (q, _) in enumerate(turns) if q.startswith("How many")]
        assert counts in ([], [len(turns) - 1]), turns
    assert later["Yes"] + later["No"] > 200 and 0.4 < later["Yes"] / (later["Yes"] + later["No"]) < 0.6, later
    counts = ("How many shapes are there", "Which image has more shapes?")
    for _ in range(300):
        task = s.pick(toyworld.MULTI)
        pair, q, a = s.multi(task)
        if len(pair) == 2:
            asked = [q] + [t for t, _ in s.about_pair(*pair, 2, q)]
            assert sum(any(c in t for c in counts) for t in asked) <= 1, asked
            assert len(set(asked)) == len(asked)


def test_vlfeedback_and_pairs(world):
    rows, ties, unparsable = load(world, "dpo/vlfeedback.jsonl"), 0, 0
    for row in rows:
        assert set(row) == {"id", "prompt", "img_path", "completions"} and 3 <= len(row["completions"]) <= 4
        png((world / row["img_path"]).read_bytes())
        means = []
        for c in row["completions"]:
            assert set(c["annotations"]) == {"Helpfulness", "Ethical Considerations", "Visual Faithfulness"}
            ratings = [a["Rating"] for a in c["annotations"].values()]
            assert all(isinstance(x, str) for x in ratings)
            unparsable += sum(not x.isdigit() for x in ratings)
            means.append(sum(int(x) for x in ratings if x.isdigit()) / max(1, sum(x.isdigit() for x in ratings)))
        ties += len(set(means)) == 1
    assert unparsable > 0 and 0 < ties < len(rows) / 4
    for p in load(world, "dpo/pairs.jsonl"):
        assert set(p) == {"image", "prompt", "chosen", "rejected"} and p["chosen"] != p["rejected"]
        png((world / p["image"]).read_bytes())


def test_vlguard(world):
    rows = load(world, "safety/vlguard_train.json")
    assert {r["safe"] for r in rows} == {True, False}
    for r in rows:
        png((world / r["image"]).read_bytes())
        keys = [k for ir in r["instr-resp"] for k in ir if k != "response"]
        if r["safe"]:
            assert keys == ["safe_instruction", "unsafe_instruction"] and "harmful_category" not in r
            assert r["instr-resp"][1]["response"] in toyworld.HARM_REFUSALS
            assert r["instr-resp"][0]["response"] not in toyworld.HARM_REFUSALS + toyworld.HAZARD_REFUSALS
        else:
            assert keys == ["instruction"] and r["harmful_category"]
            assert r["instr-resp"][0]["response"] in toyworld.HAZARD_REFUSALS


SPLITS = ("vqa", "counting", "ocr", "ocr_small", "grounding", "multi_image", "captions", "safety", "fewshot",
          "arithmetic", "pope")


def test_test_splits_carry_task_and_answer(world):
    for split in SPLITS:
        records = load(world, f"test/{split}.json")
        assert len(records) == round(30 * toyworld.TEST_SHARE.get(split, 1)), split
        check_llava(world, records)
        for r in records:
            assert r["task"] and isinstance(r["answer"], str) and r["conversations"][-1]["value"] == r["answer"]
    vqa = load(world, "test/vqa.json")
    assert {r["task"] for r in vqa} == {"colour", "count", "position", "existence"}
    assert sum(r["task"] == "position" for r in vqa) == len(vqa) // 4  # a quarter per kind: 150 at medium size
    safety = load(world, "test/safety.json")
    assert {r["safe"] for r in safety} == {True, False} and all(r["answer"] == "" for r in safety)
    for r in load(world, "test/fewshot.json"):
        assert len(r["support"]) == 8 and r["question"] in r["conversations"][0]["value"]
        for s in r["support"]:
            assert s["answer"] and s["question"].endswith("?")
            png((world / s["image"]).read_bytes())
    for r in load(world, "test/arithmetic.json"):
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", r["conversations"][0]["value"]).groups()
        assert int(r["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))


def rederive(question, objects):
    """The answer to a VQA question, worked out from the record's object list alone."""
    def find(colour=None, shape=None, position=None):
        return [o for o in objects if colour in (None, o["colour"]) and shape in (None, o["shape"])
                and position in (None, o["position"])]
    if m := re.fullmatch(r"What colour is the (\w+)(?: (?:at|on|in) the (.+))?\?", question):
        (o,) = find(shape=m.group(1), position=m.group(2))
        return o["colour"]
    if question == "How many shapes are there?":
        return str(len(objects))
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        return str(len(find(colour=m.group(1))))
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return str(len(find(shape=m.group(1))))
    if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", question):
        (o,) = find(*m.groups())
        return o["position"]
    m = re.fullmatch(r"Is there a (\w+) (\w+)\?", question)
    return "Yes" if find(*m.groups()) else "No"


def test_pope_asks_about_absent_shapes_adversarially(world):
    """Half the pope split asks about an absent shape, and each absent one shares its colour or its shape with a
    shape that is there (POPE's adversarial setting); the other half about a present one."""
    records = load(world, "test/pope.json")
    assert [r["absent"] for r in records] == [i % 2 == 1 for i in range(len(records))]
    for r in records:
        colour, shape = re.fullmatch(r"<image>\nIs there a (\w+) (\w+)\?", r["conversations"][0]["value"]).groups()
        present = {(o["colour"], o["shape"]) for o in r["objects"]}
        assert ((colour, shape) not in present) == r["absent"] and r["answer"] == ("No" if r["absent"] else "Yes")
        if r["absent"]:
            assert any(colour == c or shape == s for c, s in present), r


def test_answers_agree_with_the_objects(world):
    for split in ("vqa", "counting", "pope"):
        for r in load(world, f"test/{split}.json"):
            question = r["conversations"][0]["value"].removeprefix("<image>\n")
            assert rederive(question, r["objects"]) == r["answer"], r
    for r in load(world, "test/captions.json"):
        assert all(f"a {o['size']} {o['colour']} {o['shape']}" in r["answer"] for o in r["objects"])
        assert r["answer"].count(" a ") + r["answer"].startswith("a ") >= len(r["objects"])
    for r in load(world, "test/grounding.json"):
        assert r["box"] in [o["box"] for o in r["objects"]]
        assert r["answer"] == "<bbox>" + ", ".join(f"{v:.2f}" for v in r["box"]) + "</bbox>"


def test_boxes_are_on_the_grid_and_match_the_pixels(world):
    checked = 0
    for split in ("vqa", "grounding", "captions", "ocr"):
        for r in load(world, f"test/{split}.json"):
            img = png((world / r["image"]).read_bytes())
            w, h = img.size
            for o in r["objects"]:
                x1, y1, x2, y2 = o["box"]
                assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
                assert all(abs(v / GRID - round(v / GRID)) < 1e-9 for v in o["box"])
                centre = img.getpixel((int((x1 + x2) / 2 * w), int((y1 + y2) / 2 * h)))
                assert centre == scenes.COLOURS[o["colour"]], (r["id"], o)
                checked += 1
    assert checked > 100


def ink_height(img, box):
    """Rows with dark (text) pixels inside a normalized box."""
    w, h = img.size
    x1, y1, x2, y2 = round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)
    rows = [y for y in range(y1, y2) if any(max(img.getpixel((x, y))) < 120 for x in range(x1, x2))]
    return rows[-1] - rows[0] + 1


def test_small_text_is_small_in_a_large_image(world):
    """Small text fills a 32-pixel patch of a crop but shrinks to under half a patch's height in one 96-pixel view
    of the whole image (fixed resolution); normal text keeps most of a patch in that view."""
    def in_fixed_view(r):
        img = png((world / r["image"]).read_bytes())
        return ink_height(img, r["box"]) * 96 / max(img.size), img.size, ink_height(img, r["box"])
    for r in load(world, "test/ocr_small.json"):
        fixed, size, ink = in_fixed_view(r)
        assert r["small_text"] and max(size) >= 192 and 20 <= ink <= 25 and fixed <= 12.5, (r["id"], size, ink)
    for r in load(world, "test/ocr.json"):
        fixed, size, ink = in_fixed_view(r)
        assert not r["small_text"] and max(size) <= 128 and fixed >= 16, (r["id"], size, ink)


def test_views_line_up_with_the_cells(world):
    """With the toy preset's grids, a square scene is one 96-pixel crop equal to its global view (each cell one
    patch in both: 2 x 16 vision tokens), and a tall sign of small text is a column of crops at scale 1."""
    import torch
    from images import load_image, preprocess
    from model import preset
    config = preset("toy")
    for r in load(world, "test/vqa.json")[:20]:
        img = load_image(world / r["image"])
        views, size, grid = preprocess(img, config)
        assert img.width == img.height and grid == (1, 1) and config.image_tokens(size) == 32
        assert torch.equal(views[0], views[1])
    for r in load(world, "test/ocr_small.json")[:10]:
        img = load_image(world / r["image"])
        views, size, grid = preprocess(img, config)
        assert grid == (1, img.height // 96) and img.width == 96  # crops cut the canvas as drawn
        for k in range(grid[1]):
            crop = preprocess(img.crop((0, 96 * k, 96, 96 * (k + 1))), config)[0][0]
            assert torch.equal(views[1 + k], crop)


def test_train_and_test_images_are_disjoint(world):
    def digest(data):
        return hashlib.sha1(png(data).tobytes()).hexdigest()  # pixels, not just file bytes
    test = {digest(p.read_bytes()) for p in (world / "images/test").rglob("*.png")}
    train = {digest(p.read_bytes()) for p in (world / "images").rglob("*.png") if "images/test/" not in p.as_posix()}
    for path in list((world / "captions").glob("*.tar")) + list((world / "interleaved").glob("*.tar")):
        train |= {digest(data) for s in tar_samples(path).values() for ext, data in s.items() if ext.endswith("png")}
    assert len(test) > 300 and len(train) > 600
    assert not test & train


def test_mixtures_resolve(world):
    names = sorted(p.stem for p in (world / "mixtures").glob("*.json"))
    assert {"pretrain", "sft", "interleave", "safety"} <= set(names)
    types = {"captions", "interleaved", "llava", "vlfeedback", "pairs", "vlguard"}
    for name in names:
        folder = world / "mixtures"
        for src in load(world, f"mixtures/{name}.json")["sources"]:
            assert src["type"] in types and src["weight"] > 0
            paths = expand(src["path"])
            assert all((folder / p).is_file() for p in paths), src
            if src["type"] in ("captions", "interleaved"):
                assert len(paths) == len(list((world / src["path"].split("/")[1]).glob("*.tar"))), src
            if "image_folder" in src:
                assert (folder / src["image_folder"]).resolve() == world.resolve()


def test_tokenizer_loads_round_trips_and_has_phi3_ids(world):
    tok = tokenizer.Tokenizer.from_pretrained(world / "tokenizer")
    n = tok.sp.get_piece_size()
    added = [c for c, _ in toytokenizer.PHI3_ADDED]
    assert [tok.token_to_id(c) for c in added] == list(range(n, n + 11)) and len(tok) == n + 11
    assert (tok.bos_id, tok.unk_id, tok.eos_id, tok.pad_id) == (1, 0, n, n) and tok.add_bos
    assert 900 <= n <= 1000
    rstrip = {t.content: t.rstrip for t in tok.added.values()}
    assert [rstrip[c] for c in added] == [r for _, r in toytokenizer.PHI3_ADDED]
    texts = [r["answer"] for r in load(world, "test/captions.json")] + ["What is 12 + 7?", "Spell CAT backwards."]
    for text in texts:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and tok.unk_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok.encode(texts[0])) < len(texts[0]) / 2  # the world's words are single pieces
    box = "<bbox>0.35, 0.05, 0.65, 1.00</bbox>"  # one piece per coordinate and per tag: 13 tokens, not 28
    ids = tok.encode(box)
    assert len(ids) == 14 and tok.decode(ids, skip_special_tokens=True) == box
    assert {"<bbox>", "0.35", "1.00"} <= {tok.sp.id_to_piece(i) for i in ids}
    ids = tok.encode("<|user|>\nHi<|end|>\n<|assistant|>\n")
    assert ids[1] == tok.token_to_id("<|user|>") and tok.token_to_id("<|assistant|>") == ids[-1]
