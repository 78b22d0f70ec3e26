"""Metrics output: ``metrics.jsonl`` and TensorBoard event files."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Optional

import numpy as np

__all__ = ["MetricsWriter", "read_metrics"]


def _to_python(value: Any) -> Any:
  value = np.asarray(value)
  if value.ndim == 0:
    item = value.item()
    if isinstance(item, float) and not math.isfinite(item):
      return repr(item)  # JSON has no NaN / inf
    return item
  return value.tolist()


class MetricsWriter:
  """Appends one JSON object per line to ``DIR/metrics.jsonl`` and logs scalars to TensorBoard.

  Each record is ``{"step": int, "split": "train"|"eval", **scalars}``; on
  resume the file is appended to. Only the writing process (process 0 in a
  multi-host run) touches the files.

  Args:
    workdir: Run directory.
    enabled: False for non-writing processes (every method becomes a no-op).
    tensorboard: Also write TensorBoard event files under ``DIR/tensorboard``.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._enabled = enabled
    self._file = None
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._file = open(self.path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
      if tensorboard:
        import tensorboardX  # pylint: disable=import-outside-toplevel
        self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, scalars: Mapping[str, Any]) -> None:
    if not self._enabled:
      return
    record = {"step": int(step), "split": split}
    record.update({k: _to_python(v) for k, v in scalars.items()})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k not in ("step", "split") and isinstance(v, (int, float)):
          self._tb.add_scalar(f"{split}/{k}", v, int(step))

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir: str, split: Optional[str] = None) -> list[dict]:
  """The records of ``DIR/metrics.jsonl`` (optionally of one split)."""
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path, encoding="utf-8") as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if split is None or r.get("split") == split]
