"""Mask updates on parameters sharded over 8 CPU devices: no all-gather, same masks."""

import re

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

import sift_jax
from sift_jax import sharding


def params_and_batch():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {"fc1": {"kernel": jax.random.normal(k1, (32, 256)) * 0.2, "bias": jnp.zeros(256)},
            "fc2": {"kernel": jax.random.normal(k2, (256, 64)) * 0.1, "bias": jnp.zeros(64)}}
  x = jax.random.normal(k3, (16, 32))
  y = jnp.arange(16) % 64
  return params, x, y


def loss_fn(params, x, y):
  h = jax.nn.relu(x @ params["fc1"]["kernel"] + params["fc1"]["bias"])
  logits = h @ params["fc2"]["kernel"] + params["fc2"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_tx():
  # update_every=1: every step is a mask-update step.
  return sift_jax.rigl(optax.adam(1e-2), sparsity=0.9, total_steps=100, update_every=1, seed=3)


def step_fn(tx):
  def step(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


_COLLECTIVE = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(all-reduce|all-gather|all-to-all|collective-permute|"
                         r"reduce-scatter)(?:-start)?\(")


def _collectives(hlo):
  """``[(op, largest operand element count)]`` of every collective in compiled HLO text."""
  out = []
  for result_type, op in _COLLECTIVE.findall(hlo):
    dims = re.findall(r"[a-z]+\d*\[([\d,]*)\]", result_type)
    out.append((op, max(int(np.prod([int(d) for d in ds.split(",") if d])) for ds in dims)))
  return out


RULES = ((r"fc1/kernel", P(None, "model")), (r"fc1/bias", P("model")),
         (r"fc2/kernel", P("model", None)))


@pytest.mark.parametrize("mesh_shape", [(1, 8), (2, 4)])
def test_sharded_rigl_matches_single_device_without_all_gather(mesh_shape):
  assert jax.device_count() == 8
  params, x, y = params_and_batch()
  tx = make_tx()

  # Single device reference.
  ref_p, ref_s = params, tx.init(params)
  single = jax.jit(step_fn(tx))
  for _ in range(4):
    ref_p, ref_s = single(ref_p, ref_s, x, y)

  mesh = sharding.make_mesh(*mesh_shape)
  rules = RULES if mesh_shape[0] == 1 else (
      (r"fc1/kernel", P("data", "model")), (r"fc1/bias", P("model")), (r"fc2/kernel", P("model", "data")))
  abstract_params = jax.eval_shape(lambda: params)
  p_sh = sharding.param_shardings(abstract_params, mesh, rules)
  abstract_state = jax.eval_shape(tx.init, abstract_params)
  s_sh = sharding.shardings_like_params(abstract_state, abstract_params, p_sh, sharding.replicated(mesh))
  # Masks and moments take the parameters' shardings.
  assert s_sh.masks["fc1"]["kernel"] == p_sh["fc1"]["kernel"]
  assert s_sh.inner_state[0].mu["fc2"]["kernel"] == p_sh["fc2"]["kernel"]
  assert s_sh.count == sharding.replicated(mesh)

  sp = jax.device_put(params, p_sh)
  ss = jax.jit(tx.init, in_shardings=(p_sh,), out_shardings=s_sh)(sp)
  assert ss.masks["fc1"]["kernel"].sharding == p_sh["fc1"]["kernel"]
  batch_sh = NamedSharding(mesh, P("data"))
  xs, ys = jax.device_put(x, batch_sh), jax.device_put(y, batch_sh)
  sharded = jax.jit(step_fn(tx), in_shardings=(p_sh, s_sh, batch_sh, batch_sh),
                    out_shardings=(p_sh, s_sh))
  # The transformation alone (a mask-update step: update_every=1), compiled on
  # sharded params, grads and state: no all-gather of parameter-sized arrays
  # (the top-k search only all-reduces counts). The forward pass of a
  # data x model mesh may gather weights (FSDP), so it is checked apart.
  update = jax.jit(lambda g, s, p: tx.update(g, s, p), in_shardings=(p_sh, s_sh, p_sh),
                   out_shardings=(p_sh, s_sh))
  hlo = update.lower(sp, ss, sp).compile().as_text()
  collectives = _collectives(hlo)
  assert collectives and {op for op, _ in collectives} == {"all-reduce"}, collectives
  # Only counts cross devices: every all-reduce moves a few scalars, never a
  # parameter-sized array (the smallest sparse leaf here has 8192 entries).
  assert max(size for _, size in collectives) <= 16, collectives
  for _ in range(4):
    sp, ss = sharded(sp, ss, xs, ys)
  for a, b in zip(jax.tree.leaves(sift_jax.get_masks(ss)), jax.tree.leaves(sift_jax.get_masks(ref_s))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(sp), jax.tree.leaves(ref_p)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
  assert int(ss.stats.num_updates) == 4
  assert int(np.sum(np.asarray(ss.masks["fc1"]["kernel"]))) == round(0.1 * 32 * 256)


def test_sharding_rule_errors_name_the_path():
  mesh = sharding.make_mesh(1, 8)
  params = {"w": jax.ShapeDtypeStruct((30, 16), jnp.float32)}
  with pytest.raises(ValueError, match=r"dimension 30 of parameter 'w' \(shape \(30, 16\)\) is not divisible by 8"):
    sharding.param_shardings(params, mesh, ((r"w", P("model", None)),))
  with pytest.raises(ValueError, match="more axes than parameter 'w'"):
    sharding.param_shardings(params, mesh, ((r"w", P(None, None, "model")),))
  with pytest.raises(ValueError, match="does not match 8 devices"):
    sharding.make_mesh(3, 2)
