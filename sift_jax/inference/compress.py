"""Sparse storage and inference for trained masked kernels (any member, Sparse Wide included).

:func:`compress` replaces every sufficiently sparse ``kernel`` of a model's
``nn.Dense``/``nn.DenseGeneral``/``nn.Conv`` layers by a sparse format and
returns a :class:`CompressedModel` whose ``apply`` computes those layers from
the sparse form (the others run as they are). Layers are found by
intercepting their calls (``flax.linen.intercept_methods``), so any Linen
model works: registry models, :func:`sift_jax.transform`-ed ones, plain ones.

Formats (:data:`FORMATS`; an extension point: one table entry per format):

* ``"scatter"``: the flat int32 indices and the values of the nonzeros (8
  bytes per nonzero); at inference they are scattered into the masked dense
  kernel and the layer runs as it is: compressed storage, the masked dense
  layer's compute plus one scatter of the nonzeros (the cheapest rebuild we
  measured on CPU: about 0.3 ms for 30k nonzeros).
* ``"bitmask"``: one bit per kernel entry and the nonzero values in order:
  ``4 nnz + size / 8`` bytes (the smallest storage above about 3% density),
  but its rebuild (a cumulative sum and a gather over the whole kernel) costs
  some 35x the scatter's on CPU; for storage, not for latency.
* ``"ell"``: per output feature, the row indices and values of its nonzero
  weights, padded to the largest count (ELLPACK, stored column-major:
  ``(D_out, K)``). The product gathers the ``K`` needed input rows per output
  feature, ``y[:, j] = sum_k x[:, idx[j, k]] * val[j, k]``; its work is the
  nonzero count (plus padding), not the dense size, but on CPUs each gathered
  weight costs far more than a dense MAC (see :data:`ELL_MAX_DENSITY`).
* ``"bcoo"``: :class:`jax.experimental.sparse.BCOO` of the 2-D kernel and its
  ``dot_general``, for comparison.

``format="auto"`` (the default) picks per layer: ELL at or below
``ell_max_density``, else the scatter format. XLA has no fast unstructured-sparse
kernel for CPUs, so above about 1% density the masked dense product is the
faster, and ``"auto"`` never computes a layer more slowly than the
transformed model does, up to the rebuild of its kernel
(:attr:`CompressedModel.formats` says what each layer got).

Convolutions become patch extraction (``lax.conv_general_dilated_patches``,
with the layer's strides, padding and dilations) followed by the sparse
product. Everything is jittable and exportable with ``jax.export``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Optional, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import sparse as jsparse
import numpy as np

from sift_jax.masks import ops as mask_ops
from sift_jax.models.registry import ModelSpec
from sift_jax.transformations.transform import TransformedModel
from sift_jax.transformations.transform import _STATE as _TRANSFORM_STATE  # replacement depth

__all__ = ["compress", "CompressedModel", "ELL_MAX_DENSITY", "FORMATS", "FORMAT_CHOICES", "variable_bytes",
           "dense_matrix"]


def variable_bytes(tree: Any) -> int:
  """Bytes of all array leaves of a pytree (what a checkpoint of it stores)."""
  return int(sum(np.dtype(l.dtype).itemsize * int(np.prod(np.shape(l))) for l in jax.tree.leaves(tree)))


def _as_tuple(v: Any) -> tuple:
  return tuple(v) if isinstance(v, (tuple, list)) else (v,)


# ----------------------------------------------------------------------------- 2-D kernels


def dense_matrix(module: nn.Module, kernel: np.ndarray) -> np.ndarray:
  """The layer's kernel as the ``(D_in, D_out)`` matrix the sparse formats store.

  Convolution rows follow ``conv_general_dilated_patches``' feature order
  (input channel major, then the kernel's spatial positions).
  """
  kernel = np.asarray(kernel)
  if isinstance(module, nn.Conv):
    nd = kernel.ndim - 2
    return np.transpose(kernel, (nd,) + tuple(range(nd)) + (nd + 1,)).reshape(-1, kernel.shape[-1])
  if isinstance(module, nn.DenseGeneral):
    n_in = len(_as_tuple(module.axis))
    return kernel.reshape(int(np.prod(kernel.shape[:n_in])), -1)
  return kernel.reshape(kernel.shape[0], -1)


def _pack_ell(matrix: np.ndarray) -> dict[str, np.ndarray]:
  nonzero = matrix != 0
  counts = nonzero.sum(axis=0)
  k = max(int(counts.max()) if counts.size else 0, 1)
  d_out = matrix.shape[1]
  indices = np.zeros((d_out, k), np.int32)
  values = np.zeros((d_out, k), np.float32)
  for j in range(d_out):
    rows = np.flatnonzero(nonzero[:, j])
    indices[j, :rows.size] = rows
    values[j, :rows.size] = matrix[rows, j]
  return {"ell_indices": indices, "ell_values": values}


def _matmul_ell(x: jax.Array, stored: Mapping[str, jax.Array]) -> jax.Array:
  """``x @ W`` for ``x: (N, D_in)``: gather the needed rows of ``x^T`` (contiguous in N)."""
  idx, val = stored["ell_indices"], stored["ell_values"]
  gathered = jnp.take(x.T, idx, axis=0)  # (D_out, K, N)
  return jnp.einsum("jkn,jk->nj", gathered, val.astype(x.dtype))


def _pack_bcoo(matrix: np.ndarray) -> dict[str, np.ndarray]:
  rows, cols = np.nonzero(matrix)
  return {"bcoo_data": matrix[rows, cols].astype(np.float32),
          "bcoo_indices": np.stack([rows, cols], axis=1).astype(np.int32),
          # D_out as a shape (the values' count does not say it); one byte per output.
          "bcoo_columns": np.zeros((matrix.shape[1],), np.int8)}


def _matmul_bcoo(x: jax.Array, stored: Mapping[str, jax.Array]) -> jax.Array:
  shape = (x.shape[1], stored["bcoo_columns"].shape[0])
  w = jsparse.BCOO((stored["bcoo_data"].astype(x.dtype), stored["bcoo_indices"]), shape=shape,
                   indices_sorted=True, unique_indices=True)
  return (w.T @ x.T).T


def _pack_scatter(kernel: np.ndarray) -> dict[str, np.ndarray]:
  flat = kernel.reshape(-1)
  where = np.flatnonzero(flat)
  return {"scatter_indices": where.astype(np.int32), "scatter_values": flat[where].astype(np.float32),
          "scatter_columns": np.zeros((kernel.shape[-1],), np.int8)}


def _scatter_kernel(stored: Mapping[str, jax.Array], size: int, dtype: Any) -> jax.Array:
  return jnp.zeros((size,), dtype).at[stored["scatter_indices"]].set(
      stored["scatter_values"].astype(dtype), unique_indices=True, indices_are_sorted=True)


def _pack_bitmask(kernel: np.ndarray) -> dict[str, np.ndarray]:
  flat = kernel.reshape(-1)
  nonzero = flat != 0
  return {"bitmask_bits": np.packbits(nonzero), "bitmask_values": flat[nonzero].astype(np.float32),
          "bitmask_columns": np.zeros((kernel.shape[-1],), np.int8)}


def _bitmask_kernel(stored: Mapping[str, jax.Array], size: int, dtype: Any) -> jax.Array:
  values = stored["bitmask_values"].astype(dtype)
  if values.shape[0] == 0:
    return jnp.zeros((size,), dtype)
  nonzero = jnp.unpackbits(stored["bitmask_bits"], count=size).astype(bool)
  # The k-th set bit holds the k-th stored value (both in the kernel's row-major order).
  rank = jnp.clip(jnp.cumsum(nonzero, dtype=jnp.int32) - 1, 0, values.shape[0] - 1)
  return jnp.where(nonzero, values[rank], jnp.zeros((), dtype))


def _dense_kernel_layer(module: nn.Module, x: jax.Array, stored: Mapping[str, jax.Array],
                        d_out: int, *, build: Callable[..., jax.Array]) -> jax.Array:
  """Rebuilds the (masked) dense kernel from its stored form and runs the layer's own computation."""
  if isinstance(module, nn.Conv):
    shape = tuple(_as_tuple(module.kernel_size)) + (x.shape[-1], d_out)
    features: Any = d_out
  elif isinstance(module, nn.DenseGeneral):
    feats = _as_tuple(module.features)
    features = feats[:-1] + (d_out // int(math.prod(feats[:-1])),)
    shape = tuple(x.shape[a % x.ndim] for a in _as_tuple(module.axis)) + features
    features = features if isinstance(module.features, (tuple, list)) else d_out
  else:
    shape, features = (x.shape[-1], d_out), d_out
  kernel = build(stored, int(math.prod(shape)), x.dtype)
  params = {"kernel": kernel.reshape(shape)}
  if module.use_bias:
    params["bias"] = module.get_variable("params", "bias")
  # flax types apply() as maybe returning (output, state), but without
  # mutable= it returns the output alone.
  return cast(jax.Array, module.clone(parent=None, features=features).apply({"params": params}, x))


@dataclasses.dataclass(frozen=True)
class _Format:
  pack: Callable[[np.ndarray], dict[str, np.ndarray]]
  matmul: Optional[Callable[[jax.Array, Mapping[str, jax.Array]], jax.Array]]
  keys: tuple[str, ...]
  d_out: Callable[[Mapping[str, Any]], int]
  # Formats that store the kernel itself (not its 2-D matrix) and compute the whole layer.
  layer: Optional[Callable[..., jax.Array]] = None


#: Sparse kernel formats: ``name -> pack / matmul`` (or ``pack / layer`` for the formats that
#: rebuild the masked dense kernel and run the layer as it is).
FORMATS: dict[str, _Format] = {
    "bitmask": _Format(_pack_bitmask, None, ("bitmask_bits", "bitmask_values", "bitmask_columns"),
                       lambda s: s["bitmask_columns"].shape[0],
                       layer=functools.partial(_dense_kernel_layer, build=_bitmask_kernel)),
    "ell": _Format(_pack_ell, _matmul_ell, ("ell_indices", "ell_values"),
                   lambda s: s["ell_indices"].shape[0]),
    "bcoo": _Format(_pack_bcoo, _matmul_bcoo, ("bcoo_data", "bcoo_indices", "bcoo_columns"),
                    lambda s: s["bcoo_columns"].shape[0]),
    "scatter": _Format(_pack_scatter, None, ("scatter_indices", "scatter_values", "scatter_columns"),
                       lambda s: s["scatter_columns"].shape[0],
                       layer=functools.partial(_dense_kernel_layer, build=_scatter_kernel)),
}

#: What ``compress(format=...)`` accepts: a :data:`FORMATS` key, or ``"auto"`` (per layer, by density).
FORMAT_CHOICES = ("auto",) + tuple(FORMATS)

#: ``format="auto"``'s default density at or below which a layer is stored (and computed) as ELL.
#: On XLA:CPU the ELL product costs about 100-200x a dense MAC per stored weight (a gather
#: per weight, no reuse; `experiments/benchmarks/inference_latency.py`), so it only beats the
#: masked dense kernel below about 1% density; above it the scatter format (dense compute,
#: compact storage) is the faster.
ELL_MAX_DENSITY = 0.01


def _format_of(params: Mapping[str, Any]) -> Optional[_Format]:
  for fmt in FORMATS.values():
    if fmt.keys[0] in params:
      return fmt
  return None


# ----------------------------------------------------------------------------- layers


def _per_dim(value: Any, nd: int) -> tuple[int, ...]:
  value = _as_tuple(1 if value is None else value)
  return tuple(int(v) for v in (value * nd if len(value) == 1 else value))


def _conv_padding(module: nn.Conv, nd: int) -> Any:
  padding = module.padding
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      raise ValueError(f"compress(): convolution {'/'.join(module.path)!r} uses padding "
                       f"{padding!r}; the sparse path supports 'SAME', 'VALID' and explicit pads")
    return padding.upper()
  if isinstance(padding, int):
    return [(padding, padding)] * nd
  return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


def _sparse_layer(module: nn.Module, x: jax.Array, stored: Mapping[str, jax.Array],
                  fmt: _Format) -> jax.Array:
  """The layer's output computed from its sparse kernel (plus its bias)."""
  d_out = fmt.d_out(stored)
  if fmt.layer is not None:
    return fmt.layer(module, x, stored, d_out)
  assert fmt.matmul is not None  # a format without its own layer has a matmul
  if isinstance(module, nn.Conv):
    nd = x.ndim - 2
    spatial = "DHW"[-nd:]
    patches = jax.lax.conv_general_dilated_patches(
        x, filter_shape=_per_dim(module.kernel_size, nd),
        window_strides=_per_dim(module.strides, nd), padding=_conv_padding(module, nd),
        lhs_dilation=_per_dim(module.input_dilation, nd),
        rhs_dilation=_per_dim(module.kernel_dilation, nd),
        dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
        precision=jax.lax.Precision.HIGHEST)
    lead = patches.shape[:-1]
    y = fmt.matmul(patches.reshape(-1, patches.shape[-1]), stored).reshape(lead + (d_out,))
  elif isinstance(module, nn.DenseGeneral):
    if tuple(module.batch_dims):
      raise ValueError("compress(): DenseGeneral with batch_dims is not supported")
    axes = sorted(a % x.ndim for a in _as_tuple(module.axis))
    rest = [a for a in range(x.ndim) if a not in axes]
    moved = jnp.transpose(x, rest + axes)
    lead = moved.shape[:len(rest)]
    d_in = int(math.prod(x.shape[a] for a in axes))
    y = fmt.matmul(moved.reshape(-1, d_in), stored)
    feats = _as_tuple(module.features)
    feats = feats[:-1] + (d_out // int(math.prod(feats[:-1])),)
    y = y.reshape(lead + feats)
  else:
    lead = x.shape[:-1]
    y = fmt.matmul(x.reshape(-1, x.shape[-1]), stored).reshape(lead + (d_out,))
  if module.use_bias:
    y = y + module.get_variable("params", "bias").astype(y.dtype)
  return y


def _is_layer(module: Any) -> bool:
  return (isinstance(module, (nn.Dense, nn.DenseGeneral, nn.Conv))
          and not (isinstance(module, nn.Conv) and int(module.feature_group_count) != 1)
          and not (isinstance(module, nn.DenseGeneral) and tuple(module.batch_dims)))


def _replacing(transformed: bool) -> bool:
  """Whether a layer call now is one :func:`compress` computes.

  Inside a ``transform()``-ed model the layers are computed where the
  transform's own replacement runs them (a member's sub-layers, Sparse Wide's
  widened layer), so that the transform still sees and checks every layer.
  """
  return (_TRANSFORM_STATE.depth > 0) if transformed else True


def _make_interceptor(transformed: bool) -> Callable[..., Any]:
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != "__call__" or module.scope is None or not _is_layer(module)
        or not _replacing(transformed)):
      return next_fun(*args, **kwargs)
    params = module.scope.variables().get("params", {})
    fmt = _format_of(params)
    if fmt is None:
      return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs.get("inputs")
    return _sparse_layer(module, jnp.asarray(x), {k: params[k] for k in fmt.keys}, fmt)
  return interceptor


# ----------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True, eq=False)
class CompressedModel:
  """A model whose sparse kernels are stored in a sparse format.

  Attributes:
    module: The model (unchanged; its sparse layers are computed from
      ``variables`` by :meth:`apply`).
    variables: The variables with every compressed ``kernel`` replaced by
      the format's arrays (e.g. ``ell_indices``, ``ell_values``).
    format: The requested format: ``"auto"`` or a key of :data:`FORMATS`.
    apply_kwargs: Keyword arguments always passed to ``module.apply``
      (``train=False`` for registry models).
    compressed: Paths of the compressed kernels.
    formats: ``{path: FORMATS key}`` of every compressed kernel.
  """

  module: nn.Module
  variables: dict
  format: str
  apply_kwargs: Mapping[str, Any]
  compressed: tuple[str, ...]
  formats: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def apply(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
    """``module.apply`` with the sparse layers computed from their sparse kernels (jittable)."""
    transformed = isinstance(self.module, TransformedModel)
    with nn.intercept_methods(_make_interceptor(transformed)):
      return self.module.apply(variables, *args, **{**self.apply_kwargs, **kwargs})

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    return self.apply(self.variables, *args, **kwargs)


def _plain(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {str(k): _plain(v) for k, v in tree.items()}
  return tree


def compress(model: Any, variables: Any, masks: Any = None, *, format: str = "auto",
             max_density: float = 0.5, ell_max_density: float = ELL_MAX_DENSITY,
             example_input: Any = None) -> CompressedModel:
  """Stores a trained model's sparse kernels in a sparse format for inference.

  Every ``kernel`` of an ``nn.Dense``/``nn.DenseGeneral``/``nn.Conv`` layer
  (ungrouped) whose density is at most ``max_density`` is replaced; denser
  ones (stems, classifiers, Sparse Doped's dense ``U V``) stay dense.

  Args:
    model: A :class:`sift_jax.ModelSpec`, a :class:`sift_jax.TransformedModel`
      or any Linen module.
    variables: Its variables (``{"params": ..., "batch_stats": ...}``).
    masks: Optional bool tree with the structure of ``variables["params"]``;
      applied first. ``None``: the zeros of the trained weights are the mask.
    format: ``"auto"`` (per layer: ``"ell"`` at or below ``ell_max_density``,
      else ``"scatter"``) or a key of :data:`FORMATS`. ``"ell"`` and
      ``"bcoo"`` compute sparse and are slower than the masked dense layer on
      CPUs at the densities Sparse-IFT trains (see the README's benchmark).
    max_density: Kernels with at most this fraction of nonzeros are compressed.
    ell_max_density: For ``format="auto"``: the density at or below which a
      layer is stored as ELL.
    example_input: For a plain module, one input batch to find its layers
      (a ModelSpec knows its input); without it, kernels are found by name.

  Returns:
    A :class:`CompressedModel`.

  Raises:
    ValueError: for an unknown format, ``max_density`` or ``ell_max_density``
      outside their ranges, masks that do not match the params (naming the
      path), variables without ``params``.
  """
  if format not in FORMAT_CHOICES:
    raise ValueError(f"compress(): unknown format {format!r}; expected one of {FORMAT_CHOICES}")
  if not 0.0 < float(max_density) <= 1.0:
    raise ValueError(f"compress(): max_density must be in (0, 1], got {max_density!r}")
  if not 0.0 <= float(ell_max_density) <= 1.0:
    raise ValueError(f"compress(): ell_max_density must be in [0, 1], got {ell_max_density!r}")
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ValueError("compress(): variables must be the model's variables dict with a 'params' "
                     "collection")
  variables = _plain(variables)
  if masks is not None:
    variables["params"] = _plain(mask_ops.apply_masks(variables["params"], _plain(masks)))
  module, kwargs, x = _resolve(model, example_input)
  layers = _layer_modules(module, kwargs, x, variables) if x is not None else None
  formats: dict[str, str] = {}
  params = variables["params"]

  def visit(node, path):
    for name, value in list(node.items()):
      if isinstance(value, Mapping):
        visit(value, path + (name,))
    if "kernel" not in node or isinstance(node["kernel"], Mapping):
      return
    where = "/".join(path)
    if layers is not None and where not in layers:
      return
    kernel = np.asarray(jax.device_get(node["kernel"]), np.float32)
    density = float(np.count_nonzero(kernel)) / max(kernel.size, 1)
    if density > max_density or kernel.ndim < 2:
      return
    layer = layers[where] if layers is not None else _guess_layer(kernel)
    if layer is None:
      return
    name = format if format != "auto" else ("ell" if density <= ell_max_density else "scatter")
    fmt = FORMATS[name]
    node.pop("kernel")
    packed = fmt.pack(kernel if fmt.layer is not None else dense_matrix(layer, kernel))
    node.update({k: jnp.asarray(v) for k, v in packed.items()})
    formats[where] = name

  visit(params, ())
  return CompressedModel(module, variables, format, kwargs, tuple(formats), formats)


def _guess_layer(kernel: np.ndarray) -> Optional[nn.Module]:
  # Without an example input: a 2-D kernel is an nn.Dense; other shapes are left dense.
  return nn.Dense(kernel.shape[-1]) if kernel.ndim == 2 else None


def _resolve(model: Any, example_input: Any) -> tuple[nn.Module, dict, Any]:
  if isinstance(model, ModelSpec):
    return model.module, {"train": False}, model.example_input(1)
  if not isinstance(model, nn.Module):
    raise ValueError(f"compress(): expected a sift_jax.ModelSpec or a flax.linen Module, got "
                     f"{type(model).__name__}")
  x = None if example_input is None else jax.ShapeDtypeStruct(np.shape(example_input),
                                                               example_input.dtype)
  kwargs = {"train": False} if hasattr(model, "sift") else {}
  return model, kwargs, x


def _layer_modules(module: nn.Module, kwargs: dict, x: Any, variables: dict) -> dict[str, nn.Module]:
  """``{param path: layer}`` of the ungrouped Dense/DenseGeneral/Conv layers the model calls."""
  found: dict[str, nn.Module] = {}

  transformed = isinstance(module, TransformedModel)

  def record(next_fun, args, kw, context):
    m = context.module
    if (context.method_name == "__call__" and m.scope is not None and _is_layer(m)
        and _replacing(transformed)):
      found["/".join(m.scope.path)] = m.clone(parent=None)
    return next_fun(*args, **kw)

  def run(v, x):
    with nn.intercept_methods(record):
      return module.apply(v, x, **kwargs)

  jax.eval_shape(run, variables, x)
  return found
