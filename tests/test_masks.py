"""Mask transforms on parameter pytrees: selection, densities, init, apply, stats."""

import flax
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sift_jax
from sift_jax import masks as M

# CIFAR ResNet-18 masked convolutions (Flax layout kh, kw, C_in, C_out): the
# 3x3 block convs and the 1x1 projection shortcuts (docs/method.md, section 3).
RESNET18_CONVS = {
    "layer1_0/conv1": (3, 3, 64, 64), "layer1_0/conv2": (3, 3, 64, 64),
    "layer1_1/conv1": (3, 3, 64, 64), "layer1_1/conv2": (3, 3, 64, 64),
    "layer2_0/conv1": (3, 3, 64, 128), "layer2_0/conv2": (3, 3, 128, 128),
    "layer2_0/shortcut": (1, 1, 64, 128),
    "layer2_1/conv1": (3, 3, 128, 128), "layer2_1/conv2": (3, 3, 128, 128),
    "layer3_0/conv1": (3, 3, 128, 256), "layer3_0/conv2": (3, 3, 256, 256),
    "layer3_0/shortcut": (1, 1, 128, 256),
    "layer3_1/conv1": (3, 3, 256, 256), "layer3_1/conv2": (3, 3, 256, 256),
    "layer4_0/conv1": (3, 3, 256, 512), "layer4_0/conv2": (3, 3, 512, 512),
    "layer4_0/shortcut": (1, 1, 256, 512),
    "layer4_1/conv1": (3, 3, 512, 512), "layer4_1/conv2": (3, 3, 512, 512),
}


def resnet18_abstract():
  return {k: {"kernel": jax.ShapeDtypeStruct(v, jnp.float32)} for k, v in RESNET18_CONVS.items()}


def small_params(key=0):
  k = jax.random.key(key)
  k1, k2, k3 = jax.random.split(k, 3)
  return {
      "stem": {"kernel": jax.random.normal(k1, (3, 3, 3, 8)), "bias": jnp.zeros(8)},
      "block": {"kernel": jax.random.normal(k2, (3, 3, 8, 16)), "scale": jnp.ones(16)},
      "head": {"kernel": jax.random.normal(k3, (16, 10)), "bias": jnp.zeros(10)},
  }


# --- paths and selection -----------------------------------------------------

def test_path_strings_for_dict_frozendict_and_nnx_state():
  params = small_params()
  assert M.leaf_paths(params) == ["block/kernel", "block/scale", "head/bias", "head/kernel",
                                  "stem/bias", "stem/kernel"]
  assert M.leaf_paths(flax.core.freeze(params)) == M.leaf_paths(params)

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.fc = nnx.Linear(4, 3, rngs=rngs)

  state = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
  assert M.leaf_paths(state) == ["fc/bias", "fc/kernel"]


def test_policy_rules_and_order():
  params = small_params()
  default = M.explain_selection(params)
  assert {d.path: d.sparse for d in default} == {
      "block/kernel": True, "block/scale": False, "head/bias": False, "head/kernel": True,
      "stem/bias": False, "stem/kernel": True}
  policy = sift_jax.SparsityPolicy(dense=("^stem/", "^head/"))
  decided = {d.path: (d.sparse, d.rule) for d in M.explain_selection(params, policy)}
  assert decided["stem/kernel"] == (False, "dense:^stem/")
  assert decided["head/kernel"] == (False, "dense:^head/")
  assert decided["block/kernel"] == (True, "weight:kernel")
  assert decided["block/scale"] == (False, "non-weight:scale")
  only_head = sift_jax.SparsityPolicy(sparse=("head",))
  assert [d.path for d in M.explain_selection(params, only_head) if d.sparse] == ["head/kernel"]
  # A callable decides first, even against a dense regex.
  fn_policy = sift_jax.SparsityPolicy(dense=("stem",), fn=lambda p, x: True if p == "stem/kernel" else None)
  assert M.select_sparse(params, fn_policy)["stem"]["kernel"] is True
  assert M.select_sparse(params, fn_policy)["stem"]["bias"] is False


def test_policy_errors_name_the_problem():
  with pytest.raises(ValueError, match="selects no sparse leaf"):
    M.select_sparse(small_params(), sift_jax.SparsityPolicy(sparse=("nothing_matches",)))
  with pytest.raises(ValueError, match=r"invalid regex '\('"):
    sift_jax.SparsityPolicy(dense=("(",))
  with pytest.raises(ValueError, match=r"densities\['head'\] = 1.5"):
    sift_jax.SparsityPolicy(densities={"head": 1.5})


# --- densities ---------------------------------------------------------------

def test_uniform_densities_and_dense_leaves():
  d = sift_jax.layer_densities(small_params(), 0.75)
  assert d["block"]["kernel"] == 0.25 and d["head"]["kernel"] == 0.25 and d["stem"]["kernel"] == 0.25
  assert d["block"]["scale"] == 1.0 and d["head"]["bias"] == 1.0


# Golden ERK densities for the CIFAR ResNet-18 convs (checked against an
# independent transcription of RigL's get_sparsities_erdos_renyi).
GOLDEN_ERK = {
    0.9: {"layer1_0/conv1": 0.48244559699239853, "layer2_0/conv1": 0.35643368733020486,
          "layer2_0/shortcut": 1.0, "layer3_0/shortcut": 1.0,
          "layer4_0/shortcut": 0.7796986910348231, "layer4_1/conv2": 0.057942976317883685},
    0.5: {"layer1_0/conv1": 1.0, "layer2_0/conv1": 1.0, "layer2_0/shortcut": 1.0,
          "layer3_0/shortcut": 1.0, "layer4_0/shortcut": 1.0,
          "layer4_1/conv2": 0.3584310015996062},
}


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_erk_golden_values_for_resnet18(sparsity):
  params = resnet18_abstract()
  d = sift_jax.layer_densities(params, sparsity, distribution="erk")
  for path, want in GOLDEN_ERK[sparsity].items():
    assert d[path]["kernel"] == pytest.approx(want, rel=1e-12), path
  sizes = {k: int(np.prod(v)) for k, v in RESNET18_CONVS.items()}
  total = sum(d[k]["kernel"] * sizes[k] for k in sizes) / sum(sizes.values())
  assert total == pytest.approx(1 - sparsity, rel=1e-12)
  assert all(0 < d[k]["kernel"] <= 1.0 for k in sizes)
  # Dense-layer loop: at s=0.5 twelve layers are forced dense.
  n_dense = sum(d[k]["kernel"] == 1.0 for k in sizes)
  assert n_dense == {0.9: 2, 0.5: 12}[sparsity]


def test_er_uses_channel_dims_only():
  params = {"a": {"kernel": jax.ShapeDtypeStruct((3, 3, 16, 32), jnp.float32)},
            "b": {"kernel": jax.ShapeDtypeStruct((64, 32), jnp.float32)}}
  d = sift_jax.layer_densities(params, 0.8, distribution="er")
  raw_a, raw_b = (16 + 32) / (16 * 32), (64 + 32) / (64 * 32)
  n_a, n_b = 3 * 3 * 16 * 32, 64 * 32
  eps = 0.2 * (n_a + n_b) / (raw_a * n_a + raw_b * n_b)
  assert d["a"]["kernel"] == pytest.approx(eps * raw_a, rel=1e-12)
  assert d["b"]["kernel"] == pytest.approx(eps * raw_b, rel=1e-12)


def test_density_overrides_are_fixed_and_excluded_from_budget():
  params = resnet18_abstract()
  policy = sift_jax.SparsityPolicy(densities={"shortcut": 0.5})
  d = sift_jax.layer_densities(params, 0.9, distribution="erk", policy=policy)
  for k in ("layer2_0/shortcut", "layer3_0/shortcut", "layer4_0/shortcut"):
    assert d[k]["kernel"] == 0.5
  sizes = {k: int(np.prod(v)) for k, v in RESNET18_CONVS.items() if "shortcut" not in k}
  total = sum(d[k]["kernel"] * sizes[k] for k in sizes) / sum(sizes.values())
  assert total == pytest.approx(0.1, rel=1e-12)
  u = sift_jax.layer_densities(params, 0.9, policy=policy)
  assert u["layer2_0/shortcut"]["kernel"] == 0.5 and u["layer1_0/conv1"]["kernel"] == pytest.approx(0.1)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), "0.5x", None])
def test_bad_sparsity_is_rejected(bad):
  with pytest.raises(ValueError, match="sparsity must be"):
    sift_jax.layer_densities(small_params(), bad)


def test_unknown_distribution():
  with pytest.raises(ValueError, match="'erdos'"):
    sift_jax.layer_densities(small_params(), 0.5, distribution="erdos")


# --- init / apply / stats ----------------------------------------------------

def test_target_count_rounding():
  assert M.target_count(0.5, 3) == 2        # 1.5 rounds half up
  assert M.target_count(0.25, 10) == 3      # 2.5 rounds half up
  assert M.target_count(0.24, 10) == 2
  assert M.target_count(0.1, 4) == 1        # 0.4 would be 0: a layer keeps >= 1
  assert M.target_count(1.0, 7) == 7


def test_init_masks_exact_counts_and_randomness():
  params = small_params()
  dens = sift_jax.layer_densities(params, 0.7)
  masks = sift_jax.init_masks(jax.random.key(1), params, dens)
  for path, p, m, d in zip(M.leaf_paths(params), jax.tree.leaves(params), jax.tree.leaves(masks),
                           jax.tree.leaves(dens)):
    assert m.dtype == jnp.bool_ and m.shape == p.shape
    assert int(m.sum()) == M.target_count(d, p.size), path
  other = sift_jax.init_masks(jax.random.key(2), params, dens)
  assert not np.array_equal(masks["block"]["kernel"], other["block"]["kernel"])
  # Positions are not the first k indices.
  flat = np.asarray(masks["block"]["kernel"]).ravel()
  assert not flat[: flat.sum()].all()


def test_init_masks_positions_are_uniform():
  # Each of 40 positions should be picked ~ k/n of the time over many keys.
  params = {"w": jnp.zeros((5, 8))}
  dens = {"w": 0.25}
  hits = np.zeros(40)
  draw = jax.jit(lambda k: sift_jax.init_masks(k, params, dens)["w"])
  for seed in range(400):
    hits += np.asarray(draw(jax.random.key(seed))).ravel()
  assert hits.sum() == 400 * 10
  # Binomial(400, 0.25): mean 100, std ~8.7; every position within 5 std.
  assert np.all(np.abs(hits - 100) < 45), hits


def test_init_masks_jit_eager_and_abstract():
  params = small_params()
  dens = sift_jax.layer_densities(params, 0.6)
  key = jax.random.key(3)
  eager = sift_jax.init_masks(key, params, dens)
  jitted = jax.jit(lambda k, p: sift_jax.init_masks(k, p, dens))(key, params)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_array_equal(a, b)
  abstract = jax.eval_shape(lambda k: sift_jax.init_masks(k, resnet18_abstract(),
                                                          sift_jax.layer_densities(resnet18_abstract(), 0.9)), key)
  assert abstract["layer4_1/conv2"]["kernel"].shape == (3, 3, 512, 512)
  assert abstract["layer4_1/conv2"]["kernel"].dtype == jnp.bool_


def test_apply_masks_and_stats_on_linen_and_nnx():
  params = flax.core.freeze(small_params())
  masks = sift_jax.init_masks(jax.random.key(0), params, sift_jax.layer_densities(params, 0.5))
  masked = sift_jax.apply_masks(params, masks)
  for p, m in zip(jax.tree.leaves(masked), jax.tree.leaves(masks)):
    assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)
  stats = sift_jax.mask_stats(masks)
  assert stats["per_leaf"]["block/kernel"]["nnz"] == 576 and stats["per_leaf"]["block/kernel"]["size"] == 1152
  assert stats["size"] == sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  assert int(stats["nnz"]) == sum(int(m.sum()) for m in jax.tree.leaves(masks))

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = nnx.Linear(6, 8, rngs=rngs)
      self.fc2 = nnx.Linear(8, 2, rngs=rngs)

  state = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
  nd = sift_jax.layer_densities(state, 0.75)
  nm = sift_jax.init_masks(jax.random.key(0), state, nd)
  assert int(sift_jax.mask_stats(nm)["per_leaf"]["fc1/kernel"]["nnz"]) == 12
  applied = sift_jax.apply_masks(state, nm)
  assert isinstance(applied, nnx.State)
  jitted = jax.jit(sift_jax.mask_stats)(nm)
  assert int(jitted["nnz"]) == 12 + 4 + 8 + 2


def test_mask_tree_errors_name_the_path():
  params = small_params()
  masks = sift_jax.init_masks(jax.random.key(0), params, sift_jax.layer_densities(params, 0.5))
  missing = {k: v for k, v in masks.items() if k != "head"}
  with pytest.raises(ValueError, match=r"missing for parameter path\(s\) \['head/bias', 'head/kernel'\]"):
    sift_jax.apply_masks(params, missing)
  wrong_shape = jax.tree.map(lambda m: m, masks)
  wrong_shape["block"]["kernel"] = jnp.ones((3, 3, 8, 15), bool)
  with pytest.raises(ValueError, match=r"'block/kernel' has shape \(3, 3, 8, 15\), expected \(3, 3, 8, 16\)"):
    M.check_masks(params, wrong_shape)
  # apply_masks validates too: a (16,) mask would otherwise broadcast silently.
  broadcastable = jax.tree.map(lambda m: m, masks)
  broadcastable["head"]["kernel"] = jnp.ones((10,), bool)
  with pytest.raises(ValueError, match=r"'head/kernel' has shape \(10,\), expected \(16, 10\)"):
    sift_jax.apply_masks(params, broadcastable)
  wrong_dtype = jax.tree.map(lambda m: m, masks)
  wrong_dtype["head"]["kernel"] = jnp.ones((16, 10), jnp.float32)
  with pytest.raises(ValueError, match="'head/kernel' has dtype float32, expected bool"):
    M.check_masks(params, wrong_dtype)
  with pytest.raises(ValueError, match="'head/kernel' has dtype float32, expected bool"):
    sift_jax.apply_masks(params, wrong_dtype)
  dens = sift_jax.layer_densities(params, 0.5)
  dens["stem"]["kernel"] = 0.0
  with pytest.raises(ValueError, match=r"density for parameter 'stem/kernel' must be in \(0, 1\], got 0.0"):
    sift_jax.init_masks(jax.random.key(0), params, dens)


# --- exact top-k -------------------------------------------------------------

def test_select_top_k_exact_with_ties_and_exclusions():
  keys = jnp.array([5, 5, 5, 5, 1, -1, 7, 5], jnp.int32)
  for k in range(9):
    sel = np.asarray(M.select_top_k(keys, k, jnp.uint32(3)))
    assert sel.sum() == min(k, 7)
    assert not sel[5]                           # excluded never chosen
    if k >= 1:
      assert sel[6]                             # the largest key first
    if 1 <= k <= 5:
      assert not sel[4]                         # 1 only after all the 5s


def test_ties_are_broken_randomly_not_by_index():
  keys = jnp.zeros((64,), jnp.int32)
  picks = [np.flatnonzero(M.select_top_k(keys, 8, jnp.uint32(s))) for s in range(20)]
  assert all(len(p) == 8 for p in picks)
  assert len({tuple(p) for p in picks}) == 20
  assert not any(tuple(p) == tuple(range(8)) for p in picks)
  counts = np.bincount(np.concatenate(picks), minlength=64)
  assert counts[:8].sum() < 40  # index order would give 160


def test_float_keys_order_like_floats_and_bf16_is_exact():
  x = jnp.array([0.0, 1e-30, 0.5, -0.75, 3.0, jnp.inf], jnp.float32)
  keys = np.asarray(M.float_keys(x))
  assert list(np.argsort(keys)) == [0, 1, 2, 3, 4, 5]
  b = jnp.array([0.1, 0.1, 0.2], jnp.bfloat16)
  kb = np.asarray(M.float_keys(b))
  assert kb[0] == kb[1] < kb[2]
