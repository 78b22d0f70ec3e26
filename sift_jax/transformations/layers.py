"""Flax Linen layers of the Sparse-IFT family.

Each member wraps a *template*: an unbound ``nn.Dense``, ``nn.DenseGeneral`` or
``nn.Conv`` describing the dense layer it replaces (features, kernel size,
strides, padding, initialisers, dtypes). The member builds its sub-layers as
copies of that template, so any layer configuration carries over::

    SparseParallel(nn.Conv(64, (3, 3), use_bias=False), num_branches=4)
    SparseFactorized(nn.Dense(512), sparsity=0.75, mid="norm_relu")
    SparseDoped(nn.Conv(128, (3, 3), strides=2), sparsity=0.9)

Parameter layout (all under the member's own name):

* :class:`SparseParallel`: ``branch_{i}/kernel`` (+ ``branch_{i}/bias``) and,
  with ``branch_norm``, ``branch_{i}_norm/{scale,bias}``.
* :class:`SparseFactorized`: ``U/kernel`` (template kernel, ``rank`` outputs,
  no bias), optional ``mid_norm``, ``V/kernel`` (+ ``V/bias``); for a
  convolution ``V`` is a 1x1 convolution with stride 1.
* :class:`SparseDoped`: ``S`` (a copy of the template), ``U`` and ``V`` as
  above without biases; output ``S(x) + alpha V(U(x))`` with a constant
  ``alpha`` of the initialisation (:data:`DOPED_LOW_RANK_INITS`; 1 for
  ``"template"``).

Ranks and branch counts are either given or derived at call time from the
input shape and ``sparsity`` with the rules of
:mod:`sift_jax.transformations.sizes`. Sparse Wide needs no layer of its own:
it is the template with more output features (:func:`widen`).

Which of these weights are masked is decided by a
:class:`sift_jax.masks.SparsityPolicy` (docs/method.md, section 3); the layers themselves
are dense Flax layers, so masking stays outside the model (in the optimizer
transforms of :mod:`sift_jax`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp

from sift_jax.transformations import sizes

__all__ = [
    "SparseParallel", "SparseFactorized", "SparseDoped", "widen", "layer_kind",
    "template_dims", "FACTORIZED_MIDS", "NORMS", "DOPED_LOW_RANK_INITS", "doped_low_rank", "BATCH_NORM_MOMENTUM", "BATCH_NORM_EPSILON",
]

#: What may sit between ``U`` and ``V`` of Sparse Factorized.
FACTORIZED_MIDS = ("linear", "norm", "norm_relu")
#: Norm kinds usable inside the family layers.
NORMS = ("batch", "layer")
# PyTorch's BatchNorm2d defaults (momentum 0.1 there is 0.9 in Flax's convention),
# as in the reference implementation.
BATCH_NORM_MOMENTUM = 0.9
BATCH_NORM_EPSILON = 1e-5


def layer_kind(layer: Any) -> str:
  """Returns ``"dense"``, ``"dense_general"`` or ``"conv"`` for a template.

  Raises:
    ValueError: for any other module, a grouped convolution, or a
      ``DenseGeneral`` with ``batch_dims``.
  """
  if isinstance(layer, nn.Dense):
    return "dense"
  if isinstance(layer, nn.DenseGeneral):
    if tuple(layer.batch_dims):
      raise ValueError(f"cannot transform DenseGeneral {layer.name!r} with batch_dims={layer.batch_dims}")
    return "dense_general"
  if isinstance(layer, nn.Conv):
    if int(layer.feature_group_count) != 1:
      raise ValueError(f"cannot transform grouped convolution {layer.name!r} "
                       f"(feature_group_count={layer.feature_group_count})")
    return "conv"
  raise ValueError(f"Sparse-IFT layers wrap nn.Dense, nn.DenseGeneral or nn.Conv templates, "
                   f"got {type(layer).__name__}")


def _as_tuple(v: Any) -> tuple:
  return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def template_dims(layer: Any, input_shape: tuple[int, ...]) -> tuple[int, int]:
  """Returns ``(D_in, D_out)`` of the dense weight of ``layer`` applied to an input shape."""
  kind = layer_kind(layer)
  if kind == "dense":
    return int(input_shape[-1]), int(layer.features)
  if kind == "dense_general":
    ndim = len(input_shape)
    axes = [a % ndim for a in _as_tuple(layer.axis)]
    return (int(math.prod(input_shape[a] for a in axes)),
            int(math.prod(_as_tuple(layer.features))))
  kernel = _as_tuple(layer.kernel_size)
  return int(math.prod(kernel)) * int(input_shape[-1]), int(layer.features)


def widen(layer: Any, features: int, **updates: Any) -> Any:
  """Returns a copy of ``layer`` with ``features`` outputs (Sparse Wide).

  For a ``DenseGeneral`` with tuple features (e.g. ``(heads, head_dim)`` in
  attention) the last feature dimension is replaced.
  """
  kind = layer_kind(layer)
  new_features: int | tuple[int, ...] = features
  if kind == "dense_general" and isinstance(layer.features, (tuple, list)):
    new_features = tuple(layer.features[:-1]) + (int(features),)
  return layer.clone(features=new_features, **updates)


def _u_copy(layer: Any, rank: int, name: str, **updates: Any) -> Any:
  """``U``: the template's input side (kernel, strides, padding) with ``rank`` outputs, no bias."""
  return layer.copy(name=name, features=int(rank), use_bias=False, **updates)


def _v_copy(layer: Any, name: str, use_bias: bool, **updates: Any) -> Any:
  """``V``: ``rank -> D_out`` with the template's output features (1x1, stride 1 for convs)."""
  kind = layer_kind(layer)
  if kind == "conv":
    ones = (1,) * len(_as_tuple(layer.kernel_size))
    return layer.copy(name=name, kernel_size=ones, strides=1, padding="VALID", input_dilation=1,
                      kernel_dilation=1, use_bias=use_bias, **updates)
  if kind == "dense_general":
    return layer.copy(name=name, axis=-1, use_bias=use_bias, **updates)
  return layer.copy(name=name, use_bias=use_bias, **updates)


def _make_norm(kind: str, name: str, use_running_average: Optional[bool], where: str) -> nn.Module:
  if kind == "batch":
    if use_running_average is None:
      raise ValueError(f"{where}: norm='batch' needs use_running_average (pass not train)")
    return nn.BatchNorm(use_running_average=use_running_average, momentum=BATCH_NORM_MOMENTUM,
                        epsilon=BATCH_NORM_EPSILON, name=name)
  if kind == "layer":
    return nn.LayerNorm(name=name)
  raise ValueError(f"{where}: norm must be one of {NORMS}, got {kind!r}")


def _where(module: nn.Module) -> str:
  path = "/".join(str(p) for p in (module.scope.path if module.scope is not None else ()))
  return f"{type(module).__name__} {path or module.name!r}"


def _rank(module: nn.Module, rule: Callable[..., int], x: jnp.ndarray) -> int:
  """``module.rank``, or the rank ``rule`` gives for the template on input ``x``."""
  layer_kind(module.layer)  # validates the template even when the rank is given
  rank = module.rank
  if rank is None:
    d_in, d_out = template_dims(module.layer, x.shape)
    rank = rule(d_in, d_out, module.sparsity, round_to=module.round_to,
                reference=module.reference, what=f"{_where(module)} rank")
  if int(rank) < 1:
    raise ValueError(f"{_where(module)}: rank must be >= 1, got {rank!r}")
  return int(rank)


class SparseParallel(nn.Module):
  """Sparse Parallel: ``n`` copies of the layer on the same input, outputs summed.

  Each branch is trained sparse at ``s``; with ``n = 1/d`` branches the sparse
  FLOPs equal the dense layer's (docs/method.md, section 2). With ``num_branches=1`` and
  no norm the layer computes exactly the template.

  The reference implementation gives each branch its own BatchNorm and, in its
  ImageNet ResNets, a ReLU inside each branch (``branch_norm="batch"``,
  ``branch_activation=nn.relu``); the paper's member is the plain sum.

  Attributes:
    layer: Unbound template (``nn.Dense``/``nn.DenseGeneral``/``nn.Conv``).
    num_branches: Branch count; ``None`` derives ``n`` from ``sparsity``.
    sparsity: ``s`` used when ``num_branches`` is None.
    reference: Use the reference rounding of ``n`` (``round(1/d)``).
    branch_norm: ``None``, ``"batch"`` or ``"layer"``: a norm on each branch.
    branch_activation: Optional activation applied to each branch (after its norm).
    use_running_average: BatchNorm mode, as in ``nn.BatchNorm``.
  """

  layer: Any
  num_branches: Optional[int] = None
  sparsity: float = 0.0
  reference: bool = False
  branch_norm: Optional[str] = None
  branch_activation: Optional[Callable[[jnp.ndarray], jnp.ndarray]] = None
  use_running_average: Optional[bool] = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, use_running_average: Optional[bool] = None) -> jnp.ndarray:
    layer_kind(self.layer)
    n = self.num_branches
    if n is None:
      n = sizes.sparse_parallel_branches(self.sparsity, reference=self.reference)
    if int(n) < 1:
      raise ValueError(f"{_where(self)}: num_branches must be >= 1, got {n!r}")
    ura = nn.merge_param("use_running_average", self.use_running_average, use_running_average) \
        if self.branch_norm == "batch" else None
    out = None
    for i in range(int(n)):
      y = self.layer.copy(name=f"branch_{i}")(x)
      if self.branch_norm is not None:
        y = _make_norm(self.branch_norm, f"branch_{i}_norm", ura, _where(self))(y)
      if self.branch_activation is not None:
        y = self.branch_activation(y)
      out = y if out is None else out + y
    assert out is not None  # n >= 1 branches (checked above)
    return out


class SparseFactorized(nn.Module):
  """Sparse Factorized: ``W -> U V`` with ``U: D_in x r`` and ``V: r x D_out``.

  Both factors are trained sparse at ``s``; ``r = D_in*D_out / (d*(D_in+D_out))``
  keeps the sparse FLOPs equal to the dense layer's (docs/method.md, section 2). For a
  convolution ``U`` is the template's k x k convolution (with its stride and
  padding) to ``r`` channels and ``V`` a 1x1 convolution, as in the reference.
  With ``mid="linear"`` and ``r >= min(D_in, D_out)`` the layer can represent
  any dense weight (``U V = W``).

  Attributes:
    layer: Unbound template.
    rank: ``r``; ``None`` derives it from ``sparsity`` and the input shape.
    sparsity: ``s`` used when ``rank`` is None.
    round_to: Rank granularity (paper rule).
    reference: Use the reference rank rule (``ceil``).
    mid: ``"linear"``, ``"norm"`` or ``"norm_relu"`` between U and V
      (the reference CIFAR configuration uses BatchNorm + ReLU).
    norm: ``"batch"`` or ``"layer"``, the norm used by ``mid``.
    use_running_average: BatchNorm mode, as in ``nn.BatchNorm``.
  """

  layer: Any
  rank: Optional[int] = None
  sparsity: float = 0.0
  round_to: int = 1
  reference: bool = False
  mid: str = "linear"
  norm: str = "batch"
  use_running_average: Optional[bool] = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, use_running_average: Optional[bool] = None) -> jnp.ndarray:
    if self.mid not in FACTORIZED_MIDS:
      raise ValueError(f"{_where(self)}: mid must be one of {FACTORIZED_MIDS}, got {self.mid!r}")
    rank = _rank(self, sizes.sparse_factorized_rank, x)
    y = _u_copy(self.layer, rank, "U")(x)
    if self.mid != "linear":
      ura = (nn.merge_param("use_running_average", self.use_running_average, use_running_average)
             if self.norm == "batch" else None)
      y = _make_norm(self.norm, "mid_norm", ura, _where(self))(y)
      if self.mid == "norm_relu":
        y = nn.relu(y)
    return _v_copy(self.layer, "V", bool(self.layer.use_bias))(y)


def _step_matched_init(d_in: int, d_out: int, rank: int, sparsity: float
                       ) -> tuple[Callable[..., Any], Callable[..., Any], float]:
  """Output ``alpha V(U(x))`` that starts like the dense part it replaces, at a dense step size.

  One SGD step on ``U`` and ``V`` moves ``W_eff = alpha U V`` by
  ``-lr alpha^2 (U U^T g + g V^T V)`` (``g`` the gradient of ``W_eff``): the
  path learns ``alpha^2 (|U U^T| + |V^T V|)`` times as fast as a dense weight
  in its rank-``r`` subspace, on top of ``S``'s own step. Initialised like
  dense layers (``alpha = 1``, variances ``1/D_in`` and ``1/r``) that factor
  is ``1 + D_out / r`` (3.2 for a 64x64 layer at s = 0.9, up to about 9 at
  the top of the Marchenko-Pastur spectrum), and SGD at the dense model's
  learning rate runs close to its stability edge and diverges after a mask
  update perturbs the loss. Here the factors are balanced
  (``D_in Var(U) = D_out Var(V)``), ``alpha^2 (|U U^T| + |V^T V|) = 1`` (the
  step of a dense layer) and the product's variance is ``s / D_in``, so that
  ``S + alpha U V`` starts with the variance of a dense layer (``S`` masked
  holds ``d / D_in``). ``sparsity`` is the share ``r (D_in + D_out) / (D_in D_out)``
  of the rank rule, which makes ``alpha = 1 / (2 sqrt(1 + D_out / D_in))``.
  """
  target = float(sparsity) / d_in                       # Var(alpha U V) per entry
  alpha = 1.0 / (2.0 * math.sqrt(target * d_in * d_out / rank))
  var_u = 1.0 / (2.0 * alpha ** 2 * d_in)
  var_v = 1.0 / (2.0 * alpha ** 2 * d_out)
  return (nn.initializers.variance_scaling(var_u * d_in, "fan_in", "normal"),
          nn.initializers.variance_scaling(var_v * d_out, "fan_out", "normal"), alpha)


#: Initialisations of Sparse Doped's ``U`` and ``V``:
#: ``name -> fn(D_in, D_out, rank, sparsity) -> (U kernel_init, V kernel_init, alpha)``, the
#: path's output being ``alpha V(U(x))``; ``None`` keeps the template's initialiser.
DOPED_LOW_RANK_INITS: dict[str, Callable[..., tuple[Any, Any, float]]] = {
    "step_matched": _step_matched_init,
    "template": lambda d_in, d_out, rank, share: (None, None, 1.0),
}


def doped_low_rank(low_rank_init: str, d_in: int, d_out: int,
                   rank: int) -> tuple[Any, Any, float]:
  """``(U kernel_init, V kernel_init, alpha)`` of a Sparse Doped layer.

  The layer computes ``S(x) + alpha V(U(x))``; :func:`sift_jax.fold` reads
  ``alpha`` from here too, so a folded kernel is ``S + alpha U V``.

  Args:
    low_rank_init: A key of :data:`DOPED_LOW_RANK_INITS`.
    d_in: ``D_in`` of the dense layer (``k*k*C_in`` for a convolution).
    d_out: ``D_out`` of the dense layer.
    rank: The rank ``r`` of ``U V``.
  """
  if low_rank_init not in DOPED_LOW_RANK_INITS:
    raise ValueError(f"low_rank_init must be one of {tuple(DOPED_LOW_RANK_INITS)}, "
                     f"got {low_rank_init!r}")
  # The share of the dense layer the path stands in for: s of the rank rule, from the rank.
  share = min(1.0, rank * (d_in + d_out) / (d_in * d_out))
  return DOPED_LOW_RANK_INITS[low_rank_init](d_in, d_out, rank, share)


class SparseDoped(nn.Module):
  """Sparse Doped: ``W -> alpha U V + S``, output ``S(x) + alpha V(U(x))``.

  ``S`` (a copy of the template) is trained sparse at ``s``; ``U V`` is a dense
  low-rank path with ``r = s * D_in*D_out / (D_in + D_out)``, so the total
  FLOPs equal the dense layer's (docs/method.md, section 2). No nonlinearity sits between
  ``U`` and ``V``. ``alpha`` is a constant: ``1 / (2 sqrt(1 + D_out/D_in))``
  with the default ``low_rank_init="step_matched"``, which starts
  ``S + alpha U V`` at a dense layer's variance and SGD step size (the
  template's initialisation makes the dense path learn ``1 + D_out/r`` times
  as fast and diverge at dense learning rates; see
  :data:`DOPED_LOW_RANK_INITS`). The paper keeps ``U``, ``V`` dense; the reference masks them
  too (a policy choice, see :mod:`sift_jax.models`).

  Attributes:
    layer: Unbound template.
    rank: ``r``; ``None`` derives it from ``sparsity`` and the input shape.
    sparsity: ``s`` used when ``rank`` is None.
    round_to: Rank granularity (paper rule).
    reference: Use the reference rank rule (``floor``).
    low_rank_init: How ``U`` and ``V`` are initialised, a key of
      :data:`DOPED_LOW_RANK_INITS`: ``"step_matched"`` (default) or
      ``"template"`` (the template's initialiser for both, as the reference).
  """

  layer: Any
  rank: Optional[int] = None
  sparsity: float = 0.0
  round_to: int = 1
  reference: bool = False

  low_rank_init: str = "step_matched"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if self.low_rank_init not in DOPED_LOW_RANK_INITS:
      raise ValueError(f"{_where(self)}: low_rank_init must be one of "
                       f"{tuple(DOPED_LOW_RANK_INITS)}, got {self.low_rank_init!r}")
    rank = _rank(self, sizes.sparse_doped_rank, x)
    d_in, d_out = template_dims(self.layer, x.shape)
    u_init, v_init, alpha = doped_low_rank(self.low_rank_init, d_in, d_out, rank)
    sparse = self.layer.copy(name="S")(x)
    u = _u_copy(self.layer, rank, "U", **({} if u_init is None else {"kernel_init": u_init}))
    v = _v_copy(self.layer, "V", False, **({} if v_init is None else {"kernel_init": v_init}))
    low_rank = v(u(x))
    return sparse + (low_rank if alpha == 1.0 else alpha * low_rank)
