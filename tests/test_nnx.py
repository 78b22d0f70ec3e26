"""Flax NNX models: transform, FLOP counting, RigL under nnx.Optimizer, the registry and the loop."""

import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sift_jax
from sift_jax import flops, spectral, training
from sift_jax.training import sweep

MEMBERS = ("sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped")
POLICY = sift_jax.SparsityPolicy(dense=("^stem/", "^head/"))
X = jax.random.normal(jax.random.key(1), (4, 12))
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                      "configs", "mnist1d_mlp_nnx.py")


class MLP(nnx.Module):

  def __init__(self, *, rngs):
    self.stem = nnx.Linear(12, 16, rngs=rngs)
    self.fc = nnx.Linear(16, 16, rngs=rngs)
    self.norm = nnx.LayerNorm(16, rngs=rngs)
    self.head = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem(x))
    x = nnx.relu(self.norm(self.fc(x)))
    return self.head(x)


class ConvNet(nnx.Module):

  def __init__(self, *, rngs):
    self.stem = nnx.Conv(2, 8, (3,), rngs=rngs)
    self.conv = nnx.Conv(8, 8, (3,), rngs=rngs)
    self.bn = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem(x))
    x = nnx.relu(self.bn(self.conv(x)))
    return self.head(x.mean(axis=1))


class Custom(nnx.Module):

  def __init__(self, *, rngs):
    self.fc = nnx.Linear(4, 4, rngs=rngs)
    self.w = nnx.Param(jnp.ones((4, 4)))

  def __call__(self, x):
    return self.fc(x) @ self.w


@pytest.fixture(scope="module")
def mlp():
  return MLP(rngs=nnx.Rngs(0))


def _sparse_macs(model, x, sparsity):
  """Forward MACs of an NNX model with the policy's uniform densities at ``sparsity``."""
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  densities = sift_jax.layer_densities(params, sparsity, policy=model.sparsity_policy())
  by_path = dict(zip(sift_jax.masks.tree_paths.leaf_paths(densities), jax.tree.leaves(densities)))
  return sum(r.macs * float(by_path.get(r.param, 1.0)) for r in flops.count_macs(model, x).rows)


def test_as_linen_keeps_paths_values_and_outputs(mlp):
  linen = sift_jax.transformations.as_linen(mlp)
  variables = linen.init(jax.random.key(5), X)
  assert sorted(variables["params"]) == ["fc", "head", "norm", "stem"]
  np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], mlp.fc.kernel[...])
  np.testing.assert_allclose(linen.apply(variables, X), mlp(X), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", MEMBERS)
def test_transform_nnx_mlp_is_an_nnx_module_with_the_outputs_and_iso_flop(mlp, family):
  model = sift_jax.transform(mlp, family=family, sparsity=0.75, policy=POLICY)
  assert isinstance(model, nnx.Module)
  assert isinstance(model, sift_jax.transformations.TransformedNnxModel)
  model.lazy_init(X)
  assert model(X).shape == mlp(X).shape == (4, 3)
  assert model.base_model() is mlp
  x1 = X[:1]
  base = flops.count_macs(mlp, x1).total
  assert base == 12 * 16 + 16 * 16 + 16 * 3
  sol = model.solve(x1)
  assert sol.base_dense_macs == base
  assert sol.within_tolerance
  assert _sparse_macs(model, x1, sol.solved_sparsity) == pytest.approx(base, rel=0.005)
  # The solve and the FLOP report from count_macs on the NNX model and its nnx.State agree.
  state = nnx.state(model, nnx.Param)
  macs = flops.count_macs(model, x1)
  method = sift_jax.transformations.get_member(family).solve_method(False)
  again = sift_jax.solve_sparsity(macs, state, model.sparsity_policy(), base_dense_macs=base,
                                  nominal_sparsity=0.75, method=method)
  assert again.solved_sparsity == sol.solved_sparsity
  densities = sift_jax.layer_densities(state, sol.solved_sparsity, policy=model.sparsity_policy())
  report = flops.flops_report(macs, state, densities=densities)
  assert report.sparse_macs == pytest.approx(_sparse_macs(model, x1, sol.solved_sparsity))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  if family == "sparse_wide":  # fc widened, the LayerNorm after it follows, head keeps 3 outputs
    assert params["fc"]["kernel"].shape[1] == params["norm"]["scale"].shape[0] == 32
    assert params["head"]["kernel"].shape == (32, 3)
  else:
    assert set(params["fc"]) - {"kernel", "bias"}  # replaced by the member's parts
    assert params["stem"]["kernel"].shape == (12, 16)


@pytest.mark.parametrize("family", MEMBERS)
def test_transform_nnx_conv_net(family):
  net = ConvNet(rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (2, 10, 2))
  model = sift_jax.transform(net, family=family, sparsity=0.75, policy=POLICY)
  model.lazy_init(x)
  assert model(x).shape == net(x).shape == (2, 3)
  sol = model.solve(x[:1])
  base = flops.count_macs(net, x[:1]).total
  assert base == 10 * (3 * 2 * 8 + 3 * 8 * 8) + 8 * 3
  assert _sparse_macs(model, x[:1], sol.solved_sparsity) == pytest.approx(base, rel=0.005)


class DropoutMLP(nnx.Module):

  def __init__(self, *, rngs):
    self.stem = nnx.Linear(12, 16, rngs=rngs)
    self.fc = nnx.Linear(16, 16, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(self.drop(nnx.relu(self.fc(nnx.relu(self.stem(x))))))


def test_transform_nnx_dropout_draws_from_the_dropout_stream():
  model = sift_jax.transform(DropoutMLP(rngs=nnx.Rngs(0)), family="sparse_parallel",
                             sparsity=0.5, policy=POLICY)
  model.lazy_init(X)
  a, b = model(X), model(X)  # the stream advances: new masks each call
  assert a.shape == (4, 3) and not np.allclose(a, b)
  key = jax.random.key(7)
  np.testing.assert_array_equal(model(X, rngs=nnx.Rngs(dropout=key)),
                                model(X, rngs=nnx.Rngs(dropout=key)))


def test_rigl_under_nnx_optimizer_keeps_masked_weights_zero_and_stats_are_plain(mlp):
  model = sift_jax.transform(mlp, family="sparse_factorized", sparsity=0.75, policy=POLICY)
  model.lazy_init(X)
  tx = sift_jax.rigl(optax.sgd(0.1), sparsity=0.75, policy=model.sparsity_policy(),
                     update_every=2, end_step=10)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  labels = jnp.arange(4) % 3

  @nnx.jit
  def step(model, opt):
    loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(X), labels).mean()
    opt.update(model, nnx.grad(loss)(model))

  for _ in range(5):
    step(model, opt)
  stats = sift_jax.sparse_stats(opt.opt_state)
  for name, value in stats.items():
    assert type(value) is type(jnp.zeros(())), (name, type(value))
  assert int(stats["num_updates"]) == 3  # mask updates at steps 0, 2 and 4
  masks = sift_jax.get_masks(opt.opt_state)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  u = params["fc"]["U"]["kernel"]
  mask = masks["fc"]["U"]["kernel"]
  assert int(jnp.sum(mask)) == round(0.25 * u.size)  # exact count at s = 0.75
  assert float(jnp.max(jnp.abs(jnp.where(mask, 0.0, u)))) == 0.0
  assert bool(jnp.all(masks["stem"]["kernel"]))  # dense by the policy
  n_sparse = sum(int(m.size) for m in jax.tree.leaves(masks) if not bool(jnp.all(m)))
  nnz = sum(int(jnp.sum(m)) for m in jax.tree.leaves(masks))
  size = sum(int(m.size) for m in jax.tree.leaves(masks))
  assert float(stats["density"]) == pytest.approx(nnz / size)
  assert n_sparse == 2 * 16 * 32  # fc's U (16 x 32) and V (32 x 16) at rank 32
  assert float(stats["sparse_density"]) == 0.25


def test_registry_mlp_nnx_matches_the_linen_mlp():
  for family in ("dense",) + MEMBERS:
    s = 0.0 if family == "dense" else 0.75
    nnx_spec = sift_jax.get_model("mlp_nnx", family=family, sparsity=s, hidden=(16, 16, 16))
    linen_spec = sift_jax.get_model("mlp_mnist1d", family=family, sparsity=s, hidden=(16, 16, 16))
    assert nnx_spec.base_dense_macs == linen_spec.base_dense_macs == 40 * 16 + 2 * 16 * 16 + 160
    assert nnx_spec.solved_sparsity == pytest.approx(linen_spec.solved_sparsity)
    assert sorted(nnx_spec.abstract_variables()["params"]) == ["fc_0", "fc_1", "head", "stem"]


def test_training_loop_trains_mlp_nnx_from_its_config(tmp_path):
  config = sweep.load_config_module(CONFIG).get_config()
  assert config.model.name == "mlp_nnx"
  config = training.apply_overrides(config, {
      "model.kwargs.hidden": [16, 16, 16], "model.family": "sparse_factorized",
      "model.sparsity": 0.75, "training.num_steps": 6, "training.batch_size": 32,
      "training.eval_batch_size": 250, "training.log_every_steps": 3,
      "training.checkpoint_every_steps": 3, "training.progress_bar": False, "mesh.data": 1,
      "sparse.update_every": 2})
  store = {}

  def grab(step, state):
    if step == 6:
      store["state"] = jax.device_get(state)

  summary = training.train_and_evaluate(config, str(tmp_path), hooks=[grab])
  assert summary["steps"] == 6 and not summary["preempted"]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["6"]
  state = store["state"]
  masks = sift_jax.get_masks(state.opt_state)
  kernel = state.params["fc_0"]["U"]["kernel"]
  mask = masks["fc_0"]["U"]["kernel"]
  assert int(np.sum(mask)) == round(0.25 * kernel.size)
  assert float(np.max(np.abs(np.where(mask, 0.0, kernel)))) == 0.0


def test_bad_arguments_raise():
  with pytest.raises(TypeError, match="expects a flax.nnx Module or a flax.linen Module, got function"):
    sift_jax.transform(lambda x: x, family="sparse_wide", sparsity=0.5)
  with pytest.raises(TypeError, match="count_macs.*got function"):
    flops.count_macs(lambda x: x, X)
  with pytest.raises(ValueError, match=r"Param at 'w'"):
    sift_jax.transform(Custom(rngs=nnx.Rngs(0)), family="sparse_wide", sparsity=0.5)
  with pytest.raises(ValueError, match="lazy_init"):
    flops.count_macs(sift_jax.transform(MLP(rngs=nnx.Rngs(0)), family="sparse_wide",
                                        sparsity=0.5), X)
  params = {"fc": {"kernel": jnp.arange(12.0).reshape(3, 4) + 1.0}}
  masks = {"fc": {"kernel": jnp.arange(12).reshape(3, 4) % 2 == 0}}
  assert spectral.model_metrics(params, masks)["summary"]["num_layers"] == 1
  with pytest.raises(ValueError, match=r"masks leaf 'fc/kernel'.*model_metrics\(params, masks\)"):
    spectral.model_metrics(masks={"fc": {"kernel": params["fc"]["kernel"]}}, params=None)
  with pytest.raises(ValueError, match=r"params holds boolean leaves \['fc/kernel'\]"):
    spectral.model_metrics(masks, params)
  with pytest.raises(TypeError, match="masks must be a pytree of arrays.*got ndarray"):
    spectral.model_metrics(params, np.ones((3, 4), bool))
  with pytest.raises(TypeError, match="params must be a pytree of arrays.*got str"):
    spectral.model_metrics("params", masks)
