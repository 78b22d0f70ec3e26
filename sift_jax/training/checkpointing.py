"""Checkpoints of a run with orbax's ``CheckpointManager``.

One checkpoint holds three items:

* ``state``: the :class:`~sift_jax.training.TrainState` (parameters, masks and
  the rest of the optimizer state, model state, step, RNG), saved with
  ``StandardSave`` and restored into an abstract target from
  ``jax.eval_shape`` carrying the run's shardings, so optax NamedTuples and
  :class:`sift_jax.SparseState` come back typed and already sharded;
* ``data``: the training data iterator's JSON state;
* ``meta``: a fingerprint of the run (every state leaf's path, shape and dtype,
  and the config entries that decide them). Restoring into a run whose
  fingerprint differs is refused with a message naming the first differences,
  and nothing in the directory is touched.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from sift_jax.masks import tree_paths

__all__ = ["Checkpointer", "IncompatibleCheckpointError", "state_fingerprint"]

_FORMAT = "sift_jax.training.checkpoint/v1"


class IncompatibleCheckpointError(ValueError):
  """The checkpoint in a workdir belongs to a different run."""


def state_fingerprint(abstract_state: Any) -> dict[str, list]:
  """``{path: [shape, dtype]}`` of every leaf of a (possibly abstract) state."""
  out = {}
  flat, _ = jax.tree_util.tree_flatten_with_path(abstract_state)
  for key_path, leaf in flat:
    out[tree_paths.path_str(key_path)] = [list(np.shape(leaf)), str(np.dtype(leaf.dtype))]
  return out


class Checkpointer:
  """Save / restore a run's state, data-iterator state and fingerprint.

  Args:
    directory: Checkpoint directory (made absolute, created if missing).
    keep: Number of most recent checkpoints to keep.
    run_fingerprint: JSON-able description of what the state's layout depends
      on (model, family, sparsity, optimizer...); compared on restore together
      with :func:`state_fingerprint`.
    async_save: Write in a background thread (the default); :meth:`close`
      and :meth:`wait` block until writes end.
  """

  def __init__(self, directory: str, *, keep: int, run_fingerprint: Mapping[str, Any],
               async_save: bool = True):
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    self.directory = os.path.abspath(os.fspath(directory))
    self._run_fingerprint = dict(run_fingerprint)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data", "meta"))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: Mapping[str, Any]) -> None:
    """Saves a checkpoint at ``step`` (asynchronously); drops the oldest beyond ``keep``."""
    meta = {"format": _FORMAT, "step": int(step), "run": self._run_fingerprint,
            "state": state_fingerprint(state)}
    self._manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data_state)),
        meta=ocp.args.JsonSave(meta)), force=True)

  def check_compatible(self, step: int, abstract_state: Any) -> None:
    """Raises :class:`IncompatibleCheckpointError` if checkpoint ``step`` is another run's."""
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # pylint: disable=broad-except
      raise IncompatibleCheckpointError(
          f"{self.directory} holds checkpoint step {step} that sift_jax cannot read ({type(e).__name__}: "
          f"{e}); use another --workdir or move that directory away") from e
    if not isinstance(meta, Mapping) or meta.get("format") != _FORMAT:
      raise IncompatibleCheckpointError(
          f"{self.directory} step {step} is not a sift_jax training checkpoint (format "
          f"{meta.get('format') if isinstance(meta, Mapping) else None!r}); use another --workdir")
    problems = []
    saved_run = meta.get("run", {})
    for key in sorted(set(saved_run) | set(self._run_fingerprint)):
      if saved_run.get(key) != self._run_fingerprint.get(key):
        problems.append(f"{key}: checkpoint has {saved_run.get(key)!r}, this run {self._run_fingerprint.get(key)!r}")
    saved_state = meta.get("state", {})
    current = state_fingerprint(abstract_state)
    for path in sorted(set(saved_state) | set(current)):
      if path not in saved_state:
        problems.append(f"state leaf {path!r} is missing from the checkpoint")
      elif path not in current:
        problems.append(f"checkpoint has state leaf {path!r} that this run does not")
      elif saved_state[path] != current[path]:
        problems.append(f"state leaf {path!r}: checkpoint shape/dtype {saved_state[path]}, "
                        f"this run {current[path]}")
    if problems:
      shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
      raise IncompatibleCheckpointError(
          f"{self.directory} holds an incompatible checkpoint (step {step}): {shown}. "
          "Nothing was changed; use another --workdir or move that directory away")

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict, int]:
    """Restores ``(state, data_state, step)`` of ``step`` (default: the latest).

    Args:
      abstract_state: ``jax.eval_shape`` of the state with ``.sharding`` set
        on each leaf (``jax.ShapeDtypeStruct(..., sharding=...)``).
      step: Which checkpoint.

    Raises:
      FileNotFoundError: if there is no checkpoint.
      IncompatibleCheckpointError: if the checkpoint belongs to another run.
    """
    self._manager.wait_until_finished()
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    self.check_compatible(step, abstract_state)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored.state, dict(restored.data), step

  def reached_preemption(self, step: int) -> bool:
    """Whether the JAX preemption service (TPU pods) asks all processes to save at ``step``."""
    return bool(self._manager.reached_preemption(int(step)))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending writes and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()
