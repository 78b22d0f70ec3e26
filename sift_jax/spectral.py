"""Spectral analysis of sparse masks: the Ramanujan-graph view of a layer.

Each masked layer is read as a bipartite graph (docs/method.md, section 7): the left nodes are
the layer's ``D_in`` unrolled inputs (``k_h * k_w * C_in`` for a convolution), the
right nodes its ``D_out`` outputs, and an edge joins input ``i`` and output ``j``
where the mask is 1 (with weight ``|w_ij|`` for the weighted metric). With the
biadjacency matrix ``M`` (``D_in x D_out``) the adjacency matrix is
``A = [[0, M], [M^T, 0]]`` (``[[0, M^T], [M, 0]]`` with ``M`` transposed is the
same graph), whose eigenvalues are ``+-sigma_i(M)`` plus ``|D_in - D_out|`` zeros.

Metrics (Hoang et al., ICLR 2023; Hoang et al., NeurIPS 2023):

* ``mu_0``: the largest ``|eigenvalue|`` of ``A`` = ``sigma_1(M)``.
* ``mu_hat``: the third largest ``|eigenvalue|`` of ``A``. The spectrum of a
  bipartite graph is symmetric, so the three eigenvalues of largest magnitude are
  ``+sigma_1, -sigma_1, +-sigma_2`` and ``mu_hat = sigma_2(M)``, the largest
  non-trivial eigenvalue (this stays true when ``sigma_1 = sigma_2``, e.g. for a
  disconnected graph, where ``mu_hat = mu_0``).
* Ramanujan gap ``delta_r = sqrt(d_l - 1) + sqrt(d_r - 1) - mu_hat`` with the
  average left/right degrees ``d_l``, ``d_r`` of the graph without its isolated
  nodes. Positive means (irregular) Ramanujan: well connected for its degree.
* Iterative-mean gap: the mean of ``delta_r`` over the left-regular subgraphs
  (left nodes grouped by equal degree).
* Weighted spectral gap ``lambda = mu_0(|W|) - mu_hat(|W|)`` on the weighted
  adjacency matrix.

Everything here runs on the host with numpy/scipy (outside ``jit``); it is meant to
be called every few hundred steps, e.g. through :class:`SpectralLogger`.

References:
  Hoang, Liu, Marculescu, Wang, "Revisiting Pruning at Initialization through the
  Lens of Ramanujan Graph", ICLR 2023.
  Hoang, Kundu, Liu, Wang, "Don't just prune by magnitude! Your mask topology is a
  secret weapon", NeurIPS 2023.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any, cast

import jax
import numpy as np
import scipy.sparse
import scipy.sparse.linalg

from sift_jax.masks.tree_paths import path_str

__all__ = [
    "FLAX_ATTENTION_OUTPUT_AXES",
    "SUMMARY_KEYS",
    "SpectralLogger",
    "spectral_record",
    "layer_metrics",
    "model_metrics",
    "trajectory_plot",
]

# Float metrics averaged (ignoring NaN) over layers by `model_metrics`.
SUMMARY_KEYS = (
    "ramanujan_gap",
    "iterative_mean_gap",
    "weighted_spectral_gap",
    "mu_0",
    "mu_hat",
    "weighted_mu_0",
    "weighted_mu_hat",
    "ramanujan_bound",
    "avg_left_degree",
    "avg_right_degree",
    "density",
)

# Flax's MultiHeadDotProductAttention projects with DenseGeneral: query, key and
# value kernels are (D, heads, head_dim), two output axes (the output projection
# (heads, head_dim, D) has one, like any other kernel).
FLAX_ATTENTION_OUTPUT_AXES: Mapping[str, int] = {r"(^|/)(query|key|value)/kernel$": 2}

_LAYOUTS = ("flax", "torch")
_SOLVERS = ("auto", "dense", "sparse")
# Left-degree groups smaller than this are skipped by the iterative mean (as in the
# reference code of Hoang et al., ICLR 2023).
_MIN_GROUP_SIZE = 3
# `auto` uses a dense SVD when its cost ~ rows * cols * min(rows, cols) is below this
# (~0.05 s); ARPACK above it (a 4608 x 512 layer, ~1.2e9, takes ~0.1 s with ARPACK
# and ~0.4 s with a dense SVD).
_DENSE_WORK_LIMIT = 2.0**28
# Lanczos basis size for ARPACK; larger than the default 2k+1 so that clustered or
# repeated top singular values (disconnected graphs) converge reliably.
_ARPACK_NCV = 20
# Fixed seed of the ARPACK start vector: results are bit-for-bit reproducible. A
# random (not constant) vector is needed: for a regular graph the all-ones vector is
# the top singular vector and its Krylov space would never see sigma_2.
_ARPACK_SEED = 0


# --------------------------------------------------------------------------------------
# Graph construction.
# --------------------------------------------------------------------------------------


def _as_numpy(x: Any, name: str) -> np.ndarray:
  try:
    return np.asarray(x)
  except Exception as err:  # e.g. a non-addressable sharded array.
    raise ValueError(f"{name} could not be converted to a numpy array: {err}") from err


def _biadjacency(array: np.ndarray, layout: str, output_axes: int = 1) -> np.ndarray:
  """Unrolls a kernel-shaped array to the ``(D_in, D_out)`` biadjacency layout."""
  if layout == "flax":
    # Dense (D_in, D_out); conv (k, C_in, C_out), (kh, kw, C_in, C_out), ...:
    # outputs are the last `output_axes` axes (DenseGeneral with tuple features,
    # e.g. attention's (D, heads, head_dim) query kernel), the rest are inputs.
    return array.reshape(-1, int(np.prod(array.shape[array.ndim - output_axes:])))
  # torch: dense (D_out, D_in); conv (C_out, C_in, *kernel).
  return np.moveaxis(array, 0, -1).reshape(-1, array.shape[0])


def _top_two_singular_values(matrix: np.ndarray, solver: str) -> tuple[float, float]:
  """Returns ``(sigma_1, sigma_2)`` of a 2-D bool or float matrix, in float64.

  Missing singular values (``min(matrix.shape) < 2``) are 0: the adjacency matrix
  then has that many more zero eigenvalues.
  """
  rows, cols = matrix.shape
  min_dim = min(rows, cols)
  if min_dim == 0:
    return 0.0, 0.0
  if solver == "auto":
    solver = "dense" if rows * cols * min_dim <= _DENSE_WORK_LIMIT else "sparse"
  # ARPACK needs k=2 < ncv < min_dim; tiny matrices always take the dense path.
  if solver == "sparse" and min_dim > 3:
    v0 = np.random.default_rng(_ARPACK_SEED).standard_normal(min_dim)
    values: np.ndarray
    try:
      # scipy-stubs types svds as always returning (u, s, vh); with
      # return_singular_vectors=False it returns s alone.
      values = cast(np.ndarray, scipy.sparse.linalg.svds(
          # Sparse first, then float64: no dense float64 copy of a large layer.
          scipy.sparse.csr_array(matrix).astype(np.float64),
          k=2,
          ncv=min(_ARPACK_NCV, min_dim - 1),
          v0=v0,
          return_singular_vectors=False,
      ))
    except scipy.sparse.linalg.ArpackNoConvergence:
      values = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
  else:
    values = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
  values = np.sort(np.clip(values, 0.0, None))[::-1]
  values = np.concatenate([values, np.zeros(2)])
  return float(values[0]), float(values[1])


def _ramanujan_bound(left_degree: float, right_degree: float) -> float:
  return math.sqrt(left_degree - 1.0) + math.sqrt(right_degree - 1.0)


def _iterative_mean_gap(
    adjacency: np.ndarray, *, min_degree: float, solver: str
) -> tuple[float, int]:
  """Mean Ramanujan gap over the left-regular subgraphs of ``adjacency``.

  Left nodes are grouped by degree; groups of fewer than ``_MIN_GROUP_SIZE`` nodes
  are skipped. Each group's subgraph keeps all right nodes it reaches (zero-degree
  right nodes dropped) and is skipped unless its left degree and average right degree
  are both ``>= min_degree``.

  Returns:
    ``(mean gap, number of subgraphs averaged)``; the mean is NaN when none is.
  """
  left_degrees = adjacency.sum(axis=1)
  gaps = []
  degrees, counts = np.unique(left_degrees, return_counts=True)
  for degree, count in zip(degrees, counts):
    if degree == 0 or count < _MIN_GROUP_SIZE:
      continue
    group = adjacency[left_degrees == degree]
    group = group[:, group.sum(axis=0) > 0]
    right_degree = count * degree / group.shape[1]
    if degree < min_degree or right_degree < min_degree:
      continue
    _, sigma_2 = _top_two_singular_values(group, solver)
    gaps.append(_ramanujan_bound(float(degree), right_degree) - sigma_2)
  if not gaps:
    return math.nan, 0
  return float(np.mean(gaps)), len(gaps)


def layer_metrics(
    mask: Any,
    weights: Any = None,
    *,
    min_degree: float = 3.0,
    layout: str = "flax",
    solver: str = "auto",
    output_axes: int = 1,
) -> dict[str, Any]:
  """Ramanujan-graph metrics of one masked layer.

  The mask is read as a bipartite graph (see the module docstring): left nodes are
  the unrolled inputs, right nodes the outputs. Isolated nodes are dropped; the
  spectral metrics are computed only when the average left and right degrees of the
  remaining graph are both ``>= min_degree``, otherwise they are NaN and ``reason``
  says why.

  ``mu_hat`` is the third largest ``|eigenvalue|`` of ``A = [[0, M], [M^T, 0]]``
  (docs/method.md, section 7). As the spectrum is symmetric (``+-sigma_i(M)``), the three
  largest magnitudes are ``sigma_1, sigma_1, sigma_2``, so ``mu_hat = sigma_2(M)``.

  The iterative-mean gap follows the reference code of Hoang et al. (ICLR 2023)
  per subgraph, but, like every spectral metric here, is NaN when the layer as a
  whole fails the degree condition.

  Args:
    mask: binary mask (bool or 0/1; numpy or jax) of a dense kernel ``(D_in, D_out)``
      or a convolution kernel ``(k, C_in, C_out)`` / ``(kh, kw, C_in, C_out)`` /
      ``(kh, kw, kd, C_in, C_out)`` (Flax layouts); the last axis is the outputs
      and all other axes are unrolled into ``D_in`` left nodes.
    weights: optional weights of the same shape; enables the weighted metrics, which
      use ``|weights| * mask``.
    min_degree: minimum average left and right degree (> 0) for the spectral metrics.
    layout: ``"flax"`` (outputs last, as above) or ``"torch"`` (outputs first:
      ``(D_out, D_in)`` or ``(C_out, C_in, *kernel)``).
    solver: ``"dense"`` (numpy SVD), ``"sparse"`` (ARPACK ``svds`` with a fixed start
      vector; deterministic) or ``"auto"`` (dense for small layers, sparse for large).
    output_axes: with ``layout="flax"``, how many trailing axes are outputs (1 for
      dense and conv kernels; 2 for a ``DenseGeneral`` with two output features,
      such as attention's ``(D, heads, head_dim)`` query/key/value kernels).

  Returns:
    A dict with

    * ``num_left``, ``num_right``: non-isolated left/right nodes; ``num_edges``;
      ``density``: edges / mask size.
    * ``avg_left_degree``, ``avg_right_degree``: NaN only for an empty mask.
    * ``mu_0``, ``mu_hat``, ``ramanujan_bound`` (``sqrt(d_l-1) + sqrt(d_r-1)``),
      ``ramanujan_gap``.
    * ``iterative_mean_gap`` and ``num_regular_groups`` (subgraphs averaged).
    * ``weighted_mu_0``, ``weighted_mu_hat``, ``weighted_spectral_gap`` (NaN
      without ``weights``).
    * ``reason``: None, or why the spectral metrics are NaN.

  Raises:
    ValueError: for a mask with fewer than 2 dimensions, non-binary mask values,
      weights whose shape differs from the mask's, ``min_degree <= 0``, or an
      unknown ``layout``/``solver``.

  References:
    Hoang et al., "Revisiting Pruning at Initialization through the Lens of
    Ramanujan Graph", ICLR 2023. Hoang et al., "Don't just prune by magnitude! Your
    mask topology is a secret weapon", NeurIPS 2023.
  """
  if not min_degree > 0:
    raise ValueError(f"min_degree must be > 0, got {min_degree!r}.")
  if layout not in _LAYOUTS:
    raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}.")
  if solver not in _SOLVERS:
    raise ValueError(f"solver must be one of {_SOLVERS}, got {solver!r}.")
  mask = _as_numpy(mask, "mask")
  if mask.ndim < 2:
    raise ValueError(
        f"mask must have at least 2 dimensions (dense (D_in, D_out) or a conv "
        f"kernel), got shape {mask.shape}."
    )
  if (isinstance(output_axes, bool) or not isinstance(output_axes, (int, np.integer))
      or not 1 <= output_axes < mask.ndim or (layout == "torch" and output_axes != 1)):
    raise ValueError(
        f"output_axes must be an int in [1, {mask.ndim - 1}] for a mask of shape "
        f"{mask.shape} (1 with layout='torch'), got {output_axes!r}."
    )
  if mask.dtype != np.bool_:
    if not np.all((mask == 0) | (mask == 1)):
      bad = mask[~((mask == 0) | (mask == 1))].flat[0]
      raise ValueError(
          f"mask of shape {mask.shape} must be boolean or 0/1, found value {bad!r}."
      )
    mask = mask != 0
  if weights is not None:
    weights = _as_numpy(weights, "weights")
    if weights.shape != mask.shape:
      raise ValueError(
          f"weights shape {weights.shape} does not match mask shape {mask.shape}."
      )

  adjacency = _biadjacency(mask, layout, output_axes)
  left_degrees = adjacency.sum(axis=1)
  right_degrees = adjacency.sum(axis=0)
  keep_left = left_degrees > 0
  keep_right = right_degrees > 0
  adjacency = adjacency[keep_left][:, keep_right]
  num_left, num_right = adjacency.shape
  num_edges = int(left_degrees.sum())

  nan = math.nan
  metrics: dict[str, Any] = dict(
      num_left=num_left,
      num_right=num_right,
      num_edges=num_edges,
      density=num_edges / mask.size if mask.size else nan,
      avg_left_degree=num_edges / num_left if num_left else nan,
      avg_right_degree=num_edges / num_right if num_right else nan,
      mu_0=nan,
      mu_hat=nan,
      ramanujan_bound=nan,
      ramanujan_gap=nan,
      iterative_mean_gap=nan,
      num_regular_groups=0,
      weighted_mu_0=nan,
      weighted_mu_hat=nan,
      weighted_spectral_gap=nan,
      reason=None,
  )
  left_degree, right_degree = metrics["avg_left_degree"], metrics["avg_right_degree"]
  if num_edges == 0:
    metrics["reason"] = "mask has no edges"
    return metrics
  if left_degree < min_degree or right_degree < min_degree:
    metrics["reason"] = (
        f"average degrees (left {left_degree:.4g}, right {right_degree:.4g}) below "
        f"min_degree {min_degree:g}"
    )
    return metrics

  mu_0, mu_hat = _top_two_singular_values(adjacency, solver)
  bound = _ramanujan_bound(left_degree, right_degree)
  mean_gap, num_groups = _iterative_mean_gap(
      adjacency, min_degree=min_degree, solver=solver
  )
  metrics.update(
      mu_0=mu_0,
      mu_hat=mu_hat,
      ramanujan_bound=bound,
      ramanujan_gap=bound - mu_hat,
      iterative_mean_gap=mean_gap,
      num_regular_groups=num_groups,
  )
  if weights is not None:
    if weights.dtype not in (np.float32, np.float64):  # bfloat16, ints, ...
      weights = weights.astype(np.float64)
    weighted = np.abs(_biadjacency(weights, layout, output_axes))
    weighted = np.where(_biadjacency(mask, layout, output_axes), weighted, 0)
    weighted = weighted[keep_left][:, keep_right]
    w_mu_0, w_mu_hat = _top_two_singular_values(weighted, solver)
    metrics.update(
        weighted_mu_0=w_mu_0,
        weighted_mu_hat=w_mu_hat,
        weighted_spectral_gap=w_mu_0 - w_mu_hat,
    )
  return metrics


# --------------------------------------------------------------------------------------
# Whole models.
# --------------------------------------------------------------------------------------


def _leaves_by_path(tree: Any) -> dict[str, Any]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_str(path): leaf for path, leaf in leaves}


def _nan_mean(values: Sequence[float]) -> float:
  finite = [v for v in values if not math.isnan(v)]
  return float(np.mean(finite)) if finite else math.nan


def _is_array_like(x: Any) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def _check_tree(tree: Any, name: str) -> dict[str, Any]:
  """The leaves of ``params``/``masks`` by path; a tree without arrays raises, naming it."""
  if _is_array_like(tree) or isinstance(tree, (str, bytes, int, float, bool)):
    raise TypeError(f"model_metrics(): {name} must be a pytree of arrays (a dict, Linen params "
                    f"or nnx.State), got {type(tree).__name__}")
  leaves = {p: l for p, l in _leaves_by_path(tree).items() if l is not None}
  bad = {p: type(l).__name__ for p, l in leaves.items() if not _is_array_like(l)}
  if not leaves or bad:
    raise TypeError(f"model_metrics(): {name} must be a pytree of arrays, got "
                    f"{type(tree).__name__} with " + (f"non-array leaves {bad}" if bad else
                                                      "no array leaves"))
  return leaves


def _check_params(params: Any) -> dict[str, Any]:
  leaves = _check_tree(params, "params")
  booleans = [p for p, l in leaves.items() if np.dtype(l.dtype) == np.bool_]
  if booleans:
    raise ValueError(f"model_metrics(): params holds boolean leaves {booleans[:3]}, which look "
                     "like masks: the arguments are model_metrics(params, masks)")
  return leaves


def _check_masks(masks: Any) -> dict[str, np.ndarray]:
  """The mask leaves as numpy arrays; a leaf that is not 0/1 (a weight) raises, naming it."""
  out = {}
  for path, leaf in _check_tree(masks, "masks").items():
    mask = _as_numpy(leaf, f"mask {path!r}")
    if mask.dtype != np.bool_ and not np.isin(mask, (0, 1)).all():
      raise ValueError(f"model_metrics(): masks leaf {path!r} ({mask.dtype}) holds values other "
                       "than 0 and 1, i.e. weights, not a mask: the arguments are "
                       "model_metrics(params, masks)")
    out[path] = mask
  return out


def model_metrics(
    params: Any,
    masks: Any,
    *,
    min_degree: float = 3.0,
    solver: str = "auto",
    output_axes: Mapping[str, int] | None = None,
) -> dict[str, Any]:
  """Spectral metrics of every masked layer of a model.

  A masked layer is a mask leaf with ``ndim >= 2`` that is not all ones (dense
  leaves, biases and norm parameters are skipped). Layers are keyed by their
  "/"-joined parameter path (e.g. ``"Conv_0/kernel"``; the trailing ``value`` key of
  ``nnx.State`` variables is dropped). Runs on the host; call it outside ``jit``.

  Args:
    params: parameter pytree with the same paths as ``masks`` (plain dict, Linen
      ``variables["params"]`` or ``nnx.State``), or None for topology-only metrics
      (the weighted metrics are then NaN).
    masks: mask pytree (bool or 0/1 leaves; leaves may be None).
    min_degree: see :func:`layer_metrics`.
    solver: see :func:`layer_metrics`.
    output_axes: ``{regex: n}`` on layer paths (``re.search``, first match wins):
      the number of trailing output axes of those kernels (see
      :func:`layer_metrics`); every other layer has 1. Default
      :data:`FLAX_ATTENTION_OUTPUT_AXES`: the 3-D query/key/value kernels of
      ``nn.MultiHeadDotProductAttention`` have two output axes (heads,
      head_dim). Pass ``{}`` to read every kernel with one output axis.

  Returns:
    ``{"layers": {path: layer_metrics(...)}, "summary": {...}}``, where the summary
    holds the mean over layers (ignoring NaN) of every key in :data:`SUMMARY_KEYS`,
    ``num_layers`` (masked layers) and ``num_valid`` (layers with ``reason is
    None``).

  Raises:
    TypeError: when ``params`` or ``masks`` is not a pytree of arrays (an
      array, a number, a tree with no array leaf).
    ValueError: when a masked path has no parameter in ``params``, when a mask
      leaf holds values other than 0/1 or a parameter leaf is boolean (the
      arguments swapped; the message names the leaf), or (naming the path)
      when :func:`layer_metrics` rejects a layer.
  """
  params_by_path = None if params is None else _check_params(params)
  mask_leaves = _check_masks(masks)
  rules = list((FLAX_ATTENTION_OUTPUT_AXES if output_axes is None else output_axes).items())
  for pattern, _ in rules:
    try:
      re.compile(pattern)
    except re.error as err:
      raise ValueError(f"output_axes: invalid regex {pattern!r}: {err}") from None
  layers: dict[str, dict[str, Any]] = {}
  for path, mask in mask_leaves.items():
    if mask.ndim < 2 or bool(np.all(mask)):
      continue
    weights = None
    if params_by_path is not None:
      if path not in params_by_path:
        raise ValueError(
            f"mask path {path!r} has no parameter in params (params and masks must "
            f"have the same paths, e.g. both relative to variables['params'])."
        )
      weights = params_by_path[path]
    n_out = 1
    for pattern, n in rules:
      if re.search(pattern, path):
        n_out = n
        break
    try:
      layers[path] = layer_metrics(
          mask, weights, min_degree=min_degree, solver=solver, output_axes=n_out
      )
    except ValueError as err:
      raise ValueError(f"layer {path!r}: {err}") from err

  summary: dict[str, Any] = {
      key: _nan_mean([m[key] for m in layers.values()]) for key in SUMMARY_KEYS
  }
  summary["num_layers"] = len(layers)
  summary["num_valid"] = sum(m["reason"] is None for m in layers.values())
  return {"layers": layers, "summary": summary}


# --------------------------------------------------------------------------------------
# Logging and plotting.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SpectralLogger:
  """Training callback appending spectral summaries to a JSON-lines file.

  Every ``every`` steps, computes :func:`model_metrics` and appends one line
  ``{"step": step, "split": "spectral", "<metric>": value, ...}`` (NaN written as
  ``null``) to ``path``: the format of the training loop's ``metrics.jsonl``, so
  both can share a file and :func:`trajectory_plot` reads either. Host-side: call it outside the jitted step with the current params and
  masks (e.g. ``sift_jax.get_masks(opt_state)``).

  Attributes:
    every: logging period in steps (> 0).
    path: JSON-lines file to append to (parent directories are created).
    min_degree: see :func:`layer_metrics`.
    solver: see :func:`layer_metrics`.
  """

  every: int
  path: str | os.PathLike[str]
  min_degree: float = dataclasses.field(default=3.0, kw_only=True)
  solver: str = dataclasses.field(default="auto", kw_only=True)

  def __post_init__(self):
    if not isinstance(self.every, int) or self.every <= 0:
      raise ValueError(f"every must be a positive int, got {self.every!r}.")
    if not self.min_degree > 0:
      raise ValueError(f"min_degree must be > 0, got {self.min_degree!r}.")
    if self.solver not in _SOLVERS:
      raise ValueError(f"solver must be one of {_SOLVERS}, got {self.solver!r}.")

  def __call__(self, step: Any, params: Any, masks: Any) -> dict[str, Any] | None:
    """Logs at ``step`` if it is a multiple of ``every``.

    Returns:
      The summary dict of :func:`model_metrics`, or None when nothing was logged.
    """
    step = int(step)
    if step % self.every:
      return None
    summary = model_metrics(
        params, masks, min_degree=self.min_degree, solver=self.solver
    )["summary"]
    record = {"step": step, "split": "spectral", **spectral_record(summary)}
    path = pathlib.Path(self.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    return summary


def spectral_record(summary: Mapping[str, Any]) -> dict[str, Any]:
  """The logged fields of a :func:`model_metrics` summary: NaN becomes None (JSON has no NaN).

  The one record format of spectral metrics, written by :class:`SpectralLogger`
  and by the training loop (``training.spectral_every_steps``).
  """
  record: dict[str, Any] = {}
  for key, value in summary.items():
    if isinstance(value, (float, np.floating)):
      value = None if math.isnan(value) else float(value)
    record[key] = value
  return record


def _record_value(record: Mapping[str, Any], name: str) -> float:
  value = record.get(name, record.get(f"spectral/{name}"))
  return math.nan if value is None else float(value)


def trajectory_plot(
    records: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | os.PathLike[str],
) -> pathlib.Path:
  """Plots runs' trajectories in the (Ramanujan gap, weighted spectral gap) plane.

  This is the view of Hoang et al. (NeurIPS 2023): how a sparse-training run moves
  its masks' topology (``delta_r``, x axis) and weights (``lambda``, y axis) over
  training. Each run is a line with arrows in step order; its first and last points
  are annotated with their steps. Points with a NaN coordinate are skipped.

  Args:
    records: run name -> list of summary dicts, each with ``"step"``,
      ``"ramanujan_gap"`` and ``"weighted_spectral_gap"`` (the ``"spectral/"``
      prefixed keys of :class:`SpectralLogger` lines are accepted too).
    path: output PNG file (parent directories are created).

  Returns:
    The path written.

  Raises:
    ValueError: if ``records`` is empty or a record has no ``"step"``.
  """
  # Figure + Agg canvas directly: no pyplot global state, no backend switch.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  if not records:
    raise ValueError("records is empty: nothing to plot.")
  fig = Figure(figsize=(6.5, 5.0), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  colors = [f"C{i}" for i in range(10)]
  for i, (run, run_records) in enumerate(records.items()):
    color = colors[i % len(colors)]
    points = []
    for record in run_records:
      if "step" not in record:
        raise ValueError(f"record of run {run!r} has no 'step': {dict(record)!r}")
      x = _record_value(record, "ramanujan_gap")
      y = _record_value(record, "weighted_spectral_gap")
      if not (math.isnan(x) or math.isnan(y)):
        points.append((int(record["step"]), x, y))
    points.sort()
    if not points:
      ax.plot([], [], color=color, label=f"{run} (no valid points)")
      continue
    steps, xs, ys = zip(*points)
    ax.plot(xs, ys, "-o", color=color, markersize=3, linewidth=1, label=run)
    for j in range(len(points) - 1):
      ax.annotate(
          "",
          xy=(xs[j + 1], ys[j + 1]),
          xytext=(xs[j], ys[j]),
          arrowprops=dict(arrowstyle="->", color=color, lw=1),
      )
    ax.annotate(f"start (step {steps[0]})", (xs[0], ys[0]), color=color,
                fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.annotate(f"end (step {steps[-1]})", (xs[-1], ys[-1]), color=color,
                fontsize=7, xytext=(4, -10), textcoords="offset points")
  ax.axvline(0.0, color="grey", linestyle="--", linewidth=0.8)
  ax.set_xlabel(r"Ramanujan gap $\delta_r$ (mean over layers)")
  ax.set_ylabel(r"weighted spectral gap $\lambda$ (mean over layers)")
  ax.set_title("Sparse-training trajectories (Hoang et al., NeurIPS 2023)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, format="png")
  return path
