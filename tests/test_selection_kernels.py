"""Default selection of the weights that multiply an input, and stacked (nn.scan) leaves."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sift_jax
from sift_jax import masks as M
from sift_jax.optim import branch_growth

D = 8
LAYERS = 3


class _Layer(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.LayerNorm(name="ln")(x)
    return x + nn.Dense(D, name="fc")(h), None


class _ScannedMLP(nn.Module):
  """inp -> 3 scanned (LayerNorm, Dense) residual layers -> head."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(D, name="inp")(x)
    blocks = nn.scan(_Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=LAYERS)
    x, _ = blocks(name="blocks")(x, None)
    return nn.Dense(2, name="head")(x)


class _UnrolledMLP(nn.Module):
  """The same layers, unstacked: block_0 .. block_2."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(D, name="inp")(x)
    for i in range(LAYERS):
      x, _ = _Layer(name=f"block_{i}")(x, None)
    return nn.Dense(2, name="head")(x)


X = jax.ShapeDtypeStruct((1, 4), jnp.float32)
STACKED_LEAVES = {"blocks/fc/bias": 1, "blocks/fc/kernel": 1, "blocks/ln/bias": 1,
                  "blocks/ln/scale": 1}


@pytest.fixture(scope="module")
def scanned():
  params = _ScannedMLP().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  policy = sift_jax.SparsityPolicy().with_stacked(sift_jax.detect_stacked(_ScannedMLP(), X))
  return params, policy


def _per_slice_nnz(mask):
  return [int(n) for n in np.asarray(mask).reshape(mask.shape[0], -1).sum(axis=1)]


def test_attention_biases_are_dense_and_kernels_sparse_by_default():
  model = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
  x = jnp.ones((1, 3, 8))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, x))["params"]
  decided = {d.path: (d.sparse, d.rule) for d in M.explain_selection(params)}
  for proj in ("query", "key", "value"):
    assert params[proj]["bias"].shape == (2, 4)  # (heads, head_dim): ndim 2, still a bias
    assert decided[f"{proj}/bias"] == (False, "non-weight:bias")
    assert decided[f"{proj}/kernel"] == (True, "weight:kernel")
  assert decided["out/kernel"] == (True, "weight:kernel")
  assert decided["out/bias"] == (False, "non-weight:bias")
  dens = sift_jax.layer_densities(params, 0.9)
  assert dens["query"]["bias"] == 1.0 and dens["query"]["kernel"] == pytest.approx(0.1)


def test_detect_stacked_finds_exactly_the_scanned_leaves(scanned):
  assert sift_jax.detect_stacked(_ScannedMLP(), X) == STACKED_LEAVES
  assert sift_jax.detect_stacked(_UnrolledMLP(), X) == {}
  _, policy = scanned
  assert sorted(policy.stacked) == sorted((f"^{re.escape(p)}$", 1) for p in STACKED_LEAVES)


def test_detect_stacked_refuses_a_stack_axis_that_is_not_leading():
  class Inner(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return nn.Dense(D, use_bias=False, name="fc")(x), None

  class Trailing(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(D, name="inp")(x)
      x, _ = nn.scan(Inner, variable_axes={"params": 1}, split_rngs={"params": True},
                     length=LAYERS)(name="blocks")(x, None)
      return x

  with pytest.raises(ValueError, match=r"'blocks/fc/kernel' has shape \(8, 3, 8\) but its layer "
                                       r"creates \(8, 8\)"):
    sift_jax.detect_stacked(Trailing(), X)


def test_scanned_norms_and_biases_dense_kernel_stacked(scanned):
  params, policy = scanned
  decided = {d.path: d for d in M.explain_selection(params, policy)}
  assert params["blocks"]["ln"]["scale"].shape == (LAYERS, D)
  assert not decided["blocks/ln/scale"].sparse
  assert decided["blocks/ln/scale"].rule == "non-weight:scale; stacked:1"
  assert not decided["blocks/ln/bias"].sparse and not decided["blocks/fc/bias"].sparse
  assert decided["blocks/fc/kernel"].sparse and decided["blocks/fc/kernel"].stacked == 1
  assert decided["blocks/fc/kernel"].rule == "weight:kernel; stacked:1"
  assert decided["inp/kernel"].stacked == 0 and decided["inp/kernel"].rule == "weight:kernel"
  assert M.stacked_axes(params, policy)["blocks"]["fc"]["kernel"] == 1
  assert M.stacked_axes(params, policy)["inp"]["kernel"] == 0


def test_init_masks_exact_count_in_every_slice(scanned):
  params, policy = scanned
  dens = sift_jax.layer_densities(params, 0.7, policy=policy)
  masks = M.init_masks(jax.random.key(3), params, dens, stacked=M.stacked_axes(params, policy))
  want = M.target_count(0.3, D * D)  # 19 of 64
  assert want == 19
  assert _per_slice_nnz(masks["blocks"]["fc"]["kernel"]) == [want] * LAYERS
  assert bool(jnp.all(masks["blocks"]["ln"]["scale"])) and bool(jnp.all(masks["blocks"]["fc"]["bias"]))
  # The slices are drawn independently, not one pattern repeated.
  k = np.asarray(masks["blocks"]["fc"]["kernel"])
  assert not (np.array_equal(k[0], k[1]) and np.array_equal(k[1], k[2]))


def test_init_masks_rejects_bad_stacked_counts(scanned):
  params, policy = scanned
  dens = sift_jax.layer_densities(params, 0.7, policy=policy)
  bad = jax.tree.map(lambda _: 0, params)
  bad["head"]["bias"] = 2
  with pytest.raises(ValueError, match=r"stacked axes for parameter 'head/bias' \(shape \(2,\)\).*got 2"):
    M.init_masks(jax.random.key(0), params, dens, stacked=bad)


def test_erk_per_slice_equals_erk_of_the_unstacked_model(scanned):
  params, policy = scanned
  unrolled = jax.eval_shape(lambda: _UnrolledMLP().init(jax.random.key(0), jnp.ones((1, 4))))["params"]
  for dist in ("erk", "er"):
    stacked_d = sift_jax.layer_densities(params, 0.7, distribution=dist, policy=policy)
    flat_d = sift_jax.layer_densities(unrolled, 0.7, distribution=dist)
    for i in range(LAYERS):
      assert stacked_d["blocks"]["fc"]["kernel"] == pytest.approx(flat_d[f"block_{i}"]["fc"]["kernel"],
                                                                  rel=1e-12)
    assert stacked_d["inp"]["kernel"] == pytest.approx(flat_d["inp"]["kernel"], rel=1e-12)
    assert stacked_d["head"]["kernel"] == pytest.approx(flat_d["head"]["kernel"], rel=1e-12)
  # Without the stacked rule ERK would score the (3, 8, 8) stack as one 3-D tensor.
  as_one = sift_jax.layer_densities(params, 0.7, distribution="erk")
  assert as_one["blocks"]["fc"]["kernel"] != pytest.approx(
      sift_jax.layer_densities(params, 0.7, distribution="erk", policy=policy)["blocks"]["fc"]["kernel"])


def _skewed(params):
  """Slice 0 of the stacked kernel has the largest weights and gradients, so one top-k over
  the whole stack would drop in slice 2 and grow in slice 0."""
  scale = jnp.array([10.0, 1.0, 0.1])[:, None, None]
  params = jax.tree.map(lambda x: x, params)
  params["blocks"]["fc"]["kernel"] = params["blocks"]["fc"]["kernel"] * scale
  grads = jax.tree.map(jnp.ones_like, params)
  grads["blocks"]["fc"]["kernel"] = jax.random.normal(jax.random.key(5), (LAYERS, D, D)) * scale
  return params, grads


def test_rigl_update_keeps_exact_counts_per_slice(scanned):
  params, policy = scanned
  opt = sift_jax.rigl(optax.sgd(0.1), sparsity=0.7, policy=policy, update_every=1,
                      drop_fraction=0.5, total_steps=10, seed=1)
  state = opt.init(params)
  before = sift_jax.get_masks(state)["blocks"]["fc"]["kernel"]
  assert _per_slice_nnz(before) == [19] * LAYERS
  params, grads = _skewed(sift_jax.apply_masks(params, sift_jax.get_masks(state)))
  _, state = jax.jit(opt.update)(grads, state, params)
  after = sift_jax.get_masks(state)["blocks"]["fc"]["kernel"]
  assert _per_slice_nnz(after) == [19] * LAYERS
  # floor(0.5 * 19) = 9 dropped and 9 grown per slice (some regrown where they were
  # dropped): every slice changed, none by more than 9.
  changed = [int(n) for n in np.asarray(before & ~after).reshape(LAYERS, -1).sum(axis=1)]
  assert all(1 <= n <= 9 for n in changed), changed
  others = [M.target_count(0.3, 4 * D), M.target_count(0.3, D * 2)]  # inp 10, head 5
  assert int(state.stats.num_grown) == int(state.stats.num_dropped) >= sum(changed)
  stats = sift_jax.sparse_stats(state)
  masks = sift_jax.get_masks(state)
  sparse_leaves = [masks["blocks"]["fc"]["kernel"], masks["inp"]["kernel"], masks["head"]["kernel"]]
  want = sum(int(m.sum()) for m in sparse_leaves) / sum(m.size for m in sparse_leaves)
  assert float(stats["sparse_density"]) == pytest.approx(want, rel=1e-6)
  assert sum(int(m.sum()) for m in sparse_leaves) == 19 * LAYERS + sum(others)


def test_global_scope_and_pruning_accept_stacked_leaves(scanned):
  params, policy = scanned
  glob = sift_jax.optim.dynamic_sparse(
      optax.sgd(0.1), drop_score_fn=sift_jax.optim.magnitude_score,
      grow_score_fn=sift_jax.optim.gradient_score, drop_fraction=0.5,
      update_schedule=lambda step: step == 0, sparsity=0.7, policy=policy, scope="global")
  state = glob.init(params)
  total = sum(int(m.sum()) for m in jax.tree.leaves(sift_jax.get_masks(state)))
  p, g = _skewed(params)
  _, state = jax.jit(glob.update)(g, state, p)
  assert sum(int(m.sum()) for m in jax.tree.leaves(sift_jax.get_masks(state))) == total
  prune = sift_jax.optim.dynamic_sparse(
      optax.sgd(0.1), update_schedule=lambda step: step == 0, sparsity=0.7, policy=policy,
      sparsity_progress=lambda step: jnp.float32(1.0), start_dense=True)
  state = prune.init(params)
  _, state = jax.jit(prune.update)(g, state, p)
  assert _per_slice_nnz(sift_jax.get_masks(state)["blocks"]["fc"]["kernel"]) == [19] * LAYERS


def test_branch_growth_on_stacked_siblings_is_exclusive_per_slice():
  key = jax.random.key(0)
  params = {"blocks": {"fc": {"branch_0": {"kernel": jax.random.normal(key, (LAYERS, D, D))},
                              "branch_1": {"kernel": jax.random.normal(jax.random.key(1), (LAYERS, D, D))}}}}
  policy = sift_jax.SparsityPolicy(stacked=(r"^blocks/",))
  opt = sift_jax.rigl(optax.sgd(0.1), sparsity=0.75, policy=policy, update_every=1, drop_fraction=0.5,
                      total_steps=10, grow_groups=sift_jax.parallel_branch_groups)
  state = opt.init(params)
  old = sift_jax.get_masks(state)["blocks"]["fc"]
  params = sift_jax.apply_masks(params, sift_jax.get_masks(state))
  same = jax.random.normal(jax.random.key(2), (LAYERS, D, D))  # identical gradients: RigL alone
  grads = {"blocks": {"fc": {"branch_0": {"kernel": same}, "branch_1": {"kernel": same}}}}
  _, state = jax.jit(opt.update)(grads, state, params)
  new = sift_jax.get_masks(state)["blocks"]["fc"]
  for b in ("branch_0", "branch_1"):
    assert _per_slice_nnz(new[b]["kernel"]) == [16] * LAYERS
  grown0 = np.asarray(new["branch_0"]["kernel"] & ~old["branch_0"]["kernel"])
  grown1 = np.asarray(new["branch_1"]["kernel"] & ~old["branch_1"]["kernel"])
  assert all(1 <= n <= 8 for n in grown0.reshape(LAYERS, -1).sum(axis=1)), grown0.sum()
  # Free positions abound, so no branch grows where its sibling is active.
  assert not (grown0 & np.asarray(new["branch_1"]["kernel"])).any()
  assert not (grown1 & np.asarray(new["branch_0"]["kernel"])).any()
  with pytest.raises(ValueError, match="stacked alike"):
    branch_growth.resolve_groups(sift_jax.parallel_branch_groups, params,
                                 ["blocks/fc/branch_0/kernel", "blocks/fc/branch_1/kernel"],
                                 what="rigl", stacked={"blocks/fc/branch_0/kernel": 1})


def test_user_declared_weights_and_plain_dicts():
  params = {"enc": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,))},
            "mix": {"w": jnp.ones((4, 4))}, "embed": {"embedding": jnp.ones((10, 4))}}
  decided = {d.path: (d.sparse, d.rule) for d in M.explain_selection(params)}
  assert decided["mix/w"] == (False, "not a weight:w")
  assert decided["embed/embedding"] == (False, "non-weight:embedding")
  policy = sift_jax.SparsityPolicy(weights=(r"/w$", r"^embed/embedding$"))
  decided = {d.path: (d.sparse, d.rule) for d in M.explain_selection(params, policy)}
  assert decided["mix/w"] == (True, "weights:/w$")
  assert decided["embed/embedding"] == (True, "weights:^embed/embedding$")
  assert decided["enc/kernel"] == (True, "weight:kernel")
  # A plain dict naming no weight keeps the rank rule (biases by name stay dense).
  plain = {"w1": jnp.ones((4, 4)), "b1": jnp.ones((4,)), "bias": jnp.ones((4, 4))}
  decided = {d.path: (d.sparse, d.rule) for d in M.explain_selection(plain)}
  assert decided == {"w1": (True, "default:ndim>=2"), "b1": (False, "ndim<2"),
                     "bias": (False, "non-weight:bias")}
  with pytest.raises(ValueError, match=r"SparsityPolicy.weights: invalid regex '\['"):
    sift_jax.SparsityPolicy(weights=("[",))


def test_bad_stacked_input_names_the_value():
  with pytest.raises(ValueError, match=r"stacked\['blocks'\] = 0 must be a positive int"):
    sift_jax.SparsityPolicy(stacked={"blocks": 0})
  with pytest.raises(ValueError, match=r"stacked\['blocks'\] = 'two' must be a positive int"):
    sift_jax.SparsityPolicy(stacked={"blocks": "two"})
  with pytest.raises(ValueError, match=r"stacked must be a mapping.*got 3"):
    sift_jax.SparsityPolicy(stacked=3)
  with pytest.raises(ValueError, match=r"SparsityPolicy.stacked: invalid regex '\('"):
    sift_jax.SparsityPolicy(stacked=("(",))
  policy = sift_jax.SparsityPolicy(stacked={"head/bias": 2})
  with pytest.raises(ValueError, match=r"stacked\['head/bias'\] = 2 stacked axes, but parameter "
                                       r"'head/bias' has shape \(2,\)"):
    M.explain_selection({"head": {"bias": jnp.ones((2,)), "kernel": jnp.ones((2, 2))}}, policy)


def test_policy_copies_and_transformed_policy_carry_the_stacked_axes():
  policy = sift_jax.SparsityPolicy(stacked=("blocks",))
  assert policy.stacked == (("blocks", 1),)
  assert policy.with_dense("^head/").stacked == (("blocks", 1),)
  assert sift_jax.transformed_policy(policy, "sparse_doped").stacked == (("blocks", 1),)
  assert hash(policy) == hash(sift_jax.SparsityPolicy(stacked={"blocks": 1}))


def test_transformed_scanned_model_detects_its_stacked_leaves(scanned):
  _, policy = scanned
  sift = sift_jax.transform(_ScannedMLP(), family="sparse_factorized", sparsity=0.5,
                            policy=policy.with_dense("^inp/", "^head/"))
  params = jax.eval_shape(lambda: sift.init(jax.random.key(0), jnp.ones((1, 4))))["params"]
  assert params["blocks"]["fc"]["U"]["kernel"].shape == (LAYERS, D, D)  # transformed in the scan
  decided = {d.path: d for d in M.explain_selection(params, sift.sparsity_policy(X))}
  assert decided["blocks/fc/U/kernel"].sparse and decided["blocks/fc/U/kernel"].stacked == 1
  assert decided["blocks/fc/V/kernel"].sparse and decided["blocks/fc/V/kernel"].stacked == 1
  assert not decided["blocks/fc/V/bias"].sparse and not decided["inp/kernel"].sparse
  # Without inputs only the user's rules carry over: the base model's exact paths.
  assert sift.sparsity_policy().stacked == policy.stacked


class _MlpLayer(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.relu(nn.Dense(2 * D, name="fc1")(nn.LayerNorm(name="ln")(x)))
    return x + nn.Dense(D, name="fc2")(h), None


class _ScannedResidualMLP(nn.Module):
  """inp -> 3 scanned residual MLP layers (fc1 may widen, fc2 writes the stream) -> head."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(D, name="inp")(x)
    blocks = nn.scan(_MlpLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=LAYERS)
    x, _ = blocks(name="blocks")(x, None)
    return nn.Dense(2, name="head")(x)


def test_detect_stacked_on_a_sparse_wide_scanned_model():
  # The Sparse Wide plan traces the scan body at the original widths too (its probes): the
  # slice is the seen shape that ends the final one, not the first one seen.
  sift = sift_jax.transform(_ScannedResidualMLP(), family="sparse_wide", sparsity=0.5)
  params = jax.eval_shape(sift.init, jax.random.key(0), jnp.ones((1, 4)))["params"]
  assert params["blocks"]["fc1"]["kernel"].shape == (LAYERS, D, 23)  # round(16 * sqrt 2)
  assert params["blocks"]["fc2"]["kernel"].shape == (LAYERS, 23, D)
  layer_leaves = ("fc1/bias", "fc1/kernel", "fc2/bias", "fc2/kernel", "ln/bias", "ln/scale")
  assert sift_jax.detect_stacked(sift, X) == {f"blocks/{p}": 1 for p in layer_leaves}
  decided = {d.path: d for d in M.explain_selection(params, sift.sparsity_policy(X))}
  assert decided["blocks/fc1/kernel"].sparse and decided["blocks/fc1/kernel"].stacked == 1
  assert not decided["blocks/fc1/bias"].sparse
