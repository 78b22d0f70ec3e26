"""Training FLOPs of a run by sparse method (Evci et al. 2020, Appendix H; docs/method.md, section 5)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

TRAINING_METHODS = ("dense", "static", "set", "rigl", "gmp", "oneshot")


class TrainingFlops(NamedTuple):
  """Training cost of one example per step, and of a whole run.

  Attributes:
    per_step: Cost of one example at a step outside any mask-update window
      (``3 f_D`` dense, ``3 f_S`` sparse).
    per_step_update_window: RigL's amortised cost of one example at a step
      inside its update window (equal to ``per_step`` for other methods).
    update_window_steps: Steps inside the window (``end_fraction * total_steps``).
    total: Cost of the whole run, ``batch_size`` examples per step.
  """

  per_step: float
  per_step_update_window: float
  update_window_steps: float
  total: float


def training_flops(f_sparse: float, f_dense: float, *, method: str, total_steps: int,
                   batch_size: int = 1, update_every: int = 100,
                   end_fraction: float = 0.75, start_step: int = 0) -> TrainingFlops:
  """Training FLOPs after Evci et al. (RigL, ICML 2020, Appendix H); docs/method.md.

  With ``f_S`` the sparse and ``f_D`` the dense forward cost of one example
  (MACs or FLOPs; the result has the same unit): dense ``3 f_D``; static and
  SET ``3 f_S``; RigL inside its update window
  ``(3 f_S * delta_t + 2 f_S + f_D) / (delta_t + 1)`` (one dense gradient
  every ``delta_t`` steps), after it ``3 f_S``. The window covers the first
  ``end_fraction * total_steps`` steps (a fraction of a step counts
  proportionally, as in the reference's ``relative_flops_utils``).

  Pruning starts dense, and a pruning step prunes after its own pass:
  ``oneshot`` costs ``3 f_D`` per step up to ``start_step`` and ``3 f_S``
  after it; ``gmp`` costs ``3 f(t)`` with ``f(t) = f_D - c(t) (f_D - f_S)``,
  ``c`` the cubic progress of :func:`sift_jax.optim.cubic_sparsity_schedule`
  at the last pruning step before ``t`` (exact when every sparse layer's cost is linear in its density
  and its sparsity is ``c(t)`` times its final sparsity, as gradual pruning
  does). ``per_step_update_window`` is then the mean cost of a step before
  the final sparsity is reached.

  Args:
    f_sparse: Sparse forward cost of one example.
    f_dense: Dense forward cost of one example (all masks one).
    method: One of :data:`TRAINING_METHODS`.
    total_steps: Training steps in the run.
    batch_size: Examples per step.
    update_every: RigL's ``delta_t`` (gradual pruning: steps between pruning steps).
    end_fraction: RigL stops updating masks at ``end_fraction * total_steps``
      (gradual pruning reaches its target there).
    start_step: First pruning step (``gmp``, ``oneshot``).

  Returns:
    A :class:`TrainingFlops`.
  """
  if method not in TRAINING_METHODS:
    raise ValueError(f"method must be one of {TRAINING_METHODS}, got {method!r}")
  for name, v in (("total_steps", total_steps), ("batch_size", batch_size), ("update_every", update_every)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{name} must be a positive integer, got {v!r}")
  if isinstance(start_step, bool) or not isinstance(start_step, (int, np.integer)) or start_step < 0:
    raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
  if not (0.0 <= float(end_fraction) <= 1.0):
    raise ValueError(f"end_fraction must be in [0, 1], got {end_fraction!r}")
  f_sparse, f_dense = float(f_sparse), float(f_dense)
  if method == "dense":
    step = 3.0 * f_dense
    return TrainingFlops(step, step, 0.0, step * batch_size * total_steps)
  step = 3.0 * f_sparse
  if method in ("static", "set"):
    return TrainingFlops(step, step, 0.0, step * batch_size * total_steps)
  if method == "oneshot":
    n_dense = float(min(int(start_step) + 1, total_steps))  # the pruning step's pass is dense
    total = batch_size * (3.0 * f_dense * n_dense + step * (total_steps - n_dense))
    return TrainingFlops(step, 3.0 * f_dense, n_dense, total)
  if method == "gmp":
    return _gmp_training_flops(f_sparse, f_dense, total_steps=total_steps, batch_size=batch_size,
                               update_every=int(update_every), end_fraction=float(end_fraction),
                               start_step=int(start_step))
  dt = float(update_every)
  window = (3.0 * f_sparse * dt + 2.0 * f_sparse + f_dense) / (dt + 1.0)
  n_window = float(end_fraction) * total_steps
  total = batch_size * (window * n_window + step * (total_steps - n_window))
  return TrainingFlops(step, window, n_window, total)


def _gmp_training_flops(f_sparse: float, f_dense: float, *, total_steps: int, batch_size: int,
                        update_every: int, end_fraction: float, start_step: int) -> TrainingFlops:
  """:func:`training_flops` of gradual magnitude pruning (same snapped end as the optimizer)."""
  end = max(int(end_fraction * total_steps), start_step + 1)
  last = start_step + ((end - start_step) // update_every) * update_every
  t = np.arange(total_steps, dtype=np.float64)
  # Step t's forward pass runs with the masks of the last pruning step before
  # it (a pruning step prunes after its own forward and backward pass).
  before = t - 1.0
  pruned_at = np.where(before >= start_step,
                       start_step + np.floor((np.minimum(before, last) - start_step) / update_every)
                       * update_every, -1.0)
  frac = np.clip((pruned_at - start_step) / max(last - start_step, 1), 0.0, 1.0)
  progress = np.where(pruned_at < 0, 0.0, 1.0 - (1.0 - frac) ** 3) if last > start_step else (
      (pruned_at >= 0).astype(np.float64))
  per_example = 3.0 * (f_dense - progress * (f_dense - f_sparse))
  n_window = float(min(last, total_steps))
  window = float(per_example[:int(n_window)].mean()) if n_window >= 1 else 3.0 * f_sparse
  return TrainingFlops(3.0 * f_sparse, window, n_window, batch_size * float(per_example.sum()))
