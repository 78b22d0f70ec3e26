"""Flax NNX models under Sparse-IFT: conversion to Linen and back.

The Sparse-IFT machinery (:func:`sift_jax.transform`, FLOP counting, the
training loop) works on Linen modules, whose layers create their parameters
from the input shape: that is what lets a member replace a layer, and Sparse
Wide widen a layer's inputs, without editing the model's code. An NNX model
fixes every parameter shape in its constructor, so it is converted instead:

* :func:`as_linen` returns a Linen module that runs the NNX model's own
  ``__call__`` with each of its layers (``nnx.Linear``, ``nnx.Conv``,
  ``nnx.LayerNorm``, ``nnx.BatchNorm``, ``nnx.Dropout``; the table
  :data:`NNX_LAYERS`) replaced by the equivalent Linen layer, named after the
  layer's NNX path (``"stem"``, ``"blocks_0_fc"``). The parameter tree has the
  NNX model's paths and shapes, and by default its values.
* :func:`transform_nnx` (what :func:`sift_jax.transform` does for an
  ``nnx.Module``) transforms that Linen module and wraps the result back with
  ``flax.nnx.bridge.ToNNX``: a :class:`TransformedNnxModel`, initialised
  lazily from an example input (``model.lazy_init(x)``).

A layer kind not in the table that holds NNX variables (a custom layer with
an ``nnx.Param`` of its own) cannot be converted: :func:`as_linen` raises,
naming its path. Norm layers need no widening rule: their Linen
counterparts size their parameters from the (widened) input.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional

import flax.linen as nn
from flax import nnx
import jax

from sift_jax.masks import selection, tree_paths
from sift_jax.transformations import isoflop

__all__ = ["NNX_LAYERS", "NnxAsLinen", "NotAModuleError", "TransformedNnxModel", "as_linen",
           "is_nnx_module", "transform_nnx"]


class NotAModuleError(TypeError, ValueError):
  """A model argument that is neither a Linen nor an NNX module.

  A ``TypeError``; also a ``ValueError``, which ``transform`` raised before it took NNX models.
  """


def is_nnx_module(obj: Any) -> bool:
  """Whether ``obj`` is a ``flax.nnx.Module`` instance."""
  return isinstance(obj, nnx.Module)


def _initial(variable: Any, keep: bool, default: Callable[..., Any]) -> Callable[..., Any]:
  """The Linen initializer of a converted parameter: the NNX value (``keep``) or ``default``.

  NNX layers do not store their initializers; Linen's defaults are the same as NNX's
  (LeCun normal kernels, zero biases, unit scales).
  """
  if not keep or variable is None:
    return default
  value = jax.numpy.asarray(variable[...])

  def init(key, shape, dtype=value.dtype):
    del key
    if tuple(shape) != tuple(value.shape):  # a member's part of another shape: a fresh init
      raise ValueError(f"as_linen(keep_values=True): parameter of shape {tuple(value.shape)} "
                       f"requested as {tuple(shape)}")
    return value.astype(dtype)

  return init


_KERNEL_INIT = nn.initializers.lecun_normal()
_ZEROS = nn.initializers.zeros_init()
_ONES = nn.initializers.ones_init()


def _linear(m: Any, name: str, keep: bool) -> nn.Module:
  return nn.Dense(int(m.out_features), use_bias=bool(m.use_bias), dtype=m.dtype,
                  param_dtype=m.param_dtype, precision=m.precision,
                  kernel_init=_initial(m.kernel, keep, _KERNEL_INIT),
                  bias_init=_initial(m.bias, keep, _ZEROS), name=name, parent=None)


def _conv(m: Any, name: str, keep: bool) -> nn.Module:
  if getattr(m, "mask", None) is not None:
    raise ValueError(f"as_linen(): nnx.Conv {name!r} has a fixed kernel mask (mask=), which "
                     "sift_jax does not convert")
  return nn.Conv(int(m.out_features), tuple(m.kernel_size), strides=m.strides, padding=m.padding,
                 input_dilation=m.input_dilation, kernel_dilation=m.kernel_dilation,
                 feature_group_count=int(m.feature_group_count), use_bias=bool(m.use_bias),
                 dtype=m.dtype, param_dtype=m.param_dtype, precision=m.precision,
                 kernel_init=_initial(m.kernel, keep, _KERNEL_INIT),
                 bias_init=_initial(m.bias, keep, _ZEROS), name=name, parent=None)


def _layer_norm(m: Any, name: str, keep: bool) -> nn.Module:
  return nn.LayerNorm(epsilon=m.epsilon, dtype=m.dtype, param_dtype=m.param_dtype,
                      use_bias=bool(m.use_bias), use_scale=bool(m.use_scale),
                      bias_init=_initial(m.bias, keep, _ZEROS),
                      scale_init=_initial(m.scale, keep, _ONES), reduction_axes=m.reduction_axes,
                      feature_axes=m.feature_axes, use_fast_variance=m.use_fast_variance,
                      name=name, parent=None)


def _batch_norm(m: Any, name: str, keep: bool) -> nn.Module:
  # The mode (batch statistics or running averages) is the NNX layer's at conversion time:
  # call model.train()/model.eval() on the NNX model before converting it. Running statistics
  # start afresh (zero mean, unit variance).
  return nn.BatchNorm(use_running_average=bool(m.use_running_average), axis=m.axis,
                      momentum=m.momentum, epsilon=m.epsilon, dtype=m.dtype,
                      param_dtype=m.param_dtype, use_bias=bool(m.use_bias),
                      use_scale=bool(m.use_scale), bias_init=_initial(m.bias, keep, _ZEROS),
                      scale_init=_initial(m.scale, keep, _ONES),
                      use_fast_variance=m.use_fast_variance, name=name, parent=None)


def _dropout(m: Any, name: str, keep: bool) -> nn.Module:
  del keep
  return nn.Dropout(rate=m.rate, broadcast_dims=tuple(m.broadcast_dims),
                    deterministic=bool(m.deterministic), rng_collection=m.rng_collection,
                    name=name, parent=None)


# NNX layer type -> its Linen counterpart, built from the NNX layer, a name and whether to keep
# the NNX values as the initial ones. Exact types: a subclass may change ``__call__``.
NNX_LAYERS: dict[type, Callable[[Any, str, bool], nn.Module]] = {
    nnx.Linear: _linear,
    nnx.Conv: _conv,
    nnx.LayerNorm: _layer_norm,
    nnx.BatchNorm: _batch_norm,
    nnx.Dropout: _dropout,
}


class _CallState(threading.local):

  def __init__(self):
    # name -> Linen layer of the NnxAsLinen call running now (a layer called twice shares it)
    self.layers: Optional[dict[str, nn.Module]] = None
    self.owner: Optional[nn.Module] = None


_CALL = _CallState()


class _LinenLayer(nnx.Module):
  """Stands in for an NNX layer: calling it calls its Linen counterpart in the current scope."""

  def __init__(self, template: nn.Module, name: str, nnx_type: str):
    self.template = template
    self.layer_name = name
    self.nnx_type = nnx_type

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    layers, owner = _CALL.layers, _CALL.owner
    if layers is None or owner is None:
      raise RuntimeError(f"the {self.nnx_type} {self.layer_name!r} of a model converted by "
                         "sift_jax.transformations.as_linen runs only inside the Linen module")
    if self.layer_name not in layers:
      layers[self.layer_name] = self.template.clone(parent=owner, name=self.layer_name)
    return layers[self.layer_name](*args, **kwargs)


class _Skeleton:
  """The NNX model with its layers replaced, held outside Flax's attribute handling.

  Its repr names the model and its layers' shapes (the registry caches FLOP counts by repr).
  """

  def __init__(self, module: nnx.Module, name: str, layers: tuple[str, ...] = ()):
    self.module = module
    self.name = name
    self.layers = layers

  def __repr__(self) -> str:
    return f"{self.name}({', '.join(self.layers)})" if self.layers else self.name


def _describe(path: tuple[Any, ...], layer: Any) -> str:
  shape = getattr(layer, "kernel_shape", None) or (
      (layer.in_features, layer.out_features) if hasattr(layer, "out_features") else
      getattr(layer, "num_features", getattr(layer, "rate", "")))
  return f"{_layer_name(path)}={type(layer).__name__}{shape}"


def _layer_name(path: tuple[Any, ...]) -> str:
  return "_".join(str(k) for k in path)


def _replace(root: Any, path: tuple[Any, ...], value: Any) -> None:
  parent = root
  for key in path[:-1]:
    parent = parent[key] if isinstance(key, int) or isinstance(parent, dict) else getattr(parent, key)
  key = path[-1]
  if isinstance(key, int) or isinstance(parent, dict):
    parent[key] = value
  else:
    setattr(parent, key, value)


def _skeleton(module: nnx.Module, keep_values: bool) -> _Skeleton:
  """A copy of ``module`` whose convertible layers are :class:`_LinenLayer` stand-ins."""
  name = type(module).__name__
  if type(module) in NNX_LAYERS:
    raise ValueError(f"as_linen(): got a bare {name}; convert a model that calls it (or use the "
                     "Linen layer directly)")
  copy = nnx.clone(module)
  found = [(tuple(p), n) for p, n in nnx.iter_graph(copy) if type(n) in NNX_LAYERS and p]
  for path, layer in found:
    _replace(copy, path, _LinenLayer(NNX_LAYERS[type(layer)](layer, _layer_name(path), keep_values),
                                     _layer_name(path), type(layer).__name__))
  left = nnx.state(copy)
  leaves, _ = jax.tree_util.tree_flatten_with_path(left, is_leaf=lambda v: isinstance(v, nnx.Variable))
  for key_path, leaf in leaves:
    where = tree_paths.path_str(key_path)
    raise ValueError(
        f"as_linen(): {name} holds a {type(leaf).__name__} at {where!r} outside the layers "
        f"sift_jax converts ({', '.join('nnx.' + t.__name__ for t in NNX_LAYERS)}); "
        "a custom layer with variables of its own (or an nnx.Rngs kept on the model) cannot "
        "be converted")
  return _Skeleton(copy, name, tuple(_describe(p, l) for p, l in found))


class NnxAsLinen(nn.Module):
  """An NNX model as a Linen module (built by :func:`as_linen`).

  ``init``/``apply`` take the NNX model's ``__call__`` arguments. Parameters
  follow the NNX paths, one Linen layer per NNX layer, named by
  ``"_".join(path)``.

  Attributes:
    skeleton: The NNX model with its layers replaced by Linen stand-ins.
  """

  skeleton: _Skeleton

  @nn.compact
  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    saved = (_CALL.layers, _CALL.owner)
    _CALL.layers, _CALL.owner = {}, self
    try:
      return self.skeleton.module(*args, **kwargs)
    finally:
      _CALL.layers, _CALL.owner = saved


def as_linen(module: nnx.Module, *, keep_values: bool = True) -> NnxAsLinen:
  """Converts an NNX model into an equivalent Linen module (same paths, shapes, computation).

  Example::

    model = MyNnxMLP(rngs=nnx.Rngs(0))
    linen_model = sift_jax.transformations.as_linen(model)
    variables = linen_model.init(key, x)     # {"params": {"stem": {"kernel", "bias"}, ...}}

  Args:
    module: An ``nnx.Module`` built from the layers of :data:`NNX_LAYERS` (and
      any stateless code).
    keep_values: Initialise the Linen parameters with the NNX model's current
      values (``init`` then returns them for any key); ``False``: fresh values
      from the Flax default initializers (the same as NNX's).

  Returns:
    An :class:`NnxAsLinen`.

  Raises:
    TypeError: if ``module`` is not an ``nnx.Module``.
    ValueError: if it holds variables outside the convertible layers (naming
      their path), or is itself a bare layer.
  """
  if not is_nnx_module(module):
    raise TypeError(f"as_linen() expects a flax.nnx Module, got {type(module).__name__}")
  return NnxAsLinen(skeleton=_skeleton(module, keep_values))


class TransformedNnxModel(nnx.bridge.ToNNX):
  """An NNX model with Sparse-IFT members in place of its layers (from :func:`transform_nnx`).

  A ``flax.nnx.bridge.ToNNX`` around the Linen
  :class:`sift_jax.transformations.TransformedModel` of :func:`as_linen` of
  the user's model. Its parameters are created by ``lazy_init`` on an example
  input; after that it is an ordinary NNX module (``nnx.state``,
  ``nnx.Optimizer``, ``nnx.jit``) called with the original arguments.
  """

  def __init__(self, transformed: Any, base: nnx.Module, rngs: Any):
    super().__init__(transformed, rngs=rngs)
    self.to_nnx__base = _Skeleton(base, type(base).__name__)  # static: not part of the state

  def sparsity_policy(self) -> selection.SparsityPolicy:
    """The mask policy of the transformed parameters (``nnx.state(model, nnx.Param)`` paths)."""
    return self.to_nnx__module.sparsity_policy()

  def base_model(self) -> nnx.Module:
    """The untransformed NNX model (the FLOP budget)."""
    return self.to_nnx__base.module

  def solve(self, *inputs: Any, **apply_kwargs: Any) -> isoflop.IsoFlopSolution:
    """Iso-FLOP mask sparsity (:meth:`sift_jax.transformations.TransformedModel.solve`)."""
    return self.to_nnx__module.solve(*inputs, **apply_kwargs)


def transform_nnx(model: nnx.Module, *, rngs: Any = None, **transform_kwargs: Any
                  ) -> TransformedNnxModel:
  """Applies a Sparse-IFT member to an NNX model (:func:`sift_jax.transform` on an ``nnx.Module``).

  Example::

    model = MyNnxMLP(rngs=nnx.Rngs(0))
    sift = sift_jax.transform(model, family="sparse_factorized", sparsity=0.75, policy=policy)
    sift.lazy_init(x)                  # creates the parameters from an example input
    y = sift(x)                        # same output shapes as model(x)
    sol = sift.solve(x[:1])            # iso-FLOP sparsity for the masks

  Layer paths (for ``policy``, ``layers``, ``output_layers``) are the NNX
  paths joined by ``"_"`` (see :func:`as_linen`).

  Args:
    model: An ``nnx.Module``.
    rngs: ``nnx.Rngs`` (or a key) for the parameter initialisation and
      dropout; default ``nnx.Rngs(params=0, dropout=1)``. A call can pass its
      own: ``model(x, rngs=nnx.Rngs(dropout=key))``.
    **transform_kwargs: The keyword arguments of :func:`sift_jax.transform`.

  Returns:
    A :class:`TransformedNnxModel` (parameters created by ``lazy_init``).
  """
  # transform.py imports this module; its `transform` dispatches NNX models here.
  from sift_jax.transformations.transform import transform  # pylint: disable=g-import-not-at-top
  linen = transform(as_linen(model, keep_values=False), **transform_kwargs)
  rngs = nnx.Rngs(params=0, dropout=1) if rngs is None else rngs
  return TransformedNnxModel(linen, model, rngs)
