"""
The Phi-3 / xGen-MM tokenizer: SentencePiece BPE with byte fallback, plus added tokens. Re-exported as
`phi3.Tokenizer`.

It reproduces the ids of the Hub tokenizer (transformers' `LlamaTokenizer` with `legacy: false`, which is
how Phi-3 ships):
- Text is first split on the added tokens (leftmost, longest match). A token marked `rstrip` swallows
  the whitespace after it, `lstrip` the whitespace before it (Phi-3 marks `<|user|>`, `<|end|>`, ... rstrip,
  so in "<|user|>\\nHi" the newline disappears).
- Each piece of text between added tokens is encoded by SentencePiece BPE with byte fallback. Only the
  piece at the very start of the text gets the dummy-prefix space "▁" (unless it already starts with a
  space); a piece after an added token does not.
- The reference runs BPE over each whole piece of text; SentencePiece would also pre-split it at spaces.
  So the SentencePiece model is loaded with two fields of its serialized config switched off
  (`add_dummy_prefix`, `split_by_whitespace`) by a 30-line edit of the protobuf wire format
  (sentencepiece_proto.py; the reference does the same edit with the protobuf package, which this project
  does not need).
- `<s>` is prepended when `add_bos_token` is true (Phi-3's current files say false).

Files read: tokenizer.model, tokenizer_config.json (added_tokens_decoder, add_bos_token, special
tokens), added_tokens.json, special_tokens_map.json.

Below the tokenizer, the text conventions every script shares, each written once: Phi-3's chat template
(with the character spans of the answers, which carry the loss), where image markers go when a prompt has
none, and padding a batch of id lists (docs/release.md §3).
"""
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import sentencepiece as spm
import torch

from sentencepiece_proto import ProtobufError, bare_model
from weights import read_json

# -----------------------------------------------------------------------------
# the tokenizer


class TokenizerError(ValueError):
    """Tokenizer files that cannot be read (a corrupt tokenizer.model, a tokenizer_config.json that is not
    JSON): the message names the file."""


@dataclass
class AddedToken:
    content: str
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = False
    single_word: bool = False


# what the reference (Rust's char::is_whitespace, Unicode White_Space) strips for lstrip/rstrip; Python's
# str.isspace() also counts U+001C..U+001F, which the reference keeps as text
WHITESPACE = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
                       + "".join(map(chr, range(0x2000, 0x200B))))


def _content(tok):
    return tok["content"] if isinstance(tok, dict) else tok


class Tokenizer:
    def __init__(self, model_bytes, added, bos="<s>", eos="</s>", unk="<unk>", pad=None, add_bos=True,
                 add_eos=False, legacy=False, add_prefix_space=True):
        self.model_bytes = model_bytes
        self.sp = bare_processor(model_bytes)
        self.added = dict(added)  # id -> AddedToken
        self.add_bos, self.add_eos, self.legacy, self.add_prefix_space = add_bos, add_eos, legacy, add_prefix_space
        self.names = {"bos": bos, "eos": eos, "unk": unk, "pad": pad}
        for name in (bos, eos, unk, pad):  # special tokens are always matched in text, as the reference does
            if name is not None and name not in {t.content for t in self.added.values()}:
                i = self.sp.piece_to_id(name)
                if self.sp.id_to_piece(i) == name:
                    self.added[i] = AddedToken(name)
        self._build_index()

    def __getstate__(self):  # DataLoader workers under "spawn": rebuild the processor from the model bytes
        return {k: v for k, v in self.__dict__.items() if k != "sp"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.sp = bare_processor(self.model_bytes)

    def _build_index(self):
        self.by_content = {t.content: i for i, t in self.added.items()}
        contents = sorted(self.by_content, key=len, reverse=True)  # longest first: leftmost-longest matching
        self.pattern = re.compile("|".join(map(re.escape, contents))) if contents else None

    # ---- ids and sizes -------------------------------------------------------

    def __len__(self):
        return max(self.sp.get_piece_size() - 1, *self.added) + 1

    def token_to_id(self, token):
        if token in self.by_content:
            return self.by_content[token]
        i = self.sp.piece_to_id(token)
        if self.sp.id_to_piece(i) != token:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return i

    def id_to_token(self, i):
        return self.added[i].content if i in self.added else self.sp.id_to_piece(i)

    def is_byte(self, i):
        """True for a byte-fallback piece (<0x..>): one raw byte of UTF-8, not text by itself."""
        return i not in self.added and self.sp.is_byte(i)

    def _id(self, name):
        tok = self.names[name]
        return None if tok is None else self.token_to_id(tok)

    bos_id = property(lambda self: self._id("bos"))
    eos_id = property(lambda self: self._id("eos"))
    unk_id = property(lambda self: self._id("unk"))
    pad_id = property(lambda self: self._id("pad"))

    def add_tokens(self, contents, special=True):
        """Append tokens missing from the vocabulary (ids after the current last one); returns all their ids."""
        for c in contents:
            if c not in self.by_content:
                self.added[len(self)] = AddedToken(c, special=special)
                self._build_index()
        return [self.by_content[c] for c in contents]

    # ---- encode / decode -----------------------------------------------------

    def split(self, text):
        """[(is_added, str | id, start offset)]: added tokens (with rstrip/lstrip whitespace) and text between."""
        parts, last = [], 0
        for m in (self.pattern.finditer(text) if self.pattern else ()):
            s, e = m.span()
            tok = self.added[self.by_content[m.group()]]
            if s < last:  # inside whitespace an rstrip token already swallowed: the reference skips it too
                continue
            if tok.lstrip:
                while s > last and text[s - 1] in WHITESPACE:
                    s -= 1
            if s > last:
                parts.append((False, text[last:s], last))
            parts.append((True, self.by_content[m.group()], s))
            if tok.rstrip:
                while e < len(text) and text[e] in WHITESPACE:
                    e += 1
            last = e
        if last < len(text):
            parts.append((False, text[last:], last))
        return parts

    def encode(self, text, bos=None, eos=None, offsets=False):
        """Token ids of `text`. With offsets=True also, per id, the character offset of the added token or
        text segment it came from (-1 for bos/eos): how data.py maps character spans (e.g. the assistant's
        answers) to tokens after encoding the whole text once, exactly as the reference would."""
        ids, starts = ([self.bos_id], [-1]) if (self.add_bos if bos is None else bos) else ([], [])
        for is_added, part, start in self.split(text):
            if is_added:
                ids.append(part)
                starts.append(start)
                continue
            piece = part.replace(" ", "▁")
            first = start == 0 or self.legacy  # legacy tokenizers prefix every piece
            if first and self.add_prefix_space and not piece.startswith("▁"):  # text that starts with a space keeps it
                piece = "▁" + piece
            pieces = self.sp.encode(piece)
            ids.extend(pieces)
            starts.extend([start] * len(pieces))
        if self.add_eos if eos is None else eos:
            ids.append(self.eos_id)
            starts.append(-1)
        return (ids, starts) if offsets else ids

    def decode(self, ids, skip_special_tokens=False):
        """Token strings joined, "▁" as space, byte pieces fused into UTF-8, one leading space dropped.

        A run of byte pieces that is not valid UTF-8 (a generation cut inside a character) becomes one
        U+FFFD per byte, as the reference's ByteFallback decoder does.
        """
        out, pending = [], bytearray()
        for i in (int(i) for i in ids):
            if i in self.added:
                if skip_special_tokens and self.added[i].special:
                    continue
                piece = self.added[i].content
            else:
                piece = self.sp.id_to_piece(i)
                if self.sp.is_byte(i):
                    pending.append(int(piece[3:5], 16))
                    continue
                if self.sp.is_control(i) and skip_special_tokens:
                    continue
                piece = piece.replace("▁", " ")
            out.append(_utf8(pending))
            pending.clear()
            out.append(piece)
        out.append(_utf8(pending))
        text = "".join(out)
        return text[1:] if self.add_prefix_space and text.startswith(" ") else text

    # ---- files ---------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path):
        """The tokenizer files of a Hub-layout folder; a file that is missing or cannot be read (a corrupt
        tokenizer.model, a config that is not JSON or not of the expected shape) is a TokenizerError naming it."""
        path = Path(path)
        model = path / "tokenizer.model"
        if not model.is_file():
            raise TokenizerError(f"{model}: missing; the tokenizer needs the SentencePiece tokenizer.model")
        cfg = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")
        added_json = _read_json(path / "added_tokens.json")
        try:
            added = {int(i): AddedToken(**{k: v for k, v in t.items() if k in AddedToken.__dataclass_fields__})
                     for i, t in cfg.get("added_tokens_decoder", {}).items()}
            if not all(isinstance(t.content, str) for t in added.values()):
                raise TypeError("an added token's content is not a string")
            extra = set(map(_content, special_map.get("additional_special_tokens", [])))
        except (AttributeError, TypeError, ValueError) as e:
            raise TokenizerError(f"{path}: tokenizer_config.json or special_tokens_map.json has an unexpected shape "
                                 f"({type(e).__name__}: {e})") from None
        for content, i in added_json.items():
            if not isinstance(i, int):
                raise TokenizerError(f"{path}/added_tokens.json: the id of {content!r} is not an integer")
            if i in added and added[i].content != content:
                raise TokenizerError(f"{path}: added_tokens.json gives id {i} to {content!r}, "
                                     f"tokenizer_config.json to {added[i].content!r}")
            added.setdefault(i, AddedToken(content, special=content in extra))

        def special(name, default):
            v = cfg.get(name, special_map.get(name, default))
            return None if v is None else _content(v)

        try:
            return cls(model.read_bytes(), added, bos=special("bos_token", "<s>"), eos=special("eos_token", "</s>"),
                       unk=special("unk_token", "<unk>"), pad=special("pad_token", None),
                       add_bos=cfg.get("add_bos_token", True), add_eos=cfg.get("add_eos_token", False),
                       legacy=cfg.get("legacy", False) is True,
                       add_prefix_space=cfg.get("add_prefix_space") is not False)
        except TokenizerError as e:
            raise TokenizerError(f"{model}: {e}") from None

    def save_pretrained(self, path):
        """Write the Hub layout back: tokenizer.model, tokenizer_config.json, added_tokens.json, special_tokens_map.json."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "tokenizer.model").write_bytes(self.model_bytes)
        specials = {f"{k}_token": v for k, v in self.names.items() if v is not None}
        cfg = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": self.add_bos, "add_eos_token": self.add_eos,
               "legacy": self.legacy, "added_tokens_decoder": {str(i): asdict(t) for i, t in sorted(self.added.items())},
               **specials}
        if not self.add_prefix_space:
            cfg["add_prefix_space"] = False
        n = self.sp.get_piece_size()
        _write_json(path / "tokenizer_config.json", cfg)
        _write_json(path / "added_tokens.json", {t.content: i for i, t in sorted(self.added.items()) if i >= n})
        _write_json(path / "special_tokens_map.json", specials)


def bare_processor(model_bytes):
    """A SentencePieceProcessor that adds no dummy prefix and runs BPE over whole pieces of text.

    The edit (sentencepiece_proto.py) walks the top-level fields once (linear time, every length checked
    against the data); bytes that are not a SentencePiece model are a TokenizerError, never a crash.
    """
    try:
        sp = spm.SentencePieceProcessor()
        sp.LoadFromSerializedProto(bare_model(model_bytes))
    except ProtobufError as e:
        raise TokenizerError(f"not a SentencePiece model ({e})") from None
    except (RuntimeError, OSError, ValueError) as e:  # what sentencepiece raises for a model it cannot parse
        raise TokenizerError(f"not a SentencePiece model ({type(e).__name__}: {str(e)[:200]})") from None
    if sp.get_piece_size() == 0:
        raise TokenizerError("a SentencePiece model without pieces")
    return sp


def _utf8(data):
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(data)


def _read_json(f):
    """A tokenizer JSON file as a dict ({} when absent); anything else is a TokenizerError naming it."""
    return read_json(f, TokenizerError) if f.is_file() else {}


def _write_json(f, obj):
    f.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

# -----------------------------------------------------------------------------
# the tokens xGen-MM adds

XGENMM_TOKENS = ("<image>", "<image placeholder>", "<|endofchunk|>")  # added in this order by the official factory


def extend_tokenizer(tok):
    """Add xGen-MM's tokens as the official factory does; returns the length before the three (initial_tokenizer_len).

    `<pad>` first when the tokenizer pads with its eos (Phi-3 does), then `<image>`, `<image placeholder>`,
    `<|endofchunk|>`. Tokens already present keep their ids.
    """
    if tok.pad_id is None or tok.pad_id == tok.eos_id:
        tok.add_tokens(["<pad>"])
        tok.names["pad"] = "<pad>"
    return tok.add_tokens(list(XGENMM_TOKENS))[0]


def extended_tokenizer(path):
    """The tokenizer at `path` with xGen-MM's tokens added, as the official factory adds them."""
    tok = Tokenizer.from_pretrained(path)
    extend_tokenizer(tok)
    return tok

# -----------------------------------------------------------------------------
# prompts: Phi-3's chat template, image markers, padded batches

IMAGE, END_CHUNK, END = "<image>", "<|endofchunk|>", "<|end|>"
DEFAULT_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def render_chat(turns, system=DEFAULT_SYSTEM, generation_prompt=False):
    """The Phi-3 chat text of [(role, text)] and the character spans that carry the loss (the answers).

    `<|system|>\n{system}<|end|>\n<|user|>\n{q}<|end|>\n<|assistant|>\n{a}<|end|>\n...`; with
    `generation_prompt` the text ends with `<|assistant|>\n`, where the model's answer starts. A span runs
    from the newline after `<|assistant|>` to the end of the answer's `<|end|>\n`: Phi-3's tokens swallow
    those newlines (rstrip), so the loss lands on the answer and its `<|end|>`; with a tokenizer that keeps
    them, the newline goes with the answer.
    """
    out, spans = f"<|system|>\n{system}{END}\n" if system else "", []
    for role, text in turns:
        out += f"<|{role}|>\n"
        start = len(out) - 1
        out += f"{text}{END}\n"
        if role == "assistant":
            spans.append((start, len(out)))
    return (out + "<|assistant|>\n" if generation_prompt else out), spans


def chat_prompt(turns, system=DEFAULT_SYSTEM):
    """Inference: the texts [user, assistant, user, ...] in the chat format, ending where the next answer starts."""
    roles = [("user", "assistant")[i % 2] for i in range(len(turns))]
    return render_chat(list(zip(roles, turns)), system, generation_prompt=True)[0]


def place_images(text, n):
    """Put n image markers into a user text: where it has them, else one "<image>\n" per image in front of it
    (the release's examples, and LLaVA's data, put a single image before the question)."""
    k = text.count(IMAGE)
    if k == 0:
        return (IMAGE + "\n") * n + text
    if k != n:
        raise ValueError(f"{k} {IMAGE} marker(s) in the text but {n} image(s); put one {IMAGE} where each "
                         "image goes, or none to put all of them first")
    return text


def round_up(n, k):
    """n rounded up to a multiple of k (vocabulary rows, cache lengths)."""
    return -(-n // k) * k


def pad_batch(rows, value, side="right"):
    """Id lists (or 1-D tensors) -> ((B, T) long tensor padded with `value` on `side`, (B, T) 0/1 mask)."""
    T = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), T), value, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        out[i, span], mask[i, span] = torch.as_tensor(r, dtype=torch.long), 1
    return out, mask
