"""Tokenizers and sequence packing for language-model data.

Two tokenizers, both exact and dependency free:

* :class:`ByteTokenizer` - the UTF-8 bytes of the text, ids ``0..255``; an
  optional end-of-document id ``256`` (vocab 257). Any string round-trips.
* :class:`CharTokenizer` - one id per Unicode character of a fixed,
  sorted character set (usually built from the corpus with
  :meth:`CharTokenizer.from_text`), optionally followed by an
  end-of-document id and an unknown-character id.

Packing (:class:`PackedLMSource`): the documents are tokenised, concatenated
(an end-of-document id after each document when the tokenizer has one) into
one stream ``t`` of ``T`` tokens, and cut without padding into
``n = (T - 1) // L`` windows; example ``i`` is
``inputs = t[iL : iL + L]``, ``targets = t[iL + 1 : iL + L + 1]``. Consecutive
windows share one token, so every stream token after the first is a target
exactly once per epoch (the last ``(T - 1) % L`` tokens are dropped).
"""

from __future__ import annotations

import dataclasses
import glob as glob_lib
import os
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

__all__ = [
    "ByteTokenizer",
    "CharTokenizer",
    "PackedLMSource",
    "Tokenizer",
    "read_text_files",
    "tokenize_documents",
]


class Tokenizer(Protocol):
  """Minimal tokenizer interface used by the LM pipelines."""

  vocab_size: int
  eos_id: int | None

  def encode(self, text: str) -> np.ndarray:
    ...

  def decode(self, ids: Iterable[int]) -> str:
    ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class ByteTokenizer:
  """UTF-8 byte-level tokenizer (ids 0..255, optional EOS id 256).

  Attributes:
    add_eos: reserve id 256 as end-of-document (vocab 257).
  """

  add_eos: bool = False

  @property
  def vocab_size(self) -> int:
    return 257 if self.add_eos else 256

  @property
  def eos_id(self) -> int | None:
    return 256 if self.add_eos else None

  def encode(self, text: str | bytes) -> np.ndarray:
    """int32 ids of the UTF-8 bytes of ``text`` (no EOS appended)."""
    data = text if isinstance(text, bytes) else text.encode("utf-8")
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    """Inverse of :meth:`encode`; EOS ids become newlines.

    Invalid UTF-8 (e.g. a window that cuts a multi-byte character) is
    replaced with U+FFFD.
    """
    ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(
          f"ByteTokenizer.decode: ids must lie in [0, {self.vocab_size}), got "
          f"range [{ids.min()}, {ids.max()}]"
      )
    parts, start = [], 0
    for pos in np.flatnonzero(ids == 256):
      parts.append(bytes(ids[start:pos].astype(np.uint8)).decode("utf-8", "replace"))
      start = int(pos) + 1
    parts.append(bytes(ids[start:].astype(np.uint8)).decode("utf-8", "replace"))
    return "\n".join(parts)

  def get_config(self) -> dict:
    return {"type": "byte", "add_eos": self.add_eos}


@dataclasses.dataclass(frozen=True, kw_only=True)
class CharTokenizer:
  """Character-level tokenizer over a fixed, sorted character set.

  Ids ``0..len(chars) - 1`` are the characters in code-point order, followed
  by ``eos_id`` (if ``add_eos``) and ``unk_id`` (if ``add_unk``). Encoding a
  character outside ``chars`` maps it to ``unk_id`` or, without one, raises a
  ``ValueError`` naming the characters.

  Attributes:
    chars: the vocabulary, a string of distinct characters (sorted on
      construction).
    add_eos: append an end-of-document id.
    add_unk: append an unknown-character id.
  """

  chars: str
  add_eos: bool = False
  add_unk: bool = False
  # The sorted code points of `chars`, set by __post_init__ (not an argument).
  _codepoints: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    if not self.chars:
      raise ValueError("CharTokenizer: chars must be non-empty")
    if len(set(self.chars)) != len(self.chars):
      raise ValueError("CharTokenizer: chars contains duplicates")
    object.__setattr__(self, "chars", "".join(sorted(self.chars)))
    codepoints = np.array([ord(c) for c in self.chars], dtype=np.int64)
    object.__setattr__(self, "_codepoints", codepoints)

  @classmethod
  def from_text(
      cls, text: str, *, add_eos: bool = False, add_unk: bool = False
  ) -> CharTokenizer:
    """Vocabulary = the distinct characters of ``text``."""
    return cls(chars="".join(sorted(set(text))), add_eos=add_eos, add_unk=add_unk)

  @property
  def vocab_size(self) -> int:
    return len(self.chars) + int(self.add_eos) + int(self.add_unk)

  @property
  def eos_id(self) -> int | None:
    return len(self.chars) if self.add_eos else None

  @property
  def unk_id(self) -> int | None:
    return len(self.chars) + int(self.add_eos) if self.add_unk else None

  def encode(self, text: str) -> np.ndarray:
    """int32 ids of the characters of ``text`` (no EOS appended)."""
    if not text:
      return np.zeros((0,), np.int32)
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(
        np.int64
    )
    table = self._codepoints
    pos = np.searchsorted(table, codes)
    pos_clipped = np.minimum(pos, len(table) - 1)
    known = table[pos_clipped] == codes
    ids = pos_clipped.astype(np.int32)
    if not known.all():
      if self.unk_id is None:
        missing = sorted({chr(c) for c in codes[~known]})
        raise ValueError(
            f"CharTokenizer.encode: {len(missing)} character(s) not in the "
            f"vocabulary: {missing[:20]!r}; build the tokenizer with "
            "add_unk=True to map them to an unknown id"
        )
      ids[~known] = self.unk_id
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    """Characters of ``ids``; EOS becomes a newline, UNK becomes U+FFFD."""
    out = []
    for i in ids:
      i = int(i)
      if 0 <= i < len(self.chars):
        out.append(self.chars[i])
      elif i == self.eos_id:
        out.append("\n")
      elif i == self.unk_id:
        out.append("\ufffd")
      else:
        raise ValueError(
            f"CharTokenizer.decode: id {i} outside [0, {self.vocab_size})"
        )
    return "".join(out)

  def get_config(self) -> dict:
    return {
        "type": "char",
        "chars": self.chars,
        "add_eos": self.add_eos,
        "add_unk": self.add_unk,
    }


def tokenize_documents(
    documents: Iterable[str | bytes], tokenizer: Tokenizer
) -> np.ndarray:
  """Concatenates the encoded documents into one int32 token stream.

  When ``tokenizer.eos_id`` is set it is appended after every document.
  """
  pieces = []
  eos = (
      None
      if tokenizer.eos_id is None
      else np.array([tokenizer.eos_id], np.int32)
  )
  for doc in documents:
    if isinstance(doc, bytes) and not isinstance(tokenizer, ByteTokenizer):
      doc = doc.decode("utf-8")
    pieces.append(tokenizer.encode(doc))
    if eos is not None:
      pieces.append(eos)
  if not pieces:
    return np.zeros((0,), np.int32)
  return np.concatenate(pieces).astype(np.int32, copy=False)


class PackedLMSource:
  """Random-access source of packed next-token windows over a token stream.

  ``source[i] = {"inputs": t[iL : iL + L], "targets": t[iL + 1 : iL + L + 1]}``
  with ``L = seq_len``; ``len(source) = (len(t) - 1) // L``.
  """

  def __init__(self, tokens: np.ndarray, *, seq_len: int):
    if not isinstance(seq_len, (int, np.integer)) or seq_len <= 0:
      raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
      raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    self._tokens = tokens.astype(np.int32, copy=False)
    self._tokens.setflags(write=False)
    self.seq_len = int(seq_len)
    self._length = max(0, (len(tokens) - 1) // self.seq_len)

  @property
  def tokens(self) -> np.ndarray:
    """The packed stream (read-only)."""
    return self._tokens

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < self._length:
      raise IndexError(f"index {index} out of range [0, {self._length})")
    start = int(index) * self.seq_len
    window = self._tokens[start : start + self.seq_len + 1]
    return {"inputs": window[:-1], "targets": window[1:]}

  def _getitems(self, indices):
    # Batched read for grain's SourceMapDataset (skips per-element metrics).
    return [self[int(i)] for i in indices]


def read_text_files(paths: str | Sequence[str]) -> list[str]:
  """Reads UTF-8 text files: a glob pattern or a list of paths/patterns.

  Patterns are expanded with ``glob`` (``**`` allowed) and sorted, so the
  document order is deterministic.

  Raises:
    FileNotFoundError: if a pattern matches no file or a path is missing.
  """
  patterns = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
  if not patterns:
    raise FileNotFoundError("read_text_files: no paths given")
  files: list[str] = []
  for pattern in patterns:
    pattern = os.fspath(pattern)
    matches = sorted(
        p for p in glob_lib.glob(os.path.expanduser(pattern), recursive=True)
        if os.path.isfile(p)
    )
    if not matches:
      raise FileNotFoundError(
          f"read_text_files: no file matches {pattern!r}"
      )
    files.extend(matches)
  docs = []
  for path in files:
    with open(path, encoding="utf-8") as f:
      docs.append(f.read())
  return docs
