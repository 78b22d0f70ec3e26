"""TFDS ArrayRecord sources (no TensorFlow needed).

Data are read with ``tfds.data_source(name, split=..., data_dir=...,
download=False)``, the random-access (ArrayRecord) reader of
``tensorflow_datasets`` that decodes examples with NumPy/PIL. Nothing is ever
downloaded or prepared here: the dataset must already exist under
``data_dir`` in ``array_record`` format, e.g. prepared on a machine with
TensorFlow by::

    tfds build cifar100 --data_dir=/path/to/tfds --file_format=array_record

(ImageNet additionally needs the manually downloaded archives in
``<data_dir>/downloads/manual``), or copied from such a machine
(``<data_dir>/<name>/<version>/`` with ``dataset_info.json`` and
``*.array_record-*`` files). Otherwise :class:`DatasetNotPreparedError` is
raised.
"""

from __future__ import annotations

import glob as glob_lib
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "DatasetNotPreparedError",
    "TfdsImageSource",
    "open_tfds_split",
]


class DatasetNotPreparedError(FileNotFoundError):
  """A TFDS dataset is not available in ArrayRecord format under data_dir."""


def _searched_data_dirs(data_dir: str | os.PathLike | None) -> list[str]:
  if data_dir is not None:
    return [os.fspath(data_dir)]
  try:
    from tensorflow_datasets.core.utils import file_utils  # pylint: disable=g-import-not-at-top

    return [os.fspath(p) for p in file_utils.list_data_dirs()]
  except (ImportError, AttributeError):
    from tensorflow_datasets.core import constants  # pylint: disable=g-import-not-at-top

    return [constants.DATA_DIR]


def _prepared_file_formats(name: str, data_dirs: Sequence[str]) -> set[str]:
  """File formats of prepared versions of ``name`` found on disk."""
  base = name.split(":")[0]  # drop a ":version" suffix
  formats = set()
  for data_dir in data_dirs:
    pattern = os.path.join(data_dir, base, "**", "dataset_info.json")
    for info_path in glob_lib.glob(pattern, recursive=True):
      try:
        with open(info_path) as f:
          formats.add(json.load(f).get("fileFormat", "tfrecord"))
      except (OSError, ValueError):
        formats.add("unreadable")
  return formats


def _not_prepared_message(
    name: str, data_dirs: Sequence[str], formats: set[str]
) -> str:
  where = ", ".join(repr(d) for d in data_dirs)
  if formats:
    found = (
        f"it was found under {where} only in format(s) {sorted(formats)}, but "
        "random access needs file_format=array_record"
    )
  else:
    found = f"no prepared copy was found under data_dir {where}"
  manual = (
      " (ImageNet also needs the original archives in "
      "<data_dir>/downloads/manual)"
      if name.startswith("imagenet")
      else ""
  )
  return (
      f"TFDS dataset {name!r} is not prepared: {found}. Prepare it on a "
      "machine with TensorFlow with `tfds build "
      f"{name} --data_dir={data_dirs[0]} --file_format=array_record`{manual}, "
      "or copy an already prepared ArrayRecord directory "
      f"(<data_dir>/{name}/<version>/) there; pass data_dir=... or set "
      "TFDS_DATA_DIR to point at it."
  )


def open_tfds_split(
    name: str, *, split: str, data_dir: str | os.PathLike | None = None
) -> Any:
  """``tfds.data_source(name, split=split, data_dir=data_dir)``, never downloading.

  Raises:
    DatasetNotPreparedError: if no ArrayRecord copy of ``name`` exists.
    ValueError: if ``name`` is not a TFDS dataset.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  data_dir_arg = None if data_dir is None else os.fspath(data_dir)
  try:
    return tfds.data_source(
        name, split=split, data_dir=data_dir_arg, download=False, try_gcs=False
    )
  except tfds.core.registered.DatasetNotFoundError as e:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise ValueError(
        f"unknown TFDS dataset name={name!r} ({first_line}); see "
        "`tfds.list_builders()`"
    ) from e
  except (NotImplementedError, FileNotFoundError, AssertionError, OSError) as e:
    data_dirs = _searched_data_dirs(data_dir)
    formats = _prepared_file_formats(name, data_dirs)
    if "array_record" in formats:
      raise  # Prepared correctly: a different problem, keep the original.
    raise DatasetNotPreparedError(
        _not_prepared_message(name, data_dirs, formats)
    ) from e


class TfdsImageSource:
  """Adapts a TFDS data source to ``{"image": uint8 HWC, "label": int}``.

  Other features (ids, file names, coarse labels...) are dropped; grayscale
  images get a channel axis.
  """

  def __init__(self, data_source: Any, *, label_key: str = "label"):
    self._source = data_source
    self._label_key = label_key

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._source[int(index)]
    image = np.asarray(example["image"])
    if image.ndim == 2:
      image = image[..., None]
    return {"image": image, "label": int(example[self._label_key])}

  def __repr__(self) -> str:
    return f"TfdsImageSource({self._source!r}, label_key={self._label_key!r})"
