"""Deterministic, resumable, process-sharded grain pipelines.

The pipeline is built from grain ``MapDataset`` transformations so that every
batch is a pure function of ``(seed, batch index)``:

1. ``MapDataset.source(source)`` - random access to the examples of a split.
2. ``.shuffle(seed=...)`` - a global permutation; grain reseeds it per epoch
   (``seed + epoch``), so the order differs between epochs.
3. ``.repeat(num_epochs)`` - ``None`` repeats forever.
4. ``.random_map(transform, seed=...)`` (or ``.map``) - augmentation; grain
   gives the transform a Philox generator keyed by ``(seed, stream index)``,
   so augmentation of an example depends only on the seed and its position
   in the repeated stream (hence also on the epoch).
5. ``_ProcessBatchDataset`` - global batch ``b`` is stream positions
   ``[b * B, (b + 1) * B)``; process ``p`` of ``P`` materialises only the
   ``p``-th contiguous block of ``B / P`` of them. Concatenating the process
   batches in process order therefore reproduces the single-process global
   batch exactly (the layout ``jax.make_array_from_process_local_data``
   assumes), and the iterator state (a global batch index) does not depend on
   the number of processes.
6. ``.slice(next_batch:)`` + ``.to_iter_dataset(ReadOptions)`` - background
   threads prefetch whole batches in order.

The last, partial global batch of a finite stream (``drop_remainder=False``) is
split as evenly as possible over the processes (sizes differ by at most one;
a process may get a zero-sized batch), so every process yields the same number
of batches.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

import grain
import numpy as np
import numpy.typing as npt

__all__ = [
    "ArraySource",
    "DataIterator",
    "DatasetInfo",
    "make_iterator",
]

_STATE_FORMAT = "sift_jax.data.DataIterator/v1"


class RandomAccessSource(Protocol):
  """What grain needs from a data source: ``len`` and integer indexing."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> Any:
    ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatasetInfo:
  """Static description of one split of a dataset.

  Attributes:
    name: dataset name as given to ``make_dataset``.
    split: split name.
    task: ``"classification"`` (batches ``{"image", "label"}``) or ``"lm"``
      (batches ``{"inputs", "targets"}``).
    num_examples: examples in the whole split (before process sharding); for
      ``"lm"`` the number of packed sequences.
    input_shape: per-example input shape, without the batch dimension.
    input_dtype: dtype of the input array (float32 images, int32 tokens).
    num_classes: number of classes for classification, else ``None``.
    vocab_size: vocabulary size for language modelling, else ``None``.
    mean: per-channel mean subtracted from images on the ``[0, 1]`` scale (or
      ``None`` when the source is already standardised).
    std: per-channel std images were divided by (``[0, 1]`` scale).
    tokenizer: the tokenizer of an ``"lm"`` dataset (``encode``/``decode``).
  """

  name: str
  split: str
  task: Literal["classification", "lm"]
  num_examples: int
  input_shape: tuple[int, ...]
  input_dtype: npt.DTypeLike  # a scalar type such as np.float32, as the loaders give it
  num_classes: int | None = None
  vocab_size: int | None = None
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None
  tokenizer: Any = None

  def __post_init__(self):
    if self.task not in ("classification", "lm"):
      raise ValueError(f"DatasetInfo: unknown task={self.task!r}")
    object.__setattr__(self, "input_dtype", np.dtype(self.input_dtype))
    object.__setattr__(self, "input_shape", tuple(self.input_shape))

  @property
  def input_key(self) -> str:
    """Batch key of the model input (``"image"`` or ``"inputs"``)."""
    return "image" if self.task == "classification" else "inputs"

  @property
  def target_key(self) -> str:
    """Batch key of the target (``"label"`` or ``"targets"``)."""
    return "label" if self.task == "classification" else "targets"

  def batches_per_epoch(
      self, batch_size: int, *, drop_remainder: bool = True
  ) -> int:
    """Global batches in one pass over the split."""
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    if drop_remainder:
      return self.num_examples // batch_size
    return -(-self.num_examples // batch_size)


class ArraySource:
  """In-memory random-access source over a dict of equally long arrays.

  ``source[i]`` is ``{key: array[i]}``.
  """

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    if not arrays:
      raise ValueError("ArraySource: needs at least one array")
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f"ArraySource: arrays differ in length: {lengths}")
    self._arrays = dict(arrays)
    self._length = next(iter(lengths.values()))

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in self._arrays.items()}

  def _getitems(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
    # Batched read used by grain's SourceMapDataset: one fancy-indexing
    # gather per array instead of a metrics-recording call per element.
    idx = np.asarray(indices, dtype=np.int64)
    gathered = {k: v[idx] for k, v in self._arrays.items()}
    return [{k: v[i] for k, v in gathered.items()} for i in range(len(idx))]

  def __repr__(self) -> str:
    shapes = {k: v.shape for k, v in self._arrays.items()}
    return f"ArraySource({shapes})"


def _stack(elements: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
  keys = elements[0].keys()
  return {k: np.stack([np.asarray(e[k]) for e in elements]) for k in keys}


class _ProcessBatchDataset(grain.MapDataset):
  """Element ``b``: this process's block of global batch ``b`` (stacked)."""

  def __init__(
      self,
      parent: grain.MapDataset,
      *,
      global_batch_size: int,
      process_index: int,
      process_count: int,
      drop_remainder: bool,
  ):
    super().__init__(parent)
    self._global_batch_size = global_batch_size
    self._process_index = process_index
    self._process_count = process_count
    self._stream_length = len(parent)
    if drop_remainder or self._stream_length >= sys.maxsize:
      self._length = self._stream_length // global_batch_size
    else:
      self._length = -(-self._stream_length // global_batch_size)
    self._empty_batch: dict[str, np.ndarray] | None = None

  def __len__(self) -> int:
    return self._length

  def __str__(self) -> str:
    return (
        f"_ProcessBatchDataset(global_batch_size={self._global_batch_size}, "
        f"process={self._process_index}/{self._process_count})"
    )

  def stream_indices(self, batch_index: int) -> range:
    """Stream positions that this process reads for global batch ``b``."""
    start = batch_index * self._global_batch_size
    size = min(self._global_batch_size, self._stream_length - start)
    # Even split of (possibly partial) batches: the first `size % P`
    # processes get one extra element. For full batches this is the p-th
    # contiguous block of B / P.
    base, extra = divmod(size, self._process_count)
    p = self._process_index
    offset = p * base + min(p, extra)
    count = base + (1 if p < extra else 0)
    return range(start + offset, start + offset + count)

  def _empty(self) -> dict[str, np.ndarray]:
    if self._empty_batch is None:
      example = _stack([self._parent[0]])
      self._empty_batch = {k: v[:0] for k, v in example.items()}
    return self._empty_batch

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    if not 0 <= index < self._length:
      raise IndexError(f"batch index {index} out of range [0, {self._length})")
    indices = self.stream_indices(index)
    if not indices:
      return {k: v.copy() for k, v in self._empty().items()}
    return _stack(self._parent._getitems(list(indices)))  # pylint: disable=protected-access


def _derive_seed(seed: int, stream: int) -> int:
  """Independent 32-bit seeds for shuffling and augmentation."""
  return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def _jsonable(value: Any) -> Any:
  """``value`` as it reads back from JSON (tuples become lists), or repr."""
  try:
    return json.loads(json.dumps(value))
  except (TypeError, ValueError):
    return repr(value)


class DataIterator:
  """Iterator over process-local batches with JSON-serialisable state.

  ``next(it)`` returns a dict of numpy arrays; ``it.get_state()`` returns a
  plain dict (ints/strings) that ``it.set_state`` accepts on a fresh iterator
  built with the same configuration (the number of processes may differ).

  Attributes:
    info: the :class:`DatasetInfo` of the split.
    num_batches: batches this iterator yields in total (``None`` if it
      repeats forever).
    local_batch_size: ``batch_size // process_count``.
  """

  def __init__(
      self,
      batches: _ProcessBatchDataset,
      *,
      info: DatasetInfo,
      config: Mapping[str, Any],
      read_options: grain.ReadOptions,
      local_batch_size: int,
  ):
    self._batches = batches
    self.info = info
    self._config = {k: _jsonable(v) for k, v in config.items()}
    self._read_options = read_options
    self.local_batch_size = local_batch_size
    self._next_batch = 0
    self._iterator: Any = None  # grain's (untyped) dataset iterator

  @property
  def num_batches(self) -> int | None:
    n = len(self._batches)
    return None if n >= sys.maxsize // 2 else n

  @property
  def config(self) -> dict[str, Any]:
    return dict(self._config)

  def __iter__(self) -> DataIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._next_batch >= len(self._batches):
      raise StopIteration
    if self._iterator is None:
      remaining = self._batches.slice(slice(self._next_batch, None))
      self._iterator = iter(remaining.to_iter_dataset(self._read_options))
    batch = next(self._iterator)
    self._next_batch += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable state: the configuration and the next batch index."""
    return {"format": _STATE_FORMAT, "next_batch": self._next_batch,
            **self._config}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from ``state`` (as returned by :meth:`get_state`).

    Raises:
      ValueError: if ``state`` is malformed or was produced by an iterator
        with a different configuration (dataset, split, seed, batch size...).
    """
    if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
      raise ValueError(
          f"set_state: expected a state with format={_STATE_FORMAT!r}, got "
          f"{state!r}"
      )
    for key, expected in self._config.items():
      if key not in state:
        raise ValueError(f"set_state: state is missing key {key!r}")
      got = state[key]
      if isinstance(expected, int) and not isinstance(expected, bool):
        same = isinstance(got, (int, np.integer)) and int(got) == expected
      else:
        same = got == expected
      if not same:
        raise ValueError(
            f"set_state: state[{key!r}]={got!r} does not match this "
            f"iterator's {key}={expected!r}"
        )
    next_batch = int(state["next_batch"])
    if not 0 <= next_batch <= len(self._batches):
      raise ValueError(
          f"set_state: next_batch={next_batch} out of range "
          f"[0, {len(self._batches)}]"
      )
    self.close()
    self._next_batch = next_batch

  def close(self) -> None:
    """Stops the prefetch threads; iteration restarts them on demand."""
    if self._iterator is not None:
      close = getattr(self._iterator, "close", None)
      if close is not None:
        close()
      self._iterator = None

  def __enter__(self) -> DataIterator:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __repr__(self) -> str:
    return (
        f"DataIterator({self.info.name!r}, split={self.info.split!r}, "
        f"next_batch={self._next_batch}, num_batches={self.num_batches})"
    )


def make_iterator(
    source: RandomAccessSource,
    *,
    info: DatasetInfo,
    batch_size: int,
    seed: int = 0,
    shuffle: bool,
    num_epochs: int | None,
    drop_remainder: bool,
    process_index: int,
    process_count: int,
    transform: grain.transforms.RandomMap | Callable[..., Any] | None = None,
    random_transform: bool = False,
    read_options: grain.ReadOptions | None = None,
    config: Mapping[str, Any] | None = None,
) -> DataIterator:
  """Builds a :class:`DataIterator` over any random-access ``source``.

  Args:
    source: object with ``__len__`` and ``__getitem__(int)`` returning a dict.
    info: description of the split, attached to the iterator.
    batch_size: GLOBAL batch size; must be divisible by ``process_count``.
    seed: non-negative integer seed of shuffling and augmentation.
    shuffle: shuffle (differently every epoch).
    num_epochs: passes over the data; ``None`` repeats forever.
    drop_remainder: drop the last incomplete global batch of a finite stream.
    process_index: index of this process in ``[0, process_count)``.
    process_count: number of processes reading disjoint parts of each batch.
    transform: per-example function; ``transform(example, rng)`` /
      ``RandomMap`` if ``random_transform`` else ``transform(example)`` /
      ``grain.transforms.Map``.
    random_transform: whether ``transform`` takes an rng.
    read_options: grain thread/prefetch options.
    config: extra (JSON-able) configuration recorded in the state and checked
      by ``set_state``.

  Returns:
    A :class:`DataIterator`.

  Raises:
    ValueError: on invalid batch size / process / seed / epoch arguments.
  """
  if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  if not isinstance(process_count, (int, np.integer)) or process_count <= 0:
    raise ValueError(
        f"process_count must be a positive int, got {process_count!r}"
    )
  if batch_size % process_count:
    raise ValueError(
        f"batch_size={batch_size} (global) is not divisible by "
        f"process_count={process_count}"
    )
  if not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index={process_index} not in [0, process_count="
        f"{process_count})"
    )
  if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
    raise ValueError(f"seed must be a non-negative int, got {seed!r}")
  if num_epochs is not None and (
      not isinstance(num_epochs, (int, np.integer)) or num_epochs <= 0
  ):
    raise ValueError(
        f"num_epochs must be a positive int or None, got {num_epochs!r}"
    )
  if len(source) == 0:
    raise ValueError(f"dataset {info.name!r} split {info.split!r} is empty")

  stream = grain.MapDataset.source(source)
  if shuffle:
    stream = stream.shuffle(seed=_derive_seed(int(seed), 0))
  stream = stream.repeat(None if num_epochs is None else int(num_epochs))
  if transform is not None:
    if random_transform:
      stream = stream.random_map(transform, seed=_derive_seed(int(seed), 1))
    else:
      stream = stream.map(transform)
  batches = _ProcessBatchDataset(
      stream,
      global_batch_size=int(batch_size),
      process_index=int(process_index),
      process_count=int(process_count),
      drop_remainder=bool(drop_remainder),
  )
  full_config = {
      "dataset": info.name,
      "split": info.split,
      "seed": int(seed),
      "batch_size": int(batch_size),
      "shuffle": bool(shuffle),
      "num_epochs": None if num_epochs is None else int(num_epochs),
      "drop_remainder": bool(drop_remainder),
      **(config or {}),
  }
  return DataIterator(
      batches,
      info=info,
      config=full_config,
      read_options=read_options or grain.ReadOptions(),
      local_batch_size=int(batch_size) // int(process_count),
  )
