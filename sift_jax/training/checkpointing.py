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
:class:`VerifiedCheckpointer` is the loop's side of this: it checks the losses
(one host sync per check, never per step), marks checkpoints verified, and
turns a non-finite loss into :class:`NonFiniteLossError`.

Integrity. Every checkpoint stores a checksum of each state leaf (the wrapping
``uint32`` sum of its bit pattern, computed on device, so any single flipped
bit changes it). :meth:`Checkpointer.restore_newest` tries the checkpoints
newest first and returns the newest that restores and whose checksums match;
each damaged one on the way (a truncated, deleted or corrupted file) is moved
aside, not deleted, into ``<directory>.damaged/`` with a one-line warning
naming it. Checkpoints of another run are never moved: they are refused with
:class:`IncompatibleCheckpointError`. Half-written ``*.orbax-checkpoint-tmp*``
directories (a process killed while saving) are removed when a directory is
opened.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from sift_jax.masks import tree_paths
from sift_jax.training import config as config_lib

__all__ = ["Checkpointer", "IncompatibleCheckpointError", "NonFiniteLossError", "VerifiedCheckpointer",
           "state_checksums", "state_fingerprint"]

_FORMAT = "sift_jax.training.checkpoint/v1"
_log = logging.getLogger("sift_jax")


class IncompatibleCheckpointError(ValueError):
  """The checkpoint in a workdir belongs to a different run."""


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite.

  Attributes:
    step: 0-based index of the training step whose loss was not finite: the
      loss of the state after ``step`` updates (for a non-finite eval loss,
      the step the eval ran at).
    last_checkpoint: The newest checkpoint kept in the workdir, one whose own
      loss was verified finite (``< step``; None if there is none). Resuming
      the workdir continues from it.
  """

  def __init__(self, message: str, *, step: int, last_checkpoint: Optional[int]):
    super().__init__(message)
    self.step = step
    self.last_checkpoint = last_checkpoint


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """Wrapping ``uint32`` sum of the bit pattern of ``x`` (any dtype)."""
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    words = x.astype(jnp.uint32)
  elif x.dtype.itemsize == 4:
    words = jax.lax.bitcast_convert_type(x, jnp.uint32)
  elif x.dtype.itemsize in (1, 2):
    unsigned = jnp.uint8 if x.dtype.itemsize == 1 else jnp.uint16
    words = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  else:  # 8 bytes: two words per element
    words = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jnp.sum(words, dtype=jnp.uint32)


_checksums = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def state_checksums(state: Any) -> dict[str, int]:
  """``{path: checksum}`` of every leaf of a state (see the module docstring); one host sync."""
  flat, _ = jax.tree_util.tree_flatten_with_path(state)
  sums = jax.device_get(_checksums([leaf for _, leaf in flat]))
  return {tree_paths.path_str(p): int(c) for (p, _), c in zip(flat, sums)}


class _Damaged(Exception):
  """A checkpoint that cannot be restored intact (internal to :meth:`Checkpointer.restore_newest`)."""


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
    # cleanup_tmp_directories: half-written saves of a killed process are removed on open.
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                           enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data", "meta"))
    self._reset_verified()

  def _reset_verified(self) -> None:
    steps = self.all_steps()
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
            "state": state_fingerprint(state), "checksums": state_checksums(state)}
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

  def _read_meta(self, step: int) -> Any:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def check_compatible(self, step: int, abstract_state: Any, *, meta: Any = None) -> None:
    """Raises :class:`IncompatibleCheckpointError` if checkpoint ``step`` is another run's."""
    if meta is None:
      try:
        meta = self._read_meta(step)
      except Exception as e:  # pylint: disable=broad-except
        raise IncompatibleCheckpointError(
            f"{self.directory} holds checkpoint step {step} that sift_jax cannot read "
            f"({type(e).__name__}: {_first_line(e)}); use another --workdir or move that directory "
            "away") from e
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
      ValueError: if its state does not match the checksums saved with it.
    """
    self._manager.wait_until_finished()
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    self.check_compatible(step, abstract_state)
    try:
      return self._restore_intact(step, abstract_state)
    except _Damaged as e:
      raise ValueError(f"{self.directory} step {step} is damaged: {e}") from e.__cause__

  def _restore_intact(self, step: int, abstract_state: Any, meta: Any = None) -> tuple[Any, dict, int]:
    """Restores checkpoint ``step``; raises :class:`_Damaged` if it cannot be read or verified."""
    try:
      if meta is None:
        meta = self._read_meta(step)
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
      state, data_state = restored.state, dict(restored.data)
    except Exception as e:  # pylint: disable=broad-except
      raise _Damaged(f"{type(e).__name__}: {_first_line(e)}") from e
    saved = meta.get("checksums") if isinstance(meta, Mapping) else None
    if saved is not None:  # (checkpoints written before checksums were stored have none)
      actual = state_checksums(state)
      wrong = sorted(p for p in set(saved) | set(actual) if saved.get(p) != actual.get(p))
      if wrong:
        raise _Damaged(f"checksum mismatch in {len(wrong)} state leaves, e.g. {wrong[0]!r}")
    return state, data_state, int(step)

  def restore_newest(self, abstract_state: Any, *,
                     agree: Callable[[bool], bool] = lambda damaged: damaged) -> Optional[tuple[Any, dict, int]]:
    """Restores the newest intact checkpoint; moves damaged newer ones aside.

    Checkpoints are tried newest first. One that cannot be read or whose
    state does not match its checksums is moved to ``<directory>.damaged/``
    (by the primary process) with a one-line warning, and the next older one
    is tried.

    Args:
      abstract_state: As for :meth:`restore`.
      agree: ``agree(damaged) -> damaged`` for all processes (a multi-process
        run passes "any process found it damaged", so all processes fall back
        together).

    Returns:
      ``(state, data_state, step)``, or None when no checkpoint is left.

    Raises:
      IncompatibleCheckpointError: the newest readable checkpoint is another
        run's, or this run's with a changed config (nothing is moved).
    """
    self._manager.wait_until_finished()
    for step in sorted(self.all_steps(), reverse=True):
      error, meta = None, None
      try:
        meta = self._read_meta(step)
      except Exception as e:  # pylint: disable=broad-except
        error = f"metadata unreadable: {type(e).__name__}: {_first_line(e)}"
      if not agree(error is not None):
        self.check_compatible(step, abstract_state, meta=meta)
        try:
          restored = self._restore_intact(step, abstract_state, meta)
        except _Damaged as e:
          error, restored = str(e), None
        if not agree(error is not None):
          # Older than a checkpoint that existed: its own loss was checked before that save.
          return restored
      self._move_aside(step, error or "damaged on another process")
    self._reset_verified()
    return None

  def _move_aside(self, step: int, reason: str) -> None:
    source = os.path.join(self.directory, str(step))
    target = os.path.join(self.directory + ".damaged", str(step))
    if jax.process_index() == 0 and os.path.exists(source):
      os.makedirs(os.path.dirname(target), exist_ok=True)
      if os.path.exists(target):
        target = f"{target}.{time.strftime('%Y%m%dT%H%M%S')}.{os.getpid()}"
      os.replace(source, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f"sift_jax_checkpoint_moved_{step}")
    _log.warning("sift_jax: checkpoint step %d in %s is damaged (%s); moved it to %s, falling back "
                 "to an older checkpoint", step, self.directory, reason, target)
    self._manager.reload()

  def reached_preemption(self, step: int) -> bool:
    """Whether the JAX preemption service (TPU pods) asks all processes to save at ``step``."""
    return bool(self._manager.reached_preemption(int(step)))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending writes and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


class VerifiedCheckpointer:
  """The loop's checkpoints with finite-loss checking: what may be kept and what is good.

  The training step's losses are device scalars; :meth:`record` keeps them and
  :meth:`check` fetches the unchecked ones in one host sync, so the loop checks
  every few steps, never per step. A finite loss at step ``s`` verifies the
  checkpoint of step ``s`` (see the module docstring); a non-finite one deletes
  the checkpoints holding that state and raises :class:`NonFiniteLossError`.
  :meth:`save` checks first, so no checkpoint is written after a diverged step.

  Args:
    checkpointer: The run's :class:`Checkpointer`.
  """

  def __init__(self, checkpointer: Checkpointer):
    self.checkpointer = checkpointer
    self._unchecked: list[tuple[int, Any]] = []

  def record(self, step: int, loss: Any) -> None:
    """Keeps the (device) loss of training step ``step`` (the state after ``step`` updates)."""
    self._unchecked.append((int(step), loss))

  def check(self) -> None:
    """Raises :class:`NonFiniteLossError` for the first non-finite loss recorded since the last check."""
    if not self._unchecked:
      return
    fresh, self._unchecked = self._unchecked, []
    losses = jax.device_get([loss for _, loss in fresh])
    for (step, _), loss in zip(fresh, losses):
      if not math.isfinite(float(loss)):
        raise self._diverged(step, f"training loss {float(loss)}")
    self.checkpointer.mark_verified(fresh[-1][0])

  def check_eval(self, step: int, loss: float) -> None:
    """An eval at ``step`` verifies its checkpoint, or stops the run if its loss is not finite."""
    if not math.isfinite(loss):
      raise self._diverged(step, f"eval loss {loss}")
    self.checkpointer.mark_verified(step)

  def save(self, step: int, state: Any, data_state: Mapping[str, Any]) -> None:
    """Checks the recorded losses, then saves (see :meth:`Checkpointer.save`)."""
    self.check()
    self.checkpointer.save(step, state, data_state)

  def _diverged(self, bad_step: int, what: str) -> NonFiniteLossError:
    ckpt = self.checkpointer
    ckpt.discard_from(bad_step)
    if bad_step > 0:
      ckpt.mark_verified(bad_step - 1)
    good = ckpt.last_verified_step()
    where = (f"the last good checkpoint (its own loss finite) in {ckpt.directory} is step {good}; "
             f"resuming this workdir continues from it" if good is not None else
             f"there is no good checkpoint in {ckpt.directory}; the run would start over")
    return NonFiniteLossError(
        f"non-finite {what} at step {bad_step}; stopped. Checkpoints of steps >= {bad_step} hold "
        f"that state and were deleted; {where}. Lower optimizer.learning_rate or enable "
        f"optimizer.grad_clip_norm in another --workdir", step=bad_step, last_checkpoint=good)


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0][:300] if text else repr(error)


def _show(value: Any) -> str:
  return "no such key" if value is config_lib.MISSING else repr(value)
