"""static_sparse / set_sparse / rigl as optax gradient transformations."""

import functools

from flax import linen as nn
from flax import nnx
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sift_jax
from sift_jax import masks as M


def mlp_params(key=0, din=12, hidden=32, dout=5):
  k1, k2 = jax.random.split(jax.random.key(key))
  return {"fc1": {"kernel": jax.random.normal(k1, (din, hidden)) * 0.3, "bias": jnp.zeros(hidden)},
          "fc2": {"kernel": jax.random.normal(k2, (hidden, dout)) * 0.3, "bias": jnp.zeros(dout)}}


def data(key=1, n=64, din=12, dout=5):
  kx, = jax.random.split(jax.random.key(key), 1)
  x = jax.random.normal(kx, (n, din))
  y = jnp.arange(n) % dout
  return x, y


def mlp_loss(params, x, y):
  h = jnp.tanh(x @ params["fc1"]["kernel"] + params["fc1"]["bias"])
  logits = h @ params["fc2"]["kernel"] + params["fc2"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_step(tx):
  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(mlp_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss
  return step


def count_check(params, masks, dens):
  for path, p, m, d in zip(M.leaf_paths(params), jax.tree.leaves(params), jax.tree.leaves(masks),
                           jax.tree.leaves(dens)):
    assert int(np.sum(m)) == M.target_count(d, p.size), path
    assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0), path


METHODS = {
    "static": lambda inner, **kw: sift_jax.static_sparse(inner, sparsity=0.8, seed=0),
    "set": lambda inner, **kw: sift_jax.set_sparse(inner, sparsity=0.8, total_steps=200, update_every=7, seed=0),
    "rigl": lambda inner, **kw: sift_jax.rigl(inner, sparsity=0.8, total_steps=200, update_every=7, seed=0),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_counts_exact_and_inactive_exactly_zero_every_step(method):
  params = mlp_params()
  tx = METHODS[method](optax.adam(3e-2))
  state = tx.init(params)
  dens = sift_jax.layer_densities(params, 0.8)
  x, y = data()
  step = jax.jit(make_step(tx))
  # No explicit apply_masks: the first update already zeroes inactive weights.
  masks_seen = []
  for _ in range(200):
    params, state, loss = step(params, state, x, y)
    count_check(params, sift_jax.get_masks(state), dens)
    masks_seen.append(np.asarray(sift_jax.get_masks(state)["fc1"]["kernel"]))
  changed = sum(not np.array_equal(a, b) for a, b in zip(masks_seen, masks_seen[1:]))
  n_updates = len(range(0, 150, 7))
  if method == "static":
    assert changed == 0 and int(state.stats.num_updates) == 0
  else:
    assert int(state.stats.num_updates) == n_updates
    assert 0 < changed <= n_updates
  assert float(loss) < 1.0
  assert step._cache_size() == 1  # update and ordinary steps share one compiled function


def test_no_retrace_between_update_and_normal_steps():
  traces = []
  tx = sift_jax.rigl(optax.sgd(0.1), sparsity=0.5, total_steps=40, update_every=3)

  @jax.jit
  def step(params, state, x, y):
    traces.append(1)
    loss, grads = jax.value_and_grad(mlp_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = mlp_params()
  state = tx.init(params)
  x, y = data()
  for _ in range(20):
    params, state = step(params, state, x, y)
  assert len(traces) == 1
  assert int(state.stats.num_updates) == 7


def _manual_case(optimizer_step_on_update=False, inner=None):
  # One 2x4 tensor. Active: positions 0..3 with |w| = 4, 1, 3, 2.
  # drop_fraction 0.5 (constant) -> n_drop = 2: keep positions 0 and 2.
  w = jnp.array([[4.0, -1.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
  mask = jnp.array([[True, True, True, True], [False] * 4])
  # Largest dense |g| among the free positions: 5 (index 5) and the just-dropped 3 (|g|=9).
  g = jnp.array([[0.1, 0.2, 0.3, 9.0], [0.0, 7.0, 0.5, 0.0]])
  tx = sift_jax.rigl(inner or optax.sgd(1.0), masks={"w": mask}, end_step=10, update_every=5,
                     drop_fraction=0.5, drop_schedule="constant",
                     optimizer_step_on_update=optimizer_step_on_update)
  params = {"w": w}
  state = tx.init(params)
  updates, state = tx.update({"w": g}, state, params)
  return params, g, updates, state


def test_rigl_drops_smallest_magnitude_and_grows_largest_gradient():
  params, _, updates, state = _manual_case()
  new_mask = np.asarray(sift_jax.get_masks(state)["w"])
  np.testing.assert_array_equal(new_mask, [[True, False, True, True], [False, True, False, False]])
  new_w = np.asarray(optax.apply_updates(params, updates)["w"])
  # Original RigL: no optimizer step on the update step. Kept weights and the
  # dropped-and-regrown weight (index 3) keep their value; grown starts at 0.
  np.testing.assert_array_equal(new_w, [[4.0, 0.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
  assert int(state.stats.num_dropped) == 1 and int(state.stats.num_grown) == 1
  assert int(state.count) == 1


def test_reference_mode_steps_the_optimizer_before_updating_masks():
  params, g, updates, state = _manual_case(optimizer_step_on_update=True)
  # SGD lr 1: stepped weights 3.9, -1.2, 2.7, -7 -> keep |w| = 7 (index 3) and
  # 3.9 (index 0); regrow the two largest |g| among the rest: 7 and 0.5 (row 1).
  new_mask = np.asarray(sift_jax.get_masks(state)["w"])
  np.testing.assert_array_equal(new_mask, [[True, False, False, True], [False, True, True, False]])
  new_w = np.asarray(optax.apply_updates(params, updates)["w"])
  np.testing.assert_allclose(new_w, [[3.9, 0.0, 0.0, -7.0], [0.0, 0.0, 0.0, 0.0]], rtol=1e-6)
  assert np.count_nonzero(new_w) == 2  # grown weights start at exactly 0


OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.05),
    "momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "nesterov": lambda: optax.sgd(0.05, momentum=0.9, nesterov=True),
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=1e-2),
    "lion": lambda: optax.lion(1e-2),
    "chain": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.add_decayed_weights(1e-3),
                                 optax.scale_by_adam(), optax.scale(-1e-2)),
    "inject_hyperparams": lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
    "multisteps": lambda: optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2),
    # States with optax.MaskedNode where a parameter is not the optimizer's.
    "masked": lambda: optax.masked(optax.adam(1e-2), lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
    "multi_transform": lambda: optax.multi_transform(
        {"w": optax.adamw(1e-2, weight_decay=1e-2), "b": optax.sgd(0.05, momentum=0.9)},
        lambda p: jax.tree.map(lambda x: "w" if x.ndim > 1 else "b", p)),
}


def _param_shaped_leaves(inner_state, params):
  shapes = {tuple(p.shape) for p in jax.tree.leaves(params)}
  return [x for x in jax.tree.leaves(inner_state) if hasattr(x, "shape") and tuple(x.shape) in shapes
          and x.ndim == 2]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_moments_of_grown_and_dropped_weights_are_zero(name):
  params = mlp_params()
  for optimizer_step_on_update in (False, True):
    tx = sift_jax.rigl(OPTIMIZERS[name](), sparsity=0.7, total_steps=60, update_every=6, start_step=6,
                       optimizer_step_on_update=optimizer_step_on_update)
    state = tx.init(params)
    x, y = data()
    step = jax.jit(make_step(tx))
    p = params
    checked = 0
    for t in range(45):
      old = sift_jax.get_masks(state)["fc1"]["kernel"]
      p, state, _ = step(p, state, x, y)
      new = sift_jax.get_masks(state)["fc1"]["kernel"]
      changed = np.asarray(old != new)
      inactive = ~np.asarray(new)
      moments = [np.asarray(v) for v in _param_shaped_leaves(state.inner_state, params)
                 if v.shape == new.shape]
      assert moments or name == "sgd", "no param-shaped moments found"
      for v in moments:
        assert np.all(v[inactive] == 0), (name, t)
      if changed.any():
        grown = np.asarray(new) & ~np.asarray(old)
        assert grown.any()
        for v in moments:
          assert np.all(v[grown] == 0), (name, t)
        assert np.all(np.asarray(p["fc1"]["kernel"])[grown] == 0)
        checked += 1
    assert checked >= 3, name


def test_ties_broken_randomly_for_bf16_params():
  # All |w| equal in bf16: which weights are dropped must depend on the seed.
  w = jnp.ones((16, 16), jnp.bfloat16)
  picks = set()
  for seed in range(6):
    tx = sift_jax.rigl(optax.sgd(0.0), masks={"w": jnp.ones((16, 16), bool).at[8:].set(False)},
                       end_step=5, update_every=5, drop_fraction=0.5, drop_schedule="constant", seed=seed)
    params = {"w": w.at[8:].set(0)}
    state = tx.init(params)
    # Gradient only on the inactive rows, so growth happens there.
    grads = jnp.zeros((16, 16), jnp.bfloat16).at[8:].set(1.0)
    _, state = tx.update({"w": grads}, state, params)
    m = np.asarray(sift_jax.get_masks(state)["w"])
    assert m.sum() == 128
    picks.add(m.tobytes())
    assert m[:8].sum() == 64  # half of the 128 active kept, the rest grown in rows 8..15
    assert not np.all(m[:4]), "dropped by index"
  assert len(picks) == 6


def test_jit_matches_eager():
  params = mlp_params()
  tx = sift_jax.rigl(optax.adam(1e-2), sparsity=0.75, total_steps=40, update_every=4)
  x, y = data()
  step = make_step(tx)
  pe, se = params, tx.init(params)
  pj, sj = params, tx.init(params)
  jstep = jax.jit(step)
  for _ in range(12):
    pe, se, _ = step(pe, se, x, y)
    pj, sj, _ = jstep(pj, sj, x, y)
  for a, b in zip(jax.tree.leaves(sift_jax.get_masks(se)), jax.tree.leaves(sift_jax.get_masks(sj))):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(pe), jax.tree.leaves(pj)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_works_with_flax_train_state():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(5)(nn.tanh(nn.Dense(32)(x)))

  x, y = data()
  variables = Net().init(jax.random.key(0), x)
  tx = sift_jax.rigl(optax.adam(1e-2), sparsity=0.8, total_steps=30, update_every=5)
  ts = train_state.TrainState.create(apply_fn=Net().apply, params=variables["params"], tx=tx)

  @jax.jit
  def step(ts):
    grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        ts.apply_fn({"params": p}, x), y).mean())(ts.params)
    return ts.apply_gradients(grads=grads)

  for _ in range(25):
    ts = step(ts)
    masks = sift_jax.get_masks(ts.opt_state)
    for p, m in zip(jax.tree.leaves(ts.params), jax.tree.leaves(masks)):
      assert np.all(np.asarray(p)[~np.asarray(m)] == 0)
  assert int(sift_jax.mask_stats(masks)["per_leaf"]["Dense_1/kernel"]["nnz"]) == round(0.2 * 12 * 32)


def test_works_with_nnx_optimizer():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = nnx.Linear(12, 32, rngs=rngs)
      self.fc2 = nnx.Linear(32, 5, rngs=rngs)

    def __call__(self, x):
      return self.fc2(nnx.tanh(self.fc1(x)))

  model = Net(nnx.Rngs(0))
  tx = sift_jax.rigl(optax.adam(1e-2), sparsity=0.8, total_steps=30, update_every=5)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x, y = data()

  @nnx.jit
  def step(model, opt):
    grads = nnx.grad(lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(model)
    opt.update(model, grads)

  for _ in range(25):
    step(model, opt)
    masks = sift_jax.get_masks(opt.opt_state)
    w = np.asarray(model.fc1.kernel[...])
    m = np.asarray(masks["fc1"]["kernel"])
    assert m.sum() == round(0.2 * 12 * 32)
    assert np.all(w[~m] == 0)


def test_set_growth_is_random_and_counts_exact():
  params = mlp_params()
  tx = sift_jax.set_sparse(optax.sgd(0.1), sparsity=0.5, total_steps=10, update_every=1,
                           drop_fraction=0.5, drop_schedule="constant")
  state = tx.init(params)
  x, y = data()
  p, state, _ = jax.jit(make_step(tx))(params, state, x, y)
  count_check(p, sift_jax.get_masks(state), sift_jax.layer_densities(params, 0.5))
  assert int(state.stats.num_grown) > 0


def test_stats_ever_active_grows_monotonically():
  params = mlp_params()
  tx = sift_jax.rigl(optax.adam(1e-2), sparsity=0.9, total_steps=80, update_every=5)
  state = tx.init(params)
  x, y = data()
  step = jax.jit(make_step(tx))
  fracs = []
  for _ in range(60):
    params, state, _ = step(params, state, x, y)
    fracs.append(float(sift_jax.sparse_stats(state)["ever_active_fraction"]))
  assert fracs[0] >= 0.1 - 1e-6
  assert all(b >= a for a, b in zip(fracs, fracs[1:]))
  assert fracs[-1] > fracs[0]
  s = sift_jax.sparse_stats(state)
  assert float(s["sparse_density"]) == pytest.approx(
      (round(0.1 * 12 * 32) + round(0.1 * 32 * 5)) / (12 * 32 + 32 * 5))


def test_drop_fraction_schedules():
  cos = sift_jax.optim.make_mask_update_schedule(end_step=100, drop_fraction=0.3)
  assert float(cos.drop_fraction_at(0)) == pytest.approx(0.3)
  assert float(cos.drop_fraction_at(50)) == pytest.approx(0.15)
  assert float(cos.drop_fraction_at(100)) == pytest.approx(0.0, abs=1e-7)
  lin = sift_jax.optim.make_mask_update_schedule(end_step=100, drop_schedule="linear")
  assert float(lin.drop_fraction_at(25)) == pytest.approx(0.225)
  ref = sift_jax.optim.make_mask_update_schedule(total_steps=1000, start_step=100)
  assert list(ref.update_steps()) == list(range(100, 750, 100))
  assert [bool(ref.is_update_step(t)) for t in (0, 99, 100, 101, 700, 750)] == [
      False, False, True, False, True, False]


def test_init_under_eval_shape():
  params = jax.eval_shape(lambda: mlp_params())
  tx = sift_jax.rigl(optax.adam(1e-3), sparsity=0.9, total_steps=100)
  abstract = jax.eval_shape(tx.init, params)
  assert abstract.masks["fc1"]["kernel"].dtype == jnp.bool_
  assert abstract.masks["fc1"]["kernel"].shape == (12, 32)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparsity=1.0, total_steps=10), "sparsity must be in"),
    (dict(sparsity=0.5, total_steps=10, update_every=0), "update_every must be an int >= 1, got 0"),
    (dict(sparsity=0.5, start_step=50, end_step=20), r"end_step \(20\) must be after start_step \(50\)"),
    (dict(sparsity=0.5), "give end_step or total_steps"),
    (dict(sparsity=0.5, total_steps=10, drop_schedule="exp"), "drop_schedule must be one of"),
    (dict(total_steps=10), "give exactly one of sparsity"),
    (dict(sparsity=0.5, total_steps=10, distribution="erdos"), "distribution must be one of"),
])
def test_bad_options(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sift_jax.rigl(optax.sgd(0.1), **kwargs)


def test_numpy_integer_options_are_accepted_and_floats_refused():
  sched = sift_jax.optim.make_mask_update_schedule(update_every=np.int64(5), start_step=np.int32(10),
                                                   total_steps=np.int64(100))
  assert (sched.update_every, sched.start_step, sched.end_step) == (5, 10, 75)
  assert all(type(v) is int for v in (sched.update_every, sched.start_step, sched.end_step))
  with pytest.raises(ValueError, match="update_every must be an int, got 5.0"):
    sift_jax.rigl(optax.sgd(0.1), sparsity=0.5, total_steps=10, update_every=5.0)
  with pytest.raises(ValueError, match="start_step must be an int, got True"):
    sift_jax.rigl(optax.sgd(0.1), sparsity=0.5, total_steps=10, start_step=True)


def test_multisteps_around_rigl_counts_optimizer_steps():
  # Gradient accumulation with RigL outside: RigL sees the mean of the k
  # accumulated dense gradients and counts optimizer steps, not mini-steps.
  params = mlp_params()
  k = 3
  tx = optax.MultiSteps(sift_jax.rigl(optax.adam(1e-2), sparsity=0.8, total_steps=40, update_every=4),
                        every_k_schedule=k)
  state = tx.init(params)
  params = sift_jax.apply_masks(params, sift_jax.get_masks(state))  # sparse from the first forward
  dens = sift_jax.layer_densities(params, 0.8)
  x, y = data()
  step = jax.jit(make_step(tx))
  for _ in range(k * 9):
    params, state, _ = step(params, state, x, y)
    count_check(params, sift_jax.get_masks(state), dens)
  inner = sift_jax.get_sparse_state(state)
  assert int(inner.count) == 9
  assert int(inner.stats.num_updates) == len(range(0, 9, 4))


def test_bad_trees_at_init_and_update():
  params = mlp_params()
  bad_masks = {"fc1": {"kernel": jnp.ones((12, 32), bool), "bias": jnp.ones(32, bool)}}
  with pytest.raises(ValueError, match=r"missing for parameter path\(s\) \['fc2/bias', 'fc2/kernel'\]"):
    sift_jax.rigl(optax.sgd(0.1), masks=bad_masks, total_steps=10).init(params)
  dens = sift_jax.layer_densities(params, 0.5)
  dens["fc2"]["kernel"] = 2.0
  with pytest.raises(ValueError, match="'fc2/kernel' must be in"):
    sift_jax.static_sparse(optax.sgd(0.1), densities=dens).init(params)
  with pytest.raises(ValueError, match="selects no sparse leaf"):
    sift_jax.static_sparse(optax.sgd(0.1), sparsity=0.5,
                           policy=sift_jax.SparsityPolicy(sparse=("conv",))).init(params)
  # A dynamic method whose policy selects nothing would train static masks.
  all_on = jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)
  with pytest.raises(ValueError, match="selects no sparse leaf"):
    sift_jax.rigl(optax.sgd(0.1), masks=all_on, total_steps=10,
                  policy=sift_jax.SparsityPolicy(sparse=("conv",))).init(params)
  with pytest.raises(ValueError, match="selects no sparse leaf"):
    sift_jax.rigl(optax.sgd(0.1), densities=sift_jax.layer_densities(params, 0.5), total_steps=10,
                  policy=sift_jax.SparsityPolicy(sparse=("conv",))).init(params)
  tx = sift_jax.rigl(optax.sgd(0.1), sparsity=0.5, total_steps=10)
  state = tx.init(params)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(params, state)
  # A gradient of the wrong shape would broadcast into wrong growth scores.
  bad_grads = jax.tree.map(jnp.ones_like, params)
  bad_grads["fc1"]["kernel"] = jnp.ones((32,))
  with pytest.raises(ValueError, match=r"updates for parameter 'fc1/kernel' has shape \(32,\), expected \(12, 32\)"):
    tx.update(bad_grads, state, params)
  with pytest.raises(ValueError, match="no SparseState"):
    sift_jax.get_masks(optax.sgd(0.1).init(params))


def test_get_masks_inside_chains():
  params = mlp_params()
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   sift_jax.rigl(optax.sgd(0.1), sparsity=0.5, total_steps=10))
  state = tx.init(params)
  assert sift_jax.get_masks(state)["fc1"]["kernel"].shape == (12, 32)


@pytest.mark.parametrize("method", ["static", "rigl"])
def test_leaves_the_policy_skips_pass_through_and_explicit_densities_still_mask(method):
  # fc1/kernel is selected; fc2/kernel is not, but has an explicit density
  # 0.5, so its mask holds zeros that must stay exact zeros; the biases are
  # neither selected nor sparse: their masks stay all-true.
  params = mlp_params()
  policy = sift_jax.SparsityPolicy(sparse=(r"fc1/kernel",))
  dens = {"fc1": {"kernel": 0.25, "bias": 1.0}, "fc2": {"kernel": 0.5, "bias": 1.0}}
  inner = optax.sgd(0.05, momentum=0.9)
  if method == "static":
    tx = sift_jax.static_sparse(inner, densities=dens, policy=policy)
  else:
    tx = sift_jax.rigl(inner, densities=dens, policy=policy, total_steps=40, update_every=5)
  state = tx.init(params)
  mask2 = np.asarray(state.masks["fc2"]["kernel"])
  assert mask2.sum() == round(0.5 * mask2.size)
  step = make_step(tx)
  x, y = data()
  for _ in range(12):
    params, state, _ = step(params, state, x, y)
  assert np.all(np.asarray(params["fc2"]["kernel"])[~mask2] == 0.0)
  np.testing.assert_array_equal(np.asarray(state.masks["fc2"]["kernel"]), mask2)
  m1 = np.asarray(state.masks["fc1"]["kernel"])
  assert m1.sum() == round(0.25 * m1.size)
  assert np.all(np.asarray(params["fc1"]["kernel"])[~m1] == 0.0)
  assert np.all(np.asarray(state.masks["fc1"]["bias"]))
