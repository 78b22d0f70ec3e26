"""Folding a trained Sparse-IFT model back into its original dense architecture.

Three of the four Sparse-IFT members are linear maps at inference time, so a
trained member can be rewritten as the one dense layer it replaced
(Thangarasa et al., 2023, arXiv 2303.11525; the reparameterisation is the
one of RepVGG, Ding et al., 2021):

* Sparse Parallel: ``sum_i BN_i(W_i x + b_i)`` with the per-branch
  BatchNorms in inference mode is ``(sum_i a_i W_i) x + sum_i (a_i (b_i -
  mu_i) + beta_i)`` with ``a_i = gamma_i / sqrt(var_i + eps)``.
* Sparse Factorized with ``mid="linear"`` or a BatchNorm-only mid:
  ``V(a (U x - mu) + beta) + b_V`` is ``(U diag(a) V) x + ...``; for
  convolutions ``U`` carries the template's kernel size, strides and padding
  and ``V`` is a 1x1 convolution, so the product is a convolution with the
  template's geometry.
* Sparse Doped: ``S x + V(U x) = (S + U V) x``.

Sparse Wide is a wider network and cannot be folded; a LayerNorm or a
nonlinearity inside a member is not linear either. :func:`fold` raises for
those, naming the member and the layer, and points to
:func:`sift_jax.inference.compress`, which runs any member with sparse kernels.

A folded bias needs somewhere to go. When the dense layer has no bias (the
ResNet convolutions) it is absorbed into the BatchNorm that the dense model
applies right after that layer, found by tracing the dense model: its
running mean is shifted by the bias. Where the member's per-branch norms
replaced that BatchNorm (the reference's Sparse Parallel ResNet blocks), the
BatchNorm is created as an exact identity plus the bias.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sift_jax.masks import ops as mask_ops
from sift_jax.models.registry import ModelSpec
from sift_jax.transformations import layers as layers_lib
from sift_jax.transformations import members as members_lib
from sift_jax.transformations.family import FamilyConfig
from sift_jax.transformations.transform import TransformedModel

__all__ = ["fold", "FoldError", "FOLDABLE_FAMILIES", "member_config", "dense_counterpart"]


class FoldError(ValueError):
  """A model, or one of its members, that is not linear at inference and cannot be folded."""


_COMPRESS_HINT = ("use sift_jax.inference.compress(model, variables) to run it with sparse "
                  "kernels instead")


# ----------------------------------------------------------------------------- tree helpers


def _plain(tree: Any) -> Any:
  """Nested plain dicts (FrozenDict and other mappings unfrozen)."""
  if isinstance(tree, (flax.core.FrozenDict, Mapping)):
    return {str(k): _plain(v) for k, v in tree.items()}
  return tree


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  node = tree
  for p in path:
    if not isinstance(node, Mapping) or p not in node:
      return None
    node = node[p]
  return node


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  node = tree
  for p in path[:-1]:
    node = node.setdefault(p, {})
  node[path[-1]] = value


def _pop(tree: dict, path: tuple[str, ...]) -> Any:
  parent = _get(tree, path[:-1]) if len(path) > 1 else tree
  if not isinstance(parent, dict) or path[-1] not in parent:
    return None
  return parent.pop(path[-1])


def _show(path: tuple[str, ...]) -> str:
  return "/".join(path)


# ----------------------------------------------------------------------------- member folders


@dataclasses.dataclass(frozen=True)
class _Folded:
  """One folded member: the dense layer's kernel and the bias to place (or None)."""

  kernel: jax.Array
  bias: Optional[jax.Array]
  norm_names: tuple[str, ...]  # sub-module names holding the member's BatchNorm statistics


def _bn_affine(params: Mapping[str, Any], stats: Optional[Mapping[str, Any]], where: str,
               epsilon: float) -> tuple[jax.Array, jax.Array]:
  """``(a, c)`` with ``BN(z) = a z + c`` in inference mode."""
  if stats is None or "mean" not in stats or "var" not in stats:
    raise ValueError(
        f"fold(): {where} is a BatchNorm without running statistics (batch_stats/{where}/mean, "
        "var): fold needs the variables of a model in inference mode, i.e. the full variables "
        "dict with its 'batch_stats' collection, not the params of a model in train mode")
  mean, var = jnp.asarray(stats["mean"], jnp.float32), jnp.asarray(stats["var"], jnp.float32)
  scale = jnp.asarray(params.get("scale", jnp.ones_like(mean)), jnp.float32)
  shift = jnp.asarray(params.get("bias", jnp.zeros_like(mean)), jnp.float32)
  a = scale * jax.lax.rsqrt(var + epsilon)
  return a, shift - a * mean


def _kernel(node: Mapping[str, Any], where: str) -> jax.Array:
  if not isinstance(node, Mapping) or "kernel" not in node:
    raise ValueError(f"fold(): expected a layer with a kernel at {where}, found "
                     f"{sorted(node) if isinstance(node, Mapping) else type(node).__name__}")
  return jnp.asarray(node["kernel"], jnp.float32)


def _low_rank_product(u: jax.Array, v: jax.Array, mid_scale: Optional[jax.Array],
                      where: str) -> jax.Array:
  """The kernel of ``V(diag(mid_scale) U(x))`` as one layer with ``U``'s input geometry.

  ``U`` is ``(*input_dims, r)``; ``V`` is ``(r, *features)`` (Dense,
  DenseGeneral) or ``(1, ..., 1, r, features)`` (a 1x1 convolution).
  """
  r = int(u.shape[-1])
  if v.ndim >= 2 and v.shape[-2] == r and all(d == 1 for d in v.shape[:-2]):
    out_shape = v.shape[-1:]
  elif v.shape[0] == r:
    out_shape = v.shape[1:]
  else:
    raise ValueError(f"fold(): {where}: U kernel {tuple(u.shape)} and V kernel {tuple(v.shape)} do "
                     f"not share the rank {r}")
  v2 = v.reshape(r, -1)
  if mid_scale is not None:
    v2 = mid_scale.reshape(r, 1) * v2
  w = jnp.matmul(u.reshape(-1, r), v2, precision=jax.lax.Precision.HIGHEST)
  return w.reshape(tuple(u.shape[:-1]) + tuple(out_shape))


def _fold_parallel(node, stats, where, cfg):
  branches = sorted((k for k in node if re.fullmatch(r"branch_\d+", k)), key=lambda k: int(k[7:]))
  if not branches:
    raise ValueError(f"fold(): {where}: no branch_0/kernel under this Sparse Parallel layer")
  unknown = sorted(set(node) - set(branches) - {f"{b}_norm" for b in branches})
  if unknown:
    raise ValueError(f"fold(): {where}: unexpected entries {unknown} in a Sparse Parallel layer")
  if cfg.parallel_activation is not None:
    raise FoldError(f"fold(): Sparse Parallel layer {where} applies {cfg.parallel_activation!r} "
                    "inside every branch; a nonlinearity before the sum is not linear and "
                    f"cannot fold; {_COMPRESS_HINT}")
  normed = [f"{b}_norm" in node for b in branches]
  if any(normed) and cfg.norm != "batch":
    raise FoldError(f"fold(): Sparse Parallel layer {where} has a LayerNorm on every branch; a "
                    "LayerNorm divides by a statistic of its input, is not linear at inference "
                    f"and cannot fold; {_COMPRESS_HINT}")
  kernel, bias = None, None
  for b, has_norm in zip(branches, normed):
    k = _kernel(node[b], f"{where}/{b}")
    c = jnp.asarray(node[b]["bias"], jnp.float32) if "bias" in node[b] else None
    if has_norm:
      a, shift = _bn_affine(node[f"{b}_norm"], _get(stats or {}, (f"{b}_norm",)),
                            f"{where}/{b}_norm", layers_lib.BATCH_NORM_EPSILON)
      k = k * a
      c = shift if c is None else a * c + shift
    kernel = k if kernel is None else kernel + k
    if c is not None:
      bias = c if bias is None else bias + c
  norms = tuple(f"{b}_norm" for b, n in zip(branches, normed) if n)
  assert kernel is not None  # branches is non-empty (checked above)
  return _Folded(kernel, bias, norms)


def _fold_factorized(node, stats, where, cfg):
  unknown = sorted(set(node) - {"U", "V", "mid_norm"})
  if unknown or "U" not in node or "V" not in node:
    raise ValueError(f"fold(): {where}: a Sparse Factorized layer holds U, V (and mid_norm), "
                     f"found {sorted(node)}")
  if cfg.factorized_mid == "norm_relu":
    raise FoldError(f"fold(): Sparse Factorized layer {where} has a ReLU between U and V "
                    "(factorized_mid='norm_relu'); it is not linear and cannot fold; "
                    f"{_COMPRESS_HINT}, or train with factorized_mid='linear' or 'norm'")
  u, v = _kernel(node["U"], f"{where}/U"), _kernel(node["V"], f"{where}/V")
  mid_scale, mid_shift = None, None
  if "mid_norm" in node:
    if cfg.norm != "batch":
      raise FoldError(f"fold(): Sparse Factorized layer {where} has a LayerNorm between U and V; "
                      f"a LayerNorm is not linear at inference and cannot fold; {_COMPRESS_HINT}")
    mid_scale, mid_shift = _bn_affine(node["mid_norm"], _get(stats or {}, ("mid_norm",)),
                                      f"{where}/mid_norm", layers_lib.BATCH_NORM_EPSILON)
  kernel = _low_rank_product(u, v, mid_scale, where)
  bias = jnp.asarray(node["V"]["bias"], jnp.float32) if "bias" in node["V"] else None
  if mid_shift is not None:
    r = int(u.shape[-1])
    through_v = jnp.matmul(mid_shift.reshape(1, r), v.reshape(r, -1),
                           precision=jax.lax.Precision.HIGHEST).reshape(kernel.shape[u.ndim - 1:])
    bias = through_v if bias is None else bias + through_v
  return _Folded(kernel, bias, ("mid_norm",) if "mid_norm" in node else ())


def _fold_doped(node, stats, where, cfg):
  if set(node) != {"S", "U", "V"}:
    raise ValueError(f"fold(): {where}: a Sparse Doped layer holds S, U and V, found {sorted(node)}")
  s = _kernel(node["S"], f"{where}/S")
  u = _kernel(node["U"], f"{where}/U")
  low_rank = _low_rank_product(u, _kernel(node["V"], f"{where}/V"), None, where)
  if low_rank.shape != s.shape:
    raise ValueError(f"fold(): {where}: U V has shape {tuple(low_rank.shape)}, S {tuple(s.shape)}")
  # The layer computes S(x) + alpha V(U(x)); alpha depends on its initialisation rule.
  rank = int(u.shape[-1])
  d_in = int(np.prod(u.shape[:-1]))
  d_out = int(np.prod(low_rank.shape)) // d_in
  alpha = layers_lib.doped_low_rank(cfg.doped_low_rank_init, d_in, d_out, rank)[2]
  bias = jnp.asarray(node["S"]["bias"], jnp.float32) if "bias" in node["S"] else None
  return _Folded(s + alpha * low_rank, bias, ())


def _is_parallel(node):
  return "branch_0" in node


def _is_factorized(node):
  return "U" in node and "V" in node and "S" not in node


def _is_doped(node):
  return "S" in node and "U" in node and "V" in node


def _fold_rule(cfg: FamilyConfig) -> Optional[members_lib.MemberFold]:
  """The member's fold rule from the members table; ``None`` for ``dense`` (nothing to fold).

  Raises:
    ValueError: for a family the table does not know.
    FoldError: for a member without a fold rule (Sparse Wide), with its reason.
  """
  if cfg.family not in members_lib.member_names():
    raise ValueError(f"fold(): unknown member {cfg.family!r}; expected one of "
                     f"{members_lib.member_names()}")
  member = members_lib.get_member(cfg.family)
  if not member.transforms:
    return None
  if member.fold is None:
    why = member.cannot_fold or "its members-table entry has no fold rule"
    raise FoldError(f"fold(): {member.title} cannot fold: {why} (s={cfg.sparsity}); "
                    f"{_COMPRESS_HINT}")
  return member.fold


#: Built-in members :func:`fold` can fold (with linear or BatchNorm-only insides); a registered
#: member folds if its :class:`sift_jax.transformations.Member` has a ``fold`` rule.
FOLDABLE_FAMILIES = tuple(name for name in members_lib.member_names()
                          if members_lib.get_member(name).fold is not None)


# ----------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class _Target:
  """What a model folds into."""

  config: FamilyConfig
  dense_module: nn.Module
  example_input: Optional[jax.ShapeDtypeStruct]  # to trace the dense model (registry models)
  apply_kwargs: Mapping[str, Any]


def _layer_member(model: Any) -> Optional[members_lib.Member]:
  """The member whose layer class ``model`` is (a bare SparseParallel, ...), else None."""
  for name in members_lib.member_names():
    member = members_lib.get_member(name)
    if member.layer_type is not None and isinstance(model, member.layer_type):
      return member
  return None


def member_config(model: Any) -> FamilyConfig:
  """The :class:`FamilyConfig` of a registry model, a ``transform()``-ed model or a member layer."""
  return _target(model).config


def dense_counterpart(model: Any) -> nn.Module:
  """The original dense architecture of a (transformed) model (see :func:`fold`)."""
  return _target(model).dense_module


def _layer_config(layer: nn.Module, member: members_lib.Member) -> FamilyConfig:
  ura = getattr(layer, "use_running_average", None)
  if ura is False:
    raise ValueError(f"fold(): {type(layer).__name__} {layer.name!r} is in train mode "
                     "(use_running_average=False); fold an inference-mode layer "
                     "(use_running_average=True) with its batch_stats")
  assert member.layer_options is not None  # Member requires it with layer_type
  return FamilyConfig(family=member.name, **member.layer_options(layer))


def _target(model: Any, example_input: Any = None) -> _Target:
  if isinstance(model, ModelSpec):
    cfg = getattr(model.module, "sift", None)
    if not isinstance(cfg, FamilyConfig):
      cfg = FamilyConfig(family=model.family, sparsity=model.nominal_sparsity)
    if cfg.family != model.family:
      raise ValueError(f"fold(): ModelSpec {model.name!r} says family={model.family!r} but its "
                       f"module is built with {cfg.family!r}")
    return _Target(cfg, model.base_module, model.example_input(1), {"train": False})
  abstract = None if example_input is None else jax.ShapeDtypeStruct(
      tuple(np.shape(example_input)), jnp.dtype(example_input.dtype))
  if isinstance(model, TransformedModel):
    return _Target(model.config, model.base_model(), abstract, {})
  layer_member = _layer_member(model)
  if layer_member is not None:
    return _Target(_layer_config(model, layer_member), model.layer.clone(parent=None), None, {})
  cfg = getattr(model, "sift", None)
  if isinstance(model, nn.Module) and isinstance(cfg, FamilyConfig):
    # A registry architecture built directly (e.g. models.ResNet(..., sift=cfg)): its dense
    # counterpart is the same module with the dense config (Sparse Wide, whose widths differ,
    # raises before this is used).
    if abstract is None:
      raise ValueError(f"fold(): {type(model).__name__} built directly needs example_input= (one "
                       "input batch or its ShapeDtypeStruct) to trace its dense counterpart; or "
                       "pass the sift_jax.ModelSpec of sift_jax.get_model")
    dense = model.clone(parent=None, sift=FamilyConfig(norm=cfg.norm,
                                                       factorized_mid=cfg.factorized_mid))
    return _Target(cfg, dense, abstract, {"train": False})
  raise ValueError(
      f"fold(): expected a sift_jax.ModelSpec (sift_jax.get_model), a sift_jax.TransformedModel "
      f"(sift_jax.transform), a registry architecture with a `sift` FamilyConfig, or a "
      f"SparseParallel/SparseFactorized/SparseDoped layer, got {type(model).__name__}")


@dataclasses.dataclass(frozen=True)
class _DenseLayout:
  """The dense model's variables (abstract) and which BatchNorm follows which layer."""

  variables: Any
  next_norm: Mapping[tuple[str, ...], tuple[tuple[str, ...], float]]  # layer -> (norm, epsilon)


def _dense_layout(target: _Target) -> Optional[_DenseLayout]:
  """Traces the dense model abstractly: its variables, and the BatchNorm fed by each layer."""
  if target.example_input is None:
    return None
  outputs: dict[int, tuple[str, ...]] = {}
  keep_alive: list[Any] = []  # ids stay unique while the outputs live
  next_norm: dict[tuple[str, ...], tuple[tuple[str, ...], float]] = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != "__call__" or module.scope is None:
      return out
    path = tuple(module.scope.path)
    if isinstance(module, (nn.Dense, nn.DenseGeneral, nn.Conv)):
      outputs[id(out)] = path
      keep_alive.append(out)
    elif isinstance(module, nn.BatchNorm) and args and id(args[0]) in outputs:
      next_norm.setdefault(outputs[id(args[0])], (path, float(module.epsilon)))
    return out

  def run(x):
    with nn.intercept_methods(interceptor):
      return target.dense_module.init({"params": jax.random.key(0), "dropout": jax.random.key(0)},
                                      x, **target.apply_kwargs)

  variables = jax.eval_shape(run, target.example_input)
  return _DenseLayout(_plain(variables), next_norm)


def _check_variables(variables: Any) -> dict:
  if not isinstance(variables, (Mapping, flax.core.FrozenDict)) or "params" not in variables:
    got = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
    raise ValueError(f"fold(): variables must be the model's variables dict with a 'params' "
                     f"collection (and 'batch_stats' where BatchNorms are used), got {got}")
  return _plain(variables)


def _members(params: Mapping[str, Any], is_member: Callable[[Mapping], bool],
             prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
  """Paths of the parameter nodes that are members."""
  if is_member(params):
    return [prefix]
  found = []
  for k, v in params.items():
    if isinstance(v, Mapping):
      found += _members(v, is_member, prefix + (k,))
  return found


def fold(model: Any, variables: Any, masks: Any = None, *,
         example_input: Any = None) -> tuple[nn.Module, dict]:
  """Folds a trained Sparse-IFT model into its original dense architecture.

  The returned model is the one the member was built from: for a registry
  model (:func:`sift_jax.get_model`) ``spec.base_module`` (the same model
  with ``family="dense"``), for a :func:`sift_jax.transform`-ed model the
  model given to ``transform``, for a member layer its template. Its
  variables give, in inference mode, the transformed model's outputs up to
  float32 rounding (they are the same linear maps, summed in another order).
  The parameter count of the folded variables is exactly the dense model's.

  Example::

    spec = sift_jax.get_model("cnn_mnist1d", family="sparse_doped", sparsity=0.9)
    ...  # train
    dense_module, dense_vars = sift_jax.fold(spec, {"params": params, **model_state})
    logits = dense_module.apply(dense_vars, x, train=False)

  Args:
    model: A :class:`sift_jax.ModelSpec`, a :class:`sift_jax.TransformedModel`
      or a :class:`sift_jax.SparseParallel` / :class:`sift_jax.SparseFactorized`
      / :class:`sift_jax.SparseDoped` layer (in inference mode).
    variables: The trained model's variables: ``{"params": ...}`` plus
      ``"batch_stats"`` where BatchNorms are used.
    masks: Optional bool tree with the structure of ``variables["params"]``
      (e.g. :func:`sift_jax.get_masks` of the optimizer state); it is applied
      before folding. ``None``: the parameters are used as they are (a sparse
      optimizer keeps masked weights at exactly zero).
    example_input: One input batch (or its ``jax.ShapeDtypeStruct``). Needed
      for a registry architecture built directly (``models.ResNet(...,
      sift=cfg)``); for a ``transform()``-ed model it makes :func:`fold`
      check the folded variables against the dense model's and lets folded
      biases go into a following BatchNorm. A ModelSpec knows its input.

  Returns:
    ``(dense_module, dense_variables)`` (plain dicts, float32 kernels).

  Raises:
    FoldError: for Sparse Wide, and for members with a nonlinearity or a
      LayerNorm inside (Factorized ``mid="norm_relu"``, Parallel with
      ``parallel_activation`` or LayerNorm branches); the message points to
      :func:`sift_jax.inference.compress`.
    ValueError: for variables without ``params``, masks that do not match the
      params (naming the path), variables of a model in train mode (no
      ``batch_stats`` for a member's BatchNorm, or a layer with
      ``use_running_average=False``), an unknown member, or a model of
      another kind.
  """
  target = _target(model, example_input)
  cfg = target.config
  variables = _check_variables(variables)
  if masks is not None:
    masked = mask_ops.apply_masks(variables["params"], _plain(masks))
    variables = dict(variables, params=_plain(masked))
  folder = _fold_rule(cfg)
  if folder is None:
    return target.dense_module, variables
  if _layer_member(model) is not None:
    return _fold_layer(model, cfg, folder, variables)
  is_member, fold_member = folder
  layout = _dense_layout(target)
  out = _plain(variables)  # fresh dicts: the caller's variables are not modified
  params, stats = out["params"], out.setdefault("batch_stats", {})
  paths = _members(params, is_member)
  if not paths:
    raise ValueError(f"fold(): no {cfg.family} layer found in the params (top-level entries: "
                     f"{sorted(params)[:8]}); are these the variables of this model?")
  for path in paths:
    where = _show(path)
    node = _get(params, path)
    folded = fold_member(node, _get(stats, path), where, cfg)
    _place(out, path, folded, layout, where)
  if not stats:
    out.pop("batch_stats")
  if layout is not None:
    _check_layout(out, layout.variables)
  return target.dense_module, out


def _fold_layer(layer: nn.Module, cfg: FamilyConfig, folder: members_lib.MemberFold,
                variables: dict) -> tuple[nn.Module, dict]:
  is_member, fold_member = folder
  params, stats = variables["params"], variables.get("batch_stats")
  if not is_member(params):
    raise ValueError(f"fold(): the params (entries {sorted(params)}) are not those of a "
                     f"{type(layer).__name__}")
  folded = fold_member(params, stats, layer.name or type(layer).__name__, cfg)
  template = layer.layer.clone(parent=None)
  new = {"kernel": folded.kernel}
  if template.use_bias:
    new["bias"] = folded.bias if folded.bias is not None else jnp.zeros(folded.kernel.shape[-1:])
  elif folded.bias is not None:
    raise FoldError(f"fold(): {type(layer).__name__} {layer.name!r} folds to a bias (from its "
                    "BatchNorms) but its template has use_bias=False; fold the model that contains "
                    "it (the bias goes into the BatchNorm after it) or use a template with a bias")
  return template, {"params": new}


def _place(out: dict, path: tuple[str, ...], folded: _Folded, layout: Optional[_DenseLayout],
           where: str) -> None:
  """Writes a folded member into ``out`` as the dense layer at ``path``."""
  params, stats = out["params"], out["batch_stats"]
  for name in folded.norm_names:
    _pop(stats, path + (name,))
  # Drop the member's statistics entries left empty.
  for depth in range(len(path), 0, -1):
    node = _get(stats, path[:depth])
    if isinstance(node, dict) and not node:
      _pop(stats, path[:depth])
  dense_node = None if layout is None else _get(layout.variables.get("params", {}), path)
  if layout is not None and (not isinstance(dense_node, Mapping) or "kernel" not in dense_node):
    raise ValueError(f"fold(): the dense model has no layer with a kernel at {where} to fold "
                     "the member into")
  node = {"kernel": folded.kernel}
  has_bias = ("bias" in dense_node) if dense_node is not None else folded.bias is not None
  bias = folded.bias
  if has_bias:
    node["bias"] = bias if bias is not None else jnp.zeros(folded.kernel.shape[-1:], jnp.float32)
  elif bias is not None:
    _absorb_bias(out, path, bias, layout, where)
  _set(params, path, node)


def _absorb_bias(out: dict, path: tuple[str, ...], bias: jax.Array,
                 layout: Optional[_DenseLayout], where: str) -> None:
  """Puts a folded bias into the BatchNorm the dense model applies after the layer."""
  norm = None if layout is None else layout.next_norm.get(path)
  if norm is None:
    raise FoldError(f"fold(): {where} folds to a bias (from its BatchNorms), but the dense layer "
                    "has use_bias=False and no BatchNorm follows it to take the bias")
  norm_path, epsilon = norm
  params, stats = out["params"], out["batch_stats"]
  norm_params = _get(params, norm_path)
  if norm_params is None:
    # The member's own norms replaced this BatchNorm: rebuild it as identity + bias.
    # var = 1 - eps makes rsqrt(var + eps) == 1 up to one rounding.
    ones = jnp.ones(bias.shape, jnp.float32)
    _set(params, norm_path, {"scale": ones, "bias": bias})
    _set(stats, norm_path, {"mean": jnp.zeros_like(ones), "var": ones - epsilon})
    return
  norm_stats = _get(stats, norm_path)
  if norm_stats is None or "mean" not in norm_stats:
    raise ValueError(f"fold(): the BatchNorm {_show(norm_path)} after {where} has no running "
                     "statistics; fold needs the variables of a model in inference mode")
  # BN(z + b) == BN(z) with its running mean shifted by -b.
  _set(stats, norm_path, dict(norm_stats, mean=jnp.asarray(norm_stats["mean"]) - bias))


def _check_layout(out: dict, expected: Mapping[str, Any]) -> None:
  """The folded variables must have exactly the dense model's paths and shapes."""
  got = {k: v for k, v in _flat(out).items()}
  want = _flat(_plain(expected))
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  if missing or extra:
    raise ValueError(f"fold(): the folded variables do not match the dense model: missing "
                     f"{missing[:5]}, unexpected {extra[:5]}")
  for k in want:
    if tuple(np.shape(got[k])) != tuple(want[k].shape):
      raise ValueError(f"fold(): folded {k} has shape {tuple(np.shape(got[k]))}, the dense model "
                       f"expects {tuple(want[k].shape)}")


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(_flat(v, key))
    else:
      out[key] = v
  return out
