"""The table of Sparse-IFT members: one :class:`Member` per ``family`` name.

Every module that behaves differently per member reads this table instead of
comparing ``family`` strings: :class:`sift_jax.transformations.FamilyConfig`
(the layer a member builds and the widths it sets), :func:`sift_jax.transform`
and the registry models (which parameters stay dense, how the iso-FLOP
sparsity is solved), the training config (which names are valid) and
:func:`sift_jax.fold` (how a member folds back into a dense layer). A name the
table does not know raises a ``ValueError`` naming it and the known names.

A new member is registered from outside the package::

    import flax.linen as nn
    from sift_jax import transformations as T

    def gated_layer(config, template, *, use_running_average, **module_kwargs):
      return MyGatedParallel(template, sparsity=config.sparsity, **module_kwargs)

    T.register_member(T.Member(name="sparse_gated", layer=gated_layer))
    spec = sift_jax.get_model("mlp_mnist1d", family="sparse_gated", sparsity=0.75)

and is then accepted by ``transform``, ``get_model``, the FLOP counter, the
iso-FLOP solve, ``fold`` (which says it cannot fold it unless a ``fold`` rule
is given) and the training config (``model.family``). See docs/method.md,
"Adding a member".

The built-in members are ``dense`` (the untransformed model) and the four of
Thangarasa et al., "Sparse-IFT: Sparse Iso-FLOP Transformations for
Maximizing Training Efficiency", ICML 2024 (arXiv:2303.11525), Section 3.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple, Optional, Protocol

import flax.linen as nn

from sift_jax.transformations import layers as layers_lib
from sift_jax.transformations import sizes
from sift_jax.transformations.isoflop import SOLVE_METHODS

if TYPE_CHECKING:  # FamilyConfig reads this table, so it is imported for annotations only.
  from sift_jax.transformations.family import FamilyConfig

__all__ = ["Member", "MemberFold", "LayerFactory", "WidthRule", "register_member",
           "unregister_member", "get_member", "member_names", "DOPED_DENSE_PARTS"]


class LayerFactory(Protocol):
  """Builds the module that replaces one dense layer (``template``) under a member."""

  def __call__(self, config: "FamilyConfig", template: Any, *,
               use_running_average: Optional[bool], **module_kwargs: Any) -> nn.Module:
    """Returns the replacement of ``template``.

    Args:
      config: The :class:`FamilyConfig` (sparsity, reference rules, options).
      template: Unbound ``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Conv``.
      use_running_average: BatchNorm mode for layers with BatchNorms inside.
      **module_kwargs: ``name`` and/or ``parent`` of the returned module.
    """
    ...


class WidthRule(Protocol):
  """A member's rule for layer widths (Sparse Wide's ``k_sw = sqrt(1/d)``)."""

  def __call__(self, config: "FamilyConfig", features: int, *, what: str) -> int:
    """Returns the width of a layer with ``features`` outputs (``what`` names it in errors)."""
    ...


class MemberFold(NamedTuple):
  """How :func:`sift_jax.fold` rewrites a member's layer as one dense layer.

  Attributes:
    matches: ``matches(node) -> bool``: whether a parameter sub-tree (the
      params of one layer, a mapping) is a layer of this member.
    fold: ``fold(node, batch_stats_node, where, config) -> folded`` with
      ``folded`` carrying ``kernel``, ``bias`` (or None) and ``norm_names``
      (the sub-modules whose batch statistics it used), as the built-in rules
      of :mod:`sift_jax.inference.fold`.
  """

  matches: Callable[[Mapping[str, Any]], bool]
  fold: Callable[[Mapping[str, Any], Optional[Mapping[str, Any]], str, "FamilyConfig"], Any]


def _never(config: "FamilyConfig") -> bool:
  return False


@dataclasses.dataclass(frozen=True)
class Member:
  """One Sparse-IFT member: everything the library needs to know about it.

  Attributes:
    name: The ``family`` name (``"sparse_doped"``).
    title: Human-readable name used in messages (``"Sparse Doped"``);
      defaults to ``name``.
    layer: :class:`LayerFactory` building the replacement of a dense layer;
      ``None``: the layer is the template itself (``dense``, Sparse Wide).
      The factory applies the member's per-layer size rule (branches, ranks).
    width: :class:`WidthRule` for the widths of the models built under the
      member (every widened layer of :func:`sift_jax.transform`, the stage
      widths of the registry models); ``None``: widths are unchanged. A
      member with a width rule is a *widening* member: ``transform`` widens
      every layer but the output layers and checks the output shapes, and the
      registry MLP masks its widened stem.
    dense_parts: Regexes of the member's parameters that stay dense (are
      never masked), added to every policy of a model under this member
      (Sparse Doped's ``U`` and ``V``: :data:`DOPED_DENSE_PARTS`).
    reference_dense_parts: The same under ``reference=True``; ``None``: as
      ``dense_parts`` (the reference masks Doped's ``U`` and ``V`` too: ``()``).
    solve: How the iso-FLOP sparsity is solved with the paper rules
      (:data:`sift_jax.transformations.SOLVE_METHODS`).
    reference_solve: The same under ``reference=True`` (the reference re-fits
      only Sparse Wide, by bisection).
    fold: :class:`MemberFold` of :func:`sift_jax.fold`; ``None``: the member
      cannot fold (``fold`` raises :class:`sift_jax.FoldError` with
      ``cannot_fold`` and points to ``compress``).
    cannot_fold: Why the member cannot fold, for that error.
    layer_type: The module class ``layer`` builds, so that :func:`sift_jax.fold`
      accepts a bare layer of this member; ``None``: no such class.
    layer_options: Reads the :class:`FamilyConfig` keyword arguments (norm,
      options) back from a built ``layer_type`` module, for ``fold``.
    replaces_norm: ``replaces_norm(config) -> bool``: the member's layer ends
      in norms of its own, so a model skips the norm it applies after the
      layer (Sparse Parallel with per-branch norms, as the reference blocks).
    transforms: False only for ``dense``: nothing is replaced, widened, or
      re-solved, and a model must not be given a nominal sparsity to size it.
  """

  name: str
  title: str = ""
  layer: Optional[LayerFactory] = None
  width: Optional[WidthRule] = None
  dense_parts: tuple[str, ...] = ()
  reference_dense_parts: Optional[tuple[str, ...]] = None
  solve: str = "closed_form"
  reference_solve: str = "nominal"
  fold: Optional[MemberFold] = None
  cannot_fold: str = ""
  layer_type: Optional[type] = None
  layer_options: Optional[Callable[[nn.Module], dict[str, Any]]] = None
  replaces_norm: Callable[["FamilyConfig"], bool] = _never
  transforms: bool = True

  def __post_init__(self) -> None:
    if not isinstance(self.name, str) or not self.name.isidentifier():
      raise ValueError(f"Member.name must be an identifier such as 'sparse_gated', got "
                       f"{self.name!r}")
    if not self.title:
      object.__setattr__(self, "title", self.name)
    for key in ("solve", "reference_solve"):
      if getattr(self, key) not in SOLVE_METHODS:
        raise ValueError(f"Member {self.name!r}: {key} must be one of {SOLVE_METHODS}, got "
                         f"{getattr(self, key)!r}")
    for key in ("layer", "width", "layer_options", "replaces_norm"):
      value = getattr(self, key)
      if value is not None and not callable(value):
        raise ValueError(f"Member {self.name!r}: {key} must be callable or None, got {value!r}")
    if self.fold is not None and not isinstance(self.fold, MemberFold):
      raise ValueError(f"Member {self.name!r}: fold must be a MemberFold(matches, fold) or None, "
                       f"got {self.fold!r}")
    if (self.layer_type is None) != (self.layer_options is None):
      raise ValueError(f"Member {self.name!r}: layer_type and layer_options go together (both "
                       "or neither)")
    for key in ("dense_parts", "reference_dense_parts"):
      value = getattr(self, key)
      if value is not None:
        if isinstance(value, str) or not all(isinstance(p, str) for p in value):
          raise ValueError(f"Member {self.name!r}: {key} must be a tuple of regexes, got "
                           f"{value!r}")
        object.__setattr__(self, key, tuple(value))

  @property
  def widens(self) -> bool:
    """Whether the member changes layer widths (has a :class:`WidthRule`)."""
    return self.width is not None

  def dense_regexes(self, reference: bool = False) -> tuple[str, ...]:
    """Regexes of the parameters that stay dense under this member (paper or reference rules)."""
    if reference and self.reference_dense_parts is not None:
      return self.reference_dense_parts
    return self.dense_parts

  def solve_method(self, reference: bool = False) -> str:
    """How the iso-FLOP sparsity is solved (``"nominal"`` for ``dense``)."""
    if not self.transforms:
      return "nominal"
    return self.reference_solve if reference else self.solve


# ----------------------------------------------------------------------------- built-in members

#: Sparse Doped's parameters that stay dense with the paper's rules: the low-rank ``U`` and
#: ``V`` (only ``S`` is sparse). The reference masks them too.
DOPED_DENSE_PARTS = (r"(^|/)U/kernel$", r"(^|/)V/kernel$")


def _wide_width(config: "FamilyConfig", features: int, *, what: str) -> int:
  return sizes.sparse_wide_width(features, config.sparsity, round_to=config.round_to,
                                 reference=config.reference, what=what)


def _parallel_layer(config: "FamilyConfig", template: Any, *, use_running_average: Optional[bool],
                    **module_kwargs: Any) -> nn.Module:
  return layers_lib.SparseParallel(
      template, sparsity=config.sparsity, reference=config.reference,
      branch_norm=config.norm if config.parallel_norm else None,
      branch_activation=config.parallel_activation,
      use_running_average=use_running_average if config.parallel_norm else None, **module_kwargs)


def _factorized_layer(config: "FamilyConfig", template: Any, *,
                      use_running_average: Optional[bool], **module_kwargs: Any) -> nn.Module:
  return layers_lib.SparseFactorized(
      template, sparsity=config.sparsity, round_to=config.round_to, reference=config.reference,
      mid=config.factorized_mid, norm=config.norm,
      use_running_average=use_running_average if config.factorized_mid != "linear" else None,
      **module_kwargs)


def _doped_layer(config: "FamilyConfig", template: Any, *, use_running_average: Optional[bool],
                 **module_kwargs: Any) -> nn.Module:
  return layers_lib.SparseDoped(template, sparsity=config.sparsity, round_to=config.round_to,
                                reference=config.reference,
                                low_rank_init=config.doped_low_rank_init, **module_kwargs)


def _parallel_options(layer: nn.Module) -> dict[str, Any]:
  return dict(norm=layer.branch_norm or "batch", parallel_norm=layer.branch_norm is not None,
              parallel_activation=layer.branch_activation)


def _factorized_options(layer: nn.Module) -> dict[str, Any]:
  return dict(norm=layer.norm, factorized_mid=layer.mid)


def _doped_options(layer: nn.Module) -> dict[str, Any]:
  return dict(doped_low_rank_init=layer.low_rank_init)


def _builtin_fold(matches: str, fold: str) -> MemberFold:
  """A fold rule of :mod:`sift_jax.inference.fold`, looked up when used.

  That module imports the registry models, which read this table, so it
  cannot be imported while the table is built.
  """
  def module() -> Any:
    return importlib.import_module("sift_jax.inference.fold")

  def matches_fn(node: Mapping[str, Any]) -> bool:
    return bool(getattr(module(), matches)(node))

  def fold_fn(node: Mapping[str, Any], stats: Optional[Mapping[str, Any]], where: str,
              config: "FamilyConfig") -> Any:
    return getattr(module(), fold)(node, stats, where, config)

  return MemberFold(matches_fn, fold_fn)


_BUILTIN = (
    Member(name="dense", title="dense", transforms=False, solve="nominal"),
    Member(name="sparse_wide", title="Sparse Wide", width=_wide_width,
           reference_solve="reference_bisection",
           cannot_fold=("it is a wider network (every hidden width grows by sqrt(1/d)), not a "
                        "reparameterisation of the dense one")),
    Member(name="sparse_parallel", title="Sparse Parallel", layer=_parallel_layer,
           fold=_builtin_fold("_is_parallel", "_fold_parallel"),
           layer_type=layers_lib.SparseParallel, layer_options=_parallel_options,
           replaces_norm=lambda config: bool(config.parallel_norm)),
    Member(name="sparse_factorized", title="Sparse Factorized", layer=_factorized_layer,
           fold=_builtin_fold("_is_factorized", "_fold_factorized"),
           layer_type=layers_lib.SparseFactorized, layer_options=_factorized_options),
    Member(name="sparse_doped", title="Sparse Doped", layer=_doped_layer,
           dense_parts=DOPED_DENSE_PARTS, reference_dense_parts=(),
           fold=_builtin_fold("_is_doped", "_fold_doped"),
           layer_type=layers_lib.SparseDoped, layer_options=_doped_options),
)
_BUILTIN_NAMES = tuple(m.name for m in _BUILTIN)
if _BUILTIN_NAMES != sizes.FAMILIES:  # the public name tuples and the table must agree
  raise AssertionError(f"built-in members {_BUILTIN_NAMES} != sizes.FAMILIES {sizes.FAMILIES}")

_MEMBERS: dict[str, Member] = {m.name: m for m in _BUILTIN}


# ----------------------------------------------------------------------------- the table's API


def member_names() -> tuple[str, ...]:
  """Names of every registered member, ``"dense"`` first, built-ins before registered ones."""
  return tuple(_MEMBERS)


def get_member(name: str) -> Member:
  """Returns the :class:`Member` called ``name``.

  Raises:
    ValueError: for a name that is not registered, naming it and the known names.
  """
  member = _MEMBERS.get(name) if isinstance(name, str) else None
  if member is None:
    raise ValueError(f"unknown Sparse-IFT family {name!r}; expected one of {member_names()}")
  return member


def register_member(member: Member, *, replace: bool = False) -> Member:
  """Adds ``member`` to the table, so that every ``family=`` argument accepts its name.

  Args:
    member: The :class:`Member`.
    replace: Allow replacing a registered member of the same name (never a
      built-in one).

  Returns:
    ``member``.

  Raises:
    ValueError: if ``member`` is not a :class:`Member`, its name is built in,
      or it is registered already and ``replace`` is False.
  """
  if not isinstance(member, Member):
    raise ValueError(f"register_member() expects a sift_jax.transformations.Member, got "
                     f"{type(member).__name__}")
  if member.name in _BUILTIN_NAMES:
    raise ValueError(f"register_member(): {member.name!r} is a built-in member and cannot be "
                     "replaced; choose another name")
  if member.name in _MEMBERS and not replace:
    raise ValueError(f"register_member(): a member named {member.name!r} is registered already "
                     "(pass replace=True to replace it)")
  _MEMBERS[member.name] = member
  return member


def unregister_member(name: str) -> Member:
  """Removes a registered (not built-in) member and returns it.

  Raises:
    ValueError: for a built-in or unknown name.
  """
  if name in _BUILTIN_NAMES:
    raise ValueError(f"unregister_member(): {name!r} is a built-in member")
  get_member(name)
  return _MEMBERS.pop(name)
