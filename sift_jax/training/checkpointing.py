"""Checkpoints of a run with orbax's ``CheckpointManager``.

One checkpoint holds three items:

* ``state``: the :class:`~sift_jax.training.TrainState` (parameters, masks and
  the rest of the optimizer state, model state, step, RNG), saved with
  ``StandardSave`` and restored into an abstract target from
  ``jax.eval_shape`` carrying the run's shardings, so optax NamedTuples and
  :class:`sift_jax.SparseState` come back typed and already sharded;
* ``data``: the training data iterator's JSON state;
* ``meta``: a fingerprint of the run (every state leaf's path, shape and dtype,
  and the config entries that decide them) and the run's resolved config.
  Restoring into a run whose fingerprint or config differs (beyond the
  operational keys of
  :data:`sift_jax.training.config.RESUME_OPERATIONAL_KEYS`) is refused with a
  message naming the differences, and nothing in the directory is touched.

Retention is verified-first. A checkpoint of step ``s`` holds the state after
``s`` updates; it is *verified* once the loss computed from that state (the
training loss of step ``s``, or an eval at step ``s``) was found finite. The
newest ``keep`` verified checkpoints are kept, and the newer, not yet verified
ones besides them (at most one in the training loop, which checks the losses
before every save); a verified checkpoint is only deleted once ``keep`` newer
verified ones exist. A non-finite loss at step ``b`` deletes the checkpoints of
steps ``>= b`` (:meth:`Checkpointer.discard_from`): they hold the state that
produced it, or states computed from it. Orbax's own ``max_to_keep`` is off.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from sift_jax.masks import tree_paths
from sift_jax.training import config as config_lib

__all__ = ["Checkpointer", "IncompatibleCheckpointError", "state_fingerprint"]

_FORMAT = "sift_jax.training.checkpoint/v1"
_log = logging.getLogger("sift_jax")


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
  """Save / restore a run's state, data-iterator state, fingerprint and config.

  Args:
    directory: Checkpoint directory (made absolute, created if missing).
    keep: Number of most recent *verified* checkpoints to keep (see the
      module docstring); newer unverified ones are kept besides them.
    run_fingerprint: JSON-able description of what the state's layout depends
      on (model, family, sparsity, optimizer...); compared on restore together
      with :func:`state_fingerprint`.
    run_config: The run's resolved config as
      :func:`sift_jax.training.config.resume_config` gives it, stored in every
      checkpoint. On restore, a checkpoint that stores one is compared key by
      key (operational keys excepted) instead of ``run_fingerprint``. ``None``
      stores and compares no config.
    async_save: Write in a background thread (the default); :meth:`close`
      and :meth:`wait` block until writes end.

  On opening a directory that already holds checkpoints, every one but the
  newest counts as verified (the loop saves a checkpoint only after checking
  the losses of all earlier steps); the newest is verified by the resumed run.
  """

  def __init__(self, directory: str, *, keep: int, run_fingerprint: Mapping[str, Any],
               run_config: Optional[Mapping[str, Any]] = None, async_save: bool = True):
    if not isinstance(keep, (int, np.integer)) or keep < 1:
      raise ValueError(f"keep must be an int >= 1, got {keep!r}")
    self.directory = os.path.abspath(os.fspath(directory))
    self._keep = int(keep)
    self._run_fingerprint = dict(run_fingerprint)
    self._run_config = None if run_config is None else dict(run_config)
    # Retention is managed here (verified-first), not by orbax's max_to_keep.
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data", "meta"))
    steps = sorted(self.all_steps())
    # States with step <= this watermark have a verified finite loss.
    self._verified_through = steps[-2] if len(steps) > 1 else -1

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(int(s) for s in self._manager.all_steps())

  def verified_steps(self) -> list[int]:
    """Steps of the kept checkpoints whose state's loss was verified finite."""
    return [s for s in self.all_steps() if s <= self._verified_through]

  def last_verified_step(self) -> Optional[int]:
    """The newest verified checkpoint (the last good one), or None."""
    verified = self.verified_steps()
    return verified[-1] if verified else None

  def save(self, step: int, state: Any, data_state: Mapping[str, Any]) -> None:
    """Saves a checkpoint at ``step`` (asynchronously).

    It counts as verified if :meth:`mark_verified` already covered ``step``;
    then the oldest verified checkpoints beyond ``keep`` are deleted.
    """
    meta = {"format": _FORMAT, "step": int(step), "run": self._run_fingerprint,
            "state": state_fingerprint(state)}
    if self._run_config is not None:
      meta["config"] = self._run_config
    self._manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data_state)),
        meta=ocp.args.JsonSave(meta)), force=True)
    self._prune()

  def mark_verified(self, step: int) -> None:
    """Records that the states of steps ``<= step`` have finite losses; prunes beyond ``keep``."""
    if int(step) > self._verified_through:
      self._verified_through = int(step)
      self._prune()

  def _prune(self) -> None:
    verified = self.verified_steps()
    stale = verified[:-self._keep]
    if stale:
      self._manager.wait_until_finished()
      for s in stale:
        self._manager.delete(s)

  def discard_from(self, step: int) -> None:
    """Deletes the checkpoints of steps ``>= step`` (they hold a non-finite state).

    Waits for pending writes first.
    """
    self._manager.wait_until_finished()
    for s in self.all_steps():
      if s >= int(step):
        self._manager.delete(s)
    self._verified_through = min(self._verified_through, int(step) - 1)

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
    saved_config = meta.get("config")
    if self._run_config is not None and isinstance(saved_config, Mapping):
      for key, saved, current in config_lib.resume_differences(saved_config, self._run_config):
        problems.append(f"{key}: checkpoint has {_show(saved)}, this run {_show(current)}")
    else:
      if self._run_config is not None:
        _log.warning("sift_jax: %s step %d stores no config; comparing the model and optimizer only",
                     self.directory, step)
      saved_run = meta.get("run", {})
      for key in sorted(set(saved_run) | set(self._run_fingerprint)):
        if saved_run.get(key) != self._run_fingerprint.get(key):
          problems.append(f"{key}: checkpoint has {saved_run.get(key)!r}, this run "
                          f"{self._run_fingerprint.get(key)!r}")
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
      shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
      raise IncompatibleCheckpointError(
          f"{self.directory} holds an incompatible checkpoint (step {step}): {shown}. "
          "A resumed run must use the config it started with (only logging, eval, checkpoint, "
          "progress-bar, data-location and mesh-layout keys may change). Nothing was changed; "
          "use another --workdir (or move that directory away) to start a new run, or pass the "
          "checkpoint's values to continue this one")

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


def _show(value: Any) -> str:
  return "no such key" if value is config_lib.MISSING else repr(value)
