"""Pure functions on parameter pytrees: initial masks, masking and statistics."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sift_jax.masks import topk, tree_paths

__all__ = ["target_count", "init_masks", "apply_masks", "mask_stats",
           "check_masks", "check_densities", "check_same_shapes", "check_stacked", "conform",
           "slice_size"]


def target_count(density: float, size: int) -> int:
  """Number of active weights of a tensor: ``round(density * size)``.

  Rounding is half-up (``floor(density * size + 0.5)``), clipped to
  ``[1, size]`` for any density > 0 so that a tiny layer never ends up with no
  connection at all, and exactly ``size`` for density 1.
  """
  if density >= 1.0:
    return int(size)
  n = int(math.floor(float(density) * size + 0.5))
  return int(min(max(n, 1 if density > 0 else 0), size))


def _paths_and_leaves(tree: Any) -> tuple[list[str], list[Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [tree_paths.path_str(kp) for kp, _ in flat], [leaf for _, leaf in flat]


def conform(params: Any, other: Any, name: str) -> Any:
  """Returns ``other``'s leaves arranged in ``params``' tree structure.

  Accepts a plain-dict ``other`` for a ``FrozenDict`` / ``nnx.State`` params
  (and vice versa) as long as the leaf paths agree.

  Raises:
    ValueError: naming the first missing or unexpected parameter path.
  """
  p_paths, _ = _paths_and_leaves(params)
  o_paths, o_leaves = _paths_and_leaves(other)
  if p_paths != o_paths:
    missing = [p for p in p_paths if p not in set(o_paths)]
    extra = [p for p in o_paths if p not in set(p_paths)]
    detail = []
    if missing:
      detail.append(f"missing for parameter path(s) {missing[:5]}")
    if extra:
      detail.append(f"has unexpected path(s) {extra[:5]}")
    if not detail:
      detail.append("has the same paths in a different order")
    raise ValueError(f"{name} tree does not match the params: it " + "; ".join(detail))
  return jax.tree.unflatten(jax.tree.structure(params), o_leaves)


def check_densities(params: Any, densities: Any) -> Any:
  """Validates a density tree against ``params`` and returns it conformed."""
  densities = conform(params, densities, "densities")
  for path, d in zip(*_paths_and_leaves(densities)):
    try:
      value = float(d)
    except (TypeError, ValueError):
      raise ValueError(f"density for parameter {path!r} must be a Python float, got {d!r}") from None
    if not (0.0 < value <= 1.0):
      raise ValueError(f"density for parameter {path!r} must be in (0, 1], got {d!r}")
  return densities


def check_same_shapes(params: Any, other: Any, name: str) -> None:
  """Raises unless every leaf of ``other`` has its parameter's shape.

  ``other`` must already have the params' structure (see :func:`conform`);
  shapes are static, so this costs nothing under ``jit``.
  """
  for path, p, o in zip(_paths_and_leaves(params)[0], jax.tree.leaves(params), jax.tree.leaves(other)):
    if tuple(np.shape(o)) != tuple(np.shape(p)):
      raise ValueError(f"{name} for parameter {path!r} has shape {tuple(np.shape(o))}, "
                       f"expected {tuple(np.shape(p))}")


def check_masks(params: Any, masks: Any) -> Any:
  """Validates a mask tree (structure, shapes, bool dtype) and returns it conformed."""
  masks = conform(params, masks, "masks")
  check_same_shapes(params, masks, "mask")
  for path, m in zip(_paths_and_leaves(params)[0], jax.tree.leaves(masks)):
    dtype = jnp.dtype(getattr(m, "dtype", None) or np.asarray(m).dtype)
    if dtype != jnp.bool_:
      raise ValueError(f"mask for parameter {path!r} has dtype {dtype}, expected bool")
  return masks


def check_stacked(params: Any, stacked: Any) -> list[int]:
  """Per leaf of ``params``, its number of stacked leading axes (0 for ``None``).

  ``stacked`` is a tree of ints with the params' structure, e.g. from
  :func:`sift_jax.masks.selection.stacked_axes`.

  Raises:
    ValueError: naming the parameter path of a bad count.
  """
  paths, leaves = _paths_and_leaves(params)
  if stacked is None:
    return [0] * len(leaves)
  counts = jax.tree.leaves(conform(params, stacked, "stacked"))
  for path, leaf, n in zip(paths, leaves, counts):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= len(np.shape(leaf)):
      raise ValueError(f"stacked axes for parameter {path!r} (shape {tuple(np.shape(leaf))}) must "
                       f"be an int in [0, ndim], got {n!r}")
  return [int(n) for n in counts]


def slice_size(shape: tuple[int, ...], n_stacked: int) -> int:
  """Number of weights of one layer of a leaf whose first ``n_stacked`` axes are stacked."""
  return int(np.prod(shape[n_stacked:])) if shape[n_stacked:] else 1


def init_masks(key: jax.Array, params: Any, densities: Any, *, stacked: Any = None) -> Any:
  """Draws random masks with an exact number of ones per leaf (per layer of a stack).

  Leaf ``l`` gets exactly :func:`target_count` ``(densities[l], size)`` ones at
  uniformly random positions (RigL's exact-count rule, docs/method.md, section 4).
  A leaf with ``n`` stacked leading axes (``nn.scan``/``nn.vmap`` layers) gets
  that count in every slice, with ``size`` the slice's. Leaves with density
  1.0 get all-ones masks. Jittable; ``params`` may hold
  ``jax.ShapeDtypeStruct`` leaves.

  Args:
    key: A JAX PRNG key.
    params: Parameter pytree (only shapes are used).
    densities: Pytree of Python floats with the structure of ``params``, e.g.
      from :func:`sift_jax.layer_densities`.
    stacked: Optional tree of ints with the structure of ``params``: the
      leading axes of each leaf that index stacked layers
      (:func:`sift_jax.masks.selection.stacked_axes`); None: no stacks.

  Returns:
    A bool pytree with the structure of ``params``.
  """
  densities = check_densities(params, densities)
  n_stacked = check_stacked(params, stacked)
  leaves = jax.tree.leaves(params)
  dens = jax.tree.leaves(densities)
  keys = jax.random.split(key, max(len(leaves), 1))
  out: list = [None] * len(leaves)
  sel_idx, sel_keys, sel_ks, sel_seeds, sel_batch = [], [], [], [], []
  for i, (leaf, d) in enumerate(zip(leaves, dens)):
    shape = tuple(np.shape(leaf))
    size = slice_size(shape, n_stacked[i])
    n = target_count(float(d), size)
    if n >= size:
      out[i] = jnp.ones(shape, jnp.bool_)
      continue
    k_score, k_tie = jax.random.split(keys[i])
    sel_idx.append(i)
    sel_keys.append((jax.random.bits(k_score, shape, jnp.uint32) >> 1).astype(jnp.int32))
    sel_ks.append(n)
    sel_seeds.append(jax.random.bits(k_tie, (), jnp.uint32))
    sel_batch.append(n_stacked[i])
  for i, m in zip(sel_idx, topk.select_top_k_many(sel_keys, sel_ks, sel_seeds,
                                                   batch_ndims=sel_batch)):
    out[i] = m
  return jax.tree.unflatten(jax.tree.structure(params), out)


def apply_masks(params: Any, masks: Any) -> Any:
  """Returns ``params`` with masked-out entries set to exactly zero.

  Raises:
    ValueError: if ``masks`` does not match ``params`` (paths, shapes, bool
      dtype), naming the first offending parameter path.
  """
  masks = check_masks(params, masks)
  return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)


def mask_stats(masks: Any) -> dict[str, Any]:
  """Nonzero counts and densities of a mask tree, per leaf and in total.

  Returns:
    ``{"per_leaf": {path: {"nnz", "size", "density"}}, "nnz", "size",
    "density"}``; counts are int32 arrays (jittable), sizes Python ints.
  """
  paths, leaves = _paths_and_leaves(masks)
  per_leaf = {}
  total_nnz = jnp.zeros((), jnp.int32)
  total_size = 0
  for path, m in zip(paths, leaves):
    nnz = jnp.sum(jnp.asarray(m), dtype=jnp.int32)
    size = int(np.prod(np.shape(m))) if np.shape(m) else 1
    per_leaf[path] = {"nnz": nnz, "size": size, "density": nnz / size}
    total_nnz = total_nnz + nnz
    total_size += size
  return {"per_leaf": per_leaf, "nnz": total_nnz, "size": total_size,
          "density": total_nnz / max(total_size, 1)}
