"""Metrics output: ``metrics.jsonl`` and TensorBoard event files, and the train-metric window.

What a run logs is a function of its checkpointed state, so a run resumed after
any interruption writes the same records as an uninterrupted one: the train
record of step ``s`` averages the per-step metrics since the previous log step
(:class:`TrainWindow`, whose unlogged part is saved with every checkpoint), and
a resumed run first drops what its predecessor wrote after the checkpoint it
resumes from. The wall-clock fields (``steps_per_second``, ``wall_seconds``)
are the only values that differ.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np

__all__ = ["MetricsWriter", "TrainWindow", "read_metrics", "TIMING_KEYS"]

# Record fields measured by the wall clock: the only ones a resumed run cannot reproduce.
TIMING_KEYS = ("steps_per_second", "wall_seconds")


class TrainWindow:
  """The per-step train metrics since the last log step, averaged into one record.

  The metrics stay on device until :meth:`mean` (one host sync per log
  interval). :meth:`state` / :meth:`from_state` carry the window through a
  checkpoint as JSON (exact: each value with its dtype), so a resumed run's
  next record averages the same steps as an uninterrupted run's.
  """

  def __init__(self, steps: Optional[list] = None, metrics: Optional[list] = None):
    self._steps: list[int] = list(steps or [])
    self._metrics: list[Mapping[str, Any]] = list(metrics or [])
    self._restored = len(self._steps)
    self._started = time.time()

  def __len__(self) -> int:
    return len(self._steps)

  def add(self, step: int, metrics: Mapping[str, Any]) -> None:
    self._steps.append(int(step))
    self._metrics.append(metrics)

  def mean(self) -> dict[str, float]:
    """The window's mean of each metric, plus ``steps_per_second``; empties the window."""
    values = jax.device_get(self._metrics)
    out = {k: float(np.mean([v[k] for v in values])) for k in values[-1]}
    ran_here = len(values) - self._restored
    out["steps_per_second"] = ran_here / max(time.time() - self._started, 1e-9)
    self._steps, self._metrics, self._restored = [], [], 0
    self._started = time.time()
    return out

  def state(self) -> dict[str, Any]:
    """JSON-able contents (fetches them from the device)."""
    values = jax.device_get(self._metrics)
    return {"steps": list(self._steps),
            "metrics": [{k: [np.asarray(x).tolist(), str(np.asarray(x).dtype)] for k, x in v.items()}
                        for v in values]}

  @classmethod
  def from_state(cls, state: Optional[Mapping[str, Any]]) -> "TrainWindow":
    if not state:
      return cls()
    metrics = [{k: np.asarray(value, dtype=dtype) for k, (value, dtype) in m.items()}
               for m in state["metrics"]]
    return cls(steps=state["steps"], metrics=metrics)


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

  Each record is ``{"step": int, "split": "train"|"eval"|..., **scalars}``.
  Only the writing process (process 0 in a multi-host run) touches the files.

  A run resumed at step ``k`` (``resume_step=k``) first drops what the
  interrupted run wrote after its checkpoint: the records with ``step > k``
  and the ``summary`` record of step ``k`` (the resumed run writes them
  again), and lines a crash left unparsable; a run that starts from scratch
  (``resume_step=-1``: no checkpoint) drops every record. The file is
  rewritten atomically (a temporary file renamed over it) and then appended
  to; TensorBoard hides the events after ``k`` (``purge_step``; all of them
  for ``k = -1``). The loop calls :meth:`flush` before each checkpoint so that
  no record of a checkpointed step is lost to a crash.

  Args:
    workdir: Run directory.
    enabled: False for non-writing processes (every method becomes a no-op).
    tensorboard: Also write TensorBoard event files under ``DIR/tensorboard``.
    resume_step: The step the run continues from (-1: from scratch; None:
      keep every record).
  """

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True,
               resume_step: Optional[int] = None):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._enabled = enabled
    self._file = None
    self._tb = None
    self.dropped = 0
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      if resume_step is not None:
        self.dropped = _truncate(self.path, int(resume_step))
      self._file = open(self.path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
      if tensorboard:
        import tensorboardX  # pylint: disable=import-outside-toplevel
        tb_dir = os.path.join(workdir, "tensorboard")
        purge = int(resume_step) + 1 if resume_step is not None and os.path.isdir(tb_dir) else None
        # TensorBoard hides the events of steps >= purge_step that older files hold.
        self._tb = tensorboardX.SummaryWriter(tb_dir, purge_step=purge)

  def write(self, step: int, split: str, scalars: Mapping[str, Any]) -> None:
    if not self._enabled:
      return
    if self._file is None:
      raise ValueError(f"MetricsWriter.write(step={step}, split={split!r}) after close()")
    record = {"step": int(step), "split": split}
    record.update({k: _to_python(v) for k, v in scalars.items()})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k not in ("step", "split") and isinstance(v, (int, float)):
          self._tb.add_scalar(f"{split}/{k}", v, int(step))

  def flush(self) -> None:
    """Hands every record to the OS (they then survive a killed process)."""
    if self._file is not None:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _truncate(path: str, step: int) -> int:
  """Drops the records after ``step`` (see :class:`MetricsWriter`); returns how many."""
  if not os.path.exists(path):
    return 0
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      record_step = int(record["step"])
    except (ValueError, KeyError, TypeError):
      continue  # a line cut short by a crash
    if record_step < step or (record_step == step >= 0 and record.get("split") != "summary"):
      kept.append(line if line.endswith("\n") else line + "\n")
  dropped = len(lines) - len(kept)
  if dropped:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  return dropped


def read_metrics(workdir: str, split: Optional[str] = None) -> list[dict]:
  """The records of ``DIR/metrics.jsonl`` (optionally of one split)."""
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path, encoding="utf-8") as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if split is None or r.get("split") == split]
