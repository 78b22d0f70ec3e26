"""Tests of sift_jax.spectral: closed forms on graphs with known spectra."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sift_jax import spectral

SOLVERS = ("dense", "sparse")


def _adjacency_top(biadjacency):
  """(mu_0, mu_hat) from numpy.linalg.eigvalsh on the full adjacency matrix."""
  m = np.asarray(biadjacency, dtype=np.float64)
  rows, cols = m.shape
  a = np.zeros((rows + cols, rows + cols))
  a[:rows, rows:] = m
  a[rows:, :rows] = m.T
  magnitudes = np.sort(np.abs(np.linalg.eigvalsh(a)))[::-1]
  return magnitudes[0], magnitudes[2]


def _random_mask(rng, shape, density):
  return rng.random(shape) < density


def _block_diag(*blocks):
  rows = sum(b.shape[0] for b in blocks)
  cols = sum(b.shape[1] for b in blocks)
  out = np.zeros((rows, cols), dtype=blocks[0].dtype)
  r = c = 0
  for b in blocks:
    out[r:r + b.shape[0], c:c + b.shape[1]] = b
    r += b.shape[0]
    c += b.shape[1]
  return out


# --------------------------------------------------------------------------------------
# Closed forms.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("a,b", [(3, 4), (5, 7), (6, 6)])
def test_complete_bipartite_closed_form(a, b, solver):
  # K_{a,b}: M = ones(a, b) has singular values sqrt(ab), 0, ..., left degree b.
  m = spectral.layer_metrics(np.ones((a, b), bool), solver=solver)
  assert m["reason"] is None
  assert (m["num_left"], m["num_right"], m["num_edges"]) == (a, b, a * b)
  assert m["avg_left_degree"] == b and m["avg_right_degree"] == a
  assert m["density"] == 1.0
  np.testing.assert_allclose(m["mu_0"], math.sqrt(a * b), rtol=1e-12)
  np.testing.assert_allclose(m["mu_hat"], 0.0, atol=1e-7)
  bound = math.sqrt(b - 1) + math.sqrt(a - 1)
  np.testing.assert_allclose(m["ramanujan_bound"], bound, rtol=1e-12)
  np.testing.assert_allclose(m["ramanujan_gap"], bound, atol=1e-7)
  # One left-degree group (all a nodes have degree b): the iterative mean is the gap.
  assert m["num_regular_groups"] == 1
  np.testing.assert_allclose(m["iterative_mean_gap"], bound, atol=1e-7)
  assert math.isnan(m["weighted_spectral_gap"])


@pytest.mark.parametrize("solver", SOLVERS)
def test_disjoint_complete_bipartite_graphs(solver):
  k34 = np.ones((3, 4), bool)
  # Two copies of K_{3,4}: sigma = sqrt(12), sqrt(12) -> mu_hat = mu_0 = sqrt(12).
  m = spectral.layer_metrics(_block_diag(k34, k34), solver=solver)
  np.testing.assert_allclose(m["mu_0"], math.sqrt(12), rtol=1e-10)
  np.testing.assert_allclose(m["mu_hat"], math.sqrt(12), rtol=1e-10)
  assert m["avg_left_degree"] == 4 and m["avg_right_degree"] == 3
  np.testing.assert_allclose(
      m["ramanujan_gap"], math.sqrt(3) + math.sqrt(2) - math.sqrt(12), rtol=1e-10)
  # K_{3,4} + K_{5,6}: sigma = sqrt(30), sqrt(12); 42 edges, 8 left and 10 right nodes.
  m = spectral.layer_metrics(_block_diag(k34, np.ones((5, 6), bool)), solver=solver)
  np.testing.assert_allclose(m["mu_0"], math.sqrt(30), rtol=1e-10)
  np.testing.assert_allclose(m["mu_hat"], math.sqrt(12), rtol=1e-10)
  assert m["avg_left_degree"] == 42 / 8 and m["avg_right_degree"] == 42 / 10


def _circulant(n, d):
  m = np.zeros((n, n), bool)
  for i in range(n):
    m[i, (i + np.arange(d)) % n] = True
  return m


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("n,d", [(12, 4), (20, 5), (31, 3)])
def test_regular_circulant_graph(n, d, solver):
  # M is a circulant: singular values |sum_{j<d} w^{jk}| = |sin(pi d k/n) / sin(pi k/n)|.
  m = spectral.layer_metrics(_circulant(n, d), solver=solver)
  k = np.arange(1, n)
  expected_hat = np.max(np.abs(np.sin(np.pi * d * k / n) / np.sin(np.pi * k / n)))
  assert m["avg_left_degree"] == d and m["avg_right_degree"] == d
  np.testing.assert_allclose(m["mu_0"], d, rtol=1e-12)
  np.testing.assert_allclose(m["mu_hat"], expected_hat, rtol=1e-9)
  np.testing.assert_allclose(m["ramanujan_gap"], 2 * math.sqrt(d - 1) - expected_hat,
                             rtol=1e-9, atol=1e-12)
  assert m["num_regular_groups"] == 1
  np.testing.assert_allclose(m["iterative_mean_gap"], m["ramanujan_gap"], rtol=1e-9)


def test_iterative_mean_gap_by_hand():
  # Left groups by degree (right nodes 0..9):
  #   degree 4, 3 nodes: K_{3,4} on right 0..3          -> gap sqrt(3)+sqrt(2)-0
  #   degree 3, 6 nodes: two K_{3,3} on right 4..6, 7..9 -> gap 2 sqrt(2) - 3
  #   degree 5, 2 nodes: right 0..4, skipped (group of 2 < 3 nodes)
  #   degree 1, 3 nodes: right 0, 1, 2, skipped (degree 1 < min_degree)
  m = np.zeros((14, 10), bool)
  m[0:3, 0:4] = True
  m[3:6, 4:7] = True
  m[6:9, 7:10] = True
  m[9:11, 0:5] = True
  m[11, 0] = m[12, 1] = m[13, 2] = True
  got = spectral.layer_metrics(m)
  gap_k34 = math.sqrt(3) + math.sqrt(2)
  gap_2k33 = 2 * math.sqrt(2) - 3
  assert got["num_regular_groups"] == 2
  np.testing.assert_allclose(got["iterative_mean_gap"], (gap_k34 + gap_2k33) / 2, atol=1e-9)
  # With min_degree 2 the size-2 group K_{2,5} (right degree 2) would qualify but for
  # the group-size rule; the degree-1 group still fails.
  low = spectral.layer_metrics(m, min_degree=2.0)
  assert low["num_regular_groups"] == 2
  np.testing.assert_allclose(low["iterative_mean_gap"], got["iterative_mean_gap"], atol=1e-12)
  # The whole-graph metrics agree with the full adjacency spectrum.
  num_edges = 12 + 18 + 10 + 3
  assert got["num_edges"] == num_edges
  assert got["avg_left_degree"] == num_edges / 14
  assert got["avg_right_degree"] == num_edges / 10
  mu_0, mu_hat = _adjacency_top(m)
  np.testing.assert_allclose([got["mu_0"], got["mu_hat"]], [mu_0, mu_hat], rtol=1e-10)
  np.testing.assert_allclose(
      got["ramanujan_gap"],
      math.sqrt(num_edges / 14 - 1) + math.sqrt(num_edges / 10 - 1) - mu_hat, rtol=1e-10)


def test_iterative_mean_gap_subgraph_degree_uses_reached_right_nodes():
  # One left group of degree 3 over 3 nodes reaching only right nodes 0..2 of 40: the
  # subgraph is K_{3,3} (right degree 3, not 9/40), so it qualifies with gap 2 sqrt(2).
  m = np.zeros((6, 40), bool)
  m[0:3, 0:3] = True
  # Degree-30 group reaching right nodes 0..31: right degree 90/32 < 3 -> skipped.
  m[3:6] = _circulant(40, 30)[:3]
  got = spectral.layer_metrics(m)
  assert got["reason"] is None
  assert got["num_regular_groups"] == 1
  np.testing.assert_allclose(got["iterative_mean_gap"], 2 * math.sqrt(2), atol=1e-9)


@pytest.mark.parametrize("solver", SOLVERS)
def test_weighted_gap_rank_one_weights(solver):
  # Full mask, |W| = |u| |v|^T has rank 1: weighted mu_0 = |u| |v|, mu_hat = 0.
  rng = np.random.default_rng(0)
  u = rng.standard_normal(5)
  v = rng.standard_normal(7)
  m = spectral.layer_metrics(np.ones((5, 7), bool), np.outer(u, v), solver=solver)
  norm = np.linalg.norm(u) * np.linalg.norm(v)
  np.testing.assert_allclose(m["weighted_mu_0"], norm, rtol=1e-10)
  np.testing.assert_allclose(m["weighted_mu_hat"], 0.0, atol=1e-7)
  np.testing.assert_allclose(m["weighted_spectral_gap"], norm, rtol=1e-7)


def test_weighted_gap_ignores_masked_out_weights_and_signs():
  # Two K_{3,4} blocks with weights -2 and 0.5 (|W| singular values 2 sqrt12,
  # 0.5 sqrt12) and large weights outside the mask that must be ignored.
  k34 = np.ones((3, 4), bool)
  mask = _block_diag(k34, k34)
  weights = np.full(mask.shape, 100.0)
  weights[:3, :4] = -2.0
  weights[3:, 4:] = 0.5
  m = spectral.layer_metrics(mask, weights)
  np.testing.assert_allclose(m["weighted_mu_0"], 2 * math.sqrt(12), rtol=1e-10)
  np.testing.assert_allclose(m["weighted_mu_hat"], 0.5 * math.sqrt(12), rtol=1e-10)
  np.testing.assert_allclose(m["weighted_spectral_gap"], 1.5 * math.sqrt(12), rtol=1e-10)
  # Topology metrics do not depend on the weights.
  np.testing.assert_allclose(m["mu_hat"], math.sqrt(12), rtol=1e-10)


# --------------------------------------------------------------------------------------
# Agreement with the full adjacency spectrum, invariances, solvers.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_eigvalsh_on_small_random_graphs(seed, solver):
  rng = np.random.default_rng(seed)
  mask = _random_mask(rng, (24, 37), 0.3)
  mask[5] = False  # an isolated left node, dropped
  mask[:, 11] = False  # an isolated right node, dropped
  weights = rng.standard_normal(mask.shape)
  got = spectral.layer_metrics(mask, weights, solver=solver)
  mu_0, mu_hat = _adjacency_top(mask)
  np.testing.assert_allclose([got["mu_0"], got["mu_hat"]], [mu_0, mu_hat], rtol=1e-9)
  w_mu_0, w_mu_hat = _adjacency_top(np.abs(weights) * mask)
  np.testing.assert_allclose(got["weighted_mu_0"], w_mu_0, rtol=1e-9)
  np.testing.assert_allclose(got["weighted_mu_hat"], w_mu_hat, rtol=1e-9)
  assert (got["num_left"], got["num_right"]) == (23, 36)
  assert got["avg_left_degree"] == mask.sum() / 23
  assert got["avg_right_degree"] == mask.sum() / 36


def test_sparse_solver_on_medium_graph_matches_dense_and_is_deterministic():
  rng = np.random.default_rng(3)
  mask = _random_mask(rng, (150, 260), 0.06)
  weights = rng.standard_normal(mask.shape)
  sparse = spectral.layer_metrics(mask, weights, solver="sparse")
  dense = spectral.layer_metrics(mask, weights, solver="dense")
  mu_0, mu_hat = _adjacency_top(mask)
  np.testing.assert_allclose([sparse["mu_0"], sparse["mu_hat"]], [mu_0, mu_hat], rtol=1e-9)
  for key in spectral.SUMMARY_KEYS:
    np.testing.assert_allclose(sparse[key], dense[key], rtol=1e-9, err_msg=key)
  # Fixed ARPACK start vector: bit-for-bit identical on a second call.
  assert spectral.layer_metrics(mask, weights, solver="sparse") == sparse


def test_invariant_to_permuting_rows_and_columns():
  rng = np.random.default_rng(4)
  mask = _random_mask(rng, (120, 20), 0.5)
  weights = rng.standard_normal(mask.shape)
  rows, cols = rng.permutation(120), rng.permutation(20)
  base = spectral.layer_metrics(mask, weights)
  permuted = spectral.layer_metrics(mask[rows][:, cols], weights[rows][:, cols])
  assert base["num_regular_groups"] == permuted["num_regular_groups"] > 0
  for key in spectral.SUMMARY_KEYS:
    np.testing.assert_allclose(permuted[key], base[key], rtol=1e-10, err_msg=key)


def test_conv_masks_unroll_to_the_equivalent_2d_mask():
  rng = np.random.default_rng(5)
  conv = _random_mask(rng, (3, 3, 4, 10), 0.3)
  weights = rng.standard_normal(conv.shape)
  flat = spectral.layer_metrics(conv.reshape(36, 10), weights.reshape(36, 10))
  got = spectral.layer_metrics(conv, weights)
  assert got == flat
  assert (got["num_left"], got["num_right"]) == (36, 10)
  # PyTorch layout (C_out, C_in, kh, kw) of the same kernel gives the same graph.
  torch_layout = spectral.layer_metrics(
      conv.transpose(3, 2, 0, 1), weights.transpose(3, 2, 0, 1), layout="torch")
  for key in spectral.SUMMARY_KEYS:
    np.testing.assert_allclose(torch_layout[key], flat[key], rtol=1e-10, err_msg=key)
  # PyTorch dense layout (D_out, D_in): the transposed kernel, same left/right sides.
  dense = _random_mask(rng, (40, 12), 0.4)
  expected = spectral.layer_metrics(dense)
  assert spectral.layer_metrics(dense.T, layout="torch") == expected
  assert expected["avg_left_degree"] != spectral.layer_metrics(dense.T)["avg_left_degree"]
  # 1-D conv (k, C_in, C_out).
  conv1d = _random_mask(rng, (3, 5, 12), 0.4)
  assert spectral.layer_metrics(conv1d) == spectral.layer_metrics(conv1d.reshape(15, 12))


def test_accepts_jax_and_zero_one_masks():
  rng = np.random.default_rng(6)
  mask = _random_mask(rng, (20, 16), 0.4)
  weights = rng.standard_normal(mask.shape).astype(np.float32)
  expected = spectral.layer_metrics(mask, weights)
  assert spectral.layer_metrics(jnp.asarray(mask), jnp.asarray(weights)) == expected
  assert spectral.layer_metrics(mask.astype(np.int8), weights) == expected
  assert spectral.layer_metrics(jnp.asarray(mask, jnp.float32), weights) == expected
  bf16 = jnp.asarray(weights, jnp.bfloat16)
  assert spectral.layer_metrics(mask, bf16) == spectral.layer_metrics(
      mask, np.asarray(bf16.astype(jnp.float32)))


def test_nan_and_reason_when_degree_condition_fails():
  # Perfect matching plus a few edges: average degrees < 3.
  mask = np.eye(10, dtype=bool)
  mask[0, 1] = True
  m = spectral.layer_metrics(mask, np.ones(mask.shape))
  assert m["avg_left_degree"] == 1.1 and m["avg_right_degree"] == 1.1
  assert m["num_edges"] == 11
  assert "min_degree" in m["reason"] and "1.1" in m["reason"]
  for key in ("mu_0", "mu_hat", "ramanujan_gap", "iterative_mean_gap",
              "weighted_spectral_gap", "ramanujan_bound"):
    assert math.isnan(m[key]), key
  assert m["num_regular_groups"] == 0
  # The same graph passes with a lower threshold.
  assert spectral.layer_metrics(mask, min_degree=1.0)["reason"] is None
  # Only one side failing is enough: K_{2,8} has left degree 8 but right degree 2.
  m = spectral.layer_metrics(np.ones((2, 8), bool))
  assert m["avg_right_degree"] == 2 and math.isnan(m["ramanujan_gap"])
  assert "right 2" in m["reason"]
  empty = spectral.layer_metrics(np.zeros((4, 5), bool))
  assert empty["reason"] == "mask has no edges" and empty["num_edges"] == 0
  assert math.isnan(empty["avg_left_degree"]) and math.isnan(empty["mu_0"])


def test_bad_inputs_raise_value_errors():
  with pytest.raises(ValueError, match=r"\(7,\)"):
    spectral.layer_metrics(np.ones(7, bool))
  with pytest.raises(ValueError, match=r"\(4, 5\).*\(5, 4\)"):
    spectral.layer_metrics(np.ones((5, 4), bool), np.ones((4, 5)))
  for bad in (0, -1.0):
    with pytest.raises(ValueError, match=f"min_degree.*{bad}"):
      spectral.layer_metrics(np.ones((5, 4), bool), min_degree=bad)
  with pytest.raises(ValueError, match="0/1.*2"):
    spectral.layer_metrics(np.full((5, 4), 2))
  with pytest.raises(ValueError, match="layout.*'oihw'"):
    spectral.layer_metrics(np.ones((5, 4), bool), layout="oihw")
  with pytest.raises(ValueError, match="solver.*'eig'"):
    spectral.layer_metrics(np.ones((5, 4), bool), solver="eig")


# --------------------------------------------------------------------------------------
# Models, logger, plot.
# --------------------------------------------------------------------------------------


def _toy_tree(rng):
  masks = {
      "conv": {"kernel": _random_mask(rng, (3, 3, 4, 8), 0.4), "bias": np.ones(8, bool)},
      "blocks": [
          {"kernel": _random_mask(rng, (16, 12), 0.5)},
          {"kernel": _random_mask(rng, (12, 12), 0.1)},  # fails the degree condition
      ],
      "head": {"kernel": np.ones((12, 3), bool)},  # dense: all ones, skipped
  }
  params = jax.tree.map(lambda m: rng.standard_normal(m.shape).astype(np.float32), masks)
  return params, masks


def test_model_metrics_on_a_dict_of_masks():
  params, masks = _toy_tree(np.random.default_rng(7))
  got = spectral.model_metrics(params, masks)
  paths = ["conv/kernel", "blocks/0/kernel", "blocks/1/kernel"]
  assert sorted(got["layers"]) == sorted(paths)
  parts = {"conv/kernel": ("conv",), "blocks/0/kernel": ("blocks", 0),
           "blocks/1/kernel": ("blocks", 1)}
  for path, keys in parts.items():
    mask, weights = masks, params
    for k in keys + ("kernel",):
      mask, weights = mask[k], weights[k]
    assert got["layers"][path] == spectral.layer_metrics(mask, weights)
  assert got["layers"]["blocks/1/kernel"]["reason"] is not None
  summary = got["summary"]
  assert summary["num_layers"] == 3 and summary["num_valid"] == 2
  for key in spectral.SUMMARY_KEYS:
    values = [got["layers"][p][key] for p in paths]
    finite = [v for v in values if not math.isnan(v)]
    np.testing.assert_allclose(summary[key], np.mean(finite), rtol=1e-12, err_msg=key)
  # Topology only.
  topo = spectral.model_metrics(None, masks)
  assert topo["summary"]["num_layers"] == 3
  assert math.isnan(topo["summary"]["weighted_spectral_gap"])
  assert topo["summary"]["ramanujan_gap"] == summary["ramanujan_gap"]


def test_model_metrics_on_nnx_state():
  class Net(nnx.Module):

    def __init__(self, rngs):
      self.conv = nnx.Conv(4, 6, kernel_size=(3, 3), rngs=rngs)
      self.lin = nnx.Linear(16, 12, rngs=rngs)

  state = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
  key = jax.random.key(1)
  masks = jax.tree.map(lambda p: jax.random.bernoulli(key, 0.5, p.shape), state)
  got = spectral.model_metrics(state, masks)
  assert sorted(got["layers"]) == ["conv/kernel", "lin/kernel"]
  np.testing.assert_array_equal(
      got["layers"]["lin/kernel"]["num_edges"], int(np.asarray(masks["lin"]["kernel"][...]).sum()))
  assert got["layers"]["conv/kernel"] == spectral.layer_metrics(
      masks["conv"]["kernel"][...], state["conv"]["kernel"][...])


def test_model_metrics_errors_name_the_path():
  params, masks = _toy_tree(np.random.default_rng(8))
  del params["conv"]["kernel"]
  with pytest.raises(ValueError, match="'conv/kernel'"):
    spectral.model_metrics(params, masks)
  params, masks = _toy_tree(np.random.default_rng(8))
  params["blocks"][0]["kernel"] = np.ones((3, 3))
  with pytest.raises(ValueError, match=r"'blocks/0/kernel'.*\(3, 3\)"):
    spectral.model_metrics(params, masks)


def test_multi_axis_output_kernels_unroll_to_their_2d_graph():
  # A DenseGeneral kernel (D, heads, head_dim) is the graph D x (heads * head_dim).
  rng = np.random.default_rng(12)
  mask = rng.random((16, 4, 8)) < 0.4
  weights = rng.normal(size=(16, 4, 8))
  got = spectral.layer_metrics(mask, weights, output_axes=2)
  want = spectral.layer_metrics(mask.reshape(16, 32), weights.reshape(16, 32))
  assert (got["num_left"], got["num_right"]) == (16, 32)
  assert np.isfinite(got["ramanujan_gap"]) and np.isfinite(got["weighted_spectral_gap"])
  for key in ("mu_0", "mu_hat", "ramanujan_gap", "iterative_mean_gap", "weighted_spectral_gap"):
    np.testing.assert_equal(got[key], want[key], err_msg=key)
  # Read with one output axis it is another graph (64 x 8): the default differs.
  assert spectral.layer_metrics(mask)["num_right"] == 8
  # model_metrics reads attention's query/key/value kernels with two output axes
  # by default, every other kernel (the output projection too) with one.
  out_mask = rng.random((4, 8, 16)) < 0.4
  masks = {"attn": {"query": {"kernel": mask}, "out": {"kernel": out_mask}}}
  layers = spectral.model_metrics(None, masks)["layers"]
  assert layers["attn/query/kernel"]["num_right"] == 32
  assert layers["attn/out/kernel"]["num_right"] == 16
  assert spectral.model_metrics(None, masks, output_axes={})["layers"]["attn/query/kernel"]["num_right"] == 8
  with pytest.raises(ValueError, match=r"output_axes must be an int in \[1, 2\]"):
    spectral.layer_metrics(mask, output_axes=3)
  with pytest.raises(ValueError, match="output_axes: invalid regex"):
    spectral.model_metrics(None, masks, output_axes={"(": 2})


def test_spectral_logger_appends_jsonl(tmp_path):
  params, masks = _toy_tree(np.random.default_rng(9))
  path = tmp_path / "logs" / "metrics.jsonl"
  logger = spectral.SpectralLogger(2, path)
  returned = [logger(step, params, masks) for step in range(5)]
  assert [r is None for r in returned] == [False, True, False, True, False]
  lines = [json.loads(line) for line in path.read_text().splitlines()]
  assert [line["step"] for line in lines] == [0, 2, 4]
  assert {line["split"] for line in lines} == {"spectral"}  # the training loop's format
  summary = spectral.model_metrics(params, masks)["summary"]
  assert returned[0] == summary
  for key, value in summary.items():
    assert lines[0][key] == pytest.approx(value), key
  # NaN is written as JSON null.
  empty = {"w": np.zeros((6, 6), bool)}
  spectral.SpectralLogger(1, path)(jnp.asarray(7), {"w": np.ones((6, 6))}, empty)
  last = json.loads(path.read_text().splitlines()[-1])
  assert last["step"] == 7 and last["ramanujan_gap"] is None
  assert last["num_layers"] == 1 and last["num_valid"] == 0
  with pytest.raises(ValueError, match="every.*0"):
    spectral.SpectralLogger(0, path)


def test_trajectory_plot_writes_png(tmp_path):
  runs = {
      "rigl": [{"step": s, "ramanujan_gap": 0.1 * s - 0.3, "weighted_spectral_gap": 2.0 + s}
               for s in (0, 1, 2, 3)],
      "static": [{"step": 0, "spectral/ramanujan_gap": 0.2,
                  "spectral/weighted_spectral_gap": None},
                 {"step": 1, "spectral/ramanujan_gap": 0.25,
                  "spectral/weighted_spectral_gap": 1.5},
                 {"step": 2, "spectral/ramanujan_gap": 0.3,
                  "spectral/weighted_spectral_gap": 1.4}],
      "collapsed": [{"step": 0, "ramanujan_gap": math.nan, "weighted_spectral_gap": 1.0}],
  }
  out = spectral.trajectory_plot(runs, tmp_path / "plots" / "traj.png")
  data = out.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
  with pytest.raises(ValueError, match="empty"):
    spectral.trajectory_plot({}, tmp_path / "x.png")
  with pytest.raises(ValueError, match="step"):
    spectral.trajectory_plot({"r": [{"ramanujan_gap": 0.0}]}, tmp_path / "x.png")
