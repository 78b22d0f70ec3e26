"""Which parameter leaves are sparse: regex and callable rules on parameter paths.

A :class:`SparsityPolicy` is resolved once against a parameter tree into a
static tree of Python booleans (:func:`select_sparse`). Resolution needs only
paths and shapes, so it works on ``jax.ShapeDtypeStruct`` leaves and inside
``jit``/``eval_shape``. The rule that decided each leaf is logged once per
(policy, tree) pair, in the manner of big_vision's parameter selection.

The default selects the weights that multiply an input: the ``kernel`` of
Flax's ``Dense``, ``DenseGeneral``, ``Conv`` and ``Einsum`` and what a user
declares with ``weights=``; biases, norm scales and embedding tables (a
lookup, not a multiply) stay dense whatever their rank
(:data:`NON_WEIGHT_NAMES`, docs/method.md, section 3).

Leaves of an ``nn.scan``/``nn.vmap`` stack carry one slice per layer along
their leading axes (``SparsityPolicy(stacked=...)``, :func:`detect_stacked`);
every slice is then a layer of its own: its own density, its own exact
count and its own top-k at mask updates.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from sift_jax.masks import tree_paths

__all__ = ["SparsityPolicy", "LeafDecision", "NON_WEIGHT_NAMES", "WEIGHT_NAMES", "select_sparse",
           "explain_selection", "stacked_axes", "detect_stacked"]

_log = logging.getLogger("sift_jax")
_LOGGED: set[tuple[Any, Any]] = set()

LeafPredicate = Callable[[str, Any], Optional[bool]]

#: Last path names of parameters that do not multiply an input, and what
#: they are. A leaf with one of these names is dense whatever its rank
#: (rule ``"non-weight:<name>"``) unless ``SparsityPolicy.weights`` declares
#: it a weight (e.g. ``weights=(r"embed/embedding$",)`` to mask an embedding).
NON_WEIGHT_NAMES: Mapping[str, str] = {
    "bias": "additive offset (Dense, DenseGeneral, Conv, Einsum, norms)",
    "scale": "norm scale (LayerNorm, RMSNorm, GroupNorm, BatchNorm)",
    "embedding": "lookup table (nn.Embed): rows are gathered, not multiplied",
    "mean": "running mean (BatchNorm statistics)",
    "var": "running variance (BatchNorm statistics)",
    "negative_slope": "PReLU slope",
}

#: Last path names of the weights that multiply an input: Flax's ``Dense``,
#: ``DenseGeneral``, ``Conv``, ``ConvTranspose`` and ``Einsum`` kernels (Linen and NNX).
WEIGHT_NAMES: tuple[str, ...] = ("kernel",)


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


def _as_stacked(stacked: Any) -> tuple[tuple[str, int], ...]:
  """``stacked=`` as ``((regex, n_axes), ...)``: a mapping, or regexes meaning 1 axis."""
  if stacked is None:
    return ()
  if isinstance(stacked, str):
    items: list[tuple[Any, Any]] = [(stacked, 1)]
  elif isinstance(stacked, Mapping):
    items = list(stacked.items())
  elif isinstance(stacked, (tuple, list)) and all(isinstance(x, tuple) and len(x) == 2 for x in stacked):
    items = list(stacked)  # the normalised form, e.g. from dataclasses.replace
  elif isinstance(stacked, (tuple, list, set, frozenset)):
    items = [(p, 1) for p in stacked]
  else:
    raise ValueError(f"SparsityPolicy.stacked must be a mapping regex -> number of stacked "
                     f"leading axes, or a tuple of regexes (1 axis each), got {stacked!r}")
  out = []
  for pat, n in items:
    _as_tuple((pat,), "stacked")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or int(n) < 1:
      raise ValueError(f"SparsityPolicy.stacked[{pat!r}] = {n!r} must be a positive int (the "
                       "number of leading axes that index the layers of the stack)")
    out.append((pat, int(n)))
  return tuple(out)


def _ndim(leaf: Any) -> int:
  return len(np.shape(leaf)) if not hasattr(leaf, "ndim") else int(leaf.ndim)


def _last_name(path: str) -> str:
  return path.rsplit("/", 1)[-1]


@dataclasses.dataclass(frozen=True)
class SparsityPolicy:
  """Decides which leaves of a parameter tree carry a sparse mask.

  Rules are tried in this order for each leaf, with ``path`` the "/"-joined
  key path (``re.search`` semantics, so ``"head"`` matches ``"head/kernel"``)
  and ``name`` its last part; the rule that decided is
  :attr:`LeafDecision.rule`:

  1. ``fn(path, leaf)``, if given and it returns a bool, decides (``"fn"``).
  2. A leaf matching any ``dense`` regex is dense (``"dense:<regex>"``).
  3. A leaf matching a ``weights`` regex is a weight (go to 6).
  4. A leaf whose name is in :data:`NON_WEIGHT_NAMES` (``bias``, ``scale``,
     ``embedding``, ...) is dense whatever its rank (``"non-weight:<name>"``).
  5. A leaf named ``kernel`` is a weight. A leaf with another name is not a
     weight if the tree names its weights (holds a ``kernel`` leaf or one
     matched by ``weights``): dense, ``"not a weight:<name>"``. In a tree
     that names none (a plain dict such as ``{"w1": ..., "b1": ...}``) the
     leaf goes on to 6 (the rule before weight names were known).
  6. A leaf with ``ndim < min_ndim`` is dense; for a stacked leaf ``ndim``
     is that of one slice.
  7. If ``sparse`` is non-empty, a leaf is sparse iff it matches one of them.
  8. Otherwise the leaf is sparse (``"weight:kernel"``, ``"weights:<regex>"``,
     or ``"default:ndim>=2"`` in a tree that names no weight).

  Attributes:
    sparse: Regexes selecting the sparse leaves among the weights (empty:
      all of them).
    dense: Regexes of leaves that stay dense (a model's stem, classifier,
      embeddings, LM head).
    fn: Optional callable ``(path, leaf) -> bool | None`` deciding first.
    densities: Optional mapping ``regex -> density`` of per-leaf overrides
      used by :func:`sift_jax.layer_densities` (first matching regex wins).
    min_ndim: Minimum number of dimensions of a sparse leaf (of one slice of
      a stacked leaf).
    weights: Regexes of leaves that are weights although their name is not
      ``kernel`` (a custom ``self.param("w", ...)``, or an embedding table
      to mask).
    stacked: Leaves of an ``nn.scan``/``nn.vmap`` stack: a mapping ``regex ->
      n`` (the first ``n`` axes index the layers), or a tuple of regexes
      (one leading axis each); first matching regex wins.
      :func:`detect_stacked` finds them, :meth:`with_stacked` adds them.
      Every slice is a layer of its own: ERK densities are computed on the
      slice shape, counts are exact per slice, and RigL ranks per slice.
  """

  sparse: Sequence[str] = ()
  dense: Sequence[str] = ()
  fn: Optional[LeafPredicate] = None
  densities: Optional[Mapping[str, float]] = None
  min_ndim: int = 2
  weights: Sequence[str] = ()
  stacked: Any = ()

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
    object.__setattr__(self, "weights", _as_tuple(self.weights, "weights"))
    object.__setattr__(self, "stacked", _as_stacked(self.stacked))

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

  def with_stacked(self, stacked: Mapping[str, int], *, exact: bool = True) -> "SparsityPolicy":
    """Returns a copy with stacked leaves added (checked before the existing ones).

    Args:
      stacked: Mapping ``path -> number of stacked leading axes``, e.g. from
        :func:`detect_stacked`.
      exact: The keys are parameter paths, matched whole (``^path$``);
        False: they are regexes.
    """
    items = _as_stacked(dict(stacked))
    if exact:
      items = tuple((f"^{re.escape(p)}$", n) for p, n in items)
    return dataclasses.replace(self, stacked=items + tuple(self.stacked))

  def stacked_axes(self, path: str, leaf: Any = None) -> int:
    """Number of leading axes of the leaf at ``path`` that index stacked layers.

    Raises:
      ValueError: if ``leaf`` is given and has no more axes than that.
    """
    for pat, n in self.stacked:
      if re.search(pat, path):
        if leaf is not None and _ndim(leaf) < n:
          raise ValueError(f"SparsityPolicy.stacked[{pat!r}] = {n} stacked axes, but parameter "
                           f"{path!r} has shape {tuple(np.shape(leaf))}")
        return n
    return 0

  def is_weight(self, path: str) -> Optional[str]:
    """The rule by which the leaf at ``path`` is a weight (``weights``, kernel), or None."""
    for pat in self.weights:
      if re.search(pat, path):
        return f"weights:{pat}"
    name = _last_name(path)
    if name in WEIGHT_NAMES:
      return f"weight:{name}"
    return None

  def decide(self, path: str, leaf: Any, *, names_weights: bool = False) -> "LeafDecision":
    """Returns whether the leaf at ``path`` is sparse and the rule that decided.

    Args:
      path: The leaf's "/"-joined path.
      leaf: The leaf (only its shape is read).
      names_weights: Whether the tree holds a leaf that :meth:`is_weight`
        (rule 5 of the class docstring); :func:`explain_selection` sets it.
    """
    n_stacked = self.stacked_axes(path, leaf)
    ndim = _ndim(leaf) - n_stacked
    tag = "" if not n_stacked else f"; stacked:{n_stacked}"
    if self.fn is not None:
      verdict = self.fn(path, leaf)
      if verdict is not None:
        return LeafDecision(path, bool(verdict), "fn" + tag, n_stacked)
    for pat in self.dense:
      if re.search(pat, path):
        return LeafDecision(path, False, f"dense:{pat}" + tag, n_stacked)
    name = _last_name(path)
    weight_rule = None
    for pat in self.weights:
      if re.search(pat, path):
        weight_rule = f"weights:{pat}"
        break
    if weight_rule is None:
      if name in NON_WEIGHT_NAMES:
        return LeafDecision(path, False, f"non-weight:{name}" + tag, n_stacked)
      if name in WEIGHT_NAMES:
        weight_rule = f"weight:{name}"
      elif names_weights:
        return LeafDecision(path, False, f"not a weight:{name}" + tag, n_stacked)
      else:
        weight_rule = f"default:ndim>={self.min_ndim}"
    if ndim < self.min_ndim:
      return LeafDecision(path, False, f"ndim<{self.min_ndim}" + tag, n_stacked)
    if self.sparse:
      for pat in self.sparse:
        if re.search(pat, path):
          return LeafDecision(path, True, f"sparse:{pat}" + tag, n_stacked)
      return LeafDecision(path, False, "not matched by sparse rules" + tag, n_stacked)
    return LeafDecision(path, True, weight_rule + tag, n_stacked)

  def density_override(self, path: str) -> Optional[float]:
    """Returns the density override for ``path``, or None."""
    for pat, d in dict(self.densities or {}).items():
      if re.search(pat, path):
        return float(d)
    return None


@dataclasses.dataclass(frozen=True)
class LeafDecision:
  """How :class:`SparsityPolicy` decided one leaf.

  Attributes:
    path: The leaf's "/"-joined path.
    sparse: Whether the leaf carries a sparse mask.
    rule: The rule that decided (see :class:`SparsityPolicy`), with
      ``"; stacked:<n>"`` appended for a stacked leaf.
    stacked: Number of leading axes indexing stacked layers (0: none).
  """

  path: str
  sparse: bool
  rule: str
  stacked: int = 0


def explain_selection(params: Any, policy: Optional[SparsityPolicy] = None) -> list[LeafDecision]:
  """Returns one :class:`LeafDecision` per leaf of ``params`` (flatten order)."""
  policy = SparsityPolicy() if policy is None else policy
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  paths = [tree_paths.path_str(kp) for kp, _ in flat]
  names_weights = any(policy.is_weight(p) is not None for p in paths)
  return [policy.decide(p, leaf, names_weights=names_weights) for p, (_, leaf) in zip(paths, flat)]


def stacked_axes(params: Any, policy: Optional[SparsityPolicy] = None) -> Any:
  """Static tree of ints: per leaf, the leading axes that index stacked layers.

  Raises:
    ValueError: for a leaf with no more axes than its ``stacked`` rule says.
  """
  policy = SparsityPolicy() if policy is None else policy
  return tree_paths.map_with_path_str(policy.stacked_axes, params)


def select_sparse(params: Any, policy: Optional[SparsityPolicy] = None, *,
                  require_any: bool = True) -> Any:
  """Resolves ``policy`` on ``params`` into a static tree of Python bools.

  Args:
    params: Parameter pytree (plain dict, Linen params, ``nnx.State``); leaves
      may be arrays or ``jax.ShapeDtypeStruct``.
    policy: The :class:`SparsityPolicy`; default selects the kernels (and,
      in a tree that names no weight, every leaf with ``ndim >= 2``), never
      biases, scales or embeddings.
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
      _log.info("sift_jax sparsity: %-48s %-6s (%s)", d.path, "sparse" if d.sparse else "dense",
                d.rule)
  return jax.tree.unflatten(treedef, [d.sparse for d in decisions])


def detect_stacked(model: Any, *example_inputs: Any, method: Any = None,
                   **apply_kwargs: Any) -> dict[str, int]:
  """Finds the parameters of a Linen model that ``nn.scan``/``nn.vmap`` stack.

  Initialises ``model`` abstractly (``jax.eval_shape``, nothing is computed)
  and records the shape every submodule sees of its own parameters when it
  is called: inside a lifted ``nn.scan``/``nn.vmap`` body a layer sees one
  slice, while the finished parameter tree holds the stack. A leaf whose
  shape is ``(L_1, ..., L_n) + slice_shape`` has ``n`` stacked leading axes.

  Example::

    policy = sift_jax.SparsityPolicy().with_stacked(sift_jax.detect_stacked(model, x))

  Args:
    model: An unbound Linen module.
    *example_inputs: Inputs of ``model.init`` (arrays or ``ShapeDtypeStruct``).
    method: Optional method of ``model`` to initialise with.
    **apply_kwargs: Static keyword arguments of the model's ``__call__``.

  Returns:
    ``{"/"-joined params path: number of stacked leading axes}``, only for
    stacked leaves (in the params collection, flatten order).

  Raises:
    ValueError: for a stacked leaf whose stack axes are not leading (e.g.
      ``variable_axes={"params": 1}``), naming the path and both shapes.
  """
  import flax.linen as nn  # Linen only here: the masks package itself does not need flax

  # Every shape a path is seen with: the lifted wrapper sees the whole stack, the layer in
  # the body one slice, and a model that traces itself more than once (the Sparse Wide
  # plan's probes at other widths) may show a layer at shapes the final tree does not have.
  seen: dict[str, set[tuple[int, ...]]] = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if module.scope is None:
      return out
    own = module.variables.get("params", {})
    for kp, leaf in jax.tree_util.tree_flatten_with_path(own)[0]:
      path = "/".join(list(module.path) + [tree_paths.path_str(kp)])
      seen.setdefault(path, set()).add(tuple(np.shape(leaf)))
    return out

  def init(*inputs):
    with nn.intercept_methods(record):
      return model.init(jax.random.key(0), *inputs, method=method, **apply_kwargs)

  variables = jax.eval_shape(init, *example_inputs)
  out: dict[str, int] = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(variables.get("params", {}))[0]:
    path = tree_paths.path_str(kp)
    full = tuple(np.shape(leaf))
    shapes = seen.get(path, {full})
    # The slice is the shortest seen shape that ends the full one (leading stack axes).
    n = max((len(full) - len(s) for s in shapes if full[len(full) - len(s):] == s), default=0)
    shorter = [s for s in shapes if len(s) < len(full) - n]
    if shorter and n == 0:
      inner = min(shorter, key=len)
      raise ValueError(f"detect_stacked: parameter {path!r} has shape {full} but its layer "
                       f"creates {inner}; only leading stack axes are supported (nn.scan/nn.vmap "
                       "with variable_axes={'params': 0})")
    if n > 0:
      out[path] = n
  return out
