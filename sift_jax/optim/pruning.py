"""Magnitude pruning as optax transformations: gradual (Zhu & Gupta) and one-shot.

Both are thin factories over :func:`sift_jax.optim.dynamic_sparse`: masks
start dense and only shrink, ranked by :func:`~sift_jax.optim.magnitude_score`,
nothing is regrown. Pruned weights are exactly zero from the pruning step on
and their optimizer moments are reset, as for RigL's dropped weights.

References:
  Zhu, Gupta, "To prune, or not to prune: exploring the efficacy of pruning for
  model compression", ICLR Workshop 2018 (arXiv 1710.01878): the cubic
  gradual-pruning schedule.
  Han, Pool, Tran, Dally, "Learning both Weights and Connections for Efficient
  Neural Networks", NeurIPS 2015: magnitude pruning of a trained model.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sift_jax.masks import selection
from sift_jax.optim import schedules
from sift_jax.optim import sparse as sparse_lib

__all__ = ["cubic_sparsity_schedule", "gradual_magnitude_pruning", "oneshot_magnitude_pruning",
           "magnitude_masks"]


def cubic_sparsity_schedule(*, start_step: int, end_step: int, power: float = 3.0) -> optax.Schedule:
  """Zhu & Gupta's pruning progress ``c(t) = 1 - (1 - (t - t0) / (t1 - t0))^power``.

  ``c`` is 0 before ``start_step`` (``t0``) and 1 from ``end_step`` (``t1``)
  on, so the sparsity ``s_t = c(t) * s_final`` rises fast first and flattens
  out as the network has fewer weights left to lose (Zhu & Gupta 2018, eq. 1
  with ``s_i = 0``). ``start_step == end_step`` prunes all at once.

  Raises:
    ValueError: for ``end_step < start_step`` or ``power <= 0``.
  """
  start, end = int(start_step), int(end_step)
  if end < start:
    raise ValueError(f"end_step ({end_step}) must not be before start_step ({start_step})")
  if not float(power) > 0:
    raise ValueError(f"power must be > 0, got {power!r}")

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    if end == start:
      return jnp.where(t >= start, jnp.float32(1.0), jnp.float32(0.0))
    frac = jnp.clip((t - jnp.float32(start)) / jnp.float32(end - start), 0.0, 1.0)
    return 1.0 - (1.0 - frac) ** jnp.float32(power)

  return schedule


def gradual_magnitude_pruning(
    inner: optax.GradientTransformation, *, sparsity: Optional[float] = None,
    densities: Any = None, policy: Optional[selection.SparsityPolicy] = None,
    distribution: str = "uniform", scope: str = "layerwise", total_steps: Optional[int] = None,
    update_every: int = 100, start_step: int = 0, end_step: Optional[int] = None,
    end_fraction: float = 0.75, power: float = 3.0, optimizer_step_on_update: bool = False,
    seed: Union[int, jax.Array] = 0) -> optax.GradientTransformationExtraArgs:
  """Gradual magnitude pruning from dense to the target (Zhu & Gupta 2018).

  Masks start all ones. Every ``update_every`` steps from ``start_step`` to
  ``end_step``, each sparse tensor keeps its ``n(t) = size - round(c(t) *
  (size - n_final))`` weights of largest ``|w|`` (``c`` from
  :func:`cubic_sparsity_schedule`, ``n_final`` the count of ``sparsity``
  under ``distribution``); the last pruning step is the last update step not
  after ``end_step``, and it reaches ``n_final`` exactly. Then training goes
  on with fixed masks.

  Args:
    inner: Any optax optimizer; it sees masked gradients.
    sparsity: Final sparsity in [0, 1) (or ``densities``: final per-leaf densities).
    densities: Pytree of final per-leaf densities.
    policy: :class:`sift_jax.SparsityPolicy` selecting the prunable leaves.
    distribution: ``"uniform"``, ``"erk"`` or ``"er"``: how ``sparsity``
      spreads over the leaves.
    scope: ``"layerwise"`` (each tensor reaches its own count) or
      ``"global"`` (one ranking of all prunable weights, same total count).
    total_steps: Training length; ``end_step`` defaults to
      ``int(end_fraction * total_steps)``.
    update_every: Steps between pruning steps (``delta_t``).
    start_step: First pruning step (``t0``; it prunes nothing, ``c(t0) = 0``).
    end_step: Step by which the final sparsity is reached.
    end_fraction: Default ``end_step`` as a fraction of ``total_steps``.
    power: Exponent of the schedule (3: Zhu & Gupta's cubic).
    optimizer_step_on_update: False (default): a pruning step only prunes.
      True: it takes the optimizer step first and prunes the stepped weights.
    seed: int or PRNG key for tie-breaking.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with
    :class:`~sift_jax.optim.SparseState`.

  Raises:
    ValueError: naming the offending option.
  """
  timing = schedules.make_mask_update_schedule(
      update_every=update_every, start_step=start_step, end_step=end_step, total_steps=total_steps,
      end_fraction=end_fraction)
  # Snap the end onto the update grid so that the last pruning step reaches
  # the final count (an off-grid end would stop short of it).
  last = timing.start_step + ((timing.end_step - timing.start_step) // timing.update_every
                              ) * timing.update_every
  timing = schedules.MaskUpdateSchedule(
      update_every=timing.update_every, start_step=timing.start_step, end_step=last + 1,
      drop_fraction=0.0, drop_schedule="constant")
  return sparse_lib.dynamic_sparse(
      inner, drop_score_fn=sparse_lib.magnitude_score, update_schedule=timing,
      sparsity_progress=cubic_sparsity_schedule(start_step=timing.start_step, end_step=last,
                                                power=power),
      start_dense=True, sparsity=sparsity, densities=densities, policy=policy,
      distribution=distribution, scope=scope, optimizer_step_on_update=optimizer_step_on_update,
      seed=seed, name="gradual_magnitude_pruning")


def oneshot_magnitude_pruning(
    inner: optax.GradientTransformation, *, sparsity: Optional[float] = None,
    densities: Any = None, policy: Optional[selection.SparsityPolicy] = None,
    distribution: str = "uniform", scope: str = "layerwise", prune_step: int = 0,
    seed: Union[int, jax.Array] = 0) -> optax.GradientTransformationExtraArgs:
  """One-shot magnitude pruning at ``prune_step``, then fine-tuning with fixed masks.

  Steps before ``prune_step`` train dense. At ``prune_step`` the weights are
  pruned as they are (no optimizer step that step): each sparse tensor
  keeps its ``n_final`` weights of largest ``|w|`` (``scope="layerwise"``),
  or all prunable weights are ranked together and the summed count is kept
  (``scope="global"``, Han et al. 2015). Use ``prune_step=0`` to prune a
  trained model passed as the params, or :func:`magnitude_masks` for the
  masks alone.

  Args:
    inner: Any optax optimizer; it sees masked gradients.
    sparsity: Target sparsity in [0, 1) (or ``densities``).
    densities: Pytree of per-leaf densities.
    policy: :class:`sift_jax.SparsityPolicy` selecting the prunable leaves.
    distribution: ``"uniform"``, ``"erk"`` or ``"er"`` (layerwise counts; the
      global scope keeps their sum).
    scope: ``"layerwise"`` or ``"global"``.
    prune_step: The step (``update`` call, from 0) that prunes.
    seed: int or PRNG key for tie-breaking.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with
    :class:`~sift_jax.optim.SparseState`.

  Raises:
    ValueError: naming the offending option.
  """
  prune_step = schedules._as_int(prune_step, "prune_step")  # pylint: disable=protected-access
  if prune_step is None or prune_step < 0:
    raise ValueError(f"prune_step must be an int >= 0, got {prune_step!r}")
  return sparse_lib.dynamic_sparse(
      inner, drop_score_fn=sparse_lib.magnitude_score,
      update_schedule=lambda step: jnp.asarray(step, jnp.int32) == prune_step,
      sparsity_progress=lambda step: jnp.float32(1.0), start_dense=True, sparsity=sparsity,
      densities=densities, policy=policy, distribution=distribution, scope=scope,
      optimizer_step_on_update=False, seed=seed, name="oneshot_magnitude_pruning")


def magnitude_masks(params: Any, *, sparsity: Optional[float] = None, densities: Any = None,
                    policy: Optional[selection.SparsityPolicy] = None,
                    distribution: str = "uniform", scope: str = "layerwise",
                    seed: Union[int, jax.Array] = 0) -> Any:
  """Bool masks keeping the largest ``|w|`` of a (trained) model.

  The masks :func:`oneshot_magnitude_pruning` prunes to at step 0: per
  tensor (``"layerwise"``) or ranked over all prunable tensors
  (``"global"``); leaves the policy leaves out are all True. Exact counts;
  ties are broken pseudo-randomly from ``seed``. Fine-tune with
  ``sift_jax.static_sparse(inner, masks=magnitude_masks(params, ...))``.

  Returns:
    A bool pytree with the structure of ``params``.
  """
  tx = oneshot_magnitude_pruning(optax.set_to_zero(), sparsity=sparsity, densities=densities,
                                 policy=policy, distribution=distribution, scope=scope, seed=seed)
  state = tx.init(params)
  zeros = jax.tree.map(lambda p: jnp.zeros(np.shape(p), jnp.result_type(p)), params)
  _, state = tx.update(zeros, state, params)
  return state.masks
