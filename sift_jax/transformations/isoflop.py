"""Re-solving the sparsity so that a transformed model is iso-FLOP with its dense base.

After widths and ranks are rounded (and because stems, classifiers, embeddings,
attention products and other parts stay dense), the nominal ``s`` no longer
gives exactly the dense model's forward cost. The training code masks the
policy's sparse leaves uniformly (``sift_jax.layer_densities(params, s',
policy=policy)``), so the sparse MACs are affine in ``s'``::

    sparse_macs(s') = fixed_macs + (1 - s') * sparse_part_macs

where ``sparse_part_macs`` are the MACs charged to the policy's sparse leaves
and ``fixed_macs`` everything else (dense leaves, leaves with a fixed density
override, activation x activation products). Setting it equal to the base
model's dense MACs gives ``s'`` in closed form (:func:`solve_sparsity`).

The reference re-fits only Sparse Wide, by bisection to 0.1% with steps of
1e-4 (``ComputerVision/CIFAR/main.py``); :func:`reference_bisection`
reproduces that loop on the same MAC counts.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Optional

import jax

from sift_jax import flops
from sift_jax.masks import selection, tree_paths
from sift_jax.masks.densities import check_sparsity, layer_densities

__all__ = ["IsoFlopSolution", "IsoFlopToleranceWarning", "solve_sparsity", "reference_bisection",
           "SOLVE_METHODS", "ISO_FLOP_TOLERANCE"]

#: ``closed_form`` (paper rule, exact), ``reference_bisection`` (reference's
#: Sparse Wide re-fit), ``nominal`` (masks use the nominal ``s``; the
#: reference's other members).
SOLVE_METHODS = ("closed_form", "reference_bisection", "nominal")
#: The relative tolerance the library guarantees for ``closed_form``.
ISO_FLOP_TOLERANCE = 0.005


class IsoFlopToleranceWarning(UserWarning):
  """The closed-form solve could not bring a model within :data:`ISO_FLOP_TOLERANCE`.

  Happens on tiny models, whose masks hold whole numbers of weights (at least
  one per tensor), so the sparse cost moves in steps coarser than 0.5%.
  """


@dataclasses.dataclass(frozen=True)
class IsoFlopSolution:
  """The sparsity a transformed model's masks must use, and its cost.

  Attributes:
    nominal_sparsity: The ``s`` that sized the transformation.
    solved_sparsity: The uniform sparsity of the policy's sparse leaves.
    method: One of :data:`SOLVE_METHODS`.
    base_dense_macs: Dense MACs of the untransformed model (the budget).
    dense_macs: MACs of the transformed model with all masks one.
    sparse_part_macs: MACs charged to the policy's uniformly-masked leaves.
    fixed_macs: MACs that do not depend on the solved sparsity.
    sparse_macs: MACs at ``solved_sparsity`` with exact-count masks.
  """

  nominal_sparsity: float
  solved_sparsity: float
  method: str
  base_dense_macs: int
  dense_macs: int
  sparse_part_macs: int
  fixed_macs: float
  sparse_macs: float

  @property
  def iso_flop_ratio(self) -> float:
    """The achieved ratio ``sparse_macs / base_dense_macs`` (1.0 is iso-FLOP)."""
    return float(self.sparse_macs) / float(self.base_dense_macs)

  @property
  def within_tolerance(self) -> bool:
    """Whether ``|iso_flop_ratio - 1| <= ISO_FLOP_TOLERANCE`` (0.5%)."""
    return abs(self.iso_flop_ratio - 1.0) <= ISO_FLOP_TOLERANCE


def _split_rows(macs: flops.MacCount, params: Any, policy: selection.SparsityPolicy
                ) -> tuple[int, list[tuple[str, float]]]:
  """Returns (MACs of uniformly-masked leaves, ``[(row, MACs)]`` not depending on the sparsity)."""
  is_sparse = dict(zip(tree_paths.leaf_paths(params),
                       jax.tree.leaves(selection.select_sparse(params, policy))))
  sparse_part, fixed = 0, []
  for row in macs.rows:
    if row.param is not None and is_sparse.get(row.param, False):
      override = policy.density_override(row.param)
      if override is None:
        sparse_part += row.macs
      else:
        fixed.append((row.name, row.macs * override))
    else:
      fixed.append((row.name, float(row.macs)))
  return sparse_part, fixed


def _largest(rows: list[tuple[str, float]], budget: int, n: int = 3) -> str:
  """The ``n`` costliest rows, as ``'name' (MACs, % of budget)``."""
  top = sorted(rows, key=lambda r: -r[1])[:n]
  return ", ".join(f"{name!r} ({m:,.0f}, {100.0 * m / budget:.1f}%)" for name, m in top)


def _exact_sparse_macs(macs: flops.MacCount, params: Any, policy: selection.SparsityPolicy,
                       sparsity: float) -> float:
  densities = layer_densities(params, sparsity, policy=policy)
  return flops.flops_report(macs, params, densities=densities).sparse_macs


def _refine_for_exact_counts(sparse_macs_fn: Callable[[float], float], budget: float,
                             solved: float, *, tolerance: float = 1e-3) -> float:
  """Moves the closed-form sparsity so exact-count masks meet the budget.

  Masks hold ``round(d * size)`` weights (at least one), so on small layers
  the closed form, which assumes fractional counts, can miss the budget by
  a few percent. When it misses by more than ``tolerance`` (relative), bisect
  on the (non-increasing, step-shaped) exact cost and keep whichever side of
  the crossing is closer to the budget. Large models keep the closed form.
  """
  cost = sparse_macs_fn(solved)
  if abs(cost - budget) <= tolerance * budget:
    return solved
  lo, hi = 0.0, 1.0 - 1e-9  # cost(lo) >= cost(hi); find the crossing of the budget
  if sparse_macs_fn(lo) < budget or sparse_macs_fn(hi) > budget:
    return solved
  for _ in range(60):
    mid = 0.5 * (lo + hi)
    if sparse_macs_fn(mid) > budget:
      lo = mid
    else:
      hi = mid
  best = min((solved, lo, hi), key=lambda x: abs(sparse_macs_fn(x) - budget))
  return float(best)


def reference_bisection(sparse_macs_fn: Callable[[float], float], budget: float, *,
                        tolerance: float = 1e-3, increment: float = 1e-4,
                        high: float = 0.9999) -> float:
  """The reference's Sparse Wide sparsity search (``get_mask_optimizer``).

  Bisects on ``[0, high]`` until ``sparse_macs_fn(s)`` is within ``tolerance``
  (relative) of ``budget``, moving the bounds by ``increment`` past ``mid``,
  and returns the last ``mid`` (as the reference does, even if the loop ends
  without meeting the tolerance).
  """
  low = 0.0
  upper, lower = budget * (1 + tolerance), budget * (1 - tolerance)
  mid = 0.0
  while low <= high:
    mid = low + (high - low) / 2
    cost = sparse_macs_fn(mid)
    if lower <= cost <= upper:
      break
    if cost < upper:
      high = mid - increment
    else:
      low = mid + increment
  return float(mid)


def solve_sparsity(macs: flops.MacCount, params: Any, policy: Optional[selection.SparsityPolicy],
                   *, base_dense_macs: int, nominal_sparsity: float, method: str = "closed_form",
                   what: str = "model") -> IsoFlopSolution:
  """Solves the uniform sparsity of ``policy``'s leaves that makes the model iso-FLOP.

  Args:
    macs: :func:`sift_jax.flops.count_macs` of the transformed model.
    params: Its parameter tree (arrays or ``ShapeDtypeStruct``).
    policy: The transformed model's :class:`SparsityPolicy`.
    base_dense_macs: Dense MACs of the untransformed model (the budget).
    nominal_sparsity: The ``s`` the transformation was sized with.
    method: One of :data:`SOLVE_METHODS`.
    what: Name used in error messages (model name).

  Returns:
    An :class:`IsoFlopSolution`; its ``iso_flop_ratio`` is the achieved ratio
    with exact-count masks. With ``closed_form``, a ratio more than
    :data:`ISO_FLOP_TOLERANCE` away from 1 (only on tiny models, whose masks
    hold whole numbers of weights) also emits an
    :class:`IsoFlopToleranceWarning` naming it. The reference methods miss
    the budget by design and do not warn.

  Raises:
    ValueError: if no sparsity in [0, 1) meets the budget: the dense parts
      alone exceed it (e.g. Sparse Wide at a very high ``s`` widens a dense
      stem and classifier too much), or the transformed model is cheaper than
      the budget even with all masks one.
  """
  s_nom = check_sparsity(nominal_sparsity, "nominal_sparsity")
  if method not in SOLVE_METHODS:
    raise ValueError(f"method must be one of {SOLVE_METHODS}, got {method!r}")
  policy = selection.SparsityPolicy() if policy is None else policy
  budget = int(base_dense_macs)
  if budget <= 0:
    raise ValueError(f"{what}: base_dense_macs must be positive, got {base_dense_macs!r}")
  sparse_part, fixed_rows = _split_rows(macs, params, policy)
  fixed = float(sum(m for _, m in fixed_rows))
  if sparse_part <= 0:
    raise ValueError(f"{what}: no multiply-accumulate flows through a sparse parameter of the "
                     f"policy {policy!r}; nothing can be solved")
  if method == "closed_form":
    if fixed >= budget:
      raise ValueError(
          f"{what}: at nominal sparsity {s_nom} the parts that stay dense cost {fixed:,.0f} MACs, "
          f"at least the dense budget {budget:,}; no sparsity makes the model iso-FLOP "
          "(lower the sparsity or the round_to). Largest dense parts (MACs, share of the "
          f"budget): {_largest(fixed_rows, budget)}")
    solved = 1.0 - (budget - fixed) / sparse_part
    if solved < 0.0:
      if solved < -1e-12:
        raise ValueError(
            f"{what}: at nominal sparsity {s_nom} the transformed model costs "
            f"{fixed + sparse_part:,.0f} MACs with all masks one, less than the dense budget "
            f"{budget:,}; it cannot be made iso-FLOP by masking")
      solved = 0.0
    solved = _refine_for_exact_counts(lambda x: _exact_sparse_macs(macs, params, policy, x),
                                      budget, solved)
  elif method == "reference_bisection":
    solved = reference_bisection(lambda s: _exact_sparse_macs(macs, params, policy, s), budget)
  else:
    solved = s_nom
  sparse = _exact_sparse_macs(macs, params, policy, solved)
  solution = IsoFlopSolution(nominal_sparsity=s_nom, solved_sparsity=float(solved), method=method,
                             base_dense_macs=budget, dense_macs=macs.total,
                             sparse_part_macs=int(sparse_part), fixed_macs=float(fixed),
                             sparse_macs=float(sparse))
  if method == "closed_form" and not solution.within_tolerance:
    warnings.warn(
        f"{what}: the iso-FLOP solve reaches a ratio of {solution.iso_flop_ratio:.4f} "
        f"(sparse {solution.sparse_macs:,.0f} / budget {budget:,} MACs) at sparsity "
        f"{solution.solved_sparsity:.4f}, outside the {ISO_FLOP_TOLERANCE:.1%} tolerance: its "
        "masks hold whole numbers of weights, too coarse a step for so small a model",
        IsoFlopToleranceWarning, stacklevel=2)
  return solution
