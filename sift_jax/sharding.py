"""Shardings for parameters, masks and optimizer states over a device mesh.

Parameters are partitioned by regex rules on their "/"-joined paths (first
match wins, the big_vision way). Every other tree that mirrors the parameters
(masks, optimizer moments, ``ever_active``) takes the parameters' shardings;
everything else (counters, keys, scalars) is replicated.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Optional, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from sift_jax.masks import tree_paths

__all__ = ["make_mesh", "param_shardings", "shardings_like_params", "replicated"]

_log = logging.getLogger("sift_jax")


def make_mesh(data: int = -1, model: int = 1, *, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A ``("data", "model")`` mesh with Auto axis types.

  Args:
    data: Size of the data-parallel axis; -1 takes all devices left over.
    model: Size of the model-parallel axis.
    devices: Devices to use (default ``jax.devices()``).

  Raises:
    ValueError: if the sizes do not divide the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if model < 1 or n % model:
    raise ValueError(f"model axis size {model} must be >= 1 and divide the {n} devices")
  if data == -1:
    data = n // model
  if data * model != n:
    raise ValueError(f"mesh data={data} x model={model} does not match {n} devices")
  axis_types = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((data, model), ("data", "model"), axis_types=axis_types, devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_shardings(params: Any, mesh: Mesh, rules: Sequence[tuple[str, P]] = (), *,
                    log: bool = True) -> Any:
  """NamedShardings for ``params`` from ``(regex, PartitionSpec)`` rules.

  The first rule whose regex ``re.search``-es a leaf's path decides; leaves no
  rule matches are replicated. A spec that does not fit a leaf (more axes
  than dimensions, or a dimension not divisible by the mesh axis size) is an
  error naming the path, since silently replicating would hide a bad config.

  Args:
    params: Parameter pytree (arrays or ``jax.ShapeDtypeStruct``).
    mesh: The device mesh.
    rules: Sequence of ``(regex, PartitionSpec)``.
    log: Log the decision for each leaf once.

  Raises:
    ValueError: for a spec that does not fit the parameter it matched.
  """
  compiled = [(re.compile(pat), spec if isinstance(spec, P) else P(*spec)) for pat, spec in rules]

  def one(path: str, leaf: Any) -> NamedSharding:
    shape = tuple(np.shape(leaf))
    for regex, spec in compiled:
      if regex.search(path):
        if len(spec) > len(shape):
          raise ValueError(f"sharding rule {regex.pattern!r} -> {spec} has more axes than "
                           f"parameter {path!r} of shape {shape}")
        for dim, axes in zip(shape, spec):
          if axes is None:
            continue
          names = axes if isinstance(axes, tuple) else (axes,)
          size = int(np.prod([mesh.shape[a] for a in names]))
          if dim % size:
            raise ValueError(f"sharding rule {regex.pattern!r} -> {spec}: dimension {dim} of "
                             f"parameter {path!r} (shape {shape}) is not divisible by {size}")
        if log:
          _log.info("sift_jax sharding: %-48s %s (rule %r)", path, spec, regex.pattern)
        return NamedSharding(mesh, spec)
    return NamedSharding(mesh, P())

  return tree_paths.map_with_path_str(one, params)


def shardings_like_params(tree: Any, params: Any, params_shardings: Any, default: Any) -> Any:
  """Shardings for ``tree``: param-shaped subtrees mirror ``params_shardings``.

  Walks ``tree`` (e.g. an abstract optimizer state from ``jax.eval_shape``);
  each subtree with the same structure as ``params`` (masks, moments) gets
  the parameters' shardings leaf by leaf where the leaf has the parameter's
  shape (factored statistics that do not are given ``default``); every other
  leaf gets ``default``.
  """
  params_def: jax.tree_util.PyTreeDef = jax.tree.structure(params)
  param_shapes = [tuple(np.shape(p)) for p in jax.tree.leaves(params)]
  param_leaves = params_def.flatten_up_to(params_shardings)

  def visit(node: Any) -> Any:
    try:
      same = jax.tree.structure(node) == params_def
    except Exception:  # pylint: disable=broad-except
      same = False
    if not same:
      return None
    out = [s if tuple(np.shape(l)) == shape else default
           for l, s, shape in zip(jax.tree.leaves(node), param_leaves, param_shapes)]
    return _Marked(jax.tree.unflatten(params_def, out))

  marked = _map_subtrees(visit, tree)
  return jax.tree.map(lambda x: x.value if isinstance(x, _Marked) else default, marked,
                      is_leaf=lambda x: isinstance(x, _Marked))


class _Marked:
  """Wraps an already-decided sharding subtree so the final map keeps it."""

  def __init__(self, value: Any):
    self.value = value


def _map_subtrees(fn, node):
  out = fn(node)
  if out is not None:
    return out
  if isinstance(node, tuple) and hasattr(node, "_fields"):
    return type(node)(*[_map_subtrees(fn, c) for c in node])
  if isinstance(node, (tuple, list)):
    return type(node)(_map_subtrees(fn, c) for c in node)
  if isinstance(node, dict):
    return type(node)({k: _map_subtrees(fn, v) for k, v in node.items()})
  children, treedef = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
  if len(children) == 1 and children[0] is node:
    return node
  return jax.tree.unflatten(treedef, [_map_subtrees(fn, c) for c in children])
