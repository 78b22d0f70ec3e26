"""What a compiled RigL step copies: structural checks of the HLO, not timings.

An ordinary (non-update) RigL step should cost what a static sparse step
costs. XLA copies whatever a ``lax.cond`` branch returns unchanged (a
conditional's result never aliases its operands), so the mask-update cond of
:func:`sift_jax.dynamic_sparse` returns only the new masks of the sparse
tensors and two counters; the optimizer moments never pass through it.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sift_jax

_SHAPE = r"(?:f32|f16|bf16|pred|s32|u32)\[[0-9,]*\]"


def _params() -> dict:
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"fc1": {"kernel": jax.random.normal(k1, (24, 96)) * 0.2, "bias": jnp.zeros(96)},
          "fc2": {"kernel": jax.random.normal(k2, (96, 16)) * 0.1, "bias": jnp.zeros(16)}}


def _batch() -> tuple[jax.Array, jax.Array]:
  x = jax.random.normal(jax.random.key(1), (8, 24))
  return x, jnp.arange(8) % 16


def _loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  h = jax.nn.relu(x @ params["fc1"]["kernel"] + params["fc1"]["bias"])
  logits = h @ params["fc2"]["kernel"] + params["fc2"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _step(tx: optax.GradientTransformation, *, donate: bool = True):
  def step(params, state, x, y):
    grads = jax.grad(_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


@functools.lru_cache(maxsize=None)
def _hlo_of(kind: str, inner_name: str, step_on_update: bool = False) -> str:
  """Compiled HLO of one step, compiled once per configuration for all tests."""
  if kind == "static":
    tx = sift_jax.static_sparse(_INNERS[inner_name](), sparsity=0.8)
  else:
    tx = _rigl(inner_name, step_on_update)
  params = _params()
  x, y = _batch()
  return _step(tx).lower(params, tx.init(params), x, y).compile().as_text()


def _float_copies(hlo: str, shapes: set[str]) -> int:
  """Copies anywhere in the module of float buffers with one of ``shapes``."""
  copied = re.findall(r"= (f32\[[0-9,]*\])\{[0-9,]*\} copy\(", hlo)
  return sum(1 for s in copied if s in shapes)


def _conditional_results(hlo: str) -> list[list[str]]:
  """Result shapes of every conditional, e.g. [['pred[24,96]', 's32[]'], ...]."""
  out = []
  for line in hlo.splitlines():
    if " conditional(" in line:
      result = line.split(" = ", 1)[1].split(" conditional(", 1)[0]
      out.append(re.findall(_SHAPE, result))
  return out


_PARAM_SHAPES = {"f32[24,96]", "f32[96]", "f32[96,16]", "f32[16]"}
_INNERS = {"sgd_momentum": lambda: optax.sgd(0.05, momentum=0.9, nesterov=True),
           "adamw": lambda: optax.adamw(1e-2, weight_decay=1e-4)}


def _rigl(inner_name: str, step_on_update: bool) -> optax.GradientTransformation:
  return sift_jax.rigl(_INNERS[inner_name](), sparsity=0.8, total_steps=1000, update_every=5,
                       optimizer_step_on_update=step_on_update)


@pytest.mark.parametrize("inner_name,step_on_update", [("sgd_momentum", False),
                                                       ("sgd_momentum", True)])
def test_mask_update_cond_returns_only_masks_and_counts(inner_name, step_on_update):
  hlo = _hlo_of("rigl", inner_name, step_on_update)
  results = _conditional_results(hlo)
  # The outermost cond is the one with the most results: the two sparse
  # kernels' new masks and the dropped and grown counts. No float buffer
  # (parameter, moment, update) passes through it.
  outer = max(results, key=len)
  assert sorted(outer) == sorted(["pred[24,96]", "pred[96,16]", "s32[]", "s32[]"]), outer
  for result in results:
    assert not any(s.startswith("f32[") and s != "f32[]" for s in result), result


@pytest.mark.parametrize("inner_name", ["sgd_momentum"])
def test_ordinary_step_copies_no_more_float_buffers_than_static(inner_name):
  # With the optimizer step on update steps, nothing but the selection
  # differs from a static step: the moment reset is a select XLA fuses into
  # the optimizer's own in-place pass over the moments.
  n_static = _float_copies(_hlo_of("static", inner_name), _PARAM_SHAPES)
  n_rigl = _float_copies(_hlo_of("rigl", inner_name, True), _PARAM_SHAPES)
  assert n_rigl <= n_static, (n_rigl, n_static)


def test_donated_step_equals_undonated_step_across_updates():
  # update_every=5 from step 0: steps 0 and 5 update masks, the rest are
  # ordinary; one compiled function serves both.
  tx = _rigl("sgd_momentum", False)
  x, y = _batch()
  donated, plain = _step(tx, donate=True), _step(tx, donate=False)
  p_ref, s_ref = _params(), tx.init(_params())
  p, s = jax.tree.map(jnp.copy, (p_ref, s_ref))
  for _ in range(7):
    p_ref, s_ref = plain(p_ref, s_ref, x, y)
    p, s = donated(p, s, x, y)
  assert donated._cache_size() == 1
  assert int(s.stats.num_updates) == 2
  for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((p_ref, s_ref))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
