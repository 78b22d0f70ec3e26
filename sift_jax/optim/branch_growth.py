"""Growth for groups of sibling masks whose tensors are summed (Sparse Parallel's branches).

Sparse Parallel computes ``y = sum_i norm_i(x W_i)``: every branch sees the
same input and the same upstream gradient, so the dense gradients
``dL/dW_i = x^T (dL/dy * gamma_i / sigma_i)`` differ between branches only by
a per-output-channel scale. Within an output column every branch therefore
ranks the input rows in the same order, and RigL's growth, run independently
per tensor, activates the same positions in all branches: after RigL the
pairwise overlap of the branch masks is several times that of independent
masks. A position held by ``k`` branches is one weight of the folded kernel
``sum_i W_i`` learning ``k`` times as fast; the duplicates are capacity the
iso-FLOP budget paid for and lost.

:func:`grow_sibling_groups` replaces the per-tensor grow selection for such
groups. The branches of a group grow one after another (the order rotates
with every mask update, so no branch always chooses first); each branch still
grows its own count at its own largest grow scores, but positions already
active in a sibling (kept by it, or grown by it in this update) rank after
every position free in all siblings. So growth fills positions of the folded
kernel nobody holds before it duplicates one; duplicates happen only when a
branch has no free candidate left. Drops are unchanged (each branch drops its
own smallest magnitudes).

Groups are found from parameter paths by a grouping function,
``params -> groups of "/"-joined leaf paths``: :func:`parallel_branch_groups`
groups the ``{layer}/branch_{i}/kernel`` leaves of every Sparse Parallel
layer. :data:`GROW_GROUPINGS` names the groupings for configs.

References:
  Evci, Gale, Menick, Castro, Elsen, "Rigging the Lottery: Making All Tickets
  Winners", ICML 2020 (RigL).
  Thangarasa et al., "Sparse-IFT: Sparse Iso-FLOP Transformations for
  Maximizing Training Efficiency", 2023, arXiv 2303.11525 (Sparse Parallel).
  Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021
  (summed branches folded into one kernel).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from sift_jax.masks import topk, tree_paths

__all__ = ["GroupingFn", "GROW_GROUPINGS", "parallel_branch_groups", "resolve_groups",
           "grow_sibling_groups"]

GroupingFn = Callable[[Any], Sequence[Sequence[str]]]
"""``params -> groups`` of "/"-joined leaf paths whose masks grow as siblings."""

_BRANCH_KERNEL = re.compile(r"(.*)/branch_(\d+)/kernel")
# Keys of positions free in every sibling get this bit; the grow score itself
# keeps its order in the 30 bits below it (one bit of float32 mantissa is
# given up: nearly equal scores become ties, broken pseudo-randomly).
_FREE_BIT = 1 << 30


def parallel_branch_groups(params: Any) -> tuple[tuple[str, ...], ...]:
  """The ``{layer}/branch_{i}/kernel`` leaves of every Sparse Parallel layer, by layer.

  Layers with fewer than two branches form no group. Branches are ordered by
  their index ``i``.
  """
  by_layer: dict[str, dict[int, str]] = {}
  for path in tree_paths.leaf_paths(params):
    m = _BRANCH_KERNEL.fullmatch(path)
    if m:
      by_layer.setdefault(m.group(1), {})[int(m.group(2))] = path
  return tuple(tuple(b[i] for i in sorted(b)) for b in by_layer.values() if len(b) >= 2)


#: Groupings by the name configs use (``config.sparse.branch_growth``):
#: ``"exclusive"`` grows Sparse Parallel's branches as siblings (the default),
#: ``"independent"`` grows every tensor on its own (plain RigL/SET).
GROW_GROUPINGS: dict[str, Optional[GroupingFn]] = {
    "exclusive": parallel_branch_groups,
    "independent": None,
}


def resolve_groups(grouping: GroupingFn, params: Any, sparse_paths: Sequence[str], *,
                   what: str, stacked: Optional[Mapping[str, int]] = None) -> list[list[int]]:
  """Groups as positions in ``sparse_paths`` (the tensors a mask update changes).

  Leaves of a group that are not sparse are left out (a group needs two
  sparse members to matter). Stacked leaves (the branches of ``nn.scan``
  layers, ``stacked`` gives their leading layer axes) are grown per slice:
  slice ``l`` of a branch competes only with slice ``l`` of its siblings.

  Raises:
    ValueError: for a path no leaf has, a path in two groups, or a group
      whose sparse tensors differ in shape or in stacked axes.
  """
  all_paths = tree_paths.leaf_paths(params)
  shapes = {p: tuple(jnp.shape(leaf)) for p, leaf in zip(all_paths, jax.tree.leaves(params))}
  position = {p: j for j, p in enumerate(sparse_paths)}
  seen: dict[str, int] = {}
  out = []
  for g, group in enumerate(grouping(params)):
    members = []
    for path in group:
      if path not in shapes:
        raise ValueError(f"{what}: grow group {g} names {path!r}, which is not a parameter path")
      if path in seen:
        raise ValueError(f"{what}: {path!r} is in grow groups {seen[path]} and {g}")
      seen[path] = g
      if path in position:
        members.append(path)
    if len({shapes[p] for p in members}) > 1:
      raise ValueError(f"{what}: grow group {g} has tensors of shapes "
                       f"{sorted({shapes[p] for p in members})}; siblings must have one shape")
    n_stacked = {p: int((stacked or {}).get(p, 0)) for p in members}
    if len(set(n_stacked.values())) > 1:
      raise ValueError(f"{what}: grow group {g} mixes stacked axes {n_stacked}; siblings must be "
                       "stacked alike")
    if len(members) >= 2:
      out.append([position[p] for p in members])
  return out


def _tiered(keys: jax.Array, taken: jax.Array) -> jax.Array:
  """Keys with every candidate not in ``taken`` ranked above every candidate in it."""
  shifted = jnp.right_shift(keys, 1)
  return jnp.where(keys >= 0, jnp.where(taken, shifted, shifted | _FREE_BIT), topk.EXCLUDED)


def grow_sibling_groups(keys: list[jax.Array], kept: list[jax.Array], counts: list[jax.Array],
                        seeds: list[jax.Array], groups: list[list[int]], rotation: jax.Array,
                        select: Callable[..., list[jax.Array]], *,
                        batch_ndims: Optional[Sequence[int]] = None) -> list[jax.Array]:
  """Grow selection for sibling groups (see the module docstring); the others as usual.

  Args:
    keys: int32 grow keys per sparse tensor (``-1``: not a candidate, i.e.
      kept by the tensor itself).
    kept: Bool masks kept by the drop step, per tensor.
    counts: Positions to grow, per tensor (per slice: an array of the batch
      shape for a tensor with ``batch_ndims``).
    seeds: Tie-breaking seeds, per tensor.
    groups: Groups of indices into the lists (from :func:`resolve_groups`).
    rotation: int32 scalar; round ``r`` of a group of ``n`` grows its branch
      ``(rotation + r) mod n`` (the mask update's index).
    select: ``select(keys, counts, seeds, batch_ndims) -> bool masks``, one
      top-k per tensor (per slice of its ``batch_ndims`` leading axes).
    batch_ndims: Per tensor, the leading axes indexing stacked layers (grown
      per slice); None: none. Siblings share theirs.

  Returns:
    The grown bool masks, per tensor.
  """
  nbs = [0] * len(keys) if batch_ndims is None else [int(n) for n in batch_ndims]
  grouped = {j for g in groups for j in g}
  free = [j for j in range(len(keys)) if j not in grouped]
  grown: list[Optional[jax.Array]] = [None] * len(keys)
  # Per group: stacked keys, counts, seeds; "held" counts every sibling's kept mask.
  stacks = []
  for g in groups:
    stacks.append(dict(
        keys=jnp.stack([keys[j] for j in g]), counts=jnp.stack([jnp.asarray(counts[j], jnp.int32) for j in g]),
        seeds=jnp.stack([seeds[j] for j in g]),
        held=sum((kept[j].astype(jnp.int32) for j in g), jnp.zeros(kept[g[0]].shape, jnp.int32)),
        kept=jnp.stack([kept[j] for j in g]),
        grown=jnp.zeros((len(g),) + tuple(keys[g[0]].shape), jnp.bool_),
        taken_now=jnp.zeros(keys[g[0]].shape, jnp.bool_)))
  for r in range(max((len(g) for g in groups), default=0)):
    # One batched selection per round: branch r of every group (and, in round
    # 0, every tensor outside a group).
    round_keys, round_counts, round_seeds, round_nbs, where = [], [], [], [], []
    for gi, g in enumerate(groups):
      if r >= len(g):
        continue
      st = stacks[gi]
      b = (rotation + r) % len(g)
      held_by_others = (st["held"] - st["kept"][b].astype(jnp.int32)) > 0
      round_keys.append(_tiered(st["keys"][b], held_by_others | st["taken_now"]))
      round_counts.append(st["counts"][b])
      round_seeds.append(st["seeds"][b])
      round_nbs.append(nbs[g[0]])
      where.append((gi, b))
    if r == 0:
      round_keys += [keys[j] for j in free]
      round_counts += [counts[j] for j in free]
      round_seeds += [seeds[j] for j in free]
      round_nbs += [nbs[j] for j in free]
    chosen = select(round_keys, round_counts, round_seeds, round_nbs)
    for (gi, b), sel in zip(where, chosen):
      st = stacks[gi]
      st["grown"] = st["grown"].at[b].set(sel)
      st["taken_now"] = st["taken_now"] | sel
    if r == 0:
      for j, sel in zip(free, chosen[len(where):]):
        grown[j] = sel
  for gi, g in enumerate(groups):
    for pos, j in enumerate(g):
      grown[j] = stacks[gi]["grown"][pos]
  # Every tensor is either free (chosen in round 0) or in exactly one group.
  result = [g for g in grown if g is not None]
  assert len(result) == len(grown)
  return result
