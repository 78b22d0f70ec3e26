"""Diagnostics of trained Sparse-IFT members: do Sparse Parallel's branches stay distinct?

Sparse Parallel sums ``n`` sparse branches on the same input. If nothing
breaks their symmetry (a norm or nonlinearity per branch), every branch gets
the same gradient and RigL grows the same positions in all of them: their
masks overlap far beyond chance and a position held by ``k`` branches learns
``k`` times as fast (docs/method.md). :func:`branch_mask_overlap` measures
that on the masks of a trained model.
"""

from __future__ import annotations

import itertools
import re
from typing import Any, NamedTuple

import jax
import numpy as np

from sift_jax.masks import tree_paths

__all__ = ["BranchOverlap", "branch_mask_overlap"]

_BRANCH_KERNEL = re.compile(r"(.*)/branch_(\d+)/kernel")


class BranchOverlap(NamedTuple):
  """Mask overlap of the branches of one Sparse Parallel layer.

  Attributes:
    num_branches: ``n``.
    density: Mean mask density of the branches.
    mean_pair_overlap: Mean over branch pairs of the number of positions
      active in both.
    chance_overlap: The same for independent uniformly random masks with the
      same counts, ``k_i k_j / N`` averaged over pairs.
    ratio: ``mean_pair_overlap / chance_overlap`` (1 for independent masks).
    row_chance_overlap: Chance given each branch's count per input row (an
      input unit that is dead for every branch gets no weight in any): the
      mean over pairs of ``sum_r k_i(r) k_j(r) / columns``.
    row_ratio: ``mean_pair_overlap / row_chance_overlap``.
    all_active: Positions active in every branch (chance: ``N d^n``).
  """

  num_branches: int
  density: float
  mean_pair_overlap: float
  chance_overlap: float
  ratio: float
  row_chance_overlap: float
  row_ratio: float
  all_active: int


def branch_mask_overlap(masks: Any) -> dict[str, BranchOverlap]:
  """Overlap statistics of every Sparse Parallel layer in a mask tree.

  Args:
    masks: Bool (or 0/1) masks with the parameter tree's paths, e.g.
      ``sift_jax.get_masks(opt_state)``; a layer is recognised by its
      ``{layer}/branch_{i}/kernel`` leaves (at least two branches).

  Returns:
    ``{layer path: BranchOverlap}``.

  Raises:
    ValueError: if the branches of a layer have different shapes.
  """
  by_layer: dict[str, dict[int, np.ndarray]] = {}
  for path, leaf in zip(tree_paths.leaf_paths(masks), jax.tree.leaves(masks)):
    m = _BRANCH_KERNEL.fullmatch(path)
    if m:
      by_layer.setdefault(m.group(1), {})[int(m.group(2))] = np.asarray(leaf).astype(bool)
  out = {}
  for layer, branches in by_layer.items():
    if len(branches) < 2:
      continue
    shapes = {b.shape for b in branches.values()}
    if len(shapes) != 1:
      raise ValueError(f"branch_mask_overlap: branches of {layer!r} have shapes {sorted(shapes)}")
    stack = np.stack([branches[i] for i in sorted(branches)])
    n = stack.shape[0]
    rows = stack.reshape(n, -1, stack.shape[-1])  # (branch, D_in rows, D_out columns)
    size = rows.shape[1] * rows.shape[2]
    counts = rows.sum(axis=(1, 2)).astype(np.float64)
    row_counts = rows.sum(axis=2).astype(np.float64)
    pairs = list(itertools.combinations(range(n), 2))
    overlap = np.mean([np.logical_and(stack[i], stack[j]).sum() for i, j in pairs])
    chance = np.mean([counts[i] * counts[j] / size for i, j in pairs])
    row_chance = np.mean([np.sum(row_counts[i] * row_counts[j]) / rows.shape[2] for i, j in pairs])
    out[layer] = BranchOverlap(
        num_branches=n, density=float(counts.mean() / size), mean_pair_overlap=float(overlap),
        chance_overlap=float(chance), ratio=float(overlap / chance) if chance else float("nan"),
        row_chance_overlap=float(row_chance),
        row_ratio=float(overlap / row_chance) if row_chance else float("nan"),
        all_active=int(stack.all(axis=0).sum()))
  return out
