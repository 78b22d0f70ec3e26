"""Sharded training on 8 CPU devices equals training on one device."""

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

import sift_jax
from sift_jax import training
from sift_jax.data import get_dataset_info
from sift_jax.training import loop

STEPS = 24


def config_for(data, model, **overrides):
  base = {
      "model.name": "mlp_mnist1d", "model.kwargs.hidden": [32, 32, 32],
      "model.family": "sparse_factorized", "model.sparsity": 0.75, "sparse.method": "rigl",
      "sparse.update_every": 5, "training.num_steps": STEPS, "training.batch_size": 64,
      "training.eval_batch_size": 200, "training.log_every_steps": 8,
      "training.progress_bar": False, "mesh.data": data, "mesh.model": model,
      "optimizer.name": "adamw", "optimizer.learning_rate": 3e-3, "optimizer.weight_decay": 1e-4,
      # Shard hidden kernels over "model": columns of U / V (factorized fc layers) and the stem.
      "mesh.rules": ((r"fc_\d+/(U|V)/kernel$", (None, "model")), (r"^stem/kernel$", (None, "model"))),
  }
  base.update(overrides)
  return training.apply_overrides(training.default_config(), base)


def _run(config, workdir):
  store = {"losses": []}

  def hook(step, state):
    if step == STEPS:
      store["state"] = state
      store["sharding"] = jax.tree.map(lambda x: x.sharding, state)
      store["host"] = jax.device_get(state)

  summary = training.train_and_evaluate(config, str(workdir), hooks=[hook])
  store["summary"] = summary
  store["train"] = [r for r in training.read_metrics(str(workdir), "train")]
  return store


@pytest.fixture(scope="module")
def single(tmp_path_factory):
  return _run(config_for(1, 1), tmp_path_factory.mktemp("single"))


@pytest.mark.parametrize("data,model", [(8, 1), (4, 2)])
def test_sharded_run_matches_single_device(single, data, model, tmp_path):
  run = _run(config_for(data, model), tmp_path)
  a, b = single["host"], run["host"]
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a.params)[0], jax.tree.leaves(b.params)):
    np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6, err_msg=sift_jax.path_str(path))
  for r1, r2 in zip(single["train"], run["train"]):
    assert r1["step"] == r2["step"]
    np.testing.assert_allclose(r1["loss"], r2["loss"], rtol=1e-5)
  np.testing.assert_allclose(single["summary"]["final_eval_loss"], run["summary"]["final_eval_loss"],
                             rtol=1e-5)
  # Masks: identical initial draw, exact per-leaf counts after RigL updates.
  masks_a, masks_b = sift_jax.get_masks(a.opt_state), sift_jax.get_masks(b.opt_state)
  ever = a.opt_state.stats.num_updates
  assert int(ever) == 4  # updates at steps 0, 5, 10, 15 (end = 0.75 * 24 = 18)
  for (path, ma), mb in zip(jax.tree_util.tree_flatten_with_path(masks_a)[0], jax.tree.leaves(masks_b)):
    assert ma.sum() == mb.sum(), sift_jax.path_str(path)
  counts = sift_jax.mask_stats(masks_b)["per_leaf"]
  solved = run["summary"]["solved_sparsity"]
  for path, c in counts.items():
    if path.startswith("fc_") and path.endswith("kernel"):
      assert int(c["nnz"]) == sift_jax.target_count(1 - solved, c["size"]), path
    else:
      assert int(c["nnz"]) == c["size"], path
  # Masked weights are exactly zero on every shard.
  for p, m in zip(jax.tree.leaves(b.params), jax.tree.leaves(masks_b)):
    assert np.all(p[~m] == 0)
  # The rules were applied: parameter, mask and moment leaves share the sharding.
  shard = run["sharding"]
  u = shard.params["fc_0"]["U"]["kernel"]
  assert u.spec == P(None, "model") and u.mesh.shape["model"] == model
  assert shard.opt_state.masks["fc_0"]["U"]["kernel"] == u
  assert shard.params["head"]["kernel"].spec == P()
  assert run["state"].params["fc_0"]["U"]["kernel"].sharding == u


def test_one_compiled_train_step_per_run_structure(tmp_path):
  loop.clear_compilation_cache()
  config = config_for(2, 1)
  info = get_dataset_info("mnist1d", split="train")
  kwargs = dict(mesh=loop._make_mesh(config), train_info=info, total_steps=STEPS,
                steps_per_epoch=info.batches_per_epoch(64))
  training.train_and_evaluate(config, str(tmp_path / "a"))
  funcs = training.build_run(config, **kwargs)
  # 24 steps with 4 mask updates: one compilation of the train step, one of init.
  assert funcs.train_step._cache_size() == 1
  assert funcs.init._cache_size() == 1
  # Another seed reuses the compiled functions.
  training.train_and_evaluate(training.apply_overrides(config, {"seed": 3}), str(tmp_path / "b"))
  assert training.build_run(config, **kwargs) is funcs
  assert funcs.train_step._cache_size() == 1 and funcs.init._cache_size() == 1
  # A different structure does not.
  other = training.apply_overrides(config, {"model.sparsity": 0.5})
  assert training.build_run(other, **kwargs) is not funcs
