"""Per-layer densities: uniform, Erdos-Renyi (ER) and Erdos-Renyi-Kernel (ERK).

References:
  Mocanu et al., "Scalable training of artificial neural networks with adaptive
  sparse connectivity inspired by network science", Nature Communications 2018.
  Evci et al., "Rigging the Lottery: Making All Tickets Winners", ICML 2020.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import numpy as np

from sift_jax.masks import selection, tree_paths

__all__ = ["layer_densities", "check_sparsity", "DISTRIBUTIONS"]

DISTRIBUTIONS = ("uniform", "erk", "er")


def check_sparsity(sparsity: Any, name: str = "sparsity") -> float:
  """Returns ``sparsity`` as a float, raising unless it lies in [0, 1)."""
  try:
    s = float(sparsity)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number in [0, 1), got {sparsity!r}") from None
  if not (0.0 <= s < 1.0) or math.isnan(s):
    raise ValueError(f"{name} must be in [0, 1), got {sparsity!r}")
  return s


def _raw_score(shape: tuple[int, ...], distribution: str) -> float:
  if distribution == "erk":
    dims = shape
  else:  # "er": only the two channel dims (Flax layouts put them last).
    dims = shape[-2:]
  return float(sum(dims)) / float(np.prod(dims))


def layer_densities(params: Any, sparsity: float, *, distribution: str = "uniform",
                    policy: Optional[selection.SparsityPolicy] = None) -> Any:
  """Returns one float density per leaf of ``params`` (1.0 for dense leaves).

  ``uniform`` gives every sparse leaf density ``1 - sparsity``. ``erk`` gives
  leaf ``l`` with shape ``(n_1..n_k)`` the density ``eps * sum(n_i)/prod(n_i)``
  with ``eps`` chosen so that the sparse leaves hold ``(1 - sparsity)`` of
  their weights in total; while some leaf would exceed density 1, the leaves
  with the largest raw score are made dense and ``eps`` is solved again
  (docs/method.md, section 4, as in RigL's ``get_sparsities_erdos_renyi``). ``er`` uses
  only the last two (channel) dimensions of each shape.

  Leaves matched by ``policy.densities`` overrides keep their given density and
  are left out of the ERK budget (the budget covers the remaining sparse leaves).

  A leaf stacked by ``policy.stacked`` (``nn.scan``/``nn.vmap`` layers) counts
  as one layer per slice: its raw score is that of the slice shape, and its
  weights enter the budget once per slice. All slices share one shape, so
  they share one density, returned once for the leaf; it equals the density
  every layer of the unstacked model gets.

  Args:
    params: Parameter pytree; arrays or ``jax.ShapeDtypeStruct`` leaves.
    sparsity: Target fraction of zeros in [0, 1).
    distribution: ``"uniform"``, ``"erk"`` or ``"er"``.
    policy: :class:`SparsityPolicy` selecting the sparse leaves.

  Returns:
    A pytree with the structure of ``params`` and a Python float per leaf.

  Raises:
    ValueError: for a sparsity outside [0, 1), an unknown distribution, or a
      policy that selects no leaf.
  """
  s = check_sparsity(sparsity)
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
  policy = selection.SparsityPolicy() if policy is None else policy
  is_sparse = selection.select_sparse(params, policy)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  sparse_flags = jax.tree.leaves(is_sparse)
  paths = [tree_paths.path_str(kp) for kp, _ in flat]
  shapes = [tuple(int(d) for d in np.shape(leaf)) for _, leaf in flat]
  # The shape of one layer: a stacked leaf's leading (layer) axes dropped.
  slice_shapes = [shape[policy.stacked_axes(path, leaf):]
                  for path, shape, (_, leaf) in zip(paths, shapes, flat)]

  out: list[float] = [1.0] * len(flat)
  free: list[int] = []  # sparse leaves whose density the distribution decides
  for i, (path, flag) in enumerate(zip(paths, sparse_flags)):
    if not flag:
      continue
    override = policy.density_override(path)
    if override is not None:
      out[i] = override
    else:
      free.append(i)

  if distribution == "uniform" or not free:
    for i in free:
      out[i] = 1.0 - s
    return jax.tree.unflatten(treedef, out)

  sizes = {i: int(np.prod(shapes[i])) for i in free}
  raw = {i: _raw_score(slice_shapes[i], distribution) for i in free}
  dense: set[int] = set()
  while True:
    rhs = 0.0
    divisor = 0.0
    for i in free:
      if i in dense:
        rhs -= sizes[i] * s
      else:
        rhs += sizes[i] * (1.0 - s)
        divisor += raw[i] * sizes[i]
    if divisor <= 0.0:
      break
    eps = rhs / divisor
    live = [i for i in free if i not in dense]
    max_prob = max(raw[i] for i in live) * eps
    if max_prob > 1.0:
      top = max(raw[i] for i in live)
      dense.update(i for i in live if raw[i] == top)
      if len(dense) == len(free):
        break
    else:
      break
  for i in free:
    out[i] = 1.0 if i in dense else float(eps * raw[i])
  return jax.tree.unflatten(treedef, out)
