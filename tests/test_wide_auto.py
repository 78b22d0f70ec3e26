"""Sparse Wide on transformers without naming layers: the plan found by probing the model."""

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sift_jax
from sift_jax import flops
from sift_jax.masks import layer_densities
from sift_jax.transformations import (IsoFlopToleranceWarning, WideAnalysisError, WidePlan,
                                      exact_output_layers, plan_sparse_wide, transform)

D, HEADS, TOKENS = 16, 2, 6


class Block(nn.Module):
  """Pre-LN block: Flax attention (DenseGeneral q/k/v/out) and an MLP, both residual."""

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=D, name="attn")(h, h)
    h = nn.LayerNorm()(x)
    return x + nn.Dense(D, name="fc2")(nn.gelu(nn.Dense(4 * D, name="fc1")(h)))


class ViT(nn.Module):
  """ViT-like: patch embedding + position embedding, two blocks, pooled classifier."""

  @nn.compact
  def __call__(self, patches):  # (B, tokens, patch features)
    x = nn.Dense(D, name="embed")(patches)
    x = x + self.param("pos", nn.initializers.normal(0.02), (TOKENS, D))
    for i in range(2):
      x = Block(name=f"block_{i}")(x)
    return nn.Dense(5, name="head")(nn.LayerNorm()(x).mean(axis=1))


class BertLayer(nn.Module):
  """Post-LN encoder layer (BERT)."""

  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm()(x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")(x, x))
    return nn.LayerNorm()(x + nn.Dense(D, name="fc2")(nn.gelu(nn.Dense(2 * D, name="fc1")(x))))


class Bert(nn.Module):
  """BERT-like: token and position nn.Embed, two layers, MLM head (dense, norm, decoder)."""

  vocab: int = 24

  @nn.compact
  def __call__(self, tokens):  # (B, T) int
    x = nn.Embed(self.vocab, D, name="tok")(tokens)
    x = x + nn.Embed(TOKENS, D, name="pos")(jnp.arange(tokens.shape[1]))
    x = nn.LayerNorm()(x)
    for i in range(2):
      x = BertLayer(name=f"layer_{i}")(x)
    h = nn.LayerNorm()(nn.gelu(nn.Dense(D, name="mlm_dense")(x)))
    return nn.Dense(self.vocab, name="decoder")(h)


class FusedQKV(nn.Module):
  """Hand-written attention: one fused q/k/v Dense reshaped into fixed-size heads."""

  @nn.compact
  def __call__(self, x):  # (B, T, D)
    b, t, _ = x.shape
    qkv = nn.Dense(3 * D, name="qkv")(nn.LayerNorm()(x)).reshape(b, t, 3, HEADS, D // HEADS)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    a = nn.dot_product_attention(q, k, v).reshape(b, t, D)
    x = x + nn.Dense(D, name="proj")(a)
    return x + nn.Dense(D, name="fc2")(nn.relu(nn.Dense(2 * D, name="fc1")(nn.LayerNorm()(x))))


def _random_init(module, x, seed=0):
  """Variables with numpy random values: no XLA compile of the initialisers."""
  abstract = jax.eval_shape(module.init, jax.random.key(0), x)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.3, a.dtype), abstract)


X_PATCH = jax.random.normal(jax.random.key(0), (2, TOKENS, 12))
X_TOK = jax.random.randint(jax.random.key(1), (2, TOKENS), 0, 24)
X_SEQ = jax.random.normal(jax.random.key(2), (2, TOKENS, D))


def _block_widened(prefix):
  return [f"{prefix}/attn/query", f"{prefix}/attn/key", f"{prefix}/attn/value", f"{prefix}/fc1"]


# Golden plans: what is widened and what keeps its width (residual writers, model outputs).
CASES = {
    "vit": (ViT, X_PATCH,
            _block_widened("block_0") + _block_widened("block_1"),
            ["embed", "block_0/attn/out", "block_0/fc2", "block_1/attn/out", "block_1/fc2", "head"]),
    "bert": (Bert, X_TOK,
             _block_widened("layer_0") + _block_widened("layer_1") + ["mlm_dense"],
             ["layer_0/attn/out", "layer_0/fc2", "layer_1/attn/out", "layer_1/fc2", "decoder"]),
    # The fused qkv output is reshaped into (3, heads, head_dim): it keeps its width.
    "fused_qkv": (FusedQKV, X_SEQ, ["fc1"], ["qkv", "proj", "fc2"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_sparse_wide_plan_builds_and_is_iso_flop_without_output_layers(name):
  cls, x, widened, kept = CASES[name]
  model = cls()
  sift = transform(model, family="sparse_wide", sparsity=0.5)
  plan = sift.wide_plan(x)
  assert isinstance(plan, WidePlan)
  assert sorted(plan.widened) == sorted(widened) and sorted(plan.kept) == sorted(kept)
  assert plan.output_layers == exact_output_layers(plan.kept)
  assert [p for p, _ in plan.reasons] == list(plan.kept)
  v = _random_init(sift, x)
  out = jax.jit(sift.apply)(v, x)
  want = jax.eval_shape(model.init_with_output, jax.random.key(0), x)[0]
  assert (out.shape, out.dtype) == (want.shape, want.dtype)
  assert np.all(np.isfinite(np.asarray(out)))
  params = v["params"]
  base = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  width = lambda tree, path: functools.reduce(lambda t, k: t[k], path.split("/"), tree)["kernel"].shape[-1]
  for path in widened:  # output features grow by round(w * sqrt 2)
    assert width(params, path) == round(width(base, path) * 2 ** 0.5), path
  for path in kept:
    assert width(params, path) == width(base, path), path
  # Iso-FLOP on the layers actually widened: the solve, and the MAC count of the sparse-widened
  # model at the solved densities (exact-count masks) against the dense model's.
  with warnings.catch_warnings():
    warnings.simplefilter("error", IsoFlopToleranceWarning)
    sol = sift.solve(x[:1])
  assert sol.within_tolerance and abs(sol.iso_flop_ratio - 1.0) < 0.005
  dens = layer_densities(params, sol.solved_sparsity, policy=sift.sparsity_policy())
  base_macs = flops.count_macs(model, jax.eval_shape(model.init, jax.random.key(0), x), x[:1])
  assert sol.base_dense_macs == base_macs.total
  report = flops.flops_report(flops.count_macs(sift, v, x[:1]), params, densities=dens,
                              base_dense_macs=base_macs.total)
  assert abs(report.iso_flop_ratio - 1.0) < 0.005
  assert report.sparse_macs == pytest.approx(sol.sparse_macs)


def test_explicit_output_layers_win_over_the_plan():
  sift = transform(ViT(), family="sparse_wide", sparsity=0.5,
                   output_layers=("embed", "attn/out", "fc1", "fc2", "head"))
  params = jax.eval_shape(sift.init, jax.random.key(0), X_PATCH)["params"]
  assert params["block_0"]["fc1"]["kernel"].shape == (D, 4 * D)  # kept: named in output_layers
  assert params["block_0"]["attn"]["query"]["kernel"].shape == (D, HEADS, 11)
  # The plan itself does not depend on output_layers= (it is what output_layers=None applies).
  assert "block_0/fc1" in sift.wide_plan(X_PATCH).widened


def test_plan_equals_naming_the_residual_writers():
  auto = transform(Block(), family="sparse_wide", sparsity=0.75)
  named = transform(Block(), family="sparse_wide", sparsity=0.75, output_layers=("attn/out", "fc2"))
  shapes = lambda m: jax.tree.map(lambda a: a.shape, jax.eval_shape(m.init, jax.random.key(0), X_SEQ))
  assert shapes(auto) == shapes(named)
  v = _random_init(named, X_SEQ)
  np.testing.assert_array_equal(jax.jit(auto.apply)(v, X_SEQ), jax.jit(named.apply)(v, X_SEQ))
  plan = auto.wide_plan(X_SEQ)
  assert plan.groups == (("attn/query", "attn/key"), ("attn/value",), ("fc1",))
  assert plan.kept == ("attn/out", "fc2")


class Conflict(nn.Module):
  """Two width-1 gates whose widths enter one shared layer through a concat and an outer product.

  Widening ``a`` or ``b`` alone gives the shared ``mix`` inputs of equal width (3 and 2*1+1);
  widening both does not (4 and 5): which one to widen is the user's choice.
  """

  @nn.compact
  def __call__(self, x):
    a, b = nn.Dense(1, name="a")(x), nn.Dense(1, name="b")(x)
    mix = nn.Dense(4, name="mix")
    outer = (a[:, :, None] * b[:, None, :]).reshape(x.shape[0], -1)
    u = jnp.concatenate([a, b], -1)
    v = jnp.concatenate([outer, jnp.ones((x.shape[0], 1))], -1)
    return nn.Dense(3, name="head")(mix(u) + mix(v))


def test_undecidable_model_raises_with_the_output_layers_to_pass():
  x = jnp.ones((2, 5))
  sift = transform(Conflict(), family="sparse_wide", sparsity=0.75)
  fw = "output_layers=('^b$', '^head$') (widens ['a', 'mix'])"
  bw = "output_layers=('^a$', '^head$') (widens ['b', 'mix'])"
  with pytest.raises(WideAnalysisError) as err:
    jax.eval_shape(sift.init, jax.random.key(0), x)
  assert isinstance(err.value, ValueError) and sift_jax.WideAnalysisError is WideAnalysisError
  msg = str(err.value)
  assert "cannot decide which layers of Conflict to widen" in msg and fw in msg and bw in msg
  # Either suggestion builds, with the original output shape.
  for kept in (("^b$", "^head$"), ("^a$", "^head$")):
    chosen = transform(Conflict(), family="sparse_wide", sparsity=0.75, output_layers=kept)
    assert jax.eval_shape(chosen.init_with_output, jax.random.key(0), x)[0].shape == (2, 3)


def test_plan_logic_on_a_recorded_probe():
  # A synthetic model: q and k widen only together, v and fc1 alone; out and fc2 never.
  ok = [{"fc1"}, {"attn/v"}, {"attn/q", "attn/k"}]
  calls = []

  def probe(widened):
    calls.append(set(widened))
    rest = set(widened)
    for group in ok:
      if group <= rest:
        rest -= group
    return None if not rest else f"cannot widen {sorted(rest)}"

  paths = ["attn/q", "attn/k", "attn/v", "attn/out", "fc1", "fc2"]
  plan = plan_sparse_wide(paths, probe)
  assert plan.widened == ("attn/q", "attn/k", "attn/v", "fc1")
  assert plan.kept == ("attn/out", "fc2")
  assert plan.groups == (("attn/q", "attn/k"), ("attn/v",), ("fc1",))
  assert dict(plan.reasons) == {"attn/out": "cannot widen ['attn/out']", "fc2": "cannot widen ['fc2']"}
  # 6 singletons, the attn pairs (q,k) then (out alone is left), the union: 8 probes.
  assert len(calls) == 8 and calls[-1] == {"attn/q", "attn/k", "attn/v", "fc1"}
  with pytest.raises(WideAnalysisError, match=r"cannot widen any layer of the model.*'attn/q': "
                     r"no.*output_layers=\('\^attn/q\$', '\^fc1\$'\), widens nothing"):
    plan_sparse_wide(["attn/q", "fc1"], lambda w: "no")


class FlatResidual(nn.Module):
  """A residual stream whose writers are siblings: embed and fc2 could widen only with the stream."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(D, name="embed")(x)
    x = x + nn.Dense(D, name="fc2")(nn.relu(nn.Dense(2 * D, name="fc1")(x)))
    return nn.Dense(3, name="head")(x)


def test_sibling_writers_of_a_residual_stream_keep_their_width():
  sift = transform(FlatResidual(), family="sparse_wide", sparsity=0.5)
  plan = sift.wide_plan(jnp.ones((2, 5)))
  # (embed, fc2) together would build, widening the stream: fc2 reads embed's output through fc1.
  assert plan.widened == ("fc1",) and plan.kept == ("embed", "fc2", "head")
  assert "add got incompatible shapes" in dict(plan.reasons)["embed"]
