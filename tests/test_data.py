"""data.py: readers on hand-written edge cases, the chat template's loss mask token by token, truncation,
mixtures (proportions, exact resume, ranks x workers), and every kind of bad input."""
import base64
import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import data
import datafiles
import formats
import images
import model
from reference import write_tokenizer
from tokenizer import DEFAULT_SYSTEM, Tokenizer, chat_prompt, extend_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(d, add_bos=True, vocab_size=300)
    t = Tokenizer.from_pretrained(d)
    extend_tokenizer(t)
    return t


@pytest.fixture(scope="module")
def config(tok):
    return model.preset("tiny", tokenizer=tok)


@pytest.fixture(scope="module")
def enc(tok, config):
    return data.Encoder(tok, config, max_len=4096)


def png(w=40, h=30, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return path

# -----------------------------------------------------------------------------
# the chat template and its loss mask


def runs(ids, labels):
    """The supervised runs of a sample: lists of consecutive ids with a label."""
    out, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != -100:
            assert lab == i
            cur.append(i)
        elif cur:
            out, cur = out + [cur], []
    return out + ([cur] if cur else [])


def answer_ids(tok, text):
    """What an answer is inside the whole text: its pieces without the dummy prefix, then <|end|>."""
    return tok.sp.encode(text.replace(" ", "▁")) + [tok.token_to_id("<|end|>")]


CONVERSATIONS = {
    "single-turn": ([("user", "<image>\nWhat colour is the circle?"), ("assistant", "It is red.")], 1),
    "multi-turn": ([("user", "<image>\nHow many shapes?"), ("assistant", "3"), ("user", "Which is biggest?"),
                    ("assistant", "the blue square")], 1),
    "multi-image": ([("user", "<image>\n<image>\nWhich has more shapes?"), ("assistant", "the first")], 2),
    "text-only": ([("user", "What is 12 + 7?"), ("assistant", "19")], 0),
    "system": ([("system", "You count shapes."), ("user", "<image>\ncount"), ("assistant", "two")], 1),
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_loss_mask_token_by_token(enc, tok, name):
    turns, n_images = CONVERSATIONS[name]
    ids, labels = enc.chat(turns, n_images, "x")
    system = turns[0][1] if turns[0][0] == "system" else DEFAULT_SYSTEM
    text = chat_prompt([t for r, t in turns if r != "system"], system).removesuffix("<|assistant|>\n")
    assert ids == tok.encode(text)  # one encode of the whole text: no re-tokenization mismatch possible
    answers = [t for r, t in turns if r == "assistant"]
    assert runs(ids, labels) == [answer_ids(tok, a) for a in answers]
    image_id = tok.token_to_id("<image>")
    assert ids.count(image_id) == n_images and all(lab != image_id for lab in labels)


def test_single_image_without_marker_goes_first(enc):
    ids, _ = enc.chat([("user", "What is it?"), ("assistant", "a cat")], 1, "x")
    with_marker, _ = enc.chat([("user", "<image>\nWhat is it?"), ("assistant", "a cat")], 1, "x")
    assert ids == with_marker


@pytest.mark.parametrize("turns, n, reason", [
    ([("user", "<image>\n<image>\nhi"), ("assistant", "yo")], 1, "marker mismatch"),
    ([("user", "<image>\nhi"), ("assistant", "yo")], 0, "marker mismatch"),
    ([("user", "hi")], 0, "empty conversation"),
    ([("user", "hi"), ("assistant", "  ")], 0, "empty conversation"),
    ([], 0, "empty conversation"),
])
def test_bad_conversations_are_named(enc, turns, n, reason):
    with pytest.raises(data.BadSample, match="sample.json\\[7\\]") as e:
        enc.chat(turns, n, "sample.json[7]")
    assert e.value.reason == reason


def test_truncation_keeps_image_blocks_whole(enc, tok, config):
    img = Image.open(io.BytesIO(png(40, 30)))
    block = config.image_tokens(img.size)
    turns = [("user", "<image>\nfirst <image>\nsecond"), ("assistant", "an answer long enough to keep " * 3)]
    ids, labels = enc.chat(turns, 2, "x")
    head, second = [i for i, t in enumerate(ids) if t == tok.token_to_id("<image>")]
    small = data.Encoder(tok, config, max_len=second - 1 + block + block // 2)  # the cut falls in image 2
    with pytest.raises(data.BadSample, match="nothing to learn") as e:  # cut before any answer token
        small.sample(ids, labels, [img, img], "x")
    assert e.value.reason == "too long"
    turns = [("user", "<image>\nfirst"), ("assistant", "a long answer " * 8), ("user", "<image>\nsecond"),
             ("assistant", "b")]
    ids, labels = enc.chat(turns, 2, "x")
    second = [i for i, t in enumerate(ids) if t == tok.token_to_id("<image>")][1]
    budget = second - 1 + block + block // 2  # room for the first block and half of the second
    s = data.Encoder(tok, config, max_len=budget).sample(ids, labels, [img, img], "x")
    kept = config.expand_images(ids[:second], [img.size])  # text and image 1, its <image> expanded to its block
    assert len(s["images"]) == 1 and s["input_ids"] == kept and s["length"] == len(kept) == second - 1 + block


def test_pretraining_text_labels(enc, tok):
    record = {"text": "<image>a red circle<|endofchunk|><|endoftext|>", "images": [png()], "where": "x"}
    s = enc(record)
    image_id = tok.token_to_id("<image>")
    assert s["labels"] == [-100 if i in (image_id, tok.bos_id) else i for i in s["input_ids"]] and len(s["images"]) == 1
    assert s["input_ids"][-2:] == [tok.token_to_id("<|endofchunk|>"), tok.eos_id]

# -----------------------------------------------------------------------------
# readers


def test_brace_expansion():
    assert datafiles.expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert datafiles.expand_braces("{a,b}/x-{8..10}.tar") == ["a/x-8.tar", "a/x-9.tar", "a/x-10.tar", "b/x-8.tar",
                                                          "b/x-9.tar", "b/x-10.tar"]
    assert datafiles.expand_braces("plain.tar") == ["plain.tar"]


def test_caption_shards(tmp_path, enc, tok):
    write_tar(tmp_path / "c-000.tar", [("a.png", png()), ("a.txt", b"a red circle"),
                                        ("sub/b.jpg", png(20, 20)), ("sub/b.json", b'{"caption": "two squares"}')])
    write_tar(tmp_path / "c-001.tar", [("c.webp", png()), ("c.txt", b""), ("../evil.txt", b"x"),
                                        ("d.txt", b"no image"), ("e.png", b"not a png"), ("e.txt", b"broken")])
    src = formats.open_source({"type": "captions", "path": "c-{000..001}.tar"}, tmp_path, "<|endoftext|>")
    assert len(src) == 6 and formats.sniff(tmp_path / "c-{000..001}.tar") == "captions"
    first = src.record(0)
    assert first["text"] == "<image>a red circle<|endofchunk|><|endoftext|>" and first["where"].endswith("c-000.tar:a")
    assert src.record(1)["text"].startswith("<image>two squares")
    problems = {}
    for i in range(2, 6):
        try:
            enc(src.record(i))
        except data.BadSample as e:
            problems[e.reason] = str(e)
    assert set(problems) == {"missing text", "unsafe member", "missing image", "bad image"}
    assert "c-001.tar" in problems["unsafe member"] and "../evil.txt" in problems["unsafe member"]
    assert "c-001.tar:e" in problems["bad image"]


def test_interleaved_tar_members_base64_and_jsonl(tmp_path, enc, tok):
    b64 = base64.b64encode(png(30, 30, 2)).decode()
    doc1 = {"texts": ["Intro.", None, "The red circle.", None, "The blue square."],
            "images": [None, "d1.0.png", None, "d1.1.png", None]}
    doc2 = {"texts": [None, "a caption"], "images": ["data:image/png;base64," + b64, None]}
    doc3 = {"texts": [None, "x", None, "y", None, "z"], "images": ["d3.0.png", None, "d3.1.png", None, "d3.2.png", None]}
    write_tar(tmp_path / "d.tar", [("d1.json", json.dumps(doc1).encode()), ("d1.0.png", png()), ("d1.1.png", png(seed=1)),
                                   ("d2.json", json.dumps(doc2).encode()),
                                   ("d3.json", json.dumps(doc3).encode())] + [(f"d3.{k}.png", png()) for k in range(3)])
    src = formats.open_source({"type": "interleaved", "path": "d.tar", "max_images": 2}, tmp_path, "<|endoftext|>")
    r = src.record(0)
    assert r["text"] == ("Intro.<image>The red circle.<|endofchunk|><image>The blue square.<|endofchunk|>"
                         "<|endoftext|>") and len(r["images"]) == 2
    assert enc(r)["input_ids"].count(tok.token_to_id("<|endofchunk|>")) == 2
    assert src.record(1)["text"] == "<image>a caption<|endofchunk|><|endoftext|>"
    assert src.record(2)["text"] == "<image>x<|endofchunk|><image>y<|endofchunk|><|endoftext|>"  # capped at 2
    (tmp_path / "img.png").write_bytes(png())
    (tmp_path / "docs.jsonl").write_text(json.dumps({"texts": [None, "hello"], "images": ["img.png", None]}) + "\n{oops\n")
    jl = formats.open_source({"type": "interleaved", "path": "docs.jsonl"}, tmp_path, "<|endoftext|>")
    assert formats.sniff(tmp_path / "d.tar") == formats.sniff(tmp_path / "docs.jsonl") == "interleaved"
    assert len(enc(jl.record(0))["images"]) == 1
    with pytest.raises(data.BadSample, match=r"docs\.jsonl:2: malformed JSON"):
        jl.record(1)


def test_llava_json(tmp_path, enc, tok):
    (tmp_path / "imgs").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "imgs" / name).write_bytes(png())
    rows = [{"id": "1", "image": "a.png", "conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "A."}]},
            {"id": "2", "image": ["a.png", "b.png"], "conversations": [
                {"from": "human", "value": "<image> and <image>?"}, {"from": "gpt", "value": "Both."}]},
            {"id": "3", "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "1+1?"},
                                          {"from": "gpt", "value": "2"}]},
            {"id": "4", "image": "missing.png", "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "!"}]},
            {"id": "5", "image": "a.png", "conversations": [{"from": "robot", "value": "?"}]}]
    (tmp_path / "sft.json").write_text(json.dumps(rows))
    src = data.open_sources(tmp_path / "sft.json", "<|endoftext|>", image_folder=tmp_path / "imgs")[0][0]
    assert formats.sniff(tmp_path / "sft.json") == "llava"
    s = [enc(src.record(i)) for i in range(3)]
    assert [len(x["images"]) for x in s] == [1, 2, 0]
    text = tok.decode(s[2]["input_ids"])
    assert "<|system|>Be brief.<|end|>" in text and DEFAULT_SYSTEM not in text  # the row's system prompt wins
    with pytest.raises(data.BadSample, match=r"sft\.json\[3\] id=4: image file .*missing\.png does not exist"):
        enc(src.record(3))
    with pytest.raises(data.BadSample, match=r"id=5: turn .* needs 'from'"):
        enc(src.record(4))


def vlf_row(i, ratings, responses=None):
    responses = responses or [f"response {k}" for k in range(len(ratings))]
    comp = [{"model": "m", "response": r, "annotations": {a: {"Rating": v, "Rationale": ""} for a, v in
            zip(["Helpfulness", "Ethical Considerations", "Visual Faithfulness"], rs)}} for r, rs in zip(responses, ratings)]
    return {"id": i, "prompt": "Describe it.", "img_path": "a.png", "completions": comp}


def test_vlfeedback_pairs_and_counts(tmp_path, enc, tok):
    (tmp_path / "a.png").write_bytes(png())
    rows = [vlf_row(0, [("5", "5", "4"), ("2", "3", "1"), ("4", "4", "4")]),   # best 0, worst 1
            vlf_row(1, [("3", "3", "3"), ("3", "3", "3")]),                      # tie
            vlf_row(2, [("N/A", "3", "3"), ("4", "4", "4"), ("1", "1", "1")]),   # one unparsable: still a pair
            vlf_row(3, [("2", "2", "2"), ("1", "1", "1")]),                      # below min_score 3
            vlf_row(4, [("5", "5", "5"), ("1", "1", "1")], ["same", "same"])]    # chosen == rejected
    (tmp_path / "vlf.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    src = formats.open_source({"type": "vlfeedback", "path": "vlf.jsonl", "min_score": 3}, tmp_path, "")
    assert formats.sniff(tmp_path / "vlf.jsonl") == "vlfeedback"
    assert src.counts == Counter({"rows": 5, "pairs": 3, "tie": 1, "unparsable rating": 1, "below min_score": 1})
    p = src.record(0)
    assert (p["chosen"], p["rejected"]) == ("response 0", "response 1") and p["turns"][0][1] == "Describe it."
    s = enc(p)
    prompt = enc.chat([("user", "<image>\nDescribe it."), ("assistant", "response 0")], 1, "x")[0]
    assert s["chosen"]["input_ids"] == enc.config.expand_images(prompt, [(40, 30)])  # the image goes first
    assert runs(s["chosen"]["input_ids"], s["chosen"]["labels"]) == [answer_ids(tok, "response 0")]
    n = len(s["chosen"]["input_ids"]) - len(answer_ids(tok, "response 0"))
    assert s["chosen"]["input_ids"][:n] == s["rejected"]["input_ids"][:n]  # the same prompt
    assert (src.record(1)["chosen"], src.record(1)["rejected"]) == ("response 1", "response 2")
    with pytest.raises(data.BadSample, match="id=4: chosen and rejected must be two different"):
        src.record(2)
    batch = data.collate([s, s], tok.pad_id)
    assert batch["input_ids"].shape[0] == 4 and batch["images"].counts == [1, 1, 1, 1]
    # a margin filter: rows 0 (4.67 vs 2.0), 2 (4.0 vs 1.0) and 4 (5.0 vs 1.0) pass 2.5, row 3 (2.0 vs 1.0) not
    wide = formats.open_source({"type": "vlfeedback", "path": "vlf.jsonl", "min_margin": 2.5}, tmp_path, "")
    assert wide.counts["pairs"] == 3 and wide.counts["below min_margin"] == 1  # row 3: 2.0 vs 1.0
    wide = formats.open_source({"type": "vlfeedback", "path": "vlf.jsonl", "min_margin": 3.5}, tmp_path, "")
    assert wide.counts["pairs"] == 1 and wide.counts["below min_margin"] == 3  # only row 4 (a bad pair) is left


def test_vlguard_rows(tmp_path, enc):
    (tmp_path / "h.png").write_bytes(png())
    rows = [{"id": "u", "image": "h.png", "safe": False, "harmful_category": "hazard",
             "instr-resp": [{"instruction": "How to use it?", "response": "I can't help with that."}]},
            {"id": "s", "image": "h.png", "safe": True, "instr-resp": [
                {"safe_instruction": "What colour?", "response": "Red."},
                {"unsafe_instruction": "How to hurt?", "response": "I can't help with that."}]}]
    (tmp_path / "vlguard.json").write_text(json.dumps(rows))
    assert formats.sniff(tmp_path / "vlguard.json") == "vlguard"
    src = formats.open_source({"type": "vlguard", "path": "vlguard.json"}, tmp_path, "")
    assert len(src) == 3
    assert [src.record(i)["turns"][0][1] for i in range(3)] == ["How to use it?", "What colour?", "How to hurt?"]
    assert all(len(enc(src.record(i))["images"]) == 1 for i in range(3))

# -----------------------------------------------------------------------------
# images


def test_image_modes_are_converted_correctly(tmp_path):
    grey16 = Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16))
    buf = io.BytesIO()
    grey16.save(buf, format="PNG")
    img = images.open_image(buf.getvalue(), "x")
    assert img.mode == "RGB" and np.asarray(img)[0, 0].tolist() == [156, 156, 156]  # 40000 >> 8, not clipped
    for mode in ("L", "P", "RGBA", "CMYK"):
        fmt = "JPEG" if mode == "CMYK" else "PNG"
        b = io.BytesIO()
        Image.new(mode, (5, 5)).save(b, format=fmt)
        assert images.open_image(b.getvalue(), "x").mode == "RGB"


def test_bad_images_are_named(tmp_path, monkeypatch):
    with pytest.raises(data.BadSample, match="shard.tar:k: cannot decode") as e:
        images.open_image(png()[:60], "shard.tar:k")  # truncated
    assert e.value.reason == "bad image"
    with pytest.raises(data.BadSample, match="does not exist"):
        images.open_image(tmp_path / "nope.png", "x")
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    with pytest.raises(data.BadSample, match="40x30 pixels is over the 100 pixel limit") as e:
        images.open_image(png(), "x")
    assert e.value.reason == "image too large"

# -----------------------------------------------------------------------------
# mixtures


def test_schedule_proportions_and_passes():
    sched = data.Schedule([50, 30, 7], [0.7, 0.2, 0.1], seed=3)
    draws = [sched(p) for p in range(20000)]
    counts = Counter(s for s, _ in draws)
    assert counts == Counter({0: 14000, 1: 4000, 2: 2000})  # exact per block of 1000
    for s, size in enumerate([50, 30, 7]):  # every pass over a source is a permutation of it
        seq = [i for t, i in draws if t == s]
        for k in range(len(seq) // size):
            assert sorted(seq[k * size: (k + 1) * size]) == list(range(size))
    assert [sched(p) for p in range(50)] != [data.Schedule([50, 30, 7], [0.7, 0.2, 0.1], seed=4)(p) for p in range(50)]


class Numbers(formats.Source):
    """A source of n text-only samples whose record says which item it is."""

    def __init__(self, n, name="numbers", bad=()):
        super().__init__(name, list(range(n)))
        self.bad = set(bad)

    def load(self, i, _):
        if i in self.bad:
            raise data.BadSample(f"{self.name}[{i}]", "broken on purpose", "broken")
        return {"turns": [("user", f"item {i}?"), ("assistant", f"{i}")], "images": [], "where": f"{self.name}[{i}]"}


def test_resume_is_exact(enc, tok):
    def batches(start, n):
        mix = data.Mixture([(Numbers(40), 1.0), (Numbers(9, "other"), 1.0)], enc, 4, tok.pad_id, seed=1, start_batch=start)
        it = iter(mix)
        return [next(it) for _ in range(n)]
    full, resumed = batches(0, 8), batches(5, 3)
    for a, b in zip(full[5:], resumed):
        assert a["where"] == b["where"] and torch.equal(a["input_ids"], b["input_ids"]) and a["batch_index"] == b["batch_index"]


def test_two_ranks_two_workers_cover_an_epoch_once(enc, tok):
    n, B = 48, 3
    seen = []
    for rank in range(2):
        mix = data.Mixture([(Numbers(n), 1.0)], enc, B, tok.pad_id, seed=5, rank=rank, world=2)
        dl = data.loader(mix, num_workers=2, prefetch=2)
        it = iter(dl)
        got = [next(it) for _ in range(n // (B * 2))]
        assert [b["batch_index"] for b in got] == list(range(len(got)))  # in order, whichever worker built it
        seen += [w for b in got for w in b["where"]]
        del it, dl
    assert sorted(seen) == sorted(f"numbers[{i}]" for i in range(n))


class Ragged(Numbers):
    """Numbers whose answers differ a lot in length (item i: i words)."""

    def load(self, i, _):
        return {"turns": [("user", "count?"), ("assistant", " ".join(["one"] * (1 + i)))], "images": [],
                "where": f"{self.name}[{i}]"}


def test_length_groups_same_samples_less_padding_exact_resume(enc, tok):
    """G = 4: each group of 4 batches holds the same samples as without grouping, sorted into batches of
    similar length (less padding); a resumed run and two workers give the same batches."""
    def batches(group, start=0, n=8, workers=0):
        mix = data.Mixture([(Ragged(64), 1.0)], enc, 4, tok.pad_id, seed=2, start_batch=start, group=group)
        it = iter(data.loader(mix, num_workers=workers, prefetch=2) if workers else mix)
        return [next(it) for _ in range(n)]
    plain, grouped = batches(1), batches(4)
    for g in range(2):
        assert sorted(w for b in plain[4 * g:4 * g + 4] for w in b["where"]) == \
            sorted(w for b in grouped[4 * g:4 * g + 4] for w in b["where"])
    fill = [sum(b["tokens"] for b in bs) / sum(b["positions"] for b in bs) for bs in (plain, grouped)]
    assert fill[1] > fill[0] + 0.1, fill  # 79% -> 92% here
    for a, b in zip(grouped[6:], batches(4, start=6, n=2)):  # resuming inside a group
        assert a["where"] == b["where"] and torch.equal(a["input_ids"], b["input_ids"])
    assert [b["where"] for b in batches(4, workers=2)] == [b["where"] for b in grouped]


def test_bad_samples_strict_and_training_mode(enc, tok):
    src = Numbers(20, bad={3, 4, 5})
    with pytest.raises(data.BadSample, match=r"numbers\[\d\]: broken on purpose"):
        for b in iter(data.Mixture([(src, 1.0)], enc, 20, tok.pad_id, strict=True)):
            break
    batch = next(iter(data.Mixture([(src, 1.0)], enc, 20, tok.pad_id)))
    assert batch["bad"] == Counter({"broken": 3}) and batch["input_ids"].shape[0] == 17 and batch["samples"] == 20
    tally = data.Tally(max_bad_fraction=0.1, min_seen=30)
    tally.update(20, batch["bad"])  # 15%, but too few seen to judge
    with pytest.raises(RuntimeError, match=r"6 of 40 samples were bad \(broken: 6\)"):
        tally.update(20, batch["bad"])


# -----------------------------------------------------------------------------
# the toy world, read by every reader


# `world`: conftest.py's shared toy world


@pytest.mark.parametrize("mixture", ["pretrain", "sft", "interleave", "safety", "dpo", "sft_conversational"])
def test_toy_world_reads_strictly(world, mixture):
    tok = Tokenizer.from_pretrained(world / "tokenizer")
    extend_tokenizer(tok)
    enc = data.Encoder(tok, model.preset("tiny", tokenizer=tok), max_len=2048)
    sources = data.open_sources(world / "mixtures" / f"{mixture}.json", tok.id_to_token(tok.eos_id))
    kinds = Counter()
    for src, _ in sources:
        for i in range(len(src)):  # strict: any bad sample fails the test
            s = enc(src.record(i))
            for row in ([s["chosen"], s["rejected"]] if "chosen" in s else [s]):
                assert any(lab != -100 for lab in row["labels"])
                blocks = [enc.config.image_tokens(size) for _, size, _ in row["images"]]
                assert row["input_ids"].count(enc.image_id) == sum(blocks)  # each <image> expanded to its block
                kinds[len(row["images"])] += 1
    assert kinds  # something was read
    if mixture in ("interleave", "pretrain"):
        assert max(kinds) >= 2  # multi-image samples
    batch = next(iter(data.Mixture(sources, enc, 4, tok.pad_id, strict=True)))
    m_inputs = batch["images"]
    assert batch["input_ids"].shape[0] == (8 if mixture == "dpo" else 4) and len(m_inputs.counts) == batch["input_ids"].shape[0]


def test_a_toy_batch_trains_the_model(world):
    tok = Tokenizer.from_pretrained(world / "tokenizer")
    extend_tokenizer(tok)
    cfg = model.preset("tiny", tokenizer=tok)
    enc = data.Encoder(tok, cfg, max_len=1024)
    mix = data.Mixture(data.open_sources(world / "mixtures" / "interleave.json", tok.id_to_token(tok.eos_id)), enc,
                       4, tok.pad_id, strict=True)
    batch = next(iter(mix))
    torch.manual_seed(0)
    m = model.XGenMM(cfg)
    loss = m(batch["input_ids"], batch["images"], batch["attention_mask"], labels=batch["labels"])
    loss.backward()
    assert torch.isfinite(loss) and m.vision_tokenizer.latents.grad.abs().sum() > 0


def test_mixture_paths_are_relative_to_the_config(tmp_path, enc):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png())
    (tmp_path / "sets").mkdir()
    rows = [{"id": "1", "image": "a.png", "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "!"}]}]
    (tmp_path / "sets" / "sft.json").write_text(json.dumps(rows))
    (tmp_path / "configs" / "deep").mkdir(parents=True)
    mix = {"sources": [{"name": "s", "type": "llava", "path": "../../sets/sft.json", "image_folder": "../../imgs"}]}
    (tmp_path / "configs" / "deep" / "mix.json").write_text(json.dumps(mix))
    src = data.open_sources(tmp_path / "configs" / "deep" / "mix.json", "<|endoftext|>")[0][0]
    r = src.record(0)
    assert r["images"] == [tmp_path / "imgs" / "a.png"] and "configs" not in r["where"]
    assert len(enc(r)["images"]) == 1


def test_show_marks_the_supervised_tokens_and_the_image_blocks(world, capsys):
    data.main(["show", "--data", str(world / "mixtures" / "pretrain.json"), "--n", "1"])
    out = capsys.readouterr().out
    assert "== " in out and "[[" in out and "]]" in out
    assert "<image>x" in out  # an expanded block of image positions prints as one <image>xN


@pytest.mark.parametrize("content, says", [
    ('{"sources": [\n  {"name": "a", "type": "llava" "path": "x.json"}]}', "not valid JSON"),
    ('{"name": "no sources here"}', "needs a non-empty 'sources' list"),
    ('{"sources": [{"name": "a", "type": "llava"}]}', "source 0 needs a 'path'"),
    ('{"sources": [{"name": "a", "type": "nope", "path": "x.json"}]}', "unknown type 'nope'"),
])
def test_a_broken_mixture_config_is_one_line_naming_the_file(world, tmp_path, capsys, content, says):
    bad = tmp_path / "mix.json"
    bad.write_text(content)
    with pytest.raises(SystemExit) as e:
        data.main(["show", "--data", str(bad), "--tokenizer", str(world / "tokenizer")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and str(bad) in err and says in err, err
