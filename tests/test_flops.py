"""MAC counting from the jaxpr, sparse MACs, training FLOPs and the CLI."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sift_jax import flops, models
from sift_jax.masks import tree_paths


class Mixed(nn.Module):
  """Every kind of product the counter must see."""

  @nn.compact
  def __call__(self, x):  # x: (B, 6, 6, 4)
    y = nn.Conv(8, (3, 3), strides=2, padding=((1, 1), (1, 1)), name="conv")(x)  # -> (B, 3, 3, 8)
    y = nn.Conv(8, (3, 3), feature_group_count=8, name="depthwise")(y)  # (B, 3, 3, 8)
    t = y.reshape(y.shape[0], 9, 8)
    q = nn.DenseGeneral((2, 4), name="q")(t)  # (B, 9, 2, 4)
    k = nn.DenseGeneral((2, 4), name="k")(t)
    att = jnp.einsum("bqhd,bkhd->bhqk", q, k)  # activation x activation
    w = self.param("w", nn.initializers.ones, (8, 5))
    z = t @ (w.T.astype(jnp.bfloat16).astype(jnp.float32)).T  # a weight through transpose/casts
    return att.sum() + z.sum()


def test_counts_and_attribution_of_every_product():
  x = jax.ShapeDtypeStruct((1, 6, 6, 4), jnp.float32)
  v = jax.eval_shape(Mixed().init, jax.random.key(0), x)
  rows = {r.name: r for r in flops.count_macs(Mixed(), v, x).rows}
  assert rows["conv/kernel"].macs == 3 * 3 * 8 * (3 * 3 * 4)
  assert rows["depthwise/kernel"].macs == 3 * 3 * 8 * (3 * 3 * 1)  # feature groups
  assert rows["q/kernel"].macs == rows["k/kernel"].macs == 9 * 8 * 8
  assert rows["w"].macs == 9 * 8 * 5 and rows["w"].param == "w"
  [act] = [r for r in rows.values() if r.param is None]
  assert act.name.startswith("activations:") and act.macs == 2 * 9 * 9 * 4
  assert flops.count_macs(Mixed(), v, x).total == sum(r.macs for r in rows.values())
  # Batch scales every row.
  x4 = jax.ShapeDtypeStruct((4, 6, 6, 4), jnp.float32)
  assert flops.count_macs(Mixed(), v, x4).total == 4 * flops.count_macs(Mixed(), v, x).total


class Lifted(nn.Module):
  """Parameters created inside lifted transforms (scan over layers, remat, jit)."""

  @nn.compact
  def __call__(self, x):
    class Layer(nn.Module):
      @nn.compact
      def __call__(self, h, _):
        return nn.relu(nn.Dense(8, name="fc")(h)), None

    scan = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    x, _ = scan(name="layers")(x, None)
    x = nn.remat(nn.Dense)(4, name="r")(x)
    return nn.jit(nn.Dense)(2, name="j")(x)


def test_lifted_transforms_are_counted_by_both_paths():
  x = jax.ShapeDtypeStruct((1, 8), jnp.float32)
  expected = {"layers/fc/kernel": 3 * 8 * 8, "r/kernel": 8 * 4, "j/kernel": 4 * 2}
  trace = flops.trace_macs(Lifted(), x)
  assert trace.macs.by_param() == expected
  assert flops.count_macs(Lifted(), trace.variables, x).by_param() == expected
  assert trace.output.shape == (1, 2)


@pytest.mark.parametrize("name,family", [("resnet18_cifar", "sparse_parallel"),
                                         ("mobilenet_v2", "dense"), ("gpt_tiny", "sparse_doped")])
def test_init_trace_equals_apply_trace(name, family):
  spec = models.get_model(name, family=family, sparsity=0.75)
  via_apply = flops.count_macs(spec.module, spec.abstract_variables(), spec.example_input(),
                               train=False)
  assert sorted(via_apply.rows) == sorted(spec.mac_count().rows)


def test_report_with_densities_equals_report_with_masks():
  spec = models.get_model("mlp_mnist1d", family="sparse_parallel", sparsity=0.75)
  params = spec.abstract_variables()["params"]
  densities = spec.layer_densities(params)
  rng = np.random.default_rng(0)
  masks = {}
  for path, p, d in zip(tree_paths.leaf_paths(params), jax.tree.leaves(params),
                        jax.tree.leaves(densities)):
    n = int(np.prod(p.shape))
    flat = np.zeros(n, bool)
    flat[rng.permutation(n)[:int(np.floor(d * n + 0.5))]] = True
    masks[path] = flat.reshape(p.shape)
  masks = jax.tree.unflatten(jax.tree.structure(params), [masks[p] for p in tree_paths.leaf_paths(params)])
  by_density = flops.model_report(spec)
  by_mask = flops.model_report(spec, masks=masks)
  assert by_density.sparse_macs == pytest.approx(by_mask.sparse_macs, rel=1e-12)
  assert by_density.nonzero_params == by_mask.nonzero_params == sum(int(m.sum()) for m in jax.tree.leaves(masks))
  assert by_density.params == sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  assert sum(r.macs for r in by_density.layers) == by_density.dense_macs
  # stem and head: dense; the four 256x256 branches of each hidden layer at density 1/4.
  rows = {r.name: r for r in by_density.layers}
  assert rows["stem/kernel"].density == 1.0 and rows["head/kernel"].density == 1.0
  assert rows["fc_0/branch_3/kernel"].density == pytest.approx(0.25)
  assert by_density.dense_macs == 40 * 256 + 2 * 4 * 256 * 256 + 256 * 10


def test_training_flops():
  f_s, f_d = 1.0, 10.0
  dense = flops.training_flops(f_s, f_d, method="dense", total_steps=1000, batch_size=2)
  assert dense.per_step == 30.0 and dense.total == 30.0 * 2 * 1000
  for method in ("static", "set"):
    run = flops.training_flops(f_s, f_d, method=method, total_steps=1000, batch_size=2)
    assert run.per_step == run.per_step_update_window == 3.0 and run.total == 6000.0
  rigl = flops.training_flops(f_s, f_d, method="rigl", total_steps=1000, batch_size=2,
                              update_every=100, end_fraction=0.75)
  window = (3 * 1.0 * 100 + 2 * 1.0 + 10.0) / 101
  assert rigl.per_step_update_window == pytest.approx(window)
  assert rigl.update_window_steps == 750.0
  assert rigl.total == pytest.approx(2 * (750 * window + 250 * 3.0))
  with pytest.raises(ValueError, match="method must be one of.*'rigl'.*got 'prune'"):
    flops.training_flops(1, 1, method="prune", total_steps=10)
  with pytest.raises(ValueError, match="total_steps must be a positive integer, got 0"):
    flops.training_flops(1, 1, method="rigl", total_steps=0)
  with pytest.raises(ValueError, match="end_fraction must be in"):
    flops.training_flops(1, 1, method="rigl", total_steps=10, end_fraction=1.5)


def test_cli_json(capsys):
  rc = flops.main(["--model", "mlp_mnist1d", "--family", "sparse_wide", "--sparsity", "0.9", "--json"])
  assert rc == 0
  out = json.loads(capsys.readouterr().out)
  for key in ("base_dense_macs", "dense_macs", "sparse_macs", "iso_flop_ratio", "params",
              "nonzero_params", "nominal_sparsity", "solved_sparsity", "layers"):
    assert key in out, key
  assert out["base_dense_macs"] == 40 * 256 + 2 * 256 * 256 + 256 * 10
  assert out["iso_flop_ratio"] == pytest.approx(out["sparse_macs"] / out["base_dense_macs"])
  assert abs(out["iso_flop_ratio"] - 1.0) < 0.005
  # Sparse Wide masks the MLP's widened stem too (its input width stays 40): the masks then
  # need a little less sparsity than the nominal one (before: > 0.9 with a dense stem).
  assert out["nominal_sparsity"] == 0.9 and 0.89 < out["solved_sparsity"] < 0.9
  masked = sum(row["macs"] for row in out["layers"] if row["name"] != "head/kernel")
  head = sum(row["macs"] for row in out["layers"] if row["name"] == "head/kernel")
  assert (1 - out["solved_sparsity"]) * masked + head == pytest.approx(out["base_dense_macs"],
                                                                       rel=5e-3)
  assert sum(row["macs"] for row in out["layers"]) == out["dense_macs"]
  assert out["sparse_flops"] == 2 * out["sparse_macs"]
  assert [row["name"] for row in out["layers"]][:2] == ["stem/kernel", "fc_0/kernel"]


def test_cli_table_and_errors(capsys):
  assert flops.main(["--model", "cnn_mnist1d", "--family", "sparse_doped", "--sparsity", "0.5"]) == 0
  text = capsys.readouterr().out
  assert "conv_0/S/kernel" in text and "per example (batch 1)" in text and "FLOPs = 2 x MACs" in text
  assert "solved sparsity" in text
  assert flops.main(["--model", "resnet99", "--family", "dense"]) == 2
  assert "unknown model 'resnet99'" in capsys.readouterr().err
  assert flops.main(["--model", "gpt_tiny", "--family", "sparse_huge", "--sparsity", "0.5"]) == 2
  assert "unknown Sparse-IFT family 'sparse_huge'" in capsys.readouterr().err
  assert flops.main(["--model", "gpt_tiny", "--family", "sparse_wide", "--sparsity", "1.5"]) == 2
  assert "got 1.5" in capsys.readouterr().err


def test_cli_module_entry_point():
  proc = subprocess.run([sys.executable, "-m", "sift_jax.flops", "--model", "resnet18_cifar",
                         "--family", "dense", "--json"], capture_output=True, text=True, check=True)
  out = json.loads(proc.stdout)
  assert out["dense_macs"] == out["base_dense_macs"] == 555_468_800
  assert out["params"] == 11_220_132
