"""One hashable description of a Sparse-IFT transformation and the layers it builds."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn

from sift_jax.masks.densities import check_sparsity
from sift_jax.transformations import layers as layers_lib
from sift_jax.transformations import members as members_lib
from sift_jax.transformations import sizes

__all__ = ["FamilyConfig"]


@dataclasses.dataclass(frozen=True)
class FamilyConfig:
  """Which Sparse-IFT member to apply, at which sparsity, with which rules.

  Attributes:
    family: A registered member's name (:func:`sift_jax.transformations.member_names`:
      :data:`sift_jax.transformations.FAMILIES` and those added with
      :func:`sift_jax.transformations.register_member`).
    sparsity: Nominal sparsity ``s`` in [0, 1) that sizes the member.
    reference: The authors' PyTorch size rules where they differ from the
      paper: Factorized rank ``ceil``, Doped rank ``floor``, Sparse Wide
      width ``int(w * sqrt(round(1/d)))``, Parallel branches ``round(1/d)``
      (see the README's table). The per-branch norms are ``parallel_norm``
      (on by default); the registry ImageNet ResNets built with
      ``reference=True`` also set ``parallel_activation=nn.relu``.
    round_to: Widths and ranks are rounded to the nearest multiple of this,
      and to at least one multiple (paper rule; 128 suits TPUs; ignored by
      the reference rules).
    factorized_mid: ``"linear"``, ``"norm"`` or ``"norm_relu"`` between U and V.
    norm: ``"batch"`` or ``"layer"``: the norm kind used inside the members
      (Factorized ``mid``, Parallel ``branch_norm``).
    parallel_norm: Give every Parallel branch its own norm of kind ``norm``
      (default True, as the reference's per-branch BatchNorm). Without it
      the branches are summed before any nonlinearity, so every branch gets
      the same gradient ``dL/dy x^T``: RigL grows the same positions in all
      of them and the branches act as one matrix of the original shape
      (docs/method.md; RepVGG, Ding et al. 2021, uses a norm per branch for
      the same reason). ``False`` gives the paper's plain sum.
    parallel_activation: Optional activation inside every Parallel branch
      (the reference ImageNet ResNets use ReLU).
    doped_low_rank_init: Initialisation of Sparse Doped's ``U`` and ``V``
      (:data:`sift_jax.transformations.layers.DOPED_LOW_RANK_INITS`):
      ``"step_matched"`` (default) starts the dense low-rank path at a dense
      layer's SGD step size; ``"template"`` initialises both factors like the
      template (the reference), which learns up to ``1 + D_out / r`` times
      faster and diverges at dense learning rates.
  """

  family: str = "dense"
  sparsity: float = 0.0
  reference: bool = False
  round_to: int = 1
  factorized_mid: str = "linear"
  norm: str = "batch"
  parallel_norm: bool = True
  parallel_activation: Optional[Callable[..., Any]] = None
  doped_low_rank_init: str = "step_matched"

  def __post_init__(self):
    members_lib.get_member(self.family)
    object.__setattr__(self, "sparsity", check_sparsity(self.sparsity))
    object.__setattr__(self, "round_to", sizes.check_round_to(self.round_to))
    if self.factorized_mid not in layers_lib.FACTORIZED_MIDS:
      raise ValueError(f"factorized_mid must be one of {layers_lib.FACTORIZED_MIDS}, "
                       f"got {self.factorized_mid!r}")
    if self.doped_low_rank_init not in layers_lib.DOPED_LOW_RANK_INITS:
      raise ValueError(f"doped_low_rank_init must be one of "
                       f"{tuple(layers_lib.DOPED_LOW_RANK_INITS)}, got {self.doped_low_rank_init!r}")
    if self.norm not in layers_lib.NORMS:
      raise ValueError(f"norm must be one of {layers_lib.NORMS}, got {self.norm!r}")

  @property
  def member(self) -> members_lib.Member:
    """The :class:`sift_jax.transformations.Member` named by ``family``."""
    return members_lib.get_member(self.family)

  @property
  def branch_norms(self) -> bool:
    """True when the member's layer ends in norms of its own (Sparse Parallel with branch norms).

    Models that follow a transformed layer with their own norm skip it then:
    the branch norms take its place (reference ResNet blocks).
    """
    return bool(self.member.replaces_norm(self))

  @property
  def is_member(self) -> bool:
    """True for the Sparse-IFT members, False for ``"dense"``."""
    return self.member.transforms

  def width(self, features: int, *, what: str = "width") -> int:
    """Output width of a widened layer: the member's width rule (Sparse Wide's), else unchanged."""
    rule = self.member.width
    if rule is None:
      return int(features)
    return int(rule(self, int(features), what=what))

  def wrap(self, template: Any, *, use_running_average: Optional[bool] = None,
           **module_kwargs: Any) -> nn.Module:
    """Returns the module replacing the dense layer ``template``.

    Members without a layer factory (``dense`` and ``sparse_wide``) return the
    template itself (Sparse Wide widths are chosen by the caller with
    :meth:`width`, because whether a layer's output grows depends on its
    place in the network). The others return their
    :attr:`sift_jax.transformations.Member.layer` around it (the layers of
    :mod:`.layers` for the built-in members).

    Args:
      template: Unbound ``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Conv``.
      use_running_average: BatchNorm mode for members with ``norm="batch"``.
      **module_kwargs: ``name`` and/or ``parent`` of the returned module.
    """
    layers_lib.layer_kind(template)
    factory = self.member.layer
    if factory is None:
      return template.copy(**module_kwargs)
    return factory(self, template, use_running_average=use_running_average, **module_kwargs)

  def layer(self, cls: type, *args: Any, name: str, use_running_average: Optional[bool] = None,
            **kwargs: Any) -> nn.Module:
    """Builds ``cls(*args, **kwargs)`` as a template and wraps it (inside ``nn.compact``)."""
    return self.wrap(cls(*args, parent=None, **kwargs), name=name,
                     use_running_average=use_running_average)
