"""phi3.Tokenizer against transformers' AutoTokenizer on the same files (a SentencePiece model trained here)."""
import random

import pytest

import phi3
from tokenizer import TokenizerError
from reference import LSTRIP, PHI3_ADDED, XGENMM_ADDED, write_tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("google.protobuf")  # transformers needs protobuf to read tokenizer.model

TEXTS = [
    "<|system|>\nA chat between a curious user and an artificial intelligence assistant.<|end|>\n<|user|>\n"
    "<image>\nWhat is 12+345?<|end|>\n<|assistant|>\nIt is 357.<|end|>\n",
    "Hello<|end|>world", "Hello <|end|> world", "<|user|>  spaced out", "a<image>b<|endofchunk|>c",
    "<image>the red circle<|endofchunk|><image>a blue square<|endofchunk|><|endoftext|>",
    "<|user|><|assistant|>", "ends with a special<|end|>", "   <|end|>   ", "<s>bos in text</s>",
    "line one\nline two\n\n  indented\tand a tab\r\n", "\n\nleading newlines",
    "1234567890 3.14159 2026-11-26 +42", "Grüße aus Köln, 東京タワー, emoji 🦊🙂, Ωμέγα, naïve café",
    "a  b   c    d", "  leading spaces", "trailing spaces  ", "", " ", "literal ▁ metaspace",
    "look: <|placeholder1|> x <|placeholder5|>y", "<unk> and <pad> tokens",
    "a \t <|lstrip|> \n b", "x<|lstrip|>y", "<|end|>\x1cx<|end|>\x1f", "  \u3000<|lstrip|>\u00a0z",
]


@pytest.fixture(scope="module", params=[(False, True), (True, False)], ids=["xgenmm-nobos", "phi3-bos"])
def toks(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    add_bos, xgenmm = request.param
    write_tokenizer(d, add_bos=add_bos, xgenmm=xgenmm)
    return phi3.Tokenizer.from_pretrained(d), transformers.AutoTokenizer.from_pretrained(d), d


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_transformers(toks, text):
    ours, ref, _ = toks
    assert ours.encode(text) == ref.encode(text)


def test_random_text_equals_transformers(toks):
    ours, ref, _ = toks
    rng = random.Random(1)
    alphabet = list("abcdefghij ABC  \n\t0123456789.,!?-é東🙂\x1c\x1f\u00a0\u3000") + [
        "<|end|>", "<|user|>\n", "<image>", " the ", "<|lstrip|>"]
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert ours.encode(text) == ref.encode(text), repr(text)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_equals_transformers_and_round_trips(toks, text):
    ours, ref, _ = toks
    ids = ref.encode(text)
    assert ours.decode(ids) == ref.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    # lossy by design, as in the reference: rstrip tokens swallow whitespace, a leading space merges with the
    # dummy prefix that decoding drops, and a literal "▁" is a space
    lossy = any(t in text for t, r in PHI3_ADDED if r) or text.startswith(" ") or "▁" in text or LSTRIP in text
    if not lossy:
        assert ours.decode(ours.encode(text, bos=False)) == text


def test_decode_of_bytes_cut_mid_character_equals_transformers(toks):
    ours, ref, _ = toks
    ids = ref.encode("the 東京 🦊")
    byte_ids = [i for i in ids if ref.convert_ids_to_tokens(i).startswith("<0x")]
    assert len(byte_ids) >= 4  # the test model has no piece for these characters: byte fallback
    assert [i for i in ids if ours.is_byte(i)] == byte_ids
    for cut in range(1, len(ids)):  # every prefix, most of them ending inside a character
        assert ours.decode(ids[:cut]) == ref.decode(ids[:cut])
    assert ours.decode(byte_ids[1:3]) == ref.decode(byte_ids[1:3])


def test_special_ids_and_rstrip(toks):
    ours, ref, _ = toks
    assert ours.token_to_id("<|user|>") == ref.convert_tokens_to_ids("<|user|>")
    assert ours.eos_id == ref.eos_token_id and ours.bos_id == ref.bos_token_id == 1
    assert ours.pad_id == ref.pad_token_id
    ids = ours.encode("<|user|>\nWhat", bos=False)
    assert ids[0] == ours.token_to_id("<|user|>") and ours.decode(ids[1:]) == "What"
    assert ours.encode("<|user|>What", bos=False) == ids  # rstrip swallowed the newline
    kept = ours.encode("<|endoftext|>\nWhat", bos=False)  # rstrip false: the newline stays, as a byte piece
    assert ours.id_to_token(kept[1]) == "<0x0A>"
    assert len(ours) == len(ref)


def test_add_tokens_and_save_round_trip(tmp_path):
    n = write_tokenizer(tmp_path)
    tok = phi3.Tokenizer.from_pretrained(tmp_path)
    ids = tok.add_tokens(XGENMM_ADDED)
    assert ids == [n + 11 + k for k in range(4)] and tok.add_tokens(["<image>"]) == [n + 12]
    text = "<|user|>\n<image>\nhi<|end|>"
    assert tok.encode(text)[1] == ids[1]
    tok.save_pretrained(tmp_path / "saved")
    again = phi3.Tokenizer.from_pretrained(tmp_path / "saved")
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    for t in TEXTS:
        assert again.encode(t) == tok.encode(t) == ref.encode(t)


def test_missing_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.model: missing"):
        phi3.Tokenizer.from_pretrained(tmp_path)


def test_pickles_for_dataloader_workers(toks):
    import pickle
    ours, _, _ = toks
    again = pickle.loads(pickle.dumps(ours))
    assert all(again.encode(t) == ours.encode(t) for t in TEXTS) and len(again) == len(ours)
