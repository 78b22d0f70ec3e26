"""Size rules of the Sparse-IFT family: width factors, branch counts and ranks.

Every function here is pure Python on integers and floats, so it can be used to
plan a model before any array exists. ``D_in x D_out`` is the shape of the
dense weight a member replaces; for a convolution with kernel ``k_1 x .. x k_n``
and ``C_in -> C_out`` channels, ``D_in = k_1 * .. * k_n * C_in`` and
``D_out = C_out`` (docs/method.md, section 2). ``d = 1 - s`` is the density.

Two rule sets exist (docs/method.md, section 2):

* the paper's (default): exact formulas, rounded to the nearest multiple of
  ``round_to`` (ties up) and to at least one multiple. The whole model's
  sparsity is re-solved afterwards so that the rounding does not break the
  iso-FLOP budget (:mod:`sift_jax.transformations.isoflop`);
* the authors' PyTorch reference (``reference=True``): ``ceil`` for Factorized
  ranks, ``floor`` for Doped ranks, ``int(w * sqrt(round(1/d)))`` for Sparse
  Wide widths and ``round(1/d)`` branches, reproduced with the same floating
  point expressions so that, e.g., the Factorized rank of a 64->64 3x3 conv at
  ``s = 0.9`` is 577 (``ceil`` of ``576.0000000000001``) as in the reference.

References:
  Thangarasa et al., "Sparse-IFT: Sparse Iso-FLOP Transformations for
  Maximizing Training Efficiency", ICML 2024 (arXiv:2303.11525), Section 3.
"""

from __future__ import annotations

import math
import operator
from typing import Optional, Sequence

from sift_jax.masks.densities import check_sparsity

__all__ = [
    "FAMILIES", "MEMBERS", "check_family", "check_round_to", "round_to_multiple", "layer_dims",
    "sparse_wide_factor", "sparse_wide_width", "sparse_parallel_branches",
    "sparse_factorized_rank", "sparse_doped_rank",
]

#: The built-in Sparse-IFT members (the table :mod:`sift_jax.transformations.members` holds
#: them, and any registered with :func:`sift_jax.transformations.register_member`).
MEMBERS = ("sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped")
#: The built-in ``family`` values: the untransformed model and the four members
#: (:func:`sift_jax.transformations.member_names` lists registered ones too).
FAMILIES = ("dense",) + MEMBERS


def check_family(family: str) -> str:
  """Returns ``family`` if it names a registered member, else raises ValueError naming it."""
  # Imported here: the members table builds on the size rules of this module.
  from sift_jax.transformations import members  # pylint: disable=g-import-not-at-top
  return members.get_member(family).name


def check_round_to(round_to: int) -> int:
  """Returns ``round_to`` as an int >= 1, else raises ValueError."""
  try:
    value = operator.index(round_to)
  except TypeError:
    value = None
  if isinstance(round_to, bool) or value is None or value < 1:
    raise ValueError(f"round_to must be an integer >= 1, got {round_to!r}")
  return int(value)


def round_to_multiple(value: float, multiple: int = 1, *, what: str = "size") -> int:
  """Rounds ``value`` to the nearest multiple of ``multiple`` (ties go up), at least one multiple.

  The granularity never turns a real size into zero: a value that is a
  positive size at ``multiple=1`` (``value >= 0.5``, i.e. it rounds to at
  least 1) but lies below half a multiple becomes one multiple (e.g. a rank
  of 28.8 at ``multiple=128`` is 128, not 0). The iso-FLOP solver then
  re-solves the mask sparsity for the larger size
  (:mod:`sift_jax.transformations.isoflop`), and says so if the parts that
  stay dense alone exceed the budget.

  Args:
    value: The exact (real) size.
    multiple: The granularity, e.g. 1 or 128 for TPU-friendly widths.
    what: Name of the quantity, for the error message (e.g. a layer path).

  Returns:
    A positive integer multiple of ``multiple``.

  Raises:
    ValueError: if ``value`` itself rounds to zero or below (``value < 0.5``,
      e.g. a Sparse Doped rank at ``s = 0``), whatever ``multiple`` is.
  """
  multiple = check_round_to(multiple)
  value = float(value)
  if not math.isfinite(value) or int(math.floor(value + 0.5)) <= 0:
    raise ValueError(
        f"{what}: the exact size {value:.4g} rounds to "
        f"{int(math.floor(value + 0.5)) if math.isfinite(value) else value}; "
        "choose another sparsity")
  return multiple * max(int(math.floor(value / multiple + 0.5)), 1)


def layer_dims(c_in: int, c_out: int, kernel_size: Optional[Sequence[int]] = None) -> tuple[int, int]:
  """Returns ``(D_in, D_out)`` of a dense layer (no kernel) or a convolution."""
  if int(c_in) <= 0 or int(c_out) <= 0:
    raise ValueError(f"layer dimensions must be positive, got c_in={c_in!r}, c_out={c_out!r}")
  receptive = 1 if kernel_size is None else int(math.prod(int(k) for k in kernel_size))
  return receptive * int(c_in), int(c_out)


def sparse_wide_factor(sparsity: float) -> float:
  """Sparse Wide width factor ``k_sw = sqrt(1 / (1 - s))`` (paper)."""
  s = check_sparsity(sparsity)
  return math.sqrt(1.0 / (1.0 - s))


def sparse_wide_width(width: int, sparsity: float, *, round_to: int = 1, reference: bool = False,
                      what: str = "width") -> int:
  """Widened width of a layer under Sparse Wide.

  Paper: ``round_to_multiple(width * sqrt(1/d), round_to)``. Reference:
  ``int(width * sqrt(round(1/d)))`` (the reference applies this to the base
  width 64 of a ResNet: 90, 128, 202 at s = 0.5, 0.75, 0.9).
  """
  s = check_sparsity(sparsity)
  if int(width) <= 0:
    raise ValueError(f"{what} must be positive, got {width!r}")
  if reference:
    out = int(width * math.sqrt(round(1.0 / (1.0 - s))))
    if out <= 0:
      raise ValueError(f"{what}: reference Sparse Wide width of {width} at s={s} is {out}")
    return out
  return round_to_multiple(width * sparse_wide_factor(s), round_to, what=what)


def sparse_parallel_branches(sparsity: float, *, reference: bool = False) -> int:
  """Number of Sparse Parallel branches ``n = 1/d``, rounded to an integer >= 1.

  Paper: nearest integer, ties up. Reference: Python ``round(1/(1-s))`` (ties
  to even). Both give 2, 4, 10 at s = 0.5, 0.75, 0.9.
  """
  s = check_sparsity(sparsity)
  exact = 1.0 / (1.0 - s)
  n = round(exact) if reference else int(math.floor(exact + 0.5))
  return max(int(n), 1)


def sparse_factorized_rank(c_in: int, c_out: int, sparsity: float, *,
                           kernel_size: Optional[Sequence[int]] = None, round_to: int = 1,
                           reference: bool = False, what: str = "rank") -> int:
  """Rank ``r`` of Sparse Factorized ``W -> U V`` with U and V sparse at ``s``.

  Iso-FLOP condition ``d * r * (D_in + D_out) = D_in * D_out`` gives
  ``r = D_in*D_out / (d * (D_in + D_out))``. Paper: nearest multiple of
  ``round_to``; reference: ``ceil``.

  Args:
    c_in: Input features (or input channels if ``kernel_size`` is given).
    c_out: Output features / channels.
    sparsity: ``s`` in [0, 1).
    kernel_size: Convolution kernel; ``None`` for a dense layer.
    round_to: Granularity of the paper rule.
    reference: Use the reference rule.
    what: Name for error messages.
  """
  s = check_sparsity(sparsity)
  d_in, d_out = layer_dims(c_in, c_out, kernel_size)
  exact = (d_in * d_out) / ((1.0 - s) * (d_in + d_out))
  if reference:
    return max(int(math.ceil(exact)), 1)
  return round_to_multiple(exact, round_to, what=what)


def sparse_doped_rank(c_in: int, c_out: int, sparsity: float, *,
                      kernel_size: Optional[Sequence[int]] = None, round_to: int = 1,
                      reference: bool = False, what: str = "rank") -> int:
  """Rank ``r`` of the dense low-rank part of Sparse Doped ``W -> U V + S``.

  Iso-FLOP condition ``r * (D_in + D_out) + d * D_in * D_out = D_in * D_out``
  gives ``r = s * D_in*D_out / (D_in + D_out)``. Paper: nearest multiple of
  ``round_to``; reference: ``floor``.

  Raises:
    ValueError: if the exact rank rounds to zero (e.g. ``s = 0``, or a tiny
      layer at a low ``s``), naming ``what``. A positive rank below half of
      ``round_to`` becomes ``round_to`` (see :func:`round_to_multiple`).
  """
  s = check_sparsity(sparsity)
  d_in, d_out = layer_dims(c_in, c_out, kernel_size)
  exact = (s * (d_in * d_out)) / (d_in + d_out)
  if reference:
    r = int(math.floor(exact))
    if r <= 0:
      raise ValueError(f"{what}: reference Sparse Doped rank floor({exact:.4g}) is 0 at s={s}; "
                       "use a higher sparsity")
    return r
  return round_to_multiple(exact, round_to, what=what)
