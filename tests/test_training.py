"""Unit tests of sift_jax.training: config, optimizers, schedules, train/eval steps."""

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import optax
import pytest

import sift_jax
from sift_jax import training
from sift_jax.training import optimizers, state as state_lib, step as step_lib


class TinyMLP(nn.Module):
  width: int = 16
  num_classes: int = 5
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(self.width)(x)
    if self.batch_norm:
      x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x)
    return nn.Dense(self.num_classes)(x)


def _config(**overrides):
  return training.apply_overrides(training.default_config(), overrides)


def _batch(key, n=32, d=8, k=5):
  kx, ky = jax.random.split(key)
  return {"image": jax.random.normal(kx, (n, d)), "label": jax.random.randint(ky, (n,), 0, k)}


def _init(module, config, *, sparsity=0.0, total_steps=10, seed=0):
  def make_tx(s):
    return optimizers.make_optimizer(config, total_steps=total_steps, steps_per_epoch=5,
                                     sparsity=sparsity or None, seed=s)[0]
  init = state_lib.make_init_fn(module, make_tx, input_shape=(8,), input_dtype=jnp.float32)
  tx, sched = optimizers.make_optimizer(config, total_steps=total_steps, steps_per_epoch=5,
                                        sparsity=sparsity or None)
  return jax.jit(init)(np.int32(seed)), tx, sched


# ----------------------------------------------------------------------------- config

def test_default_config_validates_and_overrides_reject_unknown_keys():
  config = training.default_config()
  training.validate_config(config)
  with pytest.raises(ValueError, match="optimizer.lr"):
    training.apply_overrides(config, {"optimizer.lr": 0.1})
  with pytest.raises(ValueError, match="no section 'optimiser'"):
    training.apply_overrides(config, {"optimiser.learning_rate": 0.1})
  # Free-form sections accept new keys.
  out = training.apply_overrides(config, {"model.kwargs.width": 7, "dataset.options.seq_len": 9})
  assert out.model.kwargs.width == 7 and out.dataset.options.seq_len == 9
  # The original is not modified.
  assert "width" not in config.model.kwargs


def test_validate_config_names_unknown_keys_and_bad_values():
  config = training.default_config()
  with config.unlocked():
    config.training.nmu_steps = 3
  with pytest.raises(ValueError, match=r"unknown config key\(s\) \['training.nmu_steps'\]"):
    training.validate_config(config)
  for key, value, match in [
      ("optimizer.name", "adam", "optimizer.name='adam'"),
      ("model.sparsity", 1.0, "model.sparsity=1.0"),
      ("training.batch_size", 0, "training.batch_size=0"),
      ("training.compute_dtype", "float16", "training.compute_dtype"),
      ("model.family", "sparse_wide", "needs model.sparsity > 0"),
      ("sparse.method", "snip", "sparse.method='snip'"),
  ]:
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
      training.validate_config(_config(**{key: value}))
  with pytest.raises(ValueError, match="divisible by training.grad_accum_steps=3"):
    training.validate_config(_config(**{"training.grad_accum_steps": 3}))


def test_check_key_accepts_free_sections_and_names_known_keys():
  training.config.check_key("training.num_steps")
  training.config.check_key("model.kwargs.anything_new")
  training.config.check_key("dataset.options.num_samples")
  training.config.check_key("model.kwargs")
  with pytest.raises(ValueError, match=r"unknown config key 'training.nmu_steps'; known keys of "
                                       r"training: \['batch_size', "):
    training.config.check_key("training.nmu_steps")
  with pytest.raises(ValueError, match=r"no section 'model.kwarg'; known keys of model: \['family', "):
    training.config.check_key("model.kwarg.hidden")
  with pytest.raises(ValueError, match=r"'seed' is not a section"):
    training.config.check_key("seed.value")


def test_resume_differences_ignore_only_operational_keys():
  base = training.config.resume_config(_config(**{"model.kwargs.hidden": (8, 8)}))
  assert base["model.kwargs.hidden"] == [8, 8] and base["mesh.rules"] == []
  same = training.config.resume_config(_config(**{
      "model.kwargs.hidden": [8, 8], "training.log_every_steps": 7, "training.eval_every_steps": 3,
      "training.checkpoint_every_steps": 9, "training.keep_checkpoints": 1, "training.progress_bar": False,
      "training.spectral_every_steps": 5, "training.eval_batch_size": 64, "dataset.data_dir": "/elsewhere",
      "dataset.options.num_threads": 4, "mesh.data": 2}))
  assert training.config.resume_differences(base, same) == []
  other = training.config.resume_config(_config(**{
      "model.kwargs.hidden": (8, 9), "optimizer.momentum": 0.5, "training.num_epochs": 2.0,
      "dataset.options.num_samples": 100}))
  missing = training.config.MISSING
  assert training.config.resume_differences(base, other) == [
      ("dataset.options.num_samples", missing, 100), ("model.kwargs.hidden", [8, 8], [8, 9]),
      ("optimizer.momentum", 0.9, 0.5), ("training.num_epochs", 1.0, 2.0)]


def test_batch_blocks_of_processes():
  from sift_jax.training import loop
  # Data-parallel over processes: each process holds its own contiguous block.
  assert loop._batch_block([(0, 4), (4, 8)], 16) == (0, 2)
  assert loop._batch_block([(8, 12), (12, 16)], 16) == (1, 2)
  # A model axis across processes: replicas hold (and so read) the same rows.
  assert loop._batch_block([(8, 12), (8, 12)], 16) == (2, 4)
  assert loop._batch_block([(0, 16)] * 4, 16) == (0, 1)
  with pytest.raises(ValueError, match=r"batch rows \[\(0, 4\), \(8, 12\)\] .* one contiguous"):
    loop._batch_block([(0, 4), (8, 12)], 16)
  with pytest.raises(ValueError, match="contiguous, equal block"):
    loop._batch_block([(4, 10)], 16)
  # One process holds every row of any mesh of its devices.
  for data, model in ((8, 1), (4, 2), (1, 8)):
    mesh = sift_jax.sharding.make_mesh(data, model)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    assert loop._process_block(sharding, 64) == (0, 1)


# ----------------------------------------------------------------------------- schedules

def test_schedules_golden_values():
  base = {"optimizer.learning_rate": 1.0}
  sched = training.make_schedule(_config(**base, **{"schedule.name": "constant"}), total_steps=100,
                                 steps_per_epoch=10)
  assert float(sched(77)) == 1.0
  sched = training.make_schedule(
      _config(**base, **{"schedule.name": "multistep", "schedule.boundaries_epochs": (2.0, 5.0),
                         "schedule.decay_factor": 0.2}), total_steps=100, steps_per_epoch=10)
  np.testing.assert_allclose([float(sched(s)) for s in (0, 19, 20, 49, 50, 99)],
                             [1, 1, 0.2, 0.2, 0.04, 0.04], rtol=1e-6)
  sched = training.make_schedule(
      _config(**base, **{"schedule.name": "step", "schedule.step_epochs": 3.0,
                         "schedule.decay_factor": 0.5}), total_steps=100, steps_per_epoch=10)
  np.testing.assert_allclose([float(sched(s)) for s in (0, 29, 30, 60)], [1, 1, 0.5, 0.25], rtol=1e-6)
  sched = training.make_schedule(_config(**base, **{"schedule.name": "cosine"}), total_steps=100,
                                 steps_per_epoch=10)
  np.testing.assert_allclose([float(sched(s)) for s in (0, 50, 100)], [1, 0.5, 0], atol=1e-6)
  sched = training.make_schedule(_config(**base, **{"schedule.name": "cosine",
                                                    "schedule.warmup_epochs": 1.0}),
                                 total_steps=110, steps_per_epoch=10)
  np.testing.assert_allclose([float(sched(s)) for s in (0, 5, 10, 60, 110)], [0, 0.5, 1, 0.5, 0],
                             atol=1e-6)
  with pytest.raises(ValueError, match="warmup_epochs=20"):
    training.make_schedule(_config(**{"schedule.warmup_epochs": 20.0}), total_steps=100,
                           steps_per_epoch=5)


# ----------------------------------------------------------------------------- optimizers

def test_weight_decay_mask_excludes_matching_paths():
  params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones((2,))},
            "BatchNorm_0": {"scale": jnp.ones((2,))}}
  config = _config(**{"optimizer.weight_decay": 0.5, "optimizer.momentum": 0.0,
                      "optimizer.weight_decay_exclude": r"(bias|scale)$",
                      "schedule.name": "constant", "optimizer.learning_rate": 0.1})
  tx, _ = training.make_optimizer(config, total_steps=10, steps_per_epoch=10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates["Dense_0"]["kernel"], -0.05 * np.ones((3, 2)), rtol=1e-6)
  assert np.all(updates["Dense_0"]["bias"] == 0) and np.all(updates["BatchNorm_0"]["scale"] == 0)
  with pytest.raises(ValueError, match="not a valid regex"):
    training.weight_decay_mask("(bias")


@pytest.mark.parametrize("name", ["sgd", "nesterov", "adamw"])
def test_inner_optimizers_match_optax(name):
  params = {"w": jnp.arange(6.0).reshape(2, 3) / 7.0}
  grads = [{"w": jnp.sin(jnp.arange(6.0) + i).reshape(2, 3)} for i in range(3)]
  config = _config(**{"optimizer.name": name, "schedule.name": "constant",
                      "optimizer.learning_rate": 0.05, "optimizer.weight_decay": 0.01})
  tx, _ = training.make_optimizer(config, total_steps=10, steps_per_epoch=10)
  if name == "adamw":
    ref = optax.adamw(0.05, weight_decay=0.01)
  else:
    ref = optax.chain(optax.add_decayed_weights(0.01),
                      optax.sgd(0.05, momentum=0.9, nesterov=name == "nesterov"))
  p1, s1, p2, s2 = params, tx.init(params), params, ref.init(params)
  for g in grads:
    u1, s1 = tx.update(g, s1, p1)
    p1 = optax.apply_updates(p1, u1)
    u2, s2 = ref.update(g, s2, p2)
    p2 = optax.apply_updates(p2, u2)
  np.testing.assert_array_equal(p1["w"], p2["w"])


def test_sparse_wrapper_chosen_from_config():
  params = {"Dense_0": {"kernel": jnp.ones((10, 10)), "bias": jnp.ones((10,))}}
  for method, expect in (("rigl", True), ("static", True), ("set", True), ("none", False)):
    config = _config(**{"sparse.method": method, "model.sparsity": 0.7})
    tx, _ = training.make_optimizer(config, total_steps=10, steps_per_epoch=10, sparsity=0.75)
    state = tx.init(params)
    assert optimizers.tree_has_sparse_state(state) == expect
    if expect:
      masks = sift_jax.get_masks(state)
      # The solved sparsity (0.75) wins over the nominal one (0.7).
      assert int(masks["Dense_0"]["kernel"].sum()) == 25
      assert bool(masks["Dense_0"]["bias"].all())
  # A dense config (sparsity 0) never gets masks, whatever the method.
  tx, _ = training.make_optimizer(_config(), total_steps=10, steps_per_epoch=10)
  assert not optimizers.tree_has_sparse_state(tx.init(params))


# ----------------------------------------------------------------------------- steps

def test_cross_entropy_label_smoothing_golden():
  logits = jnp.array([[2.0, 0.0, -1.0]])
  labels = jnp.array([0])
  logp = jax.nn.log_softmax(logits[0])
  plain = -logp[0]
  smooth = -(0.9 + 0.1 / 3) * logp[0] - (0.1 / 3) * (logp[1] + logp[2])
  np.testing.assert_allclose(step_lib.cross_entropy(logits, labels), [plain], rtol=1e-6)
  np.testing.assert_allclose(step_lib.cross_entropy(logits, labels, label_smoothing=0.1), [smooth],
                             rtol=1e-6)


def test_grad_accumulation_equals_full_batch():
  module = TinyMLP()
  config = _config(**{"schedule.name": "constant"})
  state, tx, _ = _init(module, config)
  batch = _batch(jax.random.key(1))
  outs = {}
  for accum in (1, 4):
    step = jax.jit(step_lib.make_train_step(module, tx, input_key="image", target_key="label",
                                            grad_accum_steps=accum))
    outs[accum] = step(state, batch)
  (s1, m1), (s4, m4) = outs[1], outs[4]
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert int(s4.step) == 1


def test_grad_accumulation_threads_batch_stats():
  module = TinyMLP(batch_norm=True)
  config = _config(**{"schedule.name": "constant"})
  state, tx, _ = _init(module, config)
  batch = _batch(jax.random.key(2))
  step = jax.jit(step_lib.make_train_step(module, tx, input_key="image", target_key="label",
                                          grad_accum_steps=2))
  new_state, _ = step(state, batch)
  # Two momentum-0.99 updates of the running mean, from micro-batches of examples 0,2,4.. and 1,3,5..
  x = batch["image"]
  p = state.params
  h = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
  mean = np.zeros(16)
  for j in range(2):
    mean = 0.99 * mean + 0.01 * np.asarray(h[j::2].mean(0))
  np.testing.assert_allclose(new_state.model_state["batch_stats"]["BatchNorm_0"]["mean"], mean,
                             rtol=1e-5, atol=1e-7)


def test_bf16_compute_keeps_f32_params_and_tracks_f32_loss():
  module = TinyMLP(batch_norm=True)
  config = _config(**{"schedule.name": "constant"})
  state, tx, _ = _init(module, config)
  batch = _batch(jax.random.key(3))
  f32 = jax.jit(step_lib.make_train_step(module, tx, input_key="image", target_key="label"))
  bf16 = jax.jit(step_lib.make_train_step(module, tx, input_key="image", target_key="label",
                                          compute_dtype=jnp.bfloat16))
  s32, m32 = f32(state, batch)
  s16, m16 = bf16(state, batch)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16.params))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16.model_state))
  assert float(m16["loss"]) != float(m32["loss"])  # really computed in bf16
  np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=2e-2)
  for a, b in zip(jax.tree.leaves(s32.params), jax.tree.leaves(s16.params)):
    np.testing.assert_allclose(a, b, atol=5e-3)


def test_one_compiled_step_serves_mask_updates_and_keeps_zeros():
  module = TinyMLP(width=32)
  config = _config(**{"model.sparsity": 0.75, "sparse.update_every": 2, "schedule.name": "constant",
                      "optimizer.learning_rate": 0.5})
  state, tx, sched = _init(module, config, total_steps=12)
  traces = []

  def counting(state, batch):
    traces.append(1)
    return step_lib.make_train_step(module, tx, input_key="image", target_key="label",
                                    learning_rate_fn=sched)(state, batch)

  step = jax.jit(counting, donate_argnums=0)
  masks0 = jax.device_get(sift_jax.get_masks(state.opt_state))
  dropped = []
  for i in range(8):
    state, metrics = step(state, _batch(jax.random.key(10 + i)))
    dropped.append(int(metrics["sparse/num_dropped"]))
    masks = sift_jax.get_masks(state.opt_state)
    for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(masks)):
      assert np.all(np.asarray(p)[~np.asarray(m)] == 0)
  assert len(traces) == 1 and step._cache_size() == 1
  assert int(metrics["sparse/num_updates"]) == 4  # steps 0, 2, 4, 6
  masks = jax.device_get(sift_jax.get_masks(state.opt_state))
  k0, k1 = masks0["Dense_0"]["kernel"], masks["Dense_0"]["kernel"]
  assert k0.sum() == k1.sum() == sift_jax.target_count(0.25, k0.size)
  assert (k0 != k1).any()
  assert max(dropped) > 0


def test_eval_step_padding_weights_ignore_padded_examples():
  module = TinyMLP()
  state, _, _ = _init(module, _config())
  batch = _batch(jax.random.key(4), n=16)
  ev = jax.jit(step_lib.make_eval_step(module, input_key="image", target_key="label"))
  full = ev(state, {**batch, "weight": jnp.ones(16)})
  half = ev(state, {**batch, "weight": (jnp.arange(16) < 10).astype(jnp.float32)})
  only = ev(state, {k: v[:10] for k, v in batch.items()} | {"weight": jnp.ones(10)})
  assert float(full["count"]) == 16 and float(half["count"]) == 10
  np.testing.assert_allclose(half["loss_sum"], only["loss_sum"], rtol=1e-6)
  assert float(half["correct_sum"]) == float(only["correct_sum"])


def test_init_is_one_compilation_for_all_seeds_and_masks_params():
  module = TinyMLP(width=32)
  config = _config(**{"model.sparsity": 0.5})

  def make_tx(s):
    return optimizers.make_optimizer(config, total_steps=10, steps_per_epoch=5, seed=s)[0]

  init = jax.jit(state_lib.make_init_fn(module, make_tx, input_shape=(8,), input_dtype=jnp.float32))
  a, b, a2 = init(np.int32(0)), init(np.int32(1)), init(np.int32(0))
  assert init._cache_size() == 1
  ma, mb = sift_jax.get_masks(a.opt_state), sift_jax.get_masks(b.opt_state)
  assert (np.asarray(ma["Dense_0"]["kernel"]) != np.asarray(mb["Dense_0"]["kernel"])).any()
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(a2)):
    np.testing.assert_array_equal(x, y)
  k = np.asarray(a.params["Dense_0"]["kernel"])
  assert np.all(k[~np.asarray(ma["Dense_0"]["kernel"])] == 0)
  assert np.count_nonzero(k) == sift_jax.target_count(0.5, k.size)


def test_bad_model_kwargs_are_named_in_the_error(tmp_path):
  config = _config(**{"dataset.name": "mnist1d", "model.name": "mlp_mnist1d",
                      "model.kwargs.hiddne": (32, 32), "training.num_steps": 2, "mesh.data": 1,
                      "training.progress_bar": False})
  with pytest.raises(ValueError, match=r"config.model \(name='mlp_mnist1d'.*kwargs=\{'hiddne': "
                                       r"\(32, 32\)\}\) does not build a model: ValueError: mlp_mnist1d: unknown keyword argument\(s\) \[.hiddne.\]"):
    training.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_metrics_writer_refuses_a_write_after_close(tmp_path):
  from sift_jax.training import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  writer = metrics_lib.MetricsWriter(str(tmp_path), tensorboard=False)
  writer.write(3, "train", {"loss": 0.5})
  writer.close()
  with pytest.raises(ValueError, match=r"MetricsWriter.write\(step=4, split='train'\) after close"):
    writer.write(4, "train", {"loss": 0.25})
  with open(tmp_path / "metrics.jsonl") as f:
    assert f.read().splitlines() == ['{"step": 3, "split": "train", "loss": 0.5}']
