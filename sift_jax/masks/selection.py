"""Which parameter leaves are sparse: regex and callable rules on parameter paths.

A :class:`SparsityPolicy` is resolved once against a parameter tree into a
static tree of Python booleans (:func:`select_sparse`). Resolution needs only
paths and shapes, so it works on ``jax.ShapeDtypeStruct`` leaves and inside
``jit``/``eval_shape``. The rule that decided each leaf is logged once per
(policy, tree) pair, in the manner of big_vision's parameter selection.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from sift_jax.masks import tree_paths

__all__ = ["SparsityPolicy", "LeafDecision", "select_sparse", "explain_selection"]

_log = logging.getLogger("sift_jax")
_LOGGED: set[tuple[Any, Any]] = set()

LeafPredicate = Callable[[str, Any], Optional[bool]]


def _as_tuple(patterns: Any, name: str) -> tuple[str, ...]:
  if patterns is None:
    return ()
  if isinstance(patterns, str):
    patterns = (patterns,)
  patterns = tuple(patterns)
  for p in patterns:
    if not isinstance(p, str):
      raise ValueError(f"SparsityPolicy.{name} must hold regex strings, got {p!r}")
    try:
      re.compile(p)
    except re.error as e:
      raise ValueError(f"SparsityPolicy.{name}: invalid regex {p!r}: {e}") from None
  return patterns


@dataclasses.dataclass(frozen=True)
class SparsityPolicy:
  """Decides which leaves of a parameter tree carry a sparse mask.

  Rules are tried in this order for each leaf, with ``path`` the "/"-joined
  key path (``re.search`` semantics, so ``"head"`` matches ``"head/kernel"``):

  1. ``fn(path, leaf)``, if given and it returns a bool, decides.
  2. A leaf matching any ``dense`` regex is dense.
  3. A leaf with ``ndim < min_ndim`` is dense (biases, norm scales).
  4. If ``sparse`` is non-empty, a leaf is sparse iff it matches one of them.
  5. Otherwise the leaf is sparse (the default: every weight with ``ndim >= 2``).

  Attributes:
    sparse: Regexes selecting the sparse leaves (empty: all leaves with
      ``ndim >= min_ndim``).
    dense: Regexes of leaves that stay dense (a model's stem, classifier,
      embeddings, LM head).
    fn: Optional callable ``(path, leaf) -> bool | None`` deciding first.
    densities: Optional mapping ``regex -> density`` of per-leaf overrides
      used by :func:`sift_jax.layer_densities` (first matching regex wins).
    min_ndim: Minimum number of dimensions of a sparse leaf.
  """

  sparse: Sequence[str] = ()
  dense: Sequence[str] = ()
  fn: Optional[LeafPredicate] = None
  densities: Optional[Mapping[str, float]] = None
  min_ndim: int = 2

  def __post_init__(self):
    object.__setattr__(self, "sparse", _as_tuple(self.sparse, "sparse"))
    object.__setattr__(self, "dense", _as_tuple(self.dense, "dense"))
    if self.fn is not None and not callable(self.fn):
      raise ValueError(f"SparsityPolicy.fn must be callable, got {self.fn!r}")
    if self.densities is not None:
      dens = dict(self.densities)
      _as_tuple(tuple(dens), "densities")
      for pat, d in dens.items():
        if not (0.0 < float(d) <= 1.0):
          raise ValueError(f"SparsityPolicy.densities[{pat!r}] = {d!r} must be in (0, 1]")
      object.__setattr__(self, "densities", tuple(dens.items()))
    if int(self.min_ndim) < 0:
      raise ValueError(f"SparsityPolicy.min_ndim must be >= 0, got {self.min_ndim!r}")

  def with_dense(self, *patterns: str) -> "SparsityPolicy":
    """Returns a copy with ``patterns`` added to the dense regexes."""
    return dataclasses.replace(self, dense=tuple(self.dense) + _as_tuple(patterns, "dense"))

  def with_sparse(self, *patterns: str) -> "SparsityPolicy":
    """Returns a copy with ``patterns`` added to the sparse regexes."""
    return dataclasses.replace(self, sparse=tuple(self.sparse) + _as_tuple(patterns, "sparse"))

  def with_densities(self, overrides: Mapping[str, float]) -> "SparsityPolicy":
    """Returns a copy with extra per-leaf density overrides (checked first)."""
    merged = dict(overrides)
    for pat, d in dict(self.densities or {}).items():
      merged.setdefault(pat, d)
    return dataclasses.replace(self, densities=merged)

  def decide(self, path: str, leaf: Any) -> "LeafDecision":
    """Returns whether the leaf at ``path`` is sparse and the rule that decided."""
    ndim = len(np.shape(leaf)) if not hasattr(leaf, "ndim") else int(leaf.ndim)
    if self.fn is not None:
      verdict = self.fn(path, leaf)
      if verdict is not None:
        return LeafDecision(path, bool(verdict), "fn")
    for pat in self.dense:
      if re.search(pat, path):
        return LeafDecision(path, False, f"dense:{pat}")
    if ndim < self.min_ndim:
      return LeafDecision(path, False, f"ndim<{self.min_ndim}")
    if self.sparse:
      for pat in self.sparse:
        if re.search(pat, path):
          return LeafDecision(path, True, f"sparse:{pat}")
      return LeafDecision(path, False, "not matched by sparse rules")
    return LeafDecision(path, True, f"default:ndim>={self.min_ndim}")

  def density_override(self, path: str) -> Optional[float]:
    """Returns the density override for ``path``, or None."""
    for pat, d in dict(self.densities or {}).items():
      if re.search(pat, path):
        return float(d)
    return None


@dataclasses.dataclass(frozen=True)
class LeafDecision:
  path: str
  sparse: bool
  rule: str


def explain_selection(params: Any, policy: Optional[SparsityPolicy] = None) -> list[LeafDecision]:
  """Returns one :class:`LeafDecision` per leaf of ``params`` (flatten order)."""
  policy = SparsityPolicy() if policy is None else policy
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return [policy.decide(tree_paths.path_str(kp), leaf) for kp, leaf in flat]


def select_sparse(params: Any, policy: Optional[SparsityPolicy] = None, *,
                  require_any: bool = True) -> Any:
  """Resolves ``policy`` on ``params`` into a static tree of Python bools.

  Args:
    params: Parameter pytree (plain dict, Linen params, ``nnx.State``); leaves
      may be arrays or ``jax.ShapeDtypeStruct``.
    policy: The :class:`SparsityPolicy`; default selects every leaf with
      ``ndim >= 2``.
    require_any: Raise if the policy selects no leaf.

  Returns:
    A pytree with the structure of ``params`` and a bool per leaf.

  Raises:
    ValueError: if ``require_any`` and no leaf is selected.
  """
  policy = SparsityPolicy() if policy is None else policy
  decisions = explain_selection(params, policy)
  if require_any and not any(d.sparse for d in decisions):
    paths = ", ".join(d.path for d in decisions[:20])
    raise ValueError(
        f"SparsityPolicy selects no sparse leaf among {len(decisions)} leaves "
        f"({paths}{', ...' if len(decisions) > 20 else ''}); policy={policy!r}")
  treedef = jax.tree.structure(params)
  # Log once per distinct (policy, decisions): equal policies built anew (for
  # instance by every get_model call) do not log again.
  policy_key: object
  try:
    policy_key = hash(policy) and policy
  except TypeError:  # unhashable user callable
    policy_key = id(policy)
  log_key = (policy_key, tuple((d.path, d.sparse, d.rule) for d in decisions))
  if log_key not in _LOGGED:
    _LOGGED.add(log_key)
    for d in decisions:
      _log.info("sift_jax sparsity: %-48s %-6s (%s)", d.path, "sparse" if d.sparse else "dense", d.rule)
  return jax.tree.unflatten(treedef, [d.sparse for d in decisions])
