"""FLOP accounting: MACs from the jaxpr, sparse MACs, training FLOPs, and a CLI.

Conventions (docs/method.md, section 5):

* A MAC is one multiply-accumulate; FLOPs = 2 x MACs. Tables print both,
  labelled.
* Counts are for **one example** (batch 1; for a language model one sequence
  of the model's context length), forward pass only.
* Only ``dot_general`` (``Dense``, ``DenseGeneral``, ``einsum``, matmul) and
  ``conv_general_dilated`` (with ``feature_group_count``) are counted; norms,
  activations, pooling and adds are not, as in the reference numbers.

How MACs are attributed. :func:`count_macs` traces ``module.apply`` with
``jax.make_jaxpr`` on abstract inputs (no compute happens) and walks the
equations, recursing into ``jit``/``remat``/``custom_jvp``/``custom_vjp``
sub-jaxprs and into ``scan`` bodies (multiplied by the scan length). A
forward dataflow labels each value with the parameter leaves it derives from
and whether it depends on the model's inputs. The operand of a product that
does not depend on the inputs is its weight, and the product's MACs are
charged to that weight's parameter leaf; a product of two input-dependent
operands (attention ``QK^T`` and ``AV``) is charged to no parameter and is
always dense. Sparse MACs scale every row by the density of its parameter's
mask.

Run ``python -m sift_jax.flops --model resnet18_cifar --family sparse_wide
--sparsity 0.9`` for a per-layer table, ``--json`` for one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.extend.core as jex
import numpy as np

from sift_jax.masks import ops as mask_ops
from sift_jax.masks import tree_paths

__all__ = [
    "MacRow", "MacCount", "count_macs", "MacTrace", "trace_macs", "LayerFlops", "FlopsReport", "flops_report",
    "effective_densities", "TrainingFlops", "training_flops", "TRAINING_METHODS", "model_report",
    "main",
]

TRAINING_METHODS = ("dense", "static", "set", "rigl", "gmp", "oneshot")


class MacRow(NamedTuple):
  """MACs of one parameter leaf, or of one input-by-input product.

  Attributes:
    name: The parameter path (``"layer1_0/conv1/kernel"``) or, for products of
      two activations, ``"activations:<flax module path>/<op>"``.
    macs: Multiply-accumulates for one example.
    param: The parameter path the MACs are charged to, or ``None``.
  """

  name: str
  macs: int
  param: Optional[str]


@dataclasses.dataclass(frozen=True)
class MacCount:
  """Per-row forward MACs of a model for one example."""

  rows: tuple[MacRow, ...]

  @property
  def total(self) -> int:
    """All MACs (every row), i.e. the dense forward cost."""
    return int(sum(r.macs for r in self.rows))

  def by_param(self) -> dict[str, int]:
    """MACs charged to each parameter path."""
    return {r.param: r.macs for r in self.rows if r.param is not None}

  @property
  def unattributed(self) -> int:
    """MACs charged to no parameter (activation x activation products)."""
    return int(sum(r.macs for r in self.rows if r.param is None))


class _Label(NamedTuple):
  data: bool  # depends on the model inputs
  origins: frozenset  # parameter leaf indices it derives from (empty once data-dependent)


_CONST = _Label(False, frozenset())
_DATA = _Label(True, frozenset())


def _join(labels: Sequence[_Label]) -> _Label:
  if any(l.data for l in labels):
    return _DATA
  return _Label(False, frozenset().union(*[l.origins for l in labels]) if labels else frozenset())


def _scan_counts(params: Mapping[str, Any]) -> tuple[int, int]:
  """(number of constants, number of carries) of a ``scan`` equation.

  jax <= 0.10 records them as ``num_consts``/``num_carry``; newer releases
  give per-operand tuples ``ft_in = (consts, carry, xs)`` instead.
  """
  if "num_consts" in params:
    return int(params["num_consts"]), int(params["num_carry"])
  # ft_in is a flat tree of (consts, carry, xs); its groups are ``.elts``.
  groups = getattr(params["ft_in"], "elts", params["ft_in"])
  return len(groups[0]), len(groups[1])


def _sub_jaxpr(value: Any) -> Optional[Any]:
  """The ``Jaxpr`` inside an equation parameter, if it holds one."""
  if isinstance(value, jex.ClosedJaxpr):
    return value.jaxpr
  if isinstance(value, jex.Jaxpr):
    return value
  return None


class _Walker:
  """Forward dataflow over a jaxpr that records MAC rows."""

  def __init__(self, param_paths: Sequence[str], param_vars: Optional[Mapping[Any, int]] = None):
    self.param_paths = list(param_paths)
    # Variables of the top-level jaxpr that *are* parameter leaves (when tracing ``init``).
    self.param_vars = dict(param_vars or {})
    self.macs: dict[tuple[str, Optional[str]], int] = {}

  def _add(self, name: str, param: Optional[str], macs: int) -> None:
    key = (name, param)
    self.macs[key] = self.macs.get(key, 0) + int(macs)

  def _charge(self, eqn: Any, weight: Optional[_Label], both_data: bool, macs: int, mult: int) -> None:
    if macs == 0 or mult == 0:
      return
    if both_data or weight is None:
      stack = str(eqn.source_info.name_stack)
      stack = stack.split("/", 1)[1] if "/" in stack else stack
      self._add(f"activations:{stack or eqn.primitive.name}", None, macs * mult)
      return
    if not weight.origins:  # constants only (e.g. a fixed matrix closed over)
      self._add(f"constants:{eqn.primitive.name}", None, macs * mult)
      return
    path = " + ".join(sorted(self.param_paths[i] for i in weight.origins))
    self._add(path, path, macs * mult)

  def _charge_pair(self, eqn: Any, a: _Label, b: _Label, macs: int, mult: int) -> None:
    if a.data and b.data:
      self._charge(eqn, None, True, macs, mult)
    elif a.data:
      self._charge(eqn, b, False, macs, mult)
    elif b.data:
      self._charge(eqn, a, False, macs, mult)
    else:  # a product of parameters only (e.g. a folded U V): charge both
      self._charge(eqn, _join([a, b]), False, macs, mult)

  def _dot(self, eqn: Any, ins: Sequence[_Label], mult: int) -> None:
    lhs = eqn.invars[0].aval
    (lc, _), _ = eqn.params["dimension_numbers"]
    out = eqn.outvars[0].aval
    macs = int(np.prod(out.shape, dtype=np.int64)) * int(np.prod([lhs.shape[d] for d in lc], dtype=np.int64))
    self._charge_pair(eqn, ins[0], ins[1], macs, mult)

  def _conv(self, eqn: Any, ins: Sequence[_Label], mult: int) -> None:
    rhs = eqn.invars[1].aval
    out = eqn.outvars[0].aval
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec
    per_output = int(np.prod(rhs.shape, dtype=np.int64)) // int(rhs.shape[rhs_spec[0]])
    macs = int(np.prod(out.shape, dtype=np.int64)) * per_output
    self._charge_pair(eqn, ins[0], ins[1], macs, mult)

  def walk(self, jaxpr: Any, in_labels: Sequence[_Label], mult: int = 1,
           record: bool = True) -> list[_Label]:
    env: dict[Any, _Label] = {}
    for v in jaxpr.constvars:
      env[v] = _CONST
    for v, l in zip(jaxpr.invars, in_labels):
      env[v] = l

    def read(a: Any) -> _Label:
      if isinstance(a, jex.Literal):
        return _CONST
      return env.get(a, _CONST)

    for eqn in jaxpr.eqns:
      ins = [read(a) for a in eqn.invars]
      name = eqn.primitive.name
      if name == "dot_general" and record:
        self._dot(eqn, ins, mult)
      elif name == "conv_general_dilated" and record:
        self._conv(eqn, ins, mult)
      outs = self._recurse(eqn, ins, mult, record)
      if outs is None:
        outs = [_join(ins)] * len(eqn.outvars)
      for v, l in zip(eqn.outvars, outs):
        env[v] = l
        if v in self.param_vars:
          env[v] = _Label(False, frozenset([self.param_vars[v]]))
    return [read(v) for v in jaxpr.outvars]

  def _recurse(self, eqn: Any, ins: list[_Label], mult: int, record: bool) -> Optional[list[_Label]]:
    name = eqn.primitive.name
    params = eqn.params
    if name == "scan":
      body = _sub_jaxpr(params["jaxpr"])
      n_c, n_carry = _scan_counts(params)
      labels = list(ins)
      # Carries may become input-dependent after one iteration: find the fixed point first.
      for _ in range(3):
        outs = self.walk(body, labels, 0, record=False)
        merged = [_join([labels[n_c + i], outs[i]]) for i in range(n_carry)]
        if merged == labels[n_c:n_c + n_carry]:
          break
        labels[n_c:n_c + n_carry] = merged
      return self.walk(body, labels, mult * int(params["length"]), record)
    if name == "while":
      body = _sub_jaxpr(params["body_jaxpr"])
      n_cond = params["cond_nconsts"]
      body_ins = ins[n_cond:]
      # Unknown trip count: the body is counted once.
      return self.walk(body, body_ins, mult, record)[:len(eqn.outvars)]
    if name == "cond":
      best: Optional[tuple[int, dict, list[_Label]]] = None
      for branch in params["branches"]:
        sub = _Walker(self.param_paths)
        outs = sub.walk(_sub_jaxpr(branch), ins[1:], mult, record)
        total = sum(sub.macs.values())
        if best is None or total > best[0]:
          best = (total, sub.macs, outs)
      for (row_name, param), m in best[1].items():
        self._add(row_name, param, m)
      return best[2]
    for value in params.values():
      sub = _sub_jaxpr(value)
      if sub is not None and len(sub.invars) == len(ins):
        return self.walk(sub, ins, mult, record)
    return None


def _abstract(tree: Any) -> Any:
  def leaf(x):
    if hasattr(x, "shape") and hasattr(x, "dtype"):
      return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)
    return x
  return jax.tree.map(leaf, tree)


def count_macs(module: Any, variables: Mapping[str, Any], *inputs: Any, **apply_kwargs: Any) -> MacCount:
  """Counts the forward MACs of ``module.apply(variables, *inputs, **apply_kwargs)``.

  Nothing is computed: the function is traced with ``jax.make_jaxpr`` on the
  shapes of ``variables`` and ``inputs`` (arrays or ``jax.ShapeDtypeStruct``).
  Give inputs with batch size 1 for per-example counts.

  Args:
    module: A Flax Linen module (anything with ``.apply``).
    variables: Its variables; ``variables["params"]`` is the parameter tree the
      rows' paths refer to.
    *inputs: Model inputs (arrays or ``ShapeDtypeStruct``).
    **apply_kwargs: Static keyword arguments of ``apply`` (e.g. ``train=False``).

  Returns:
    A :class:`MacCount` with one row per parameter leaf that feeds a product
    and one per group of activation x activation products.
  """
  if "params" not in variables:
    raise ValueError(f"variables must hold a 'params' collection, got {sorted(variables)}")
  variables = _abstract(dict(variables))
  inputs = _abstract(inputs)
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}

  def fn(params, rest, *inputs):
    return module.apply({"params": params, **rest}, *inputs, **apply_kwargs)

  closed = jax.make_jaxpr(fn)(params, rest, *inputs)
  paths = tree_paths.leaf_paths(params)
  n_params, n_rest = len(paths), len(jax.tree.leaves(rest))
  labels = ([_Label(False, frozenset([i])) for i in range(n_params)] + [_CONST] * n_rest)
  labels += [_DATA] * (len(closed.jaxpr.invars) - len(labels))
  walker = _Walker(paths)
  walker.walk(closed.jaxpr, labels)
  rows = tuple(MacRow(name, macs, param) for (name, param), macs in walker.macs.items())
  return MacCount(rows)


class MacTrace(NamedTuple):
  """Result of :func:`trace_macs`.

  Attributes:
    macs: The :class:`MacCount`.
    variables: The model's variables as ``jax.ShapeDtypeStruct``.
    output: The model's output as ``jax.ShapeDtypeStruct``.
  """

  macs: MacCount
  variables: Any
  output: Any


def trace_macs(module: Any, *inputs: Any, **init_kwargs: Any) -> MacTrace:
  """Counts forward MACs by tracing ``module.init`` once; also returns the shapes.

  Same rows as :func:`count_macs` (``init`` runs the forward pass), at about
  half the cost: one trace gives the abstract variables, the output shapes
  and the MACs, and Flax's per-parameter shape checks of ``apply`` are
  skipped. Each parameter leaf is identified as the ``init`` output it is
  returned as, so the parameters must be created at the top level of the
  trace. Where they are not (lifted ``nn.scan``/``nn.jit``/``nn.remat``
  bodies), some product's weight is not an ``init`` output, and the function
  falls back to :func:`count_macs` on the traced shapes.

  Args:
    module: A Flax Linen module.
    *inputs: Model inputs (arrays or ``ShapeDtypeStruct``), batch 1 for
      per-example counts.
    **init_kwargs: Static keyword arguments of ``__call__`` (``train=False``).

  Returns:
    A :class:`MacTrace`.
  """
  inputs = _abstract(inputs)

  def fn(*inputs):
    key = jax.random.key(0)
    out, variables = module.init_with_output({"params": key, "dropout": key}, *inputs,
                                             **init_kwargs)
    return variables, out

  closed, (var_shapes, out_shapes) = jax.make_jaxpr(fn, return_shape=True)(*inputs)
  flat, _ = jax.tree_util.tree_flatten_with_path(var_shapes)
  if len(flat) + len(jax.tree.leaves(out_shapes)) != len(closed.jaxpr.outvars):
    raise ValueError(f"cannot match the {len(flat)} variables of {type(module).__name__} to the "
                     "outputs of its init jaxpr; use count_macs")
  params = var_shapes.get("params", {})
  paths = tree_paths.leaf_paths(params)
  param_vars: dict[Any, int] = {}
  index = 0
  for (kp, _), var in zip(flat, closed.jaxpr.outvars):
    if tree_paths.path_str(kp[:1]) == "params":
      if not isinstance(var, jex.Literal) and var not in param_vars:
        param_vars[var] = index
      index += 1
  labels = [_DATA] * len(closed.jaxpr.invars)
  walker = _Walker(paths, param_vars)
  walker.walk(closed.jaxpr, labels)
  rows = tuple(MacRow(name, macs, param) for (name, param), macs in walker.macs.items())
  if any(r.param is None and r.name.startswith("constants:") for r in rows):
    # A product whose weight is no top-level init output: parameters created inside a lifted
    # transform (nn.scan, nn.jit, nn.remat). Trace apply, where parameters are inputs.
    return MacTrace(count_macs(module, var_shapes, *inputs, **init_kwargs), var_shapes, out_shapes)
  return MacTrace(MacCount(rows), var_shapes, out_shapes)


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


def main(argv: Optional[Sequence[str]] = None) -> int:
  """CLI: ``python -m sift_jax.flops --model NAME --family FAMILY --sparsity S [--json]``."""
  from sift_jax import models  # pylint: disable=g-import-not-at-top
  from sift_jax.transformations import sizes  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(
      prog="python -m sift_jax.flops",
      description="Per-layer forward MACs (batch 1) of a Sparse-IFT model, dense and sparse.")
  parser.add_argument("--model", required=True, help=f"one of {', '.join(models.list_models())}")
  parser.add_argument("--family", default="dense", help=f"one of {', '.join(sizes.FAMILIES)}")
  parser.add_argument("--sparsity", type=float, default=0.0, help="nominal sparsity s in [0, 1)")
  parser.add_argument("--reference", action="store_true", help="reproduce the authors' PyTorch rules")
  parser.add_argument("--round-to", type=int, default=1, help="round widths and ranks to this multiple")
  parser.add_argument("--num-classes", type=int, default=None, help="override the number of classes")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  args = parser.parse_args(argv)
  try:
    spec = models.get_model(args.model, family=args.family, sparsity=args.sparsity,
                            reference=args.reference, round_to=args.round_to,
                            num_classes=args.num_classes)
    report = model_report(spec)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(report.to_dict()))
  else:
    print(f"model {spec.name}  family {spec.family}  reference={spec.reference}  "
          f"round_to={spec.round_to}  input {tuple(spec.input_shape)}")
    print(report.format_table())
  return 0
