"""dynamic_sparse as an extension point, and magnitude pruning against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sift_jax
from sift_jax import flops, optim, training
from sift_jax.masks import ops

LR, MOMENTUM = 0.05, 0.9
SHAPES = {"fc1": (12, 32), "fc2": (32, 5)}


def mlp_params(key=0):
  k1, k2 = jax.random.split(jax.random.key(key))
  return {"fc1": {"kernel": np.asarray(jax.random.normal(k1, SHAPES["fc1"]) * 0.3), "bias": np.zeros(32, np.float32)},
          "fc2": {"kernel": np.asarray(jax.random.normal(k2, SHAPES["fc2"]) * 0.3), "bias": np.zeros(5, np.float32)}}


def mlp_loss(params, x, y):
  h = jnp.tanh(x @ params["fc1"]["kernel"] + params["fc1"]["bias"])
  logits = h @ params["fc2"]["kernel"] + params["fc2"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


X = np.asarray(jax.random.normal(jax.random.key(1), (64, 12)))
Y = np.arange(64) % 5
GRAD = jax.jit(jax.grad(mlp_loss))
KERNELS = [("fc1", "kernel"), ("fc2", "kernel")]


def run(tx, params, steps):
  """Trains ``steps`` steps; returns per-step params and masks (after each step)."""
  update = jax.jit(tx.update)
  state = tx.init(params)
  history = []
  for _ in range(steps):
    grads = GRAD(params, X, Y)
    updates, state = update(grads, state, params)
    params = jax.tree.map(np.asarray, optax.apply_updates(params, updates))
    history.append((params, jax.tree.map(np.asarray, sift_jax.get_masks(state))))
  return history, state


# ----------------------------------------------------------------------------- numpy references

def reference_training(params, steps, *, is_update, keep_counts, scope="layerwise"):
  """Masked SGD with momentum in numpy; at update steps (no optimizer step)
  keeps the ``keep_counts(t)`` largest |w| of each kernel (or overall)."""
  p = {k: {n: np.array(v, np.float32) for n, v in d.items()} for k, d in params.items()}
  masks = {k: {n: np.ones_like(v, bool) for n, v in d.items()} for k, d in p.items()}
  mu = {k: {n: np.zeros_like(v) for n, v in d.items()} for k, d in p.items()}
  history = []
  for t in range(steps):
    g = jax.tree.map(np.asarray, GRAD(p, X, Y))
    if is_update(t):
      counts = keep_counts(t)
      if scope == "global":
        flat = np.concatenate([np.abs(p[a][b]).ravel() for a, b in KERNELS])
        thr = np.sort(flat)[::-1][sum(counts) - 1]
        for a, b in KERNELS:
          masks[a][b] = masks[a][b] & (np.abs(p[a][b]) >= thr)
      else:
        for (a, b), k in zip(KERNELS, counts):
          order = np.argsort(-np.abs(p[a][b]).ravel(), kind="stable")
          m = np.zeros(p[a][b].size, bool)
          m[order[:k]] = True
          masks[a][b] = masks[a][b] & m.reshape(p[a][b].shape)
      for a, b in KERNELS:
        p[a][b] = np.where(masks[a][b], p[a][b], 0.0).astype(np.float32)
        mu[a][b] = np.where(masks[a][b], mu[a][b], 0.0).astype(np.float32)
    else:
      for a in p:
        for b in p[a]:
          gm = np.where(masks[a][b], g[a][b], 0.0).astype(np.float32)
          mu[a][b] = (MOMENTUM * mu[a][b] + gm).astype(np.float32)
          p[a][b] = np.where(masks[a][b], p[a][b] - LR * mu[a][b], 0.0).astype(np.float32)
    history.append(({a: dict(d) for a, d in p.items()}, {a: dict(d) for a, d in masks.items()}))
  return history


def assert_matches(history, ref):
  for t, ((params, masks), (rp, rm)) in enumerate(zip(history, ref)):
    for a, b in KERNELS:
      np.testing.assert_array_equal(masks[a][b], rm[a][b], err_msg=f"mask {a}/{b}, step {t}")
      np.testing.assert_allclose(params[a][b], rp[a][b], rtol=1e-5, atol=1e-6,
                                 err_msg=f"{a}/{b}, step {t}")


def test_gradual_magnitude_pruning_matches_numpy_reference():
  start, every, end, steps, s = 4, 5, 26, 32, 0.8  # end snaps to 24: updates at 4, 9, ..., 24
  tx = optim.gradual_magnitude_pruning(optax.sgd(LR, momentum=MOMENTUM), sparsity=s,
                                       start_step=start, end_step=end, update_every=every)
  history, state = run(tx, mlp_params(), steps)
  finals = [ops.target_count(1 - s, int(np.prod(SHAPES[a]))) for a, _ in KERNELS]

  def keep_counts(t):
    frac = np.float32(t - start) / np.float32(24 - start)
    c = np.float32(1.0) - (np.float32(1.0) - frac) ** np.float32(3.0)
    return [int(n - np.floor(c * np.float32(n - f) + np.float32(0.5)))
            for n, f in zip([384, 160], finals)]

  ref = reference_training(mlp_params(), steps, keep_counts=keep_counts,
                           is_update=lambda t: start <= t <= 24 and (t - start) % every == 0)
  assert_matches(history, ref)
  # Dense before the first pruning step, exactly at target from the last one on.
  assert all(m[a][b].all() for m in [history[3][1]] for a, b in KERNELS)
  assert [int(history[-1][1][a][b].sum()) for a, b in KERNELS] == finals == [77, 32]
  assert [int(history[9][1][a][b].sum()) for a, b in KERNELS] == keep_counts(9)
  assert int(state.stats.num_updates) == 5 and int(state.stats.num_grown) == 0
  assert bool(history[-1][1]["fc1"]["bias"].all())


@pytest.mark.parametrize("scope", ["layerwise", "global"])
def test_oneshot_pruning_matches_numpy_reference(scope):
  prune_step, steps, s = 3, 6, 0.7
  tx = optim.oneshot_magnitude_pruning(optax.sgd(LR, momentum=MOMENTUM), sparsity=s, scope=scope,
                                       prune_step=prune_step)
  history, _ = run(tx, mlp_params(), steps)
  finals = [ops.target_count(1 - s, int(np.prod(SHAPES[a]))) for a, _ in KERNELS]
  ref = reference_training(mlp_params(), steps, is_update=lambda t: t == prune_step,
                           keep_counts=lambda t: finals, scope=scope)
  assert_matches(history, ref)
  counts = [int(history[-1][1][a][b].sum()) for a, b in KERNELS]
  if scope == "layerwise":
    assert counts == finals
  else:
    assert sum(counts) == sum(finals) and counts != finals  # one ranking moves weight between layers
  # The pure function gives the masks of a trained model directly.
  trained = history[prune_step - 1][0]
  masks = optim.magnitude_masks(trained, sparsity=s, scope=scope)
  for a, b in KERNELS:
    np.testing.assert_array_equal(np.asarray(masks[a][b]), history[prune_step][1][a][b])
  assert bool(masks["fc2"]["bias"].all())


def test_rigl_and_set_are_dynamic_sparse_with_their_scores():
  params = mlp_params()
  sched = optim.make_mask_update_schedule(update_every=3, end_step=20)
  common = dict(sparsity=0.8, seed=3)
  pairs = [(sift_jax.rigl(optax.adam(1e-2), **common, update_every=3, end_step=20),
            optim.dynamic_sparse(optax.adam(1e-2), **common, update_schedule=sched,
                                 grow_score_fn=optim.gradient_score)),
           (sift_jax.set_sparse(optax.adam(1e-2), **common, update_every=3, end_step=20),
            optim.dynamic_sparse(optax.adam(1e-2), **common, update_schedule=sched,
                                 grow_score_fn=optim.SCORE_FNS["random"]))]
  for factory, engine in pairs:
    (h1, s1), (h2, s2) = run(factory, params, 4), run(engine, params, 4)
    for x, y in zip(jax.tree.leaves((h1[-1], s1)), jax.tree.leaves((h2[-1], s2))):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert int(s1.stats.num_updates) == 2 and int(s1.stats.num_grown) > 0


def test_custom_score_from_outside_the_package():
  # A method nobody shipped: drop by |w * g| (a first-order saliency), grow the
  # positions of smallest |w| first, half of the drops every 2 steps.
  def saliency(inputs):
    return inputs.weights * inputs.grads

  def prefer_small(inputs):
    return 1.0 / (1.0 + jnp.abs(inputs.weights))

  tx = optim.dynamic_sparse(optax.sgd(LR), drop_score_fn=saliency, grow_score_fn=prefer_small,
                            drop_fraction=optax.linear_schedule(0.5, 0.0, 10),
                            update_schedule=lambda t: t % 2 == 0, sparsity=0.75)
  history, state = run(tx, mlp_params(), 4)
  for params, masks in history:
    for a, b in KERNELS:
      assert int(masks[a][b].sum()) == ops.target_count(0.25, params[a][b].size)
      assert np.all(params[a][b][~masks[a][b]] == 0.0)
  assert int(state.stats.num_updates) == 2 and int(state.stats.num_grown) > 0


def test_all_false_mask_and_bad_options_are_refused():
  masks = jax.tree.map(lambda p: np.ones(p.shape, bool), mlp_params())
  masks["fc1"]["kernel"] = np.zeros(SHAPES["fc1"], bool)
  for factory in (sift_jax.rigl, sift_jax.set_sparse):
    with pytest.raises(ValueError, match=r"'fc1/kernel' has no active weight"):
      factory(optax.sgd(0.1), masks=masks, total_steps=10)
  with pytest.raises(ValueError, match=r"'fc1/kernel' has no active weight"):
    sift_jax.static_sparse(optax.sgd(0.1), masks=masks)
  with pytest.raises(ValueError, match=r"scope must be one of \('layerwise', 'global'\), got 'per_row'"):
    optim.oneshot_magnitude_pruning(optax.sgd(0.1), sparsity=0.5, scope="per_row")
  with pytest.raises(ValueError, match="excludes drop_fraction"):
    optim.dynamic_sparse(optax.sgd(0.1), sparsity=0.5, update_schedule=lambda t: t == 0,
                         sparsity_progress=lambda t: 1.0, grow_score_fn=optim.gradient_score)
  with pytest.raises(ValueError, match="give drop_fraction"):
    optim.dynamic_sparse(optax.sgd(0.1), sparsity=0.5, update_schedule=lambda t: t == 0)
  with pytest.raises(ValueError, match="prune_step must be an int >= 0, got -1"):
    optim.oneshot_magnitude_pruning(optax.sgd(0.1), sparsity=0.5, prune_step=-1)


def _config(**overrides):
  return training.apply_overrides(training.default_config(),
                                  {"model.sparsity": 0.8, "optimizer.name": "sgd",
                                   "optimizer.momentum": MOMENTUM, "optimizer.learning_rate": LR,
                                   "optimizer.weight_decay": 0.0, "schedule.name": "constant",
                                   **overrides})


def test_pruning_methods_from_the_training_config():
  inner = optax.sgd(LR, momentum=MOMENTUM)
  cases = {
      "gmp": (dict(), optim.gradual_magnitude_pruning(inner, sparsity=0.8, total_steps=12,
                                                       update_every=2, end_fraction=0.75)),
      "oneshot": (dict(scope="global"), optim.oneshot_magnitude_pruning(
          inner, sparsity=0.8, scope="global", prune_step=2)),
  }
  for method, (extra, direct) in cases.items():
    config = _config(**{"sparse.method": method, "sparse.update_every": 2, "sparse.start_step":
                        2 if method == "oneshot" else 0,
                        **{f"sparse.{k}": v for k, v in extra.items()}})
    training.validate_config(config)
    tx, _ = training.make_optimizer(config, total_steps=12, steps_per_epoch=6)
    (h1, _), (h2, _) = run(tx, mlp_params(), 5), run(direct, mlp_params(), 5)
    for x, y in zip(jax.tree.leaves(h1[-1]), jax.tree.leaves(h2[-1])):
      np.testing.assert_array_equal(x, y)
    assert int(sum(h1[-1][1][a][b].sum() for a, b in KERNELS)) < 384 + 160


def test_unknown_names_raise_naming_the_known_ones():
  cases = [("sparse.method", "magnitude", "sparse method"), ("optimizer.name", "lamb", "optimizer"),
           ("schedule.name", "poly", "schedule")]
  for key, value, what in cases:
    config = _config(**{key: value})
    with pytest.raises(ValueError, match=rf"config\.{key}='{value}'"):
      training.validate_config(config)
    with pytest.raises(ValueError, match=rf"config\.{key}='{value}' is not a known {what}; known: \["):
      training.make_optimizer(config, total_steps=10, steps_per_epoch=5)
  for key, value in (("sparse.distribution", "erdos"), ("sparse.drop_schedule", "exp"),
                     ("sparse.scope", "rows")):
    with pytest.raises(ValueError, match=rf"config\.{key}='{value}': must be one of"):
      training.validate_config(_config(**{key: value}))
  with pytest.raises(ValueError, match=r"config\.sparse\.scope='global': is only supported by"):
    training.validate_config(_config(**{"sparse.scope": "global", "sparse.method": "rigl"}))
  with pytest.raises(ValueError, match=r"distribution must be one of \('uniform', 'erk', 'er'\), got 'erdos'"):
    sift_jax.rigl(optax.sgd(0.1), sparsity=0.5, total_steps=10, distribution="erdos")
  assert set(training.SPARSE_METHODS) == {"none", *optim.METHODS}


def test_pruning_training_flops_follow_the_masks():
  # One 40x50 sparse tensor whose forward cost is its number of active weights.
  params = {"w": np.asarray(jax.random.normal(jax.random.key(0), (40, 50)))}
  steps, every, s = 30, 4, 0.9
  tx = optim.gradual_magnitude_pruning(optax.sgd(0.0), sparsity=s, total_steps=steps,
                                       update_every=every, start_step=2, end_fraction=0.8)
  update = jax.jit(tx.update)
  state, active = tx.init(params), []
  for _ in range(steps):
    _, state = update(jax.tree.map(np.zeros_like, params), state, params)
    active.append(int(sift_jax.get_masks(state)["w"].sum()))
  got = flops.training_flops(200.0, 2000.0, method="gmp", total_steps=steps, update_every=every,
                             end_fraction=0.8, start_step=2)
  in_force = [2000] + active[:-1]  # step t runs with the masks left by step t - 1
  np.testing.assert_allclose(got.total, 3.0 * sum(in_force), rtol=1e-3)
  assert active[-1] == 200 and got.per_step == 600.0
  one = flops.training_flops(200.0, 2000.0, method="oneshot", total_steps=steps, start_step=5,
                             batch_size=2)
  assert one.total == 2 * (6 * 6000.0 + 24 * 600.0)  # steps 0..5 dense
