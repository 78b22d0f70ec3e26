"""Sparse training as optax gradient transformations: static, SET and RigL.

Each factory wraps any inner optax optimizer and returns an
``optax.GradientTransformationExtraArgs`` whose state carries the masks. The
transformation alone keeps every inactive weight at exactly zero: the update
it emits for an inactive weight is ``-p``, so ``optax.apply_updates``, flax's
``TrainState.apply_gradients`` and ``nnx.Optimizer`` need no extra call.

The inner optimizer only ever sees masked gradients, so its moments of
inactive weights stay zero; when a mask update grows or drops a connection
its moments are reset to zero through ``optax.tree_map_params``, which works
for any optax optimizer (chains, ``inject_hyperparams``, ``MultiSteps``...).

Mask updates happen inside the same jitted step as ordinary steps, chosen by
``lax.cond`` on the step counter: no retracing, no host callbacks.

References:
  Evci, Gale, Menick, Castro, Elsen, "Rigging the Lottery: Making All Tickets
  Winners", ICML 2020 (RigL).
  Mocanu et al., "Scalable training of artificial neural networks with adaptive
  sparse connectivity inspired by network science", Nat. Commun. 2018 (SET).
  Thangarasa et al., "Sparse-IFT: Sparse Iso-FLOP Transformations for
  Maximizing Training Efficiency", ICML 2024.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import optax

from sift_jax.masks import densities as densities_lib
from sift_jax.masks import ops, selection, topk
from sift_jax.optim import schedules

__all__ = ["SparseState", "SparseStats", "static_sparse", "set_sparse", "rigl",
           "get_masks", "get_sparse_state", "sparse_stats", "METHODS"]

METHODS = ("static", "set", "rigl")


class SparseStats(NamedTuple):
  """Cheap running statistics of the mask dynamics.

  Attributes:
    ever_active: Bool tree: weights active at any time so far (in-time
      over-parameterisation, Liu et al. ICML 2021).
    num_dropped: Connections dropped by the last mask update (all leaves).
    num_grown: Connections grown by the last mask update (all leaves).
    num_updates: Number of mask updates performed so far.
  """

  ever_active: Any
  num_dropped: jax.Array
  num_grown: jax.Array
  num_updates: jax.Array


class SparseState(NamedTuple):
  """State of :func:`static_sparse`, :func:`set_sparse` and :func:`rigl`.

  Attributes:
    count: Number of ``update`` calls so far (the training step).
    masks: Bool tree with the structure of the params (dense leaves all True).
    inner_state: State of the wrapped optimizer.
    key: Raw ``uint32`` PRNG key data (checkpoint friendly) for tie-breaking
      and SET's random growth.
    stats: :class:`SparseStats`.
  """

  count: jax.Array
  masks: Any
  inner_state: optax.OptState
  key: jax.Array
  stats: SparseStats


def _key_data(seed: Union[int, jax.Array]) -> jax.Array:
  if isinstance(seed, (int, np.integer)):
    return jax.random.key_data(jax.random.key(int(seed)))
  seed = jnp.asarray(seed) if not jax.dtypes.issubdtype(getattr(seed, "dtype", None), jax.dtypes.prng_key) else seed
  if jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(seed)
  return seed.astype(jnp.uint32)


def _sparse_transformation(
    inner: optax.GradientTransformation, *, method: str, sparsity: Optional[float],
    densities: Any, masks: Any, policy: Optional[selection.SparsityPolicy], distribution: str,
    schedule: Optional[schedules.MaskUpdateSchedule], optimizer_step_on_update: bool,
    seed: Union[int, jax.Array],
) -> optax.GradientTransformationExtraArgs:
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if sum(x is not None for x in (sparsity, densities, masks)) != 1:
    raise ValueError("give exactly one of sparsity=, densities= or masks= "
                     f"(got sparsity={sparsity!r}, densities={'set' if densities is not None else None}, "
                     f"masks={'set' if masks is not None else None})")
  if sparsity is not None:
    densities_lib.check_sparsity(sparsity)
  if distribution not in densities_lib.DISTRIBUTIONS:
    raise ValueError(f"distribution must be one of {densities_lib.DISTRIBUTIONS}, got {distribution!r}")
  policy = selection.SparsityPolicy() if policy is None else policy
  key_data = _key_data(seed)
  inner = optax.with_extra_args_support(inner)

  def resolve_densities(params):
    if densities is not None:
      return ops.check_densities(params, densities)
    if sparsity is not None:
      return densities_lib.layer_densities(params, sparsity, distribution=distribution, policy=policy)
    return None

  def updatable(params) -> list[bool]:
    """Static per-leaf flags: which leaves a mask update may change."""
    # A static mask given explicitly needs no policy; a dynamic method whose
    # policy selects nothing would silently train static masks, so it raises.
    flags = jax.tree.leaves(selection.select_sparse(
        params, policy, require_any=masks is None or method != "static"))
    dens = resolve_densities(params)
    if dens is not None:
      flags = [f and float(d) < 1.0 for f, d in zip(flags, jax.tree.leaves(dens))]
    return flags

  def init_fn(params):
    updatable(params)  # bad policies and density trees fail here, not at the first update
    init_key, state_key = jax.random.split(jax.random.wrap_key_data(key_data))
    if masks is not None:
      initial = ops.check_masks(params, masks)
      initial = jax.tree.map(jnp.asarray, initial)
    else:
      initial = ops.init_masks(init_key, params, resolve_densities(params))
    return SparseState(
        count=jnp.zeros((), jnp.int32),
        masks=initial,
        inner_state=inner.init(params),
        key=jax.random.key_data(state_key),
        stats=SparseStats(ever_active=initial, num_dropped=jnp.zeros((), jnp.int32),
                          num_grown=jnp.zeros((), jnp.int32), num_updates=jnp.zeros((), jnp.int32)),
    )

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(f"{method}: update() needs params (the transformation zeroes inactive "
                       "weights and ranks weights by magnitude)")
    treedef = jax.tree.structure(params)
    grads = ops.conform(params, updates, "updates")
    ops.check_same_shapes(params, grads, "updates")
    cur_masks = ops.conform(params, state.masks, "opt_state.masks")
    flags = updatable(params)
    p_leaves = treedef.flatten_up_to(params)
    g_leaves = treedef.flatten_up_to(grads)
    m_leaves = treedef.flatten_up_to(cur_masks)

    masked_grads = jax.tree.unflatten(
        treedef, [jnp.where(m, g, jnp.zeros_like(g)) for g, m in zip(g_leaves, m_leaves)])
    # The inner optimizer sees masked params too, so parameter-dependent terms
    # (weight decay) never leak into the moments of inactive weights, even
    # before the first update has zeroed them.
    masked_params = jax.tree.unflatten(
        treedef, [jnp.where(m, p, jnp.zeros_like(p)) for p, m in zip(p_leaves, m_leaves)])
    inner_updates, inner_state = inner.update(masked_grads, state.inner_state, masked_params,
                                              **extra_args)
    u_leaves = treedef.flatten_up_to(inner_updates)

    def zero_inactive(u, p, m):
      # The update of an inactive weight is -p, so it is exactly 0 afterwards.
      return jnp.where(m, u, -p).astype(u.dtype)

    if method == "static":
      new_updates = [zero_inactive(u, p, m) for u, p, m in zip(u_leaves, p_leaves, m_leaves)]
      new_state = SparseState(count=state.count + 1, masks=cur_masks, inner_state=inner_state,
                              key=state.key, stats=state.stats)
      return jax.tree.unflatten(treedef, new_updates), new_state

    idx = [i for i, flag in enumerate(flags) if flag]
    ever_leaves = treedef.flatten_up_to(state.stats.ever_active)
    is_update = schedule.is_update_step(state.count)
    # Weights ranked for dropping: after the optimizer step (reference code)
    # or as they are (original RigL, which skips that step on update steps).
    step_us = [u if optimizer_step_on_update else jnp.where(is_update, jnp.zeros_like(u), u)
               for u in u_leaves]

    def select_masks(_):
      # Only the mask selection is under lax.cond: the update itself is the
      # same elementwise expression on every step, so ordinary steps pay for
      # a predicate, not for a second copy of the update.
      drop_frac = schedule.drop_fraction_at(state.count)
      base_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.count)
      seeds = [jax.random.bits(jax.random.fold_in(base_key, i), (2,), jnp.uint32) for i in idx]
      # Drop: keep the n_active - n_drop largest |w| of every sparse tensor.
      n_active = [jnp.sum(m_leaves[i], dtype=jnp.int32) for i in idx]
      n_drop = [jnp.floor(drop_frac * n.astype(jnp.float32)).astype(jnp.int32) for n in n_active]
      drop_keys = [topk.float_keys(p_leaves[i] + step_us[i], m_leaves[i]) for i in idx]
      kept = topk.select_top_k_many(drop_keys, [n - d for n, d in zip(n_active, n_drop)],
                                    [sd[0] for sd in seeds])
      # Grow: among all positions not kept (just-dropped ones included),
      # activate the n_drop largest dense |g| (RigL) or random ones (SET).
      if method == "rigl":
        grow_keys = [topk.float_keys(g_leaves[i], ~kp) for i, kp in zip(idx, kept)]
      else:
        grow_keys = []
        for i, kp in zip(idx, kept):
          rand = jax.random.bits(jax.random.fold_in(base_key, 10_000 + i), kp.shape, jnp.uint32) >> 1
          grow_keys.append(jnp.where(~kp, rand.astype(jnp.int32), topk.EXCLUDED))
      grown = topk.select_top_k_many(grow_keys, n_drop, [sd[1] for sd in seeds])
      new_sparse = tuple(kp | gr for kp, gr in zip(kept, grown))
      n_dropped = sum((jnp.sum(m_leaves[i] & ~nm, dtype=jnp.int32) for i, nm in zip(idx, new_sparse)),
                      jnp.zeros((), jnp.int32))
      n_grown = sum((jnp.sum(nm & ~m_leaves[i], dtype=jnp.int32) for i, nm in zip(idx, new_sparse)),
                    jnp.zeros((), jnp.int32))
      new_ever = tuple(ever_leaves[i] | nm for i, nm in zip(idx, new_sparse))
      return new_sparse, new_ever, n_dropped, n_grown

    def keep_masks(_):
      zero = jnp.zeros((), jnp.int32)
      return (tuple(m_leaves[i] for i in idx), tuple(ever_leaves[i] for i in idx), zero, zero)

    new_sparse, new_ever, n_drop, n_grow = lax.cond(is_update, select_masks, keep_masks, None)

    new_masks, both, ever = list(m_leaves), list(m_leaves), list(ever_leaves)
    for j, i in enumerate(idx):
      new_masks[i] = new_sparse[j]
      both[i] = new_sparse[j] & m_leaves[i]  # active before and after: keeps value and moments
      ever[i] = new_ever[j]
    new_updates = [zero_inactive(su, p, b) for su, p, b in zip(step_us, p_leaves, both)]
    if optimizer_step_on_update:
      base_inner = inner_state
    else:
      base_inner = jax.tree.map(lambda new, old: jnp.where(is_update, old, new), inner_state,
                                state.inner_state)
    keep_tree = jax.tree.unflatten(treedef, [both[i] if i in set(idx) else True
                                             for i in range(len(both))])
    # optax.masked / multi_transform states hold MaskedNode where a param is
    # not theirs: those are leaves to leave alone, not subtrees to map over.
    new_inner = optax.tree_map_params(inner, _reset_moments, base_inner, keep_tree,
                                      is_leaf=lambda v: isinstance(v, optax.MaskedNode))
    did_update = is_update.astype(jnp.int32)
    stats = SparseStats(
        ever_active=jax.tree.unflatten(treedef, ever),
        num_dropped=jnp.where(is_update, n_drop, state.stats.num_dropped),
        num_grown=jnp.where(is_update, n_grow, state.stats.num_grown),
        num_updates=state.stats.num_updates + did_update)
    new_state = SparseState(count=state.count + 1, masks=jax.tree.unflatten(treedef, new_masks),
                            inner_state=new_inner, key=state.key, stats=stats)
    return jax.tree.unflatten(treedef, new_updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _reset_moments(value: Any, keep: Any) -> Any:
  """Zeroes optimizer-state entries of params whose connection changed."""
  if isinstance(value, optax.MaskedNode):
    return value
  if keep is True or not hasattr(value, "shape") or not hasattr(keep, "shape"):
    return value
  if tuple(value.shape) != tuple(keep.shape):
    # e.g. Adafactor's factored moments: no per-weight entry to reset.
    return value
  return jnp.where(keep, value, jnp.zeros_like(value))


def static_sparse(inner: optax.GradientTransformation, *, sparsity: Optional[float] = None,
                  densities: Any = None, masks: Any = None,
                  policy: Optional[selection.SparsityPolicy] = None, distribution: str = "uniform",
                  seed: Union[int, jax.Array] = 0) -> optax.GradientTransformationExtraArgs:
  """Sparse training with a fixed random mask.

  Args:
    inner: Any optax optimizer; it sees masked gradients.
    sparsity: Target sparsity in [0, 1) of the leaves ``policy`` selects
      (exactly one of ``sparsity``, ``densities``, ``masks``).
    densities: Pytree of per-leaf densities (see :func:`sift_jax.layer_densities`).
    masks: Explicit bool mask tree (validated against the params at ``init``).
    policy: :class:`sift_jax.SparsityPolicy`; default: every leaf with ndim >= 2.
    distribution: ``"uniform"``, ``"erk"`` or ``"er"`` when ``sparsity`` is given.
    seed: int or PRNG key for the initial masks.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`SparseState`.
  """
  return _sparse_transformation(inner, method="static", sparsity=sparsity, densities=densities,
                                masks=masks, policy=policy, distribution=distribution,
                                schedule=None, optimizer_step_on_update=True, seed=seed)


def set_sparse(inner: optax.GradientTransformation, *, sparsity: Optional[float] = None,
               densities: Any = None, masks: Any = None,
               policy: Optional[selection.SparsityPolicy] = None, distribution: str = "uniform",
               total_steps: Optional[int] = None, update_every: int = 100, start_step: int = 0,
               end_step: Optional[int] = None, end_fraction: float = 0.75,
               drop_fraction: float = 0.3, drop_schedule: str = "cosine",
               optimizer_step_on_update: bool = False,
               seed: Union[int, jax.Array] = 0) -> optax.GradientTransformationExtraArgs:
  """Sparse Evolutionary Training: drop by magnitude, regrow at random.

  Same options as :func:`rigl`; growth needs no gradient.
  """
  schedule = schedules.make_mask_update_schedule(
      update_every=update_every, start_step=start_step, end_step=end_step, total_steps=total_steps,
      end_fraction=end_fraction, drop_fraction=drop_fraction, drop_schedule=drop_schedule)
  return _sparse_transformation(inner, method="set", sparsity=sparsity, densities=densities,
                                masks=masks, policy=policy, distribution=distribution,
                                schedule=schedule, optimizer_step_on_update=optimizer_step_on_update,
                                seed=seed)


def rigl(inner: optax.GradientTransformation, *, sparsity: Optional[float] = None,
         densities: Any = None, masks: Any = None,
         policy: Optional[selection.SparsityPolicy] = None, distribution: str = "uniform",
         total_steps: Optional[int] = None, update_every: int = 100, start_step: int = 0,
         end_step: Optional[int] = None, end_fraction: float = 0.75, drop_fraction: float = 0.3,
         drop_schedule: str = "cosine", optimizer_step_on_update: bool = False,
         seed: Union[int, jax.Array] = 0) -> optax.GradientTransformationExtraArgs:
  """RigL: drop the smallest-magnitude weights, grow where the dense gradient is largest.

  At every update step ``t`` (``start_step <= t < end_step``, every
  ``update_every`` steps), for each sparse tensor: ``n_drop = floor(f(t) *
  n_active)``; keep the ``n_active - n_drop`` active weights of largest
  ``|w|``; among the positions then inactive (just-dropped ones included)
  activate the ``n_drop`` of largest dense ``|g|``. Grown weights start at 0
  with zero optimizer moments; weights dropped and regrown keep their value.
  Per-tensor counts stay exactly at target. Ties are broken pseudo-randomly
  in float32, whatever the parameter dtype.

  The updates passed to ``update`` must be the dense gradients (the gradient
  with respect to the effective, masked weights), as ``jax.grad`` gives.

  Inactive weights are zeroed by the first ``update``; the parameters given
  to ``init`` are not changed (optax cannot), so for the very first forward
  pass to be sparse too, call ``sift_jax.apply_masks(params,
  sift_jax.get_masks(opt_state))`` once after ``init`` (the
  :mod:`sift_jax.training` loop does). For gradient accumulation wrap RigL
  in ``optax.MultiSteps(rigl(...), k)``: RigL then counts optimizer steps
  and grows from the mean of the ``k`` accumulated dense gradients. (Wrapped
  the other way, ``rigl(optax.MultiSteps(...))``, ``update_every`` counts
  mini-steps and growth uses one mini-batch's gradient.)

  Args:
    inner: Any optax optimizer; it sees masked gradients.
    sparsity: Target sparsity in [0, 1) (exactly one of ``sparsity``,
      ``densities``, ``masks``).
    densities: Pytree of per-leaf densities.
    masks: Explicit initial bool masks.
    policy: :class:`sift_jax.SparsityPolicy` selecting the sparse leaves.
    distribution: ``"uniform"`` (default, as all reference configs), ``"erk"``
      or ``"er"``.
    total_steps: Training length; ``end_step`` defaults to
      ``int(end_fraction * total_steps)``.
    update_every: Steps between mask updates (``delta_t``, default 100).
    start_step: First update step (0 as original RigL; the reference code
      starts at ``update_every``).
    end_step: No mask update at or after this step.
    end_fraction: Default ``end_step`` as a fraction of ``total_steps`` (0.75).
    drop_fraction: Initial drop fraction ``f0`` (0.3).
    drop_schedule: ``"cosine"`` (default), ``"linear"`` or ``"constant"``.
    optimizer_step_on_update: False (default, original RigL): update steps only
      change masks. True (authors' Sparse-IFT code): take the optimizer step
      first, then update the masks from the stepped weights.
    seed: int or PRNG key: initial masks and tie-breaking.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`SparseState`.

  Raises:
    ValueError: for a sparsity outside [0, 1), ``update_every < 1``, an end
      step not after the start step, unknown options; at ``init``, for mask or
      density trees that do not match the params.
  """
  schedule = schedules.make_mask_update_schedule(
      update_every=update_every, start_step=start_step, end_step=end_step, total_steps=total_steps,
      end_fraction=end_fraction, drop_fraction=drop_fraction, drop_schedule=drop_schedule)
  return _sparse_transformation(inner, method="rigl", sparsity=sparsity, densities=densities,
                                masks=masks, policy=policy, distribution=distribution,
                                schedule=schedule, optimizer_step_on_update=optimizer_step_on_update,
                                seed=seed)


def get_sparse_state(opt_state: Any) -> SparseState:
  """Returns the first :class:`SparseState` found inside ``opt_state``.

  Raises:
    ValueError: if ``opt_state`` contains none.
  """
  found = []

  def visit(node):
    if found:
      return
    if isinstance(node, SparseState):
      found.append(node)
      return
    if isinstance(node, (tuple, list)):
      for child in node:
        visit(child)
    elif isinstance(node, dict):
      for child in node.values():
        visit(child)
    elif hasattr(node, "__dict__") and not hasattr(node, "shape"):
      for child in vars(node).values():
        visit(child)

  visit(opt_state)
  if not found:
    raise ValueError(f"no SparseState (static_sparse/set_sparse/rigl) in opt_state of type "
                     f"{type(opt_state).__name__}")
  return found[0]


def get_masks(opt_state: Any) -> Any:
  """Returns the masks held by any optimizer state containing a :class:`SparseState`."""
  return get_sparse_state(opt_state).masks


def sparse_stats(opt_state: Any) -> dict[str, jax.Array]:
  """Scalar statistics of the mask dynamics (jittable).

  A leaf counts as sparse when its mask has at least one zero.

  Returns:
    ``density`` (nonzeros / weights over all leaves), ``sparse_density`` (the
    same over sparse leaves), ``ever_active_fraction`` (weights of sparse
    leaves active at any time so far / their size), ``num_dropped`` and
    ``num_grown`` of the last mask update, and ``num_updates``.
  """
  state = get_sparse_state(opt_state)
  masks = jax.tree.leaves(state.masks)
  ever = jax.tree.leaves(state.stats.ever_active)
  nnz = sum(jnp.sum(m, dtype=jnp.int32) for m in masks)
  size = sum(int(np.prod(m.shape)) for m in masks)
  # Leaves whose mask has zeros are the sparse ones; count their weights.
  sparse_sizes = [jnp.where(jnp.all(m), 0, m.size) for m in masks]
  sparse_ever = [jnp.where(jnp.all(m), 0, jnp.sum(e, dtype=jnp.int32)) for m, e in zip(masks, ever)]
  sparse_nnz = [jnp.where(jnp.all(m), 0, jnp.sum(m, dtype=jnp.int32)) for m in masks]
  denom = jnp.maximum(sum(sparse_sizes), 1)
  return {
      "density": nnz / size,
      "sparse_density": sum(sparse_nnz) / denom,
      "ever_active_fraction": sum(sparse_ever) / denom,
      "num_dropped": state.stats.num_dropped,
      "num_grown": state.stats.num_grown,
      "num_updates": state.stats.num_updates,
  }
