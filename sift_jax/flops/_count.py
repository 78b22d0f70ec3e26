"""MACs of a Flax module from its jaxpr (see the package docstring for the rules)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.extend.core as jex
import numpy as np

from sift_jax.masks import tree_paths

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
      assert best is not None  # a cond has at least one branch
      for (row_name, param), m in best[1].items():
        self._add(row_name, param, m)
      return best[2]
    for value in params.values():
      sub_jaxpr = _sub_jaxpr(value)
      if sub_jaxpr is not None and len(sub_jaxpr.invars) == len(ins):
        return self.walk(sub_jaxpr, ins, mult, record)
    return None


def _abstract(tree: Any) -> Any:
  def leaf(x):
    if hasattr(x, "shape") and hasattr(x, "dtype"):
      return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)
    return x
  return jax.tree.map(leaf, tree)


def _is_nnx(module: Any) -> bool:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return isinstance(module, nnx.Module)


def _count_nnx_macs(module: Any, inputs: Sequence[Any], call_kwargs: Mapping[str, Any]) -> MacCount:
  """MACs of ``module(*inputs, **call_kwargs)`` for an NNX module (its state is its variables)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  # nnx.split's overloads type a split by several filters as a variadic tuple.
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)  # type: ignore[misc]
  leaves, treedef = jax.tree.flatten(params)
  if not leaves:
    raise ValueError(f"count_macs(): the NNX module {type(module).__name__} has no nnx.Param "
                     "(a TransformedNnxModel creates its parameters in lazy_init(x): call it first)")
  leaves, rest, inputs = _abstract(leaves), _abstract(rest), _abstract(tuple(inputs))

  def fn(leaves, rest, *inputs):
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), rest)(*inputs, **call_kwargs)

  closed = jax.make_jaxpr(fn)(leaves, rest, *inputs)
  paths = tree_paths.leaf_paths(params)  # the trailing ``value`` of each Variable dropped
  n_params, n_rest = len(paths), len(jax.tree.leaves(rest))
  labels = ([_Label(False, frozenset([i])) for i in range(n_params)] + [_CONST] * n_rest)
  labels += [_DATA] * (len(closed.jaxpr.invars) - len(labels))
  walker = _Walker(paths)
  walker.walk(closed.jaxpr, labels)
  return MacCount(tuple(MacRow(name, macs, param) for (name, param), macs in walker.macs.items()))


def count_macs(module: Any, variables: Any, *inputs: Any, **apply_kwargs: Any) -> MacCount:
  """Counts the forward MACs of ``module.apply(variables, *inputs, **apply_kwargs)``.

  An NNX module holds its variables: call ``count_macs(nnx_module, *inputs)``
  (rows are named by the ``nnx.state(module, nnx.Param)`` paths, e.g.
  ``"stem/kernel"``).

  Nothing is computed: the function is traced with ``jax.make_jaxpr`` on the
  shapes of ``variables`` and ``inputs`` (arrays or ``jax.ShapeDtypeStruct``).
  Give inputs with batch size 1 for per-example counts.

  Args:
    module: A Flax Linen module (anything with ``.apply``) or an ``nnx.Module``.
    variables: Its variables; ``variables["params"]`` is the parameter tree the
      rows' paths refer to. For an NNX module, the first input.
    *inputs: Model inputs (arrays or ``ShapeDtypeStruct``).
    **apply_kwargs: Static keyword arguments of ``apply`` (e.g. ``train=False``).

  Returns:
    A :class:`MacCount` with one row per parameter leaf that feeds a product
    and one per group of activation x activation products.

  Raises:
    ValueError: if ``variables`` has no ``"params"`` (Linen), or the NNX
      module has no ``nnx.Param``.
    TypeError: if ``module`` is neither (it has no ``apply``).
  """
  if _is_nnx(module):
    return _count_nnx_macs(module, (variables,) + inputs, apply_kwargs)
  if not callable(getattr(module, "apply", None)):
    raise TypeError(f"count_macs() expects a flax.linen Module (with .apply) or a flax.nnx "
                    f"Module, got {type(module).__name__}")
  if not isinstance(variables, Mapping):
    raise TypeError(f"count_macs(): variables must be a mapping of collections ({{'params': "
                    f"...}}), got {type(variables).__name__}")
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
    module: A Flax Linen module, or an ``nnx.Module`` (already initialised:
      its MACs come from :func:`count_macs`, its variables from its state).
    *inputs: Model inputs (arrays or ``ShapeDtypeStruct``), batch 1 for
      per-example counts.
    **init_kwargs: Static keyword arguments of ``__call__`` (``train=False``).

  Returns:
    A :class:`MacTrace`.
  """
  if _is_nnx(module):
    from flax import nnx  # pylint: disable=g-import-not-at-top
    macs = _count_nnx_macs(module, inputs, init_kwargs)
    graphdef, state = nnx.split(module)
    out = jax.eval_shape(lambda s, *x: nnx.merge(graphdef, s)(*x, **init_kwargs), state,
                         *_abstract(inputs))
    params = _abstract(nnx.to_pure_dict(nnx.state(module, nnx.Param)))
    return MacTrace(macs, {"params": params}, out)
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
