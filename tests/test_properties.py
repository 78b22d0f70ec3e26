"""Property-based tests (hypothesis) over random shapes, sparsities and optimizers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import HealthCheck, given, settings, strategies as st

import sift_jax
from sift_jax import masks as M

OPTIMIZERS = [lambda: optax.sgd(0.1), lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
              lambda: optax.adam(1e-2), lambda: optax.adamw(1e-2, weight_decay=0.1),
              lambda: optax.lion(1e-3),
              lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(), optax.scale(-1e-2)),
              lambda: optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9),
              lambda: optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2)]


def _moments(inner_state, shape):
  """Optimizer-state leaves shaped like a parameter (momenta, Adam moments, MultiSteps' buffer)."""
  return [np.asarray(v) for v in jax.tree.leaves(inner_state)
          if hasattr(v, "shape") and tuple(v.shape) == tuple(shape)]

shapes = st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=3)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=shapes, sparsity=st.floats(0.0, 0.99), seed=st.integers(0, 2**16),
       distribution=st.sampled_from(["uniform", "erk", "er"]))
def test_init_masks_counts_for_any_shape(shapes, sparsity, seed, distribution):
  params = {f"l{i}": jnp.ones(s) for i, s in enumerate(shapes)}
  dens = sift_jax.layer_densities(params, sparsity, distribution=distribution)
  masks = sift_jax.init_masks(jax.random.key(seed), params, dens)
  for (path, p), m, d in zip(params.items(), jax.tree.leaves(masks), jax.tree.leaves(dens)):
    assert 0.0 < d <= 1.0
    assert int(m.sum()) == M.target_count(d, p.size)
  if distribution != "uniform":
    # ERK/ER preserve the total budget whenever no layer is clipped to 1 and
    # never exceed it otherwise.
    total = sum(d * p.size for p, d in zip(params.values(), jax.tree.leaves(dens)))
    size = sum(p.size for p in params.values())
    assert total <= (1 - sparsity) * size + 1e-6 * size or all(d == 1.0 for d in jax.tree.leaves(dens))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=shapes, sparsity=st.floats(0.05, 0.95), opt=st.integers(0, len(OPTIMIZERS) - 1),
       drop=st.floats(0.0, 1.0), seed=st.integers(0, 1000),
       ref_mode=st.booleans(), method=st.sampled_from(["rigl", "set"]))
def test_mask_updates_keep_counts_and_zeros(shapes, sparsity, opt, drop, seed, ref_mode, method):
  keys = jax.random.split(jax.random.key(seed), len(shapes) + 1)
  params = {f"l{i}": jax.random.normal(k, s) for i, (k, s) in enumerate(zip(keys[1:], shapes))}
  factory = sift_jax.rigl if method == "rigl" else sift_jax.set_sparse
  tx = factory(OPTIMIZERS[opt](), sparsity=sparsity, end_step=4, update_every=1, drop_fraction=drop,
               drop_schedule="constant", optimizer_step_on_update=ref_mode, seed=seed)
  state = tx.init(params)
  dens = sift_jax.layer_densities(params, sparsity)

  def loss(p):
    return sum(jnp.sum(jnp.sin(v) * (i + 1)) for i, v in enumerate(jax.tree.leaves(p)))

  update = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
  for _ in range(3):
    old = sift_jax.get_masks(state)
    updates, state = update(params, state)
    params = optax.apply_updates(params, updates)
    for p, m, o, d in zip(jax.tree.leaves(params), jax.tree.leaves(sift_jax.get_masks(state)),
                          jax.tree.leaves(old), jax.tree.leaves(dens)):
      m, o, p = np.asarray(m), np.asarray(o), np.asarray(p)
      assert m.sum() == M.target_count(d, p.size)
      assert np.all(p[~m] == 0.0)
      assert np.all(p[m & ~o] == 0.0)  # grown weights start at zero
      n_drop = int(np.floor(np.float32(drop) * np.float32(o.sum())))
      assert (o & ~m).sum() <= n_drop
      # Moments of inactive and just-grown weights are zero, whatever the optimizer.
      for v in _moments(state.inner_state, p.shape):
        assert np.all(v[~m] == 0.0) and np.all(v[m & ~o] == 0.0)
