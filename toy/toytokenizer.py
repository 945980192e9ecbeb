"""
The toy world's tokenizer: a SentencePiece BPE model trained on every line of text the world wrote, saved in
the Hub layout of Phi-3's tokenizer (tokenizer.model, tokenizer_config.json, added_tokens.json,
special_tokens_map.json), so tokenizer.py reads it as it reads the release's.

- Phi-3's eleven added tokens follow the pieces, with their ids, `rstrip` flags and special-token map as in
  the release's tokenizer_config.json; xGen-MM's own tokens (<image>, ...) are added by tokenizer.py.
- Deterministic: one training thread and a fixed line order give the same model bytes every time.
"""
import io
import json

import sentencepiece as spm

from tokenizer import DEFAULT_SYSTEM

PHI3_ADDED = (("<|endoftext|>", False), ("<|assistant|>", True), ("<|placeholder1|>", True),
              ("<|placeholder2|>", True), ("<|placeholder3|>", True), ("<|placeholder4|>", True),
              ("<|system|>", True), ("<|end|>", True), ("<|placeholder5|>", True), ("<|placeholder6|>", True),
              ("<|user|>", True))  # (content, rstrip), ids n..n+10, as in Phi-3's tokenizer_config.json


# one piece per box coordinate (the 0.05 grid, two decimals) and per box tag, as location tokens are in
# Kosmos-2: a box is 12 tokens instead of 28 digits, dots and brackets, and "0.35" is one thing to learn
BOX_PIECES = ["<bbox>", "</bbox>"] + [f"{k / 20:.2f}" for k in range(21)]


def write_tokenizer(folder, corpus, vocab_size=1000):
    """SentencePiece BPE on every line of text the world wrote, in the Hub layout of Phi-3's tokenizer."""
    lines = [ln for t in corpus + [DEFAULT_SYSTEM] for ln in t.replace("<image>", "").split("\n") if ln.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(  # one thread and a fixed line order: the same model bytes every time
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2, user_defined_symbols=BOX_PIECES)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    n = spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()

    def token(content, rstrip=False):
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": rstrip, "single_word": False,
                "special": True}
    decoder = {str(i): token(c) for i, c in enumerate(["<unk>", "<s>", "</s>"])}
    decoder.update({str(n + k): token(c, r) for k, (c, r) in enumerate(PHI3_ADDED)})
    config = {"add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder, "bos_token": "<s>",
              "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>", "legacy": False,
              "model_max_length": 4096, "pad_token": "<|endoftext|>", "padding_side": "left", "sp_model_kwargs": {},
              "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>"}
    special = {name: {k: v for k, v in token(c).items() if k != "special"}
               for name, c in (("bos_token", "<s>"), ("eos_token", "<|endoftext|>"), ("pad_token", "<|endoftext|>"),
                               ("unk_token", "<unk>"))}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "added_tokens.json").write_text(json.dumps({c: n + k for k, (c, _) in enumerate(PHI3_ADDED)}, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return n
