"""Token ids -> normalised byte strings, and the teacher -> student vocabulary map.

Two tokenizers of different families spell the same text differently: byte-level BPE (GPT-2,
Llama 3, SmolLM2) writes each byte as a printable character (`Ġ` is a space, `Ċ` a newline);
SentencePiece-style vocabularies (Gemma, Llama 2, T5) write a space as `▁` and fall back to
`<0xNN>` tokens for bytes they have no piece for. `TokenBytes` undoes both spellings, so every
token becomes the exact UTF-8 bytes it stands for, and concatenating the bytes of an encoding
gives the text back (the round trip `tests/test_kdtrain_crosstok.py` checks on real tokenizers).
Special tokens (`<eos>`, `<|im_end|>`) stand for no text: their bytes are empty and they are
mapped explicitly, by role (bos/eos/pad/unk) and then by identical name.

`VocabMap` maps each teacher id to one student id:

* exact  — a student token with the same bytes;
* prefix — (`vocab_match="prefix"`) the longest student token whose bytes begin the teacher
  token's bytes: the student's first step towards the same text;
* none   — no student token (ids beyond the teacher's tokenizer, unmatched special tokens):
  the candidate's mass goes to the residual bucket.

Several teacher ids may land on one student id (collisions); the loss sums their mass.

    tb_t, tb_s = TokenBytes.from_tokenizer(teacher_tok), TokenBytes.from_tokenizer(student_tok)
    vmap = VocabMap.build(tb_t, tb_s, vocab_match="prefix")
    vmap.student_id[teacher_ids]  # -1 where unmapped

Test: `pytest tests/test_kdtrain_crosstok.py`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

VOCAB_MATCH = ("exact", "prefix")
EXACT, PREFIX, NONE = 0, 1, 2  # VocabMap.kind values
KIND_NAMES = ("exact", "prefix", "none")
ROLES = ("eos", "bos", "unk", "pad")  # in mapping priority
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode table, inverted: printable character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _has(node, type_name: str) -> bool:
    """Whether a tokenizer.json component (possibly a Sequence) contains a part of this type."""
    if not isinstance(node, dict):
        return False
    if node.get("type") == type_name:
        return True
    return any(_has(x, type_name) for key in ("decoders", "pretokenizers", "normalizers") for x in node.get(key) or [])


@dataclass
class TokenBytes:
    """The bytes of every id of one tokenizer.

    flat [sum bytes] uint8 + offsets [V+1]: id i stands for flat[offsets[i]:offsets[i+1]].
    special [V] bool: special tokens (empty bytes). scheme: "byte_level" or "sentencepiece".
    roles: {"eos": id, ...}; names: special-token content -> id.
    """

    flat: np.ndarray
    offsets: np.ndarray
    special: np.ndarray
    scheme: str
    roles: dict[str, int]
    names: dict[str, int]

    @property
    def size(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def token(self, i: int) -> bytes:
        return self.flat[self.offsets[i] : self.offsets[i + 1]].tobytes()

    def join(self, ids: np.ndarray) -> bytes:
        """The bytes an id sequence stands for (special tokens contribute nothing)."""
        return self.gather(np.asarray(ids, np.int64)).tobytes()

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """Concatenated bytes of `ids` [n] as a uint8 array (vectorised)."""
        starts, lens = self.offsets[ids], self.lengths[ids]
        total = int(lens.sum())
        if total == 0:
            return np.zeros(0, np.uint8)
        ends = np.cumsum(lens)
        idx = np.arange(total) - np.repeat(ends - lens, lens) + np.repeat(starts, lens)
        return self.flat[idx]

    def spell(self, ids: np.ndarray, text: bytes) -> np.ndarray | None:
        """[n] bytes per token such that `ids` spell exactly `text`, or None when they do not
        (a normaliser rewrote the text, or an unknown token). A SentencePiece dummy prefix (the
        space some tokenizers put before the text) is taken off the first token."""
        ids = np.asarray(ids, np.int64)
        lens = self.lengths[ids].copy()
        got = self.gather(ids).tobytes()
        if got == text:
            return lens
        if got == b" " + text and len(ids) and lens[0] >= 1:
            lens[0] -= 1
            return lens
        return None

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "TokenBytes":
        """From a transformers fast tokenizer (or a `tokenizers.Tokenizer`)."""
        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        spec = json.loads(backend.to_str())
        byte_level = _has(spec.get("decoder"), "ByteLevel") or _has(spec.get("pre_tokenizer"), "ByteLevel")
        byte_fallback = bool(spec.get("model", {}).get("byte_fallback")) or _has(spec.get("decoder"), "ByteFallback")
        size = max(backend.get_vocab_size(with_added_tokens=True), max(backend.get_vocab(with_added_tokens=True).values()) + 1)
        added = {a["id"]: a for a in spec.get("added_tokens", [])}
        dec = _byte_decoder()
        pieces: list[bytes] = [b""] * size
        special = np.zeros(size, bool)
        for piece, i in backend.get_vocab(with_added_tokens=True).items():
            a = added.get(i)
            if a is not None:
                if a["special"]:
                    special[i] = True
                else:  # added tokens are matched on the raw text: their content is the text
                    pieces[i] = a["content"].encode("utf-8")
            elif byte_level:
                try:
                    pieces[i] = bytes(dec[c] for c in piece)
                except KeyError:  # a piece outside the byte alphabet: take it literally
                    pieces[i] = piece.encode("utf-8")
            else:
                m = _BYTE_TOKEN.match(piece) if byte_fallback else None
                pieces[i] = bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode("utf-8")
        # transformers' special-token attributes, where the object has them
        roles = {}
        for role in ROLES:
            i = getattr(tokenizer, f"{role}_token_id", None)
            if isinstance(i, int) and 0 <= i < size:
                roles[role] = i
                special[i] = True
                pieces[i] = b""
        for i in getattr(tokenizer, "all_special_ids", []) or []:
            if 0 <= i < size:
                special[i] = True
                pieces[i] = b""
        names = {a["content"]: a["id"] for a in added.values() if special[a["id"]]}
        for role, i in roles.items():
            names.setdefault(backend.id_to_token(i), i)
        lens = np.fromiter((len(p) for p in pieces), np.int64, size)
        offsets = np.zeros(size + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        flat = np.frombuffer(b"".join(pieces), np.uint8).copy()
        return cls(flat, offsets, special, "byte_level" if byte_level else "sentencepiece", roles, names)


@dataclass
class VocabMap:
    """Teacher id -> student id.

    student_id [V_teacher] int64: the student id, -1 where unmapped.
    kind [V_teacher] int8: EXACT, PREFIX or NONE.
    """

    student_id: np.ndarray
    kind: np.ndarray
    vocab_match: str

    @classmethod
    def build(cls, teacher: TokenBytes, student: TokenBytes, vocab_match: str = "prefix", teacher_rows: int | None = None) -> "VocabMap":
        """Map every teacher id (ids up to `teacher_rows`, the teacher's embedding rows, all unmapped
        beyond its tokenizer) by bytes; special tokens by role, then by identical name."""
        if vocab_match not in VOCAB_MATCH:
            raise ValueError(f"vocab_match {vocab_match!r}: choose {' or '.join(VOCAB_MATCH)}")
        n = max(teacher.size, teacher_rows or 0)
        sid = np.full(n, -1, np.int64)
        kind = np.full(n, NONE, np.int8)
        lookup: dict[bytes, int] = {}
        s_lens = student.lengths
        for j in range(student.size):  # lowest id wins when two student ids spell the same bytes
            if s_lens[j] and not student.special[j]:
                lookup.setdefault(student.token(j), j)
        longest = int(s_lens.max()) if student.size else 0
        for i in range(teacher.size):
            if teacher.special[i]:
                continue
            b = teacher.token(i)
            if not b:
                continue
            j = lookup.get(b)
            if j is not None:
                sid[i], kind[i] = j, EXACT
            elif vocab_match == "prefix":
                for cut in range(min(len(b) - 1, longest), 0, -1):
                    j = lookup.get(b[:cut])
                    if j is not None:
                        sid[i], kind[i] = j, PREFIX
                        break
        by_role = set()
        for role in ROLES:  # an id with several roles (SmolLM2's eos is also its pad) keeps the first
            i = teacher.roles.get(role)
            if i is not None and role in student.roles and i not in by_role:
                sid[i], kind[i] = student.roles[role], EXACT
                by_role.add(i)
        for name, i in teacher.names.items():
            if sid[i] < 0 and name in student.names:
                sid[i], kind[i] = student.names[name], EXACT
        return cls(sid, kind, vocab_match)

    def summary(self, teacher: TokenBytes) -> dict:
        """Vocabulary-level counts: how many teacher ids map exactly / via prefix / not at all,
        and how many student ids receive more than one teacher id."""
        n = teacher.size
        kind = self.kind[:n]
        mapped = self.student_id[:n][self.student_id[:n] >= 0]
        counts = np.bincount(mapped, minlength=1) if mapped.size else np.zeros(1, np.int64)
        return {
            "teacher_vocab": int(n),
            "exact": int((kind == EXACT).sum()),
            "prefix": int((kind == PREFIX).sum()),
            "none": int((kind == NONE).sum()),
            "student_ids_hit": int((counts > 0).sum()),
            "student_ids_with_collisions": int((counts > 1).sum()),
        }
