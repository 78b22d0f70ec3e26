"""Sparse MACs per layer: FLOP reports of a MAC count and a model spec."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import numpy as np

from sift_jax.flops._count import MacCount
from sift_jax.masks import ops as mask_ops
from sift_jax.masks import tree_paths

def effective_densities(params: Any, *, densities: Any = None, masks: Any = None) -> dict[str, float]:
  """Returns ``{path: density}`` of the masks that will be used.

  With ``densities`` (a tree of floats, e.g. from :func:`sift_jax.layer_densities`)
  the density of a leaf is ``target_count(d, size) / size``: the exact-count
  masks of :func:`sift_jax.init_masks` hold ``round(d * size)`` ones. With
  ``masks`` (bool arrays) it is the measured ``nnz / size``. With neither,
  every leaf has density 1.
  """
  paths = tree_paths.leaf_paths(params)
  sizes = [int(np.prod(np.shape(l))) for l in jax.tree.leaves(params)]
  if masks is not None:
    masks = mask_ops.conform(params, masks, "masks")
    return {p: float(np.sum(np.asarray(m))) / max(n, 1)
            for p, n, m in zip(paths, sizes, jax.tree.leaves(masks))}
  if densities is not None:
    densities = mask_ops.check_densities(params, densities)
    return {p: mask_ops.target_count(float(d), n) / max(n, 1)
            for p, n, d in zip(paths, sizes, jax.tree.leaves(densities))}
  return {p: 1.0 for p in paths}


@dataclasses.dataclass(frozen=True)
class LayerFlops:
  """One row of the per-layer table.

  Attributes:
    name: Parameter path or ``activations:...``.
    shape: Shape of the parameter (empty for activation rows).
    params: Number of weights of the parameter (0 for activation rows).
    density: Mask density of the parameter (1.0 if dense).
    macs: Dense forward MACs for one example.
    sparse_macs: ``macs * density``.
  """

  name: str
  shape: tuple[int, ...]
  params: int
  density: float
  macs: int
  sparse_macs: float

  def to_dict(self) -> dict[str, Any]:
    return {"name": self.name, "shape": list(self.shape), "params": self.params,
            "density": self.density, "macs": self.macs, "flops": 2 * self.macs,
            "sparse_macs": self.sparse_macs, "sparse_flops": 2 * self.sparse_macs}


@dataclasses.dataclass(frozen=True)
class FlopsReport:
  """Dense and sparse forward cost of a model, per layer and in total (batch 1).

  Attributes:
    layers: Per-row table (every parameter that feeds a product, then the
      activation products).
    dense_macs: MACs with all masks one.
    sparse_macs: MACs with every row scaled by its mask density.
    params: Number of parameters (the ``params`` collection only).
    nonzero_params: Parameters left after masking.
    base_dense_macs: MACs of the untransformed dense model, if known.
    nominal_sparsity: The ``s`` the transformation was sized with.
    solved_sparsity: The sparsity the masks use.
  """

  layers: tuple[LayerFlops, ...]
  dense_macs: int
  sparse_macs: float
  params: int
  nonzero_params: int
  base_dense_macs: Optional[int] = None
  nominal_sparsity: Optional[float] = None
  solved_sparsity: Optional[float] = None
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def iso_flop_ratio(self) -> Optional[float]:
    """``sparse_macs / base_dense_macs`` (1.0 is iso-FLOP)."""
    if not self.base_dense_macs:
      return None
    return float(self.sparse_macs) / float(self.base_dense_macs)

  def to_dict(self) -> dict[str, Any]:
    """A JSON-serialisable dict (MACs and FLOPs = 2 x MACs, batch 1)."""
    out = {
        "batch_size": 1,
        "convention": "MACs = multiply-accumulates of dot_general and conv for one example; FLOPs = 2 x MACs",
        "base_dense_macs": self.base_dense_macs,
        "dense_macs": self.dense_macs,
        "sparse_macs": self.sparse_macs,
        "base_dense_flops": None if self.base_dense_macs is None else 2 * self.base_dense_macs,
        "dense_flops": 2 * self.dense_macs,
        "sparse_flops": 2 * self.sparse_macs,
        "iso_flop_ratio": self.iso_flop_ratio,
        "params": self.params,
        "nonzero_params": self.nonzero_params,
        "nominal_sparsity": self.nominal_sparsity,
        "solved_sparsity": self.solved_sparsity,
        "layers": [row.to_dict() for row in self.layers],
    }
    out.update(self.extra)
    return out

  def format_table(self) -> str:
    """The per-layer table and totals as text."""
    name_w = max([len("layer")] + [len(r.name) for r in self.layers])
    head = (f"{'layer':<{name_w}}  {'shape':>20}  {'params':>12}  {'density':>8}  "
            f"{'dense MACs':>16}  {'sparse MACs':>16}")
    lines = [head, "-" * len(head)]
    for r in self.layers:
      lines.append(f"{r.name:<{name_w}}  {str(r.shape) if r.shape else '-':>20}  {r.params:>12,}  "
                   f"{r.density:>8.4f}  {r.macs:>16,}  {r.sparse_macs:>16,.0f}")
    lines.append("-" * len(head))
    lines.append("per example (batch 1); MACs = multiply-accumulates, FLOPs = 2 x MACs")
    if self.base_dense_macs is not None:
      lines.append(f"base dense MACs (untransformed):   {self.base_dense_macs:>18,}"
                   f"   FLOPs {2 * self.base_dense_macs:,}")
    lines.append(f"dense MACs (all masks one):        {self.dense_macs:>18,}   FLOPs {2 * self.dense_macs:,}")
    lines.append(f"sparse MACs:                       {self.sparse_macs:>18,.0f}"
                 f"   FLOPs {2 * self.sparse_macs:,.0f}")
    if self.iso_flop_ratio is not None:
      lines.append(f"iso-FLOP ratio (sparse / base):    {self.iso_flop_ratio:>18.5f}")
    lines.append(f"params:                            {self.params:>18,}")
    lines.append(f"nonzero params:                    {self.nonzero_params:>18,}")
    if self.nominal_sparsity is not None:
      lines.append(f"nominal sparsity:                  {self.nominal_sparsity:>18.5f}")
    if self.solved_sparsity is not None:
      lines.append(f"solved sparsity:                   {self.solved_sparsity:>18.5f}")
    return "\n".join(lines)


def flops_report(macs: MacCount, params: Any, *, densities: Any = None, masks: Any = None,
                 base_dense_macs: Optional[int] = None, nominal_sparsity: Optional[float] = None,
                 solved_sparsity: Optional[float] = None,
                 extra: Optional[Mapping[str, Any]] = None) -> FlopsReport:
  """Combines a :class:`MacCount` with mask densities into a :class:`FlopsReport`.

  Args:
    macs: From :func:`count_macs` on the same parameter tree.
    params: The ``params`` tree (arrays or ``ShapeDtypeStruct``).
    densities: Tree of floats (exact-count masks are assumed), or
    masks: Tree of bool masks (measured densities). Neither: all dense.
    base_dense_macs: Dense MACs of the untransformed model, for the ratio.
    nominal_sparsity: Reported as given.
    solved_sparsity: Reported as given.
    extra: Additional entries for :meth:`FlopsReport.to_dict`.
  """
  dens = effective_densities(params, densities=densities, masks=masks)
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  shapes = {tree_paths.path_str(kp): tuple(int(d) for d in np.shape(l)) for kp, l in flat}
  rows = []
  for r in macs.rows:  # in the order the forward pass first uses them
    if r.param is not None and r.param in shapes:
      d = dens[r.param]
      shape = shapes[r.param]
      rows.append(LayerFlops(r.name, shape, int(np.prod(shape)), d, r.macs, r.macs * d))
    elif r.param is not None:  # a product of several parameters: charge the lowest density
      parts = r.param.split(" + ")
      d = min(dens.get(p, 1.0) for p in parts)
      rows.append(LayerFlops(r.name, (), 0, d, r.macs, r.macs * d))
    else:
      rows.append(LayerFlops(r.name, (), 0, 1.0, r.macs, float(r.macs)))
  n_params = int(sum(int(np.prod(s)) for s in shapes.values()))
  nnz = int(sum(round(dens[p] * int(np.prod(s))) for p, s in shapes.items()))
  return FlopsReport(
      layers=tuple(rows), dense_macs=macs.total, sparse_macs=float(sum(r.sparse_macs for r in rows)),
      params=n_params, nonzero_params=nnz, base_dense_macs=base_dense_macs,
      nominal_sparsity=nominal_sparsity, solved_sparsity=solved_sparsity, extra=dict(extra or {}))


def model_report(spec: Any, *, densities: Any = None, masks: Any = None, params: Any = None) -> FlopsReport:
  """:class:`FlopsReport` of a :class:`sift_jax.models.ModelSpec`.

  Without ``densities`` or ``masks`` the masks are the uniform ones at the
  spec's solved sparsity over its policy's sparse leaves (what the training
  code uses). ``params`` defaults to the abstract parameter tree.
  """
  from sift_jax.masks.densities import layer_densities  # pylint: disable=g-import-not-at-top

  variables = spec.abstract_variables()
  if params is None:
    params = variables["params"]
  macs = spec.mac_count()
  if densities is None and masks is None:
    if spec.solved_sparsity > 0.0:
      densities = layer_densities(params, spec.solved_sparsity, policy=spec.policy)
  extra = {"model": spec.name, "family": spec.family, "reference": spec.reference,
           "round_to": spec.round_to, "input_shape": list(spec.input_shape),
           "info": _jsonable(spec.info)}
  return flops_report(macs, params, densities=densities, masks=masks,
                      base_dense_macs=spec.base_dense_macs, nominal_sparsity=spec.nominal_sparsity,
                      solved_sparsity=spec.solved_sparsity, extra=extra)


def _jsonable(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  return x
