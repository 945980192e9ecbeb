"""
Editing two fields of a serialized SentencePiece model, in the protobuf wire format, without the protobuf
package: what tokenizer.py needs to run BPE as the reference does (tokenizer.py's docstring says why).

- A message is a run of fields, each a varint tag (field number << 3 | wire type) and a payload: a varint
  (type 0), 8 or 4 bytes (types 1, 5), or a varint length and that many bytes (type 2: strings and
  sub-messages). That is all a walk over the fields needs.
- `bare_model` switches off `normalizer_spec.add_dummy_prefix` and `trainer_spec.split_by_whitespace`.
- Untrusted bytes: every length is checked against the data and a varint is at most 10 bytes, so a corrupt
  file is a ProtobufError at once, never an IndexError, a crash or a quadratic walk.

Reference: sentencepiece's sentencepiece_model.proto; protobuf's encoding guide.
"""


class ProtobufError(ValueError):
    """Bytes that are not a well-formed protobuf message."""


def _varint(buf, i):
    """The varint at buf[i] and the position after it. At most 10 bytes (a 64-bit value), as protobuf allows:
    a run of 0xFF bytes is an error at once, not an ever longer integer (which took quadratic time)."""
    out = 0
    for k in range(10):
        if i + k >= len(buf):
            raise ProtobufError("truncated varint")
        b = buf[i + k]
        out |= (b & 0x7F) << (7 * k)
        if b < 0x80:
            return out, i + k + 1
    raise ProtobufError("varint longer than 10 bytes")


def _encode_varint(n):
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _fields(buf):
    """(field number, wire type, field start, field end, payload start) for each field of a message."""
    i = 0
    while i < len(buf):
        start = i
        tag, i = _varint(buf, i)
        num, wt = tag >> 3, tag & 7
        if wt == 0:
            payload, i = i, _varint(buf, i)[1]
        elif wt == 2:
            n, payload = _varint(buf, i)
            i = payload + n
        elif wt in (1, 5):
            payload, i = i, i + (8 if wt == 1 else 4)
        else:
            raise ProtobufError(f"unsupported protobuf wire type {wt} at byte {start}")
        if i > len(buf):
            raise ProtobufError(f"a field at byte {start} runs past the end of the data")
        yield num, wt, start, i, payload


def _set_bool(msg, field, value):
    """The message with every occurrence of varint `field` dropped and `field = value` appended."""
    kept = b"".join(msg[s:e] for num, _, s, e, _ in _fields(msg) if num != field)
    return kept + _encode_varint(field << 3) + bytes([int(value)])


def _edit_message(msg, field, edit):
    """The message with the sub-message `field` replaced by edit(sub-message)."""
    out, seen = bytearray(), False
    for num, wt, s, e, payload in _fields(msg):
        if num == field and wt == 2:
            sub = edit(msg[payload:e])
            out += _encode_varint(field << 3 | 2) + _encode_varint(len(sub)) + sub
            seen = True
        else:
            out += msg[s:e]
    if not seen:
        sub = edit(b"")
        out += _encode_varint(field << 3 | 2) + _encode_varint(len(sub)) + sub
    return bytes(out)


# field numbers from sentencepiece_model.proto
TRAINER_SPEC, NORMALIZER_SPEC, SPLIT_BY_WHITESPACE, ADD_DUMMY_PREFIX = 2, 3, 22, 3


def bare_model(model_bytes):
    """A serialized SentencePiece model with no dummy prefix and no pre-split at whitespace."""
    proto = _edit_message(model_bytes, NORMALIZER_SPEC, lambda m: _set_bool(m, ADD_DUMMY_PREFIX, False))
    return _edit_message(proto, TRAINER_SPEC, lambda m: _set_bool(m, SPLIT_BY_WHITESPACE, False))
