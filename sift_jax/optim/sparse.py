"""Sparse training as optax gradient transformations: one engine, pluggable scores.

:func:`dynamic_sparse` updates masks from a drop score and a grow score on a
schedule; :func:`static_sparse`, :func:`set_sparse` and :func:`rigl` are thin
factories over it, as are the magnitude-pruning methods of
:mod:`sift_jax.optim.pruning`.

Each factory wraps any inner optax optimizer and returns an
``optax.GradientTransformationExtraArgs`` whose state carries the masks. The
transformation alone keeps every inactive weight at exactly zero: the update
it emits for an inactive weight is ``-p``, so ``optax.apply_updates``, flax's
``TrainState.apply_gradients`` and ``nnx.Optimizer`` need no extra call.

The inner optimizer only ever sees masked gradients, so its moments of
inactive weights stay zero; when a mask update grows or drops a connection
its moments are reset to zero through ``optax.tree_map_params``, which works
for any optax optimizer (chains, ``inject_hyperparams``, ``MultiSteps``...).

Mask updates happen inside the same jitted step as ordinary steps: the
selection runs under ``lax.cond`` on the step counter, and the moment reset
is a select fused into the optimizer's update. No retracing, no host
callbacks.

References:
  Evci, Gale, Menick, Castro, Elsen, "Rigging the Lottery: Making All Tickets
  Winners", ICML 2020 (RigL).
  Mocanu et al., "Scalable training of artificial neural networks with adaptive
  sparse connectivity inspired by network science", Nat. Commun. 2018 (SET).
  Thangarasa et al., "Sparse-IFT: Sparse Iso-FLOP Transformations for
  Maximizing Training Efficiency", ICML 2024.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import optax

from sift_jax.masks import densities as densities_lib
from sift_jax.masks import ops, selection, topk, tree_paths
from sift_jax.optim import branch_growth, schedules

__all__ = ["SparseState", "SparseStats", "ScoreInputs", "ScoreFn", "SCORE_FNS", "SCOPES",
           "magnitude_score", "gradient_score", "random_score", "dynamic_sparse",
           "static_sparse", "set_sparse", "rigl", "get_masks", "get_sparse_state", "sparse_stats"]


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

  # The field shadows tuple.count, as optax's states' `count` fields do.
  count: jax.Array  # type: ignore[assignment]
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


class ScoreInputs(NamedTuple):
  """What a score function sees for one sparse tensor at a mask update.

  Attributes:
    weights: The weights being ranked: after this step's optimizer update
      when ``optimizer_step_on_update`` is True, as they are otherwise.
    grads: The dense gradient passed to ``update`` (not masked).
    masks: The bool mask before this update.
    key: A PRNG key for this tensor and this update (random scores).
  """

  weights: jax.Array
  grads: jax.Array
  masks: jax.Array
  key: jax.Array


ScoreFn = Callable[[ScoreInputs], jax.Array]
"""Maps :class:`ScoreInputs` of one tensor to a score of the same shape.

Larger scores are kept (drop scores) or grown (grow scores) first. A float
score is compared by its absolute value in float32 (NaN lowest); an int32
score must be ``>= 0`` and is compared as it is. Ties are broken
pseudo-randomly, so the selected counts are always exact.
"""


def magnitude_score(inputs: ScoreInputs) -> jax.Array:
  """``|w|``: the drop score of RigL, SET and magnitude pruning."""
  return inputs.weights


def gradient_score(inputs: ScoreInputs) -> jax.Array:
  """``|g|`` of the dense gradient: RigL's grow score (Evci et al. 2020)."""
  return inputs.grads


def random_score(inputs: ScoreInputs) -> jax.Array:
  """Uniformly random int32 keys: SET's grow score (Mocanu et al. 2018)."""
  bits = jax.random.bits(inputs.key, inputs.masks.shape, jnp.uint32) >> 1
  return bits.astype(jnp.int32)


SCORE_FNS: dict[str, ScoreFn] = {
    "magnitude": magnitude_score,
    "gradient": gradient_score,
    "random": random_score,
}
"""Score functions by name, for configs; any :data:`ScoreFn` works in code."""

SCOPES = ("layerwise", "global")


def _score_keys(score_fn: ScoreFn, inputs: ScoreInputs, candidates: jax.Array) -> jax.Array:
  """int32 top-k keys of ``score_fn`` (see :data:`ScoreFn`), -1 off ``candidates``."""
  scores = score_fn(inputs)
  if tuple(scores.shape) != tuple(inputs.masks.shape):
    raise ValueError(f"score function {getattr(score_fn, '__name__', score_fn)!r} returned shape "
                     f"{tuple(scores.shape)} for a tensor of shape {tuple(inputs.masks.shape)}")
  if scores.dtype == jnp.int32:
    return jnp.where(candidates, scores, topk.EXCLUDED)
  return topk.float_keys(scores, candidates)


def _as_step_fn(value: Any, name: str) -> Callable[[jax.Array], jax.Array]:
  """A float or an optax schedule as a function of the step."""
  if callable(value):
    return value
  try:
    constant = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a float or an optax schedule, got {value!r}") from None
  if not 0.0 <= constant <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {value!r}")
  return lambda step: jnp.float32(constant)


def _check_nonempty_masks(masks: Any) -> None:
  """Refuses a mask leaf with no active weight (a layer that could never learn)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(masks)
  for key_path, m in flat:
    if isinstance(m, jax.core.Tracer):
      continue  # only concrete masks can be checked; traced ones are the caller's
    arr = np.asarray(m)
    if arr.size and not arr.any():
      raise ValueError(f"mask for parameter {tree_paths.path_str(key_path)!r} has no active "
                       "weight (all False); give it at least one True entry, or leave the "
                       "parameter out of the sparse ones")


def dynamic_sparse(
    inner: optax.GradientTransformation, *,
    drop_score_fn: Optional[ScoreFn] = magnitude_score,
    grow_score_fn: Optional[ScoreFn] = None,
    drop_fraction: Union[float, optax.Schedule, None] = None,
    update_schedule: Union[schedules.MaskUpdateSchedule, Callable[[jax.Array], jax.Array], None],
    sparsity: Optional[float] = None, densities: Any = None, masks: Any = None,
    policy: Optional[selection.SparsityPolicy] = None, distribution: str = "uniform",
    sparsity_progress: Optional[optax.Schedule] = None, start_dense: bool = False,
    scope: str = "layerwise", optimizer_step_on_update: bool = False,
    grow_groups: Optional[branch_growth.GroupingFn] = None,
    seed: Union[int, jax.Array] = 0, name: str = "dynamic_sparse",
) -> optax.GradientTransformationExtraArgs:
  """Sparse training with masks updated by pluggable drop and grow scores.

  The one engine behind :func:`static_sparse`, :func:`set_sparse`,
  :func:`rigl` and the magnitude-pruning methods of :mod:`sift_jax.optim`.
  Between mask updates every step is a static sparse step: the inner
  optimizer sees masked gradients and masked params, and the update of an
  inactive weight is ``-p`` so that it is exactly zero afterwards. At an
  update step ``t`` (``update_schedule``), for each sparse tensor (or, with
  ``scope="global"``, for all sparse tensors ranked together):

  * **Regrowing methods** (``drop_fraction``): ``n_drop = floor(f(t) *
    n_active)``; keep the ``n_active - n_drop`` active weights of largest
    drop score; if ``grow_score_fn`` is given, activate the ``n_drop``
    positions of largest grow score among those not kept (just-dropped ones
    included), so counts stay exactly at target.
  * **Pruning methods** (``sparsity_progress``): the tensor keeps the
    ``n(t) = size - round(c(t) * (size - n_final))`` active weights of largest
    drop score (never more than are active), where ``c(t)`` in [0, 1] is the
    fraction of the way to the final count ``n_final`` given by
    ``sparsity``/``densities``; nothing is regrown.

  Grown weights start at zero with zero optimizer moments (reset through
  ``optax.tree_map_params``, so any optax optimizer works); weights kept keep
  their value and moments. The selection runs under one ``lax.cond`` that
  returns only the new masks (XLA copies whatever a branch returns
  unchanged); the moment reset is an elementwise select on the update
  predicate that XLA fuses into the optimizer's own pass over the moments.
  One compiled function serves both kinds of step: nothing retraces. With
  ``optimizer_step_on_update=False`` the previous inner state must survive
  the optimizer step to be restored on update steps, which on CPU costs
  one copy of the moments per step.

  Args:
    inner: Any optax optimizer; it sees masked gradients.
    drop_score_fn: :data:`ScoreFn` of the weights to keep (default
      :func:`magnitude_score`).
    grow_score_fn: :data:`ScoreFn` of the positions to grow (e.g.
      :func:`gradient_score`, :func:`random_score`); None grows nothing.
    drop_fraction: Fraction of active weights dropped at an update step: a
      float in [0, 1] or an optax schedule of the step. Defaults to
      ``update_schedule.drop_fraction_at`` for a
      :class:`~sift_jax.optim.MaskUpdateSchedule`.
    update_schedule: When masks change: a
      :class:`~sift_jax.optim.MaskUpdateSchedule`, a function ``step -> bool``
      (jittable), or None for fixed masks (static sparse training).
    sparsity: Target sparsity in [0, 1) of the leaves ``policy`` selects
      (exactly one of ``sparsity``, ``densities``, ``masks``).
    densities: Pytree of per-leaf densities (see :func:`sift_jax.layer_densities`).
    masks: Explicit initial bool masks; every leaf needs an active weight.
    policy: :class:`sift_jax.SparsityPolicy`; default: the kernels (never
      biases, scales, embeddings). Its ``stacked`` leaves (``nn.scan``
      layers) are counted, ranked and updated per slice: every layer keeps
      its exact count.
    distribution: ``"uniform"``, ``"erk"`` or ``"er"`` when ``sparsity`` is given.
    sparsity_progress: Pruning: optax schedule ``step -> c`` in [0, 1]
      (exclusive with ``drop_fraction`` and ``grow_score_fn``).
    start_dense: Initial masks all ones; ``sparsity``/``densities`` give the
      final counts pruning reaches (needs ``sparsity_progress``).
    scope: ``"layerwise"`` (counts per tensor) or ``"global"`` (one ranking
      over all sparse tensors, with the summed counts; gathers the sparse
      tensors into one vector at update steps).
    optimizer_step_on_update: False: update steps only change masks and rank
      the weights as they are (original RigL). True: take the optimizer step
      first, then rank the stepped weights (authors' Sparse-IFT code, and
      magnitude pruning during training).
    grow_groups: Optional function ``params -> groups of leaf paths`` whose
      tensors are summed siblings (e.g.
      :func:`sift_jax.optim.branch_growth.parallel_branch_groups`, Sparse
      Parallel's branches): their growth ranks positions active in a
      sibling after every free one (:mod:`sift_jax.optim.branch_growth`).
      Layerwise scope, regrowing methods only.
    seed: int or PRNG key: initial masks and tie-breaking.
    name: Name used in error messages.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`SparseState`.

  Raises:
    ValueError: for inconsistent options (naming them), an unknown ``scope``
      or ``distribution``, a mask leaf with no active weight; at ``init``, for
      mask or density trees that do not match the params.
  """
  if sum(x is not None for x in (sparsity, densities, masks)) != 1:
    raise ValueError(f"{name}: give exactly one of sparsity=, densities= or masks= "
                     f"(got sparsity={sparsity!r}, densities={'set' if densities is not None else None}, "
                     f"masks={'set' if masks is not None else None})")
  if sparsity is not None:
    densities_lib.check_sparsity(sparsity)
  if distribution not in densities_lib.DISTRIBUTIONS:
    raise ValueError(f"{name}: distribution must be one of {densities_lib.DISTRIBUTIONS}, "
                     f"got {distribution!r}")
  if scope not in SCOPES:
    raise ValueError(f"{name}: scope must be one of {SCOPES}, got {scope!r}")
  if masks is not None:
    _check_nonempty_masks(masks)
  is_update_step = (update_schedule.is_update_step
                    if isinstance(update_schedule, schedules.MaskUpdateSchedule) else update_schedule)
  if is_update_step is not None and not callable(is_update_step):
    raise ValueError(f"{name}: update_schedule must be a MaskUpdateSchedule, a function "
                     f"step -> bool or None, got {update_schedule!r}")
  pruning = sparsity_progress is not None
  if is_update_step is None:
    drop_fraction_fn = None
  elif pruning:
    if drop_fraction is not None or grow_score_fn is not None:
      raise ValueError(f"{name}: sparsity_progress (pruning) excludes drop_fraction= and "
                       "grow_score_fn=")
    if masks is not None:
      raise ValueError(f"{name}: pruning needs sparsity= or densities= (the final counts), "
                       "not masks=")
    drop_fraction_fn = None
  else:
    if drop_fraction is None and isinstance(update_schedule, schedules.MaskUpdateSchedule):
      drop_fraction = update_schedule.drop_fraction_at
    if drop_fraction is None:
      raise ValueError(f"{name}: give drop_fraction= (a float or an optax schedule)")
    drop_fraction_fn = _as_step_fn(drop_fraction, f"{name}: drop_fraction")
  if is_update_step is not None and drop_score_fn is None:
    raise ValueError(f"{name}: a dynamic method needs a drop_score_fn")
  if grow_groups is not None:
    if not callable(grow_groups):
      raise ValueError(f"{name}: grow_groups must be a function params -> groups of leaf paths, "
                       f"got {grow_groups!r}")
    if grow_score_fn is None or scope != "layerwise":
      raise ValueError(f"{name}: grow_groups needs a grow_score_fn and scope='layerwise' "
                       f"(got scope={scope!r})")
  if start_dense and not pruning:
    raise ValueError(f"{name}: start_dense=True needs sparsity_progress= (masks only shrink "
                     "when pruning)")
  policy = selection.SparsityPolicy() if policy is None else policy
  key_data = _key_data(seed)
  inner = optax.with_extra_args_support(inner)

  def resolve_densities(params):
    if densities is not None:
      return ops.check_densities(params, densities)
    if sparsity is not None:
      return densities_lib.layer_densities(params, sparsity, distribution=distribution, policy=policy)
    return None

  def stacked_counts(params) -> list[int]:
    """Static per-leaf number of leading axes indexing stacked layers (policy.stacked)."""
    return ops.check_stacked(params, selection.stacked_axes(params, policy))

  def leaf_flags(params) -> tuple[list[bool], list[bool]]:
    """Static per-leaf flags: which leaves a mask update may change, and which
    masks are all-true by construction, forever."""
    # A static mask given explicitly needs no policy; a dynamic method whose
    # policy selects nothing would silently train static masks, so it raises.
    flags = jax.tree.leaves(selection.select_sparse(
        params, policy, require_any=masks is None or is_update_step is not None))
    dens = resolve_densities(params)
    if dens is not None:
      flags = [f and float(d) < 1.0 for f, d in zip(flags, jax.tree.leaves(dens))]
    if masks is not None:
      always = [False] * len(flags)  # explicit masks may hold zeros anywhere
    elif start_dense:
      always = [not f for f in flags]  # start all-true; only updatable leaves shrink
    else:
      always = [not f and float(d) >= 1.0 for f, d in zip(flags, jax.tree.leaves(dens))]
    return flags, always

  def final_counts(params) -> list[int]:
    """Static per-leaf (per-slice, for a stacked leaf) active counts that pruning reaches."""
    return [ops.target_count(float(d), ops.slice_size(tuple(np.shape(p)), n))
            for p, d, n in zip(jax.tree.leaves(params), jax.tree.leaves(resolve_densities(params)),
                               stacked_counts(params))]

  def init_fn(params):
    leaf_flags(params)  # bad policies and density trees fail here, not at the first update
    init_key, state_key = jax.random.split(jax.random.wrap_key_data(key_data))
    if masks is not None:
      initial = ops.check_masks(params, masks)
      initial = jax.tree.map(jnp.asarray, initial)
    elif start_dense:
      initial = jax.tree.map(lambda p: jnp.ones(np.shape(p), jnp.bool_), params)
    else:
      initial = ops.init_masks(init_key, params, resolve_densities(params),
                               stacked=selection.stacked_axes(params, policy))
    return SparseState(
        count=jnp.zeros((), jnp.int32),
        masks=initial,
        inner_state=inner.init(params),
        key=jax.random.key_data(state_key),
        stats=SparseStats(ever_active=initial, num_dropped=jnp.zeros((), jnp.int32),
                          num_grown=jnp.zeros((), jnp.int32), num_updates=jnp.zeros((), jnp.int32)),
    )

  def select(keys: list[jax.Array], ks: list[jax.Array], seeds: list[jax.Array],
             batch_ndims: Optional[list[int]] = None) -> list[jax.Array]:
    """Top-k per tensor (per slice of a stacked tensor), or over all tensors at
    once for the global scope (``ks`` then holds one total)."""
    if scope == "layerwise" or not keys:
      return topk.select_top_k_many(keys, ks, seeds, batch_ndims)
    sizes = [int(k.size) for k in keys]
    flat = jnp.concatenate([k.reshape(-1) for k in keys])
    total = sum((jnp.sum(k, dtype=jnp.int32) for k in ks), jnp.zeros((), jnp.int32))
    chosen = topk.select_top_k_many([flat], [total], [seeds[0]])[0]
    bounds = np.cumsum([0] + sizes)
    return [chosen[a:b].reshape(k.shape) for a, b, k in zip(bounds[:-1], bounds[1:], keys)]

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(f"{name}: update() needs params (the transformation zeroes inactive "
                       "weights and ranks weights by magnitude)")
    treedef: jax.tree_util.PyTreeDef = jax.tree.structure(params)
    grads = ops.conform(params, updates, "updates")
    ops.check_same_shapes(params, grads, "updates")
    cur_masks = ops.conform(params, state.masks, "opt_state.masks")
    flags, all_active = leaf_flags(params)
    p_leaves = treedef.flatten_up_to(params)
    g_leaves = treedef.flatten_up_to(grads)
    m_leaves = treedef.flatten_up_to(cur_masks)

    # Leaves whose mask is all-true by construction (not updatable, at density
    # 1, no explicit masks=) are passed through unmasked: selecting with an
    # all-true mask changes no value, but costs XLA one more pass over the
    # gradient per leaf (a separate fusion on CPU), which for biases and dense
    # layers is pure overhead.
    def keep_active(x, m, always, fill=None):
      if always:
        return x
      return jnp.where(m, x, jnp.zeros_like(x) if fill is None else fill)

    masked_grads = jax.tree.unflatten(
        treedef, [keep_active(g, m, d) for g, m, d in zip(g_leaves, m_leaves, all_active)])
    # The inner optimizer sees masked params too, so parameter-dependent terms
    # (weight decay) never leak into the moments of inactive weights, even
    # before the first update has zeroed them.
    masked_params = jax.tree.unflatten(
        treedef, [keep_active(p, m, d) for p, m, d in zip(p_leaves, m_leaves, all_active)])
    inner_updates, inner_state = inner.update(masked_grads, state.inner_state, masked_params,
                                              **extra_args)
    u_leaves = treedef.flatten_up_to(inner_updates)

    def zero_inactive(u, p, m, always):
      # The update of an inactive weight is -p, so it is exactly 0 afterwards.
      return keep_active(u, m, always, fill=-p).astype(u.dtype)

    if is_update_step is None:
      new_updates = [zero_inactive(u, p, m, d)
                     for u, p, m, d in zip(u_leaves, p_leaves, m_leaves, all_active)]
      new_state = SparseState(count=state.count + 1, masks=cur_masks, inner_state=inner_state,
                              key=state.key, stats=state.stats)
      return jax.tree.unflatten(treedef, new_updates), new_state

    idx = [i for i, flag in enumerate(flags) if flag]
    idx_set = set(idx)
    n_stacked = stacked_counts(params)
    # Per sparse tensor: its stacked (layer) axes, counted per slice, and the axes of one slice.
    batch_ndims = [n_stacked[i] for i in idx]
    slice_axes = [tuple(range(n_stacked[i], len(np.shape(p_leaves[i])))) for i in idx]
    if grow_groups is None:
      groups = []
    else:
      leaf_paths = tree_paths.leaf_paths(params)
      groups = branch_growth.resolve_groups(
          grow_groups, params, [leaf_paths[i] for i in idx], what=name,
          stacked={leaf_paths[i]: n_stacked[i] for i in idx})
    n_final = final_counts(params) if pruning else None
    ever_leaves = treedef.flatten_up_to(state.stats.ever_active)
    is_update = is_update_step(state.count)
    # Weights ranked for dropping: after the optimizer step (reference code)
    # or as they are (original RigL, which skips that step on update steps).
    step_us = [u if optimizer_step_on_update else jnp.where(is_update, jnp.zeros_like(u), u)
               for u in u_leaves]

    def target_keep_counts(n_active: list[jax.Array]) -> tuple[list[jax.Array], list[jax.Array]]:
      """Per tensor (per slice; or, globally, in total): weights kept, weights grown."""
      if scope == "global":
        n_active = [sum((jnp.sum(n, dtype=jnp.int32) for n in n_active), jnp.zeros((), jnp.int32))]
      if pruning:
        assert sparsity_progress is not None and n_final is not None  # pruning says so
        progress = jnp.clip(jnp.asarray(sparsity_progress(state.count), jnp.float32), 0.0, 1.0)
        sizes = [ops.slice_size(tuple(p_leaves[i].shape), n_stacked[i]) for i in idx]
        finals = [n_final[i] for i in idx]
        if scope == "global":
          n_slices = [int(np.prod(p_leaves[i].shape[:n_stacked[i]])) for i in idx]
          sizes = [sum(z * m for z, m in zip(sizes, n_slices))]
          finals = [sum(f * m for f, m in zip(finals, n_slices))]
        keep = [jnp.minimum(n, s - jnp.floor(progress * jnp.float32(s - f) + 0.5).astype(jnp.int32))
                for n, s, f in zip(n_active, sizes, finals)]
        return keep, [jnp.zeros((), jnp.int32)] * len(keep)
      assert drop_fraction_fn is not None  # set for every dynamic method that does not prune
      frac = jnp.asarray(drop_fraction_fn(state.count), jnp.float32)
      n_drop = [jnp.floor(frac * n.astype(jnp.float32)).astype(jnp.int32) for n in n_active]
      grow = n_drop if grow_score_fn is not None else [jnp.zeros((), jnp.int32)] * len(n_drop)
      return [n - d for n, d in zip(n_active, n_drop)], grow

    def mask_update(_):
      base_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.count)
      seeds = [jax.random.bits(jax.random.fold_in(base_key, i), (2,), jnp.uint32) for i in idx]
      # Without the optimizer step the weights are ranked as they are: the
      # branch then reads no inner update, so the moments have no reader
      # besides the optimizer and are updated in place.
      inputs = [ScoreInputs(weights=p_leaves[i] + u_leaves[i] if optimizer_step_on_update
                            else p_leaves[i], grads=g_leaves[i], masks=m_leaves[i],
                            key=jax.random.fold_in(base_key, 10_000 + i)) for i in idx]
      n_active = [jnp.sum(m_leaves[i], axis=ax, dtype=jnp.int32) for i, ax in zip(idx, slice_axes)]
      n_keep, n_grow = target_keep_counts(n_active)
      assert drop_score_fn is not None  # checked above: a dynamic method needs one
      drop_keys = [_score_keys(drop_score_fn, x, x.masks) for x in inputs]
      kept = select(drop_keys, n_keep, [sd[0] for sd in seeds], batch_ndims)
      if grow_score_fn is not None:
        grow_keys = [_score_keys(grow_score_fn, x, ~kp) for x, kp in zip(inputs, kept)]
        if groups:
          grown = branch_growth.grow_sibling_groups(
              grow_keys, kept, n_grow, [sd[1] for sd in seeds], groups,
              state.stats.num_updates, select, batch_ndims=batch_ndims)
        else:
          grown = select(grow_keys, n_grow, [sd[1] for sd in seeds], batch_ndims)
        new_sparse = tuple(kp | gr for kp, gr in zip(kept, grown))
      else:
        new_sparse = tuple(kept)
      n_dropped = sum((jnp.sum(m_leaves[i] & ~nm, dtype=jnp.int32) for i, nm in zip(idx, new_sparse)),
                      jnp.zeros((), jnp.int32))
      n_grown = sum((jnp.sum(nm & ~m_leaves[i], dtype=jnp.int32) for i, nm in zip(idx, new_sparse)),
                    jnp.zeros((), jnp.int32))
      return new_sparse, n_dropped, n_grown

    def ordinary(_):
      zero = jnp.zeros((), jnp.int32)
      return tuple(m_leaves[i] for i in idx), zero, zero

    # Only the selection runs under lax.cond. Whatever a lax.cond branch
    # returns unchanged is copied by XLA (a conditional's result never
    # aliases its operands), so the cond returns the new masks of the sparse
    # tensors only; the moment reset and the restore of the previous inner
    # state are elementwise selects on ``is_update`` outside it, which XLA
    # fuses into the optimizer's own pass over the moments. (The reset alone
    # updates the moments in place; the restore keeps the previous moments
    # alive past the optimizer step, which XLA's CPU backend pays for with a
    # copy of them.)
    new_sparse, n_drop, n_grow = lax.cond(is_update, mask_update, ordinary, None)

    new_masks, both, ever = list(m_leaves), list(m_leaves), list(ever_leaves)
    for j, i in enumerate(idx):
      new_masks[i] = new_sparse[j]
      both[i] = new_sparse[j] & m_leaves[i]  # active before and after: keeps value and moments
      ever[i] = jnp.where(is_update, ever_leaves[i] | new_sparse[j], ever_leaves[i])
    if optimizer_step_on_update:
      base = inner_state
    else:
      # Without the optimizer step an update step keeps the previous state.
      base = jax.tree.map(lambda new, old: jnp.where(is_update, old, new), inner_state,
                          state.inner_state)
    # Only an update step changes which weights are active, so only it
    # resets moments: on ordinary steps every entry is kept.
    keep_tree = jax.tree.unflatten(treedef, [both[i] | ~is_update if i in idx_set else True
                                             for i in range(len(both))])
    # optax.masked / multi_transform states hold MaskedNode where a param is
    # not theirs: those are leaves to leave alone, not subtrees to map over.
    reset = optax.tree_map_params(inner, _reset_moments, base, keep_tree,
                                  is_leaf=lambda v: isinstance(v, optax.MaskedNode))
    new_inner = jax.tree.map(_like, reset, inner_state)
    new_updates = [zero_inactive(su, p, b, d)
                   for su, p, b, d in zip(step_us, p_leaves, both, all_active)]
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


def _like(value: Any, template: Any) -> Any:
  """``value`` with ``template``'s dtype: the reset never changes the state's dtypes."""
  if hasattr(template, "dtype") and hasattr(value, "dtype"):
    return jnp.asarray(value, template.dtype)
  return value


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
  """Sparse training with a fixed random mask: :func:`dynamic_sparse` without updates.

  Args:
    inner: Any optax optimizer; it sees masked gradients.
    sparsity: Target sparsity in [0, 1) of the leaves ``policy`` selects
      (exactly one of ``sparsity``, ``densities``, ``masks``).
    densities: Pytree of per-leaf densities (see :func:`sift_jax.layer_densities`).
    masks: Explicit bool mask tree (validated against the params at ``init``).
    policy: :class:`sift_jax.SparsityPolicy`; default: the kernels (never
      biases, scales, embeddings); ``stacked`` leaves get exact per-slice counts.
    distribution: ``"uniform"``, ``"erk"`` or ``"er"`` when ``sparsity`` is given.
    seed: int or PRNG key for the initial masks.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`SparseState`.
  """
  return dynamic_sparse(inner, drop_score_fn=None, update_schedule=None, sparsity=sparsity,
                        densities=densities, masks=masks, policy=policy, distribution=distribution,
                        seed=seed, name="static_sparse")


def set_sparse(inner: optax.GradientTransformation, *, sparsity: Optional[float] = None,
               densities: Any = None, masks: Any = None,
               policy: Optional[selection.SparsityPolicy] = None, distribution: str = "uniform",
               total_steps: Optional[int] = None, update_every: int = 100, start_step: int = 0,
               end_step: Optional[int] = None, end_fraction: float = 0.75,
               drop_fraction: float = 0.3, drop_schedule: str = "cosine",
               optimizer_step_on_update: bool = False,
               grow_groups: Optional[branch_growth.GroupingFn] = None,
               seed: Union[int, jax.Array] = 0) -> optax.GradientTransformationExtraArgs:
  """Sparse Evolutionary Training: drop by magnitude, regrow at random.

  Same options as :func:`rigl` (``grow_groups`` included); growth needs no gradient. A thin factory over
  :func:`dynamic_sparse` with :func:`magnitude_score` and :func:`random_score`.
  """
  schedule = schedules.make_mask_update_schedule(
      update_every=update_every, start_step=start_step, end_step=end_step, total_steps=total_steps,
      end_fraction=end_fraction, drop_fraction=drop_fraction, drop_schedule=drop_schedule)
  return dynamic_sparse(inner, drop_score_fn=magnitude_score, grow_score_fn=random_score,
                        drop_fraction=schedule.drop_fraction_at, update_schedule=schedule,
                        sparsity=sparsity, densities=densities, masks=masks, policy=policy,
                        distribution=distribution, optimizer_step_on_update=optimizer_step_on_update,
                        grow_groups=grow_groups, seed=seed, name="set_sparse")


def rigl(inner: optax.GradientTransformation, *, sparsity: Optional[float] = None,
         densities: Any = None, masks: Any = None,
         policy: Optional[selection.SparsityPolicy] = None, distribution: str = "uniform",
         total_steps: Optional[int] = None, update_every: int = 100, start_step: int = 0,
         end_step: Optional[int] = None, end_fraction: float = 0.75, drop_fraction: float = 0.3,
         drop_schedule: str = "cosine", optimizer_step_on_update: bool = False,
         grow_groups: Optional[branch_growth.GroupingFn] = None,
         seed: Union[int, jax.Array] = 0) -> optax.GradientTransformationExtraArgs:
  """RigL: drop the smallest-magnitude weights, grow where the dense gradient is largest.

  A thin factory over :func:`dynamic_sparse` with :func:`magnitude_score` and
  :func:`gradient_score`.

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
    grow_groups: Optional function ``params -> groups of leaf paths`` of
      summed sibling tensors, e.g.
      :func:`sift_jax.optim.branch_growth.parallel_branch_groups` for Sparse
      Parallel (which the training loop passes by default,
      ``config.sparse.branch_growth="exclusive"``): each sibling grows where
      its gradient is largest among positions no sibling holds before it
      duplicates one (:mod:`sift_jax.optim.branch_growth`). None: every
      tensor grows on its own (original RigL).
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
  return dynamic_sparse(inner, drop_score_fn=magnitude_score, grow_score_fn=gradient_score,
                        drop_fraction=schedule.drop_fraction_at, update_schedule=schedule,
                        sparsity=sparsity, densities=densities, masks=masks, policy=policy,
                        distribution=distribution, optimizer_step_on_update=optimizer_step_on_update,
                        grow_groups=grow_groups, seed=seed, name="rigl")


def _unwrap_variables(tree: Any) -> Any:
  """Replaces ``nnx.Variable`` leaves (``nnx.Optimizer``'s ``OptArray``) by their arrays."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  is_variable = lambda x: isinstance(x, nnx.Variable)
  if not any(is_variable(l) for l in jax.tree.leaves(tree, is_leaf=is_variable)):
    return tree
  return jax.tree.map(lambda x: x.get_value() if is_variable(x) else x, tree, is_leaf=is_variable)


def get_sparse_state(opt_state: Any) -> SparseState:
  """Returns the first :class:`SparseState` found inside ``opt_state``.

  The state of an ``nnx.Optimizer`` (``optimizer.opt_state``) holds its
  arrays in ``nnx.Variable`` wrappers (``OptArray``); they are unwrapped, so
  the returned state (its masks, its counters) holds plain arrays and its
  paths have no trailing ``value``.

  Raises:
    ValueError: if ``opt_state`` contains none.
  """
  found: list[SparseState] = []

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
  return _unwrap_variables(found[0])


def get_masks(opt_state: Any) -> Any:
  """Returns the masks held by any optimizer state containing a :class:`SparseState`."""
  return get_sparse_state(opt_state).masks


def sparse_stats(opt_state: Any) -> dict[str, jax.Array]:
  """Scalar statistics of the mask dynamics (jittable).

  A leaf counts as sparse when its mask has at least one zero. Works on an
  ``nnx.Optimizer``'s ``opt_state`` too; the values are plain arrays either way.

  Returns:
    ``density`` (nonzeros / weights over all leaves), ``sparse_density`` (the
    same over sparse leaves), ``ever_active_fraction`` (weights of sparse
    leaves active at any time so far / their size), ``num_dropped`` and
    ``num_grown`` of the last mask update, and ``num_updates``.
  """
  state = get_sparse_state(opt_state)
  masks = jax.tree.leaves(state.masks)
  ever = jax.tree.leaves(state.stats.ever_active)
  nnz = sum((jnp.sum(m, dtype=jnp.int32) for m in masks), jnp.zeros((), jnp.int32))
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
