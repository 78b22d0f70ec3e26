"""Sparse-IFT size rules, family layers and the drop-in transform of user models."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sift_jax import flops
from sift_jax.masks import SparsityPolicy, init_masks, layer_densities, tree_paths
from sift_jax.transformations import (FAMILIES, FamilyConfig, IsoFlopToleranceWarning, SparseDoped,
                                      SparseFactorized, SparseParallel, round_to_multiple,
                                      sparse_doped_rank, sparse_factorized_rank,
                                      sparse_parallel_branches, sparse_wide_factor,
                                      sparse_wide_width, transform)

# docs/method.md, section 5: reference ranks of CIFAR ResNet-18's 3x3 convolutions, C_in -> C_out.
CHANNELS = [(64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512), (512, 512)]
REF_FACTORIZED = {
    0.5: [116, 210, 231, 419, 461, 838, 922],
    0.75: [231, 419, 461, 838, 922, 1676, 1844],
    0.9: [577, 1048, 1153, 2095, 2305, 4190, 4609],
}
REF_DOPED = {
    0.5: [28, 52, 57, 104, 115, 209, 230],
    0.75: [43, 78, 86, 157, 172, 314, 345],
    0.9: [51, 94, 103, 188, 207, 377, 414],
}


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("s", [0.5, 0.75, 0.9])
def test_reference_rank_tables(s):
  fact = [sparse_factorized_rank(ci, co, s, kernel_size=(3, 3), reference=True) for ci, co in CHANNELS]
  doped = [sparse_doped_rank(ci, co, s, kernel_size=(3, 3), reference=True) for ci, co in CHANNELS]
  assert fact == REF_FACTORIZED[s]
  assert doped == REF_DOPED[s]


def test_paper_ranks_round_to_nearest_and_to_multiples():
  # 9*64*64 / (0.1 * 640) is 576 exactly; the reference's ceil of the float gives 577.
  assert sparse_factorized_rank(64, 64, 0.9, kernel_size=(3, 3)) == 576
  assert sparse_factorized_rank(64, 64, 0.9, kernel_size=(3, 3), reference=True) == 577
  # 0.5 * 9*64*64 / 640 = 28.8: nearest 29, reference floor 28.
  assert sparse_doped_rank(64, 64, 0.5, kernel_size=(3, 3)) == 29
  assert sparse_factorized_rank(64, 64, 0.9, kernel_size=(3, 3), round_to=128) == 640  # 4.5 x 128
  assert sparse_factorized_rank(64, 64, 0.75, kernel_size=(3, 3), round_to=128) == 256  # 230.4
  assert sparse_factorized_rank(100, 50, 0.5) == round(100 * 50 / (0.5 * 150))  # 66.67 -> 67
  assert round_to_multiple(192, 128) == 256  # ties go up
  assert round_to_multiple(191.9, 128) == 128
  assert round_to_multiple(320, 128) == 384


def test_round_to_never_rounds_a_positive_size_to_zero():
  # Doped rank of a 64-64 3x3 conv at s=0.5 is 28.8: one multiple of 128, not 0.
  assert sparse_doped_rank(64, 64, 0.5, kernel_size=(3, 3), round_to=128) == 128
  assert sparse_doped_rank(64, 64, 0.5, round_to=128) == 128  # 16.0
  assert sparse_wide_width(16, 0.5, round_to=128) == 128  # 22.6
  assert [round_to_multiple(v, 128) for v in (0.5, 1.0, 63.9, 64.0, 191.9)] == [128] * 5
  # Sizes that are zero at round_to=1 still raise, whatever round_to is.
  for multiple in (1, 128):
    with pytest.raises(ValueError, match="layer 'fc': the exact size 0.25 rounds to 0"):
      sparse_doped_rank(1, 1, 0.5, round_to=multiple, what="layer 'fc'")
    with pytest.raises(ValueError, match="the exact size 0.49 rounds to 0"):
      round_to_multiple(0.49, multiple)


def test_wide_and_parallel_sizes():
  assert [sparse_wide_width(64, s, reference=True) for s in (0.5, 0.75, 0.9)] == [90, 128, 202]
  assert [sparse_wide_width(64, s) for s in (0.5, 0.75, 0.9)] == [91, 128, 202]
  assert sparse_wide_width(64, 0.5, round_to=128) == 128
  assert sparse_wide_factor(0.75) == pytest.approx(2.0)
  assert [sparse_parallel_branches(s) for s in (0.0, 0.5, 0.75, 0.9)] == [1, 2, 4, 10]
  # 1/(1-0.6) = 2.5: the paper rounds ties up, the reference's round() to even.
  assert sparse_parallel_branches(0.6) == 3
  assert sparse_parallel_branches(0.6, reference=True) == 2


def test_size_errors_name_the_value():
  with pytest.raises(ValueError, match="layer 'fc': the exact size 0 rounds to 0"):
    sparse_doped_rank(64, 64, 0.0, round_to=128, what="layer 'fc'")
  with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.0"):
    sparse_factorized_rank(8, 8, 1.0)
  with pytest.raises(ValueError, match="-0.1"):
    sparse_wide_width(8, -0.1)
  with pytest.raises(ValueError, match="round_to must be an integer >= 1, got 0"):
    round_to_multiple(5.0, 0)
  with pytest.raises(ValueError, match="unknown Sparse-IFT family 'sparse_foo'.*sparse_doped"):
    FamilyConfig(family="sparse_foo")
  with pytest.raises(ValueError, match="factorized_mid"):
    FamilyConfig(family="sparse_factorized", factorized_mid="relu")


# ----------------------------------------------------------------------------- layers


def _random_init(module, *args, seed=0, **kwargs):
  """Variables of ``module`` with numpy random values: no XLA compile of the initialisers.

  Leaves with fewer than two dimensions (biases, norm scales, BatchNorm variances) are positive.
  """
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(np.abs(rng.normal(size=a.shape)) * 0.1 + 0.5
                                            if a.ndim < 2 else rng.normal(size=a.shape) * 0.3,
                                            a.dtype), abstract)


def _needs_ura(module):
  return (isinstance(module, SparseParallel) and module.branch_norm == "batch") or (
      isinstance(module, SparseFactorized) and module.mid != "linear" and module.norm == "batch")


def test_parallel_one_branch_equals_the_dense_layer():
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
  dense = nn.Conv(5, (3, 3), strides=2)
  v = _random_init(dense, x)
  layer = SparseParallel(nn.Conv(5, (3, 3), strides=2), num_branches=1)
  out = layer.apply({"params": {"branch_0": v["params"]}}, x)
  np.testing.assert_array_equal(out, dense.apply(v, x))


def test_parallel_sums_branches():
  x = jax.random.normal(jax.random.key(0), (3, 7))
  layer = SparseParallel(nn.Dense(4), sparsity=0.75)
  v = _random_init(layer, x)
  assert sorted(v["params"]) == [f"branch_{i}" for i in range(4)]
  expect = sum(nn.Dense(4).apply({"params": v["params"][f"branch_{i}"]}, x) for i in range(4))
  np.testing.assert_allclose(layer.apply(v, x), expect, rtol=1e-6)


def test_factorized_at_full_rank_can_equal_the_dense_layer():
  key = jax.random.key(0)
  # Dense: U = identity (rank = D_in), V = W.
  x = jax.random.normal(key, (4, 6))
  dense = nn.Dense(3)
  v = _random_init(dense, x)
  layer = SparseFactorized(nn.Dense(3), rank=6)
  params = {"U": {"kernel": jnp.eye(6)}, "V": v["params"]}
  np.testing.assert_allclose(layer.apply({"params": params}, x), dense.apply(v, x), rtol=1e-6)
  # Convolution: U = the k x k kernel (rank = C_out), V = 1x1 identity.
  x = jax.random.normal(key, (2, 8, 8, 3))
  conv = nn.Conv(5, (3, 3), strides=2, padding=((1, 1), (1, 1)))
  v = _random_init(conv, x)
  layer = SparseFactorized(nn.Conv(5, (3, 3), strides=2, padding=((1, 1), (1, 1))), rank=5)
  params = {"U": {"kernel": v["params"]["kernel"]},
            "V": {"kernel": jnp.eye(5)[None, None], "bias": v["params"]["bias"]}}
  np.testing.assert_allclose(layer.apply({"params": params}, x), conv.apply(v, x), rtol=1e-5,
                             atol=1e-6)


def test_doped_is_sparse_plus_low_rank():
  x = jax.random.normal(jax.random.key(0), (2, 10, 4))
  layer = SparseDoped(nn.Conv(6, (3,)), sparsity=0.5)
  v = _random_init(layer, x)
  # r = 0.5 * 12 * 6 / 18 = 2; U has the template's kernel, V is 1x1 without bias.
  assert v["params"]["U"]["kernel"].shape == (3, 4, 2)
  assert v["params"]["V"]["kernel"].shape == (1, 2, 6)
  assert "bias" not in v["params"]["U"] and "bias" not in v["params"]["V"]
  s_only = nn.Conv(6, (3,)).apply({"params": v["params"]["S"]}, x)
  zero_v = jax.tree.map(jnp.zeros_like, v["params"]["V"])
  out = layer.apply({"params": {**v["params"], "V": zero_v}}, x)
  np.testing.assert_array_equal(out, s_only)


def test_dense_general_templates_keep_their_axes():
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  qkv = nn.DenseGeneral(features=(2, 4), axis=-1)
  for layer in (SparseFactorized(qkv, rank=3), SparseDoped(qkv, rank=3),
                SparseParallel(qkv, num_branches=2)):
    assert jax.eval_shape(layer.init_with_output, jax.random.key(1), x)[0].shape == (2, 5, 2, 4)
  h = jax.random.normal(jax.random.key(0), (2, 5, 2, 4))
  out = nn.DenseGeneral(features=8, axis=(-2, -1))
  v = jax.eval_shape(SparseFactorized(out, sparsity=0.5).init, jax.random.key(1), h)
  # D_in = 2*4 = 8, D_out = 8: r = 64 / (0.5 * 16) = 8.
  assert v["params"]["U"]["kernel"].shape == (2, 4, 8)
  assert v["params"]["V"]["kernel"].shape == (8, 8)


LAYERS = [
    ("parallel_dense", lambda: SparseParallel(nn.Dense(6), sparsity=0.5), (3, 5)),
    ("parallel_conv_bn_relu", lambda: SparseParallel(nn.Conv(6, (3, 3)), sparsity=0.75,
                                                     branch_norm="batch", branch_activation=nn.relu),
     (2, 6, 6, 3)),
    ("parallel_layernorm", lambda: SparseParallel(nn.Dense(6), num_branches=3, branch_norm="layer"),
     (3, 5)),
    ("factorized_linear", lambda: SparseFactorized(nn.Dense(6), sparsity=0.5), (3, 5)),
    ("factorized_norm", lambda: SparseFactorized(nn.Conv(6, (3,)), sparsity=0.5, mid="norm"),
     (2, 9, 4)),
    ("factorized_norm_relu", lambda: SparseFactorized(nn.Conv(6, (3, 3), strides=2), sparsity=0.9,
                                                      mid="norm_relu"), (2, 6, 6, 3)),
    ("factorized_layernorm", lambda: SparseFactorized(nn.Dense(6), sparsity=0.5, mid="norm_relu",
                                                      norm="layer"), (3, 5)),
    ("doped_dense", lambda: SparseDoped(nn.Dense(6), sparsity=0.9), (3, 5)),
    ("doped_general", lambda: SparseDoped(nn.DenseGeneral((2, 3)), sparsity=0.75), (3, 5)),
    # r = 0.75 * 27 * 6 / 33 = 3.7 -> 4; U is the strided 3x3 conv, V a 1x1 conv.
    ("doped_conv", lambda: SparseDoped(nn.Conv(6, (3, 3), strides=2), sparsity=0.75),
     (2, 6, 6, 3)),
]


@pytest.mark.parametrize("name,make,shape", LAYERS, ids=[l[0] for l in LAYERS])
def test_layers_jit_and_gradient(name, make, shape):
  layer = make()
  x = jax.random.normal(jax.random.key(0), shape)
  kwargs = {"use_running_average": False} if _needs_ura(layer) else {}
  v = _random_init(layer, x, **kwargs)
  params = v["params"]
  rest = {k: val for k, val in v.items() if k != "params"}

  def loss(p):
    if rest:  # train-mode BatchNorm updates its statistics
      out, _ = layer.apply({"params": p, **rest}, x, mutable=list(rest), **kwargs)
    else:
      out = layer.apply({"params": p}, x, **kwargs)
    return jnp.sum(jnp.sin(out))

  eager = loss(params)
  jitted = jax.jit(loss)(params)
  np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)
  grads = jax.jit(jax.grad(loss))(params)
  for path, g in zip(tree_paths.leaf_paths(grads), jax.tree.leaves(grads)):
    assert np.all(np.isfinite(g)), path
    if path.endswith("kernel"):
      assert float(jnp.abs(g).sum()) > 0.0, f"no gradient reaches {path}"


def test_batch_norm_members_need_the_mode():
  x = jnp.ones((2, 4))
  with pytest.raises(ValueError, match="use_running_average"):
    SparseFactorized(nn.Dense(3), rank=2, mid="norm").init(jax.random.key(0), x)


def test_layer_errors_name_the_layer():
  x = jnp.ones((2, 8, 8, 4))
  with pytest.raises(ValueError, match="grouped convolution"):
    SparseFactorized(nn.Conv(4, (3, 3), feature_group_count=4), rank=2).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="nn.Dense, nn.DenseGeneral or nn.Conv templates, got LayerNorm"):
    SparseParallel(nn.LayerNorm(), num_branches=2).init(jax.random.key(0), x)

  class Holder(nn.Module):
    sparsity: float

    @nn.compact
    def __call__(self, x):
      return SparseDoped(nn.Dense(8), sparsity=self.sparsity, round_to=128, name="tiny")(x)

  with pytest.raises(ValueError, match="SparseDoped 'tiny' rank: the exact size 0 rounds to 0"):
    Holder(0.0).init(jax.random.key(0), jnp.ones((1, 8)))
  # Rank 0.5 * 64 / 16 = 2 rounds up to one multiple of 128.
  v = jax.eval_shape(Holder(0.5).init, jax.random.key(0), jnp.ones((1, 8)))
  assert v["params"]["tiny"]["U"]["kernel"].shape == (8, 128)


# ----------------------------------------------------------------------------- drop-in transform


class UserNet(nn.Module):
  """A model that exists only in this test file: 1-D convs, flatten, an MLP."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3,))(x))
    x = nn.relu(nn.Conv(16, (3,), strides=2)(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(48)(x))
    x = nn.relu(nn.Dense(32)(x))
    return nn.Dense(10)(x)


USER_POLICY = SparsityPolicy(dense=("^Conv_0", "^Dense_2"))  # stem and classifier dense
X_USER = jax.random.normal(jax.random.key(3), (4, 24, 1))

EXPECTED_LAYOUT = {
    "sparse_parallel": {"Dense_0/branch_3/kernel", "Dense_0/branch_3/bias", "Conv_1/branch_0/kernel"},
    "sparse_factorized": {"Dense_0/U/kernel", "Dense_0/V/kernel", "Dense_0/V/bias",
                          "Conv_1/U/kernel", "Conv_1/V/kernel"},
    "sparse_doped": {"Dense_1/S/kernel", "Dense_1/S/bias", "Dense_1/U/kernel", "Dense_1/V/kernel"},
    "sparse_wide": {"Dense_0/kernel", "Conv_0/kernel"},
}


@pytest.mark.parametrize("family", FAMILIES[1:])
def test_transform_unseen_model(family):
  model = UserNet()
  sift = transform(model, family=family, sparsity=0.75, policy=USER_POLICY)
  v = _random_init(sift, X_USER)
  paths = set(tree_paths.leaf_paths(v["params"]))
  assert EXPECTED_LAYOUT[family] <= paths
  # Policy-dense layers keep their original parameters (Sparse Wide widens every non-output layer).
  assert {"Conv_0/kernel", "Dense_2/kernel", "Dense_2/bias"} <= paths
  out = jax.jit(sift.apply)(v, X_USER)
  assert out.shape == jax.eval_shape(model.init_with_output, jax.random.key(0), X_USER)[0].shape
  assert out.shape == (4, 10)
  if family == "sparse_wide":
    # Output layer Dense_2 keeps 10 outputs; its inputs follow the widened Dense_1 (32 -> 64).
    assert v["params"]["Dense_2"]["kernel"].shape == (64, 10)
    assert v["params"]["Conv_0"]["kernel"].shape == (3, 1, 16)
  with warnings.catch_warnings():
    warnings.simplefilter("error", IsoFlopToleranceWarning)  # within tolerance: no warning
    sol = sift.solve(X_USER[:1])
  assert sol.method == "closed_form"
  assert abs(sol.iso_flop_ratio - 1.0) < 0.005 and sol.within_tolerance
  if family != "sparse_factorized":
    return
  # The masks of the solved sparsity realise that cost on real masks.
  policy = sift.sparsity_policy()
  dens = layer_densities(v["params"], sol.solved_sparsity, policy=policy)
  masks = jax.jit(lambda k: init_masks(k, v["params"], dens))(jax.random.key(1))
  report = flops.flops_report(flops.count_macs(sift, v, X_USER[:1]), v["params"], masks=masks,
                              base_dense_macs=sol.base_dense_macs)
  assert abs(report.iso_flop_ratio - 1.0) < 0.005
  assert report.sparse_macs == pytest.approx(sol.sparse_macs)


def test_transform_dense_family_is_the_original():
  model = UserNet()
  sift = transform(model, family="dense", sparsity=0.0)
  v, ref = jax.jit(lambda k: (sift.init(k, X_USER), model.init(k, X_USER)))(jax.random.key(0))
  assert jax.tree.structure(v) == jax.tree.structure(ref)
  jax.tree.map(np.testing.assert_array_equal, v, ref)
  np.testing.assert_array_equal(jax.jit(sift.apply)(ref, X_USER), jax.jit(model.apply)(ref, X_USER))


def test_transform_parallel_with_one_branch_reproduces_the_original():
  # s = 0.3: 1/(1-s) = 1.43 -> one branch per layer; without the (default) branch norm that
  # is the same function as the original.
  model = UserNet()
  with_norm = transform(model, family="sparse_parallel", sparsity=0.3, policy=USER_POLICY)
  assert "branch_0_norm" in jax.eval_shape(with_norm.init, jax.random.key(0), X_USER)["params"]["Dense_0"]
  sift = transform(model, family="sparse_parallel", sparsity=0.3, policy=USER_POLICY,
                   parallel_norm=False)
  v = jax.eval_shape(sift.init, jax.random.key(0), X_USER)
  ref = _random_init(model, X_USER, seed=5)["params"]
  remapped = {name: ({"branch_0": ref[name]} if "branch_0" in v["params"][name] else ref[name])
              for name in ref}
  assert jax.tree.structure(remapped) == jax.tree.structure(v["params"])
  np.testing.assert_allclose(jax.jit(sift.apply)({"params": remapped}, X_USER),
                             jax.jit(model.apply)({"params": ref}, X_USER), rtol=1e-6)
  assert sift.solve(X_USER[:1]).solved_sparsity == pytest.approx(0.0, abs=1e-12)


class TransformerBlock(nn.Module):
  """Pre-LN transformer block built from Flax's own attention (DenseGeneral projections)."""

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16, name="attn")(h, h)
    h = nn.LayerNorm()(x)
    return x + nn.Dense(16, name="fc2")(nn.gelu(nn.Dense(64, name="fc1")(h)))


X_SEQ = jax.random.normal(jax.random.key(4), (2, 12, 16))


@pytest.mark.parametrize("family", FAMILIES[1:])
def test_transform_transformer_block(family):
  block = TransformerBlock()
  sift = transform(block, family=family, sparsity=0.5, output_layers=("attn/out", "fc2"))
  v = _random_init(sift, X_SEQ)
  loss = lambda p: jnp.sum(sift.apply({"params": p}, X_SEQ) ** 2)
  assert jax.eval_shape(sift.apply, v, X_SEQ).shape == X_SEQ.shape
  paths = tree_paths.leaf_paths(v["params"])
  if family == "sparse_wide":
    # head_dim 8 -> round(8 * sqrt 2) = 11; out keeps the residual width 16.
    assert v["params"]["attn"]["query"]["kernel"].shape == (16, 2, 11)
    assert v["params"]["attn"]["out"]["kernel"].shape == (2, 11, 16)
    assert v["params"]["fc1"]["kernel"].shape == (16, 91)
  else:
    prefix = {"sparse_parallel": "branch_1", "sparse_factorized": "U", "sparse_doped": "S"}[family]
    for layer in ("attn/query", "attn/key", "attn/value", "attn/out", "fc1", "fc2"):
      assert f"{layer}/{prefix}/kernel" in paths
  value, grads = jax.jit(jax.value_and_grad(loss))(v["params"])
  assert np.isfinite(float(value))
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert all(float(jnp.abs(g).sum()) > 0 for p, g in zip(paths, jax.tree.leaves(grads))
             if p.endswith("kernel"))
  sol = sift.solve(X_SEQ[:1])
  assert abs(sol.iso_flop_ratio - 1.0) < 0.005
  # Attention QK^T and AV are activation products: charged to no parameter, always dense.
  macs = flops.count_macs(sift, v, X_SEQ[:1])
  assert macs.unattributed == (2 * 12 * 12 * 2 * (11 if family == "sparse_wide" else 8))


def test_doped_policy_keeps_low_rank_dense_unless_reference():
  sift = transform(UserNet(), family="sparse_doped", sparsity=0.75, policy=USER_POLICY)
  v = jax.eval_shape(sift.init, jax.random.key(0), X_USER)
  decide = lambda pol, p: pol.decide(p, jax.ShapeDtypeStruct((4, 4), jnp.float32)).sparse
  assert decide(sift.sparsity_policy(), "Dense_0/S/kernel")
  assert not decide(sift.sparsity_policy(), "Dense_0/U/kernel")
  assert not decide(sift.sparsity_policy(), "Dense_0/V/kernel")
  ref = transform(UserNet(), family="sparse_doped", sparsity=0.75, policy=USER_POLICY, reference=True)
  assert decide(ref.sparsity_policy(), "Dense_0/U/kernel")
  assert not decide(ref.sparsity_policy(), "Dense_2/kernel")
  assert "Dense_0/U/kernel" in tree_paths.leaf_paths(v["params"])
  # The reference keeps the nominal sparsity for Doped: not iso-FLOP.
  assert ref.solve(X_USER[:1]).method == "nominal"


def test_wide_without_output_layers_on_residual_model_keeps_the_residual_writers():
  # The plan (sift_jax.transformations.wide_analysis) finds the residual writers attn/out and fc2.
  auto = transform(TransformerBlock(), family="sparse_wide", sparsity=0.5)
  named = transform(TransformerBlock(), family="sparse_wide", sparsity=0.5,
                    output_layers=("attn/out", "fc2"))
  shapes = lambda m: jax.tree.map(lambda a: a.shape, jax.eval_shape(m.init, jax.random.key(0), X_SEQ))
  assert shapes(auto) == shapes(named)
  assert auto.wide_plan(X_SEQ).kept == ("attn/out", "fc2")


def test_transform_bad_input():
  with pytest.raises(ValueError, match="unknown Sparse-IFT family 'wide'"):
    transform(UserNet(), family="wide", sparsity=0.5)
  with pytest.raises(ValueError, match="got 1.0"):
    transform(UserNet(), family="sparse_wide", sparsity=1.0)
  with pytest.raises(ValueError, match="flax.linen Module, got function"):
    transform(lambda x: x, family="sparse_wide", sparsity=0.5)
  with pytest.raises(ValueError, match="invalid regex in output_layers"):
    transform(UserNet(), family="sparse_wide", sparsity=0.5, output_layers=("(",))

  class NoLayers(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.LayerNorm()(nn.Embed(10, 4)(x))

  with pytest.raises(ValueError, match="no layer of NoLayers was transformed.*none"):
    jax.eval_shape(transform(NoLayers(), family="sparse_factorized", sparsity=0.5).init,
                   jax.random.key(0), jnp.zeros((2, 3), jnp.int32))
  everything_dense = SparsityPolicy(dense=(".",))
  with pytest.raises(ValueError, match=r"layers seen: \['Conv_0', 'Conv_1'"):
    jax.eval_shape(transform(UserNet(), family="sparse_doped", sparsity=0.5,
                             policy=everything_dense).init, jax.random.key(0), X_USER)
  # A sparsity too high for the budget: the widened dense stem and classifier alone exceed it.
  with pytest.raises(ValueError, match=r"transformed UserNet: .*parts that stay dense cost "
                     r"28,336 MACs.*budget 16,256.*Largest dense parts .*"
                     r"'Conv_0/kernel' \(18,216, 112.1%\), "
                     r"'Dense_2/kernel' \(10,120, 62.3%\)"):
    transform(UserNet(), family="sparse_wide", sparsity=0.999, policy=USER_POLICY,
              layers=("Conv_0", "Dense_0", "Dense_1")).solve(X_USER[:1])
  with pytest.raises(ValueError, match="parallel_activation must be callable or None, got 'relu'"):
    transform(UserNet(), family="sparse_parallel", sparsity=0.5, parallel_activation="relu")


class KeywordNet(nn.Module):
  """Calls its conv and hidden Dense positionally or with ``inputs=`` (the same model otherwise)."""

  keyword: bool

  @nn.compact
  def __call__(self, x):
    call = (lambda layer, h: layer(inputs=h)) if self.keyword else (lambda layer, h: layer(h))
    h = nn.relu(call(nn.Conv(8, (3,), name="conv"), x))
    h = h.reshape(h.shape[0], -1)
    h = nn.relu(call(nn.Dense(16, name="fc"), h))
    return nn.Dense(4, name="head")(h)


X_KW = jax.random.normal(jax.random.key(5), (2, 6, 2))
KW_LAYOUT = {"sparse_parallel": ("branch_1/kernel", "branch_1/bias"),
             "sparse_factorized": ("U/kernel", "V/kernel", "V/bias"),
             "sparse_doped": ("S/kernel", "S/bias", "U/kernel", "V/kernel")}


@pytest.mark.parametrize("family", FAMILIES[1:])
def test_keyword_input_calls_are_transformed_like_positional_ones(family):
  policy = SparsityPolicy(dense=("^head",))
  positional = transform(KeywordNet(False), family=family, sparsity=0.5, policy=policy)
  keyword = transform(KeywordNet(True), family=family, sparsity=0.5, policy=policy)
  v = _random_init(positional, X_KW)
  shapes = lambda tree: jax.tree.map(lambda a: a.shape, tree)
  assert shapes(jax.eval_shape(keyword.init, jax.random.key(0), X_KW)) == shapes(v)
  paths = set(tree_paths.leaf_paths(v["params"]))
  if family == "sparse_wide":
    # conv 8 -> round(8 sqrt 2) = 11 channels, fc 16 -> 23 (input 6 * 11); head keeps 4 outputs.
    assert v["params"]["conv"]["kernel"].shape == (3, 2, 11)
    assert v["params"]["fc"]["kernel"].shape == (66, 23)
    assert v["params"]["head"]["kernel"].shape == (23, 4)
  else:
    assert {f"{layer}/{leaf}" for layer in ("conv", "fc") for leaf in KW_LAYOUT[family]} <= paths
    assert {"head/kernel", "head/bias"} <= paths
  np.testing.assert_array_equal(keyword.apply(v, X_KW), positional.apply(v, X_KW))


def test_wide_checks_the_output_shape_with_explicit_output_layers():
  # Dense_2 writes the output; naming only Dense_1 (or nothing that exists) would widen it 10 -> 14.
  for output_layers in (("Dense_1",), ("no_such_layer",)):
    sift = transform(UserNet(), family="sparse_wide", sparsity=0.5, output_layers=output_layers)
    with pytest.raises(ValueError, match=r"Sparse Wide changed the output of UserNet from "
                       r"\(\(4, 10\), .*\) to \(\(4, 14\), .*\): layer\(s\) \['Dense_2'\] were "
                       r"widened to the changed output width.*add them to output_layers="):
      jax.eval_shape(sift.init, jax.random.key(0), X_USER)
  sift = transform(UserNet(), family="sparse_wide", sparsity=0.5, output_layers=("Dense_2",))
  assert jax.eval_shape(sift.init_with_output, jax.random.key(0), X_USER)[0].shape == (4, 10)


class SharedDense(nn.Module):
  """One Dense applied twice (shared weights), optionally after a stem, then a head."""

  stem: bool

  @nn.compact
  def __call__(self, x):
    shared = nn.Dense(8, name="shared")
    h = nn.Dense(8, name="stem")(x) if self.stem else x
    return nn.Dense(3, name="head")(shared(nn.relu(shared(h))))


def test_weight_shared_layer():
  x = jnp.ones((2, 8))
  # Sparse Wide: without the stem, the first call sees the raw 8-wide input and the second the
  # widened 11-wide output of the first; no single kernel fits both: a clear error.
  with pytest.raises(ValueError, match=r"Sparse Wide cannot handle layer 'shared' of SharedDense: "
                     r"it is called 2 times \(shared weights\).*output_layers="):
    jax.eval_shape(transform(SharedDense(False), family="sparse_wide", sparsity=0.5).init,
                   jax.random.key(0), x)
  # After a widened stem both calls see 11 inputs: one (11, 11) kernel serves both.
  v = jax.eval_shape(transform(SharedDense(True), family="sparse_wide", sparsity=0.5).init,
                     jax.random.key(0), x)
  assert v["params"]["shared"]["kernel"].shape == (11, 11)
  assert v["params"]["head"]["kernel"].shape == (11, 3)
  # The other members keep the sharing: one set of parameters, used by both calls.
  sift = transform(SharedDense(True), family="sparse_factorized", sparsity=0.5,
                   policy=SparsityPolicy(dense=("stem", "head")))
  v = jax.eval_shape(sift.init, jax.random.key(0), x)
  assert sorted(tree_paths.leaf_paths(v["params"]["shared"])) == ["U/kernel", "V/bias", "V/kernel"]
  assert jax.eval_shape(sift.apply, v, x).shape == (2, 3)
  macs = flops.count_macs(sift, v, x[:1]).by_param()
  assert macs["shared/U/kernel"] == 2 * 8 * 8  # rank 64 / (0.5 * 16) = 8, two calls


def test_grouped_convolution_is_named_when_nothing_can_be_transformed():
  class Depthwise(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(4, (3,), feature_group_count=4, name="dw")(x)

  for family in ("sparse_doped", "sparse_wide"):
    with pytest.raises(ValueError, match=r"not transformed: 'dw' \(grouped convolution, "
                       r"feature_group_count=4: grouped and depthwise convolutions are not "
                       r"transformed\)" if family == "sparse_doped" else
                       r"calls no transformable nn.Dense, nn.DenseGeneral or nn.Conv"):
      jax.eval_shape(transform(Depthwise(), family=family, sparsity=0.5).init, jax.random.key(0),
                     jnp.ones((1, 5, 4)))


class MultiAxis(nn.Module):
  """DenseGeneral layers with tuple features and multi-axis contractions."""

  @nn.compact
  def __call__(self, x):  # (B, T, 16)
    h = nn.DenseGeneral((4, 8), name="split")(x)  # (B, T, 4, 8)
    h = nn.relu(nn.DenseGeneral((3, 8), axis=(-2, -1), name="mix")(h))  # (B, T, 3, 8)
    return nn.DenseGeneral(12, axis=(-2, -1), name="merge")(h)  # (B, T, 12)


X_MULTI = jax.random.normal(jax.random.key(6), (2, 3, 16))
# s = 0.75: k_sw = 2 (the last feature dim doubles); ranks r = D_in*D_out / (0.25 (D_in + D_out))
# and r = 0.75 D_in*D_out / (D_in + D_out), for (D_in, D_out) = (16, 32), (32, 24), (24, 12).
MULTI_SHAPES = {
    "sparse_wide": {"split/kernel": (16, 4, 16), "mix/kernel": (4, 16, 3, 16),
                    "merge/kernel": (3, 16, 12)},
    "sparse_factorized": {"split/U/kernel": (16, 43), "split/V/kernel": (43, 4, 8),
                          "mix/U/kernel": (4, 8, 55), "mix/V/kernel": (55, 3, 8),
                          "merge/U/kernel": (3, 8, 32), "merge/V/kernel": (32, 12)},
    "sparse_doped": {"mix/S/kernel": (4, 8, 3, 8), "mix/U/kernel": (4, 8, 10),
                     "mix/V/kernel": (10, 3, 8), "merge/U/kernel": (3, 8, 6)},
    "sparse_parallel": {"mix/branch_3/kernel": (4, 8, 3, 8), "merge/branch_3/kernel": (3, 8, 12)},
}


@pytest.mark.parametrize("family", FAMILIES[1:])
def test_multi_axis_dense_general_keeps_output_shapes(family):
  sift = transform(MultiAxis(), family=family, sparsity=0.75)
  out, v = jax.eval_shape(sift.init_with_output, jax.random.key(0), X_MULTI)
  assert out.shape == (2, 3, 12)
  shapes = {p: tuple(l.shape) for p, l in zip(tree_paths.leaf_paths(v["params"]),
                                              jax.tree.leaves(v["params"]))}
  assert {p: shapes.get(p) for p in MULTI_SHAPES[family]} == MULTI_SHAPES[family]
  assert abs(sift.solve(X_MULTI[:1]).iso_flop_ratio - 1.0) < 0.005


def test_parallel_branch_norm_and_activation_in_the_drop_in_transform():
  class Single(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4, name="fc")(x)

  x = jax.random.normal(jax.random.key(7), (3, 5))
  sift = transform(Single(), family="sparse_parallel", sparsity=0.5, parallel_norm=False,
                   parallel_activation=nn.relu)
  v = _random_init(sift, x)
  assert sorted(v["params"]["fc"]) == ["branch_0", "branch_1"]
  # ReLU inside each branch, then the sum (the reference ImageNet blocks' placement).
  expect = sum(nn.relu(x @ v["params"]["fc"][b]["kernel"] + v["params"]["fc"][b]["bias"])
               for b in ("branch_0", "branch_1"))
  np.testing.assert_allclose(sift.apply(v, x), expect, rtol=1e-6)
  # The default: a LayerNorm on every branch, before the activation and the sum.
  normed = transform(Single(), family="sparse_parallel", sparsity=0.5, parallel_activation=nn.relu)
  vn = _random_init(normed, x)
  normed_paths = tree_paths.leaf_paths(vn["params"])
  assert normed_paths == ["fc/branch_0/bias", "fc/branch_0/kernel", "fc/branch_0_norm/bias",
                          "fc/branch_0_norm/scale", "fc/branch_1/bias", "fc/branch_1/kernel",
                          "fc/branch_1_norm/bias", "fc/branch_1_norm/scale"]
  p = vn["params"]["fc"]
  expect = sum(nn.relu(nn.LayerNorm().apply({"params": p[f"{b}_norm"]},
                                            x @ p[b]["kernel"] + p[b]["bias"]))
               for b in ("branch_0", "branch_1"))
  np.testing.assert_allclose(normed.apply(vn, x), expect, rtol=1e-5, atol=1e-6)
  # reference=True changes sizes, masks and the re-fit, not where norms sit.
  ref = transform(Single(), family="sparse_parallel", sparsity=0.5, reference=True)
  paths = tree_paths.leaf_paths(jax.eval_shape(ref.init, jax.random.key(0), x)["params"])
  assert paths == normed_paths


class Tiny(nn.Module):
  """So small that whole-count masks cannot hit the 0.5% iso-FLOP tolerance."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(3, name="stem")(x))
    x = nn.relu(nn.Dense(3, name="mid")(x))
    return nn.Dense(2, name="head")(x)


def test_solve_warns_when_whole_count_masks_miss_the_tolerance():
  sift = transform(Tiny(), family="sparse_parallel", sparsity=0.5,
                   policy=SparsityPolicy(dense=("stem", "head")))
  # Budget 2*3 + 3*3 + 3*2 = 21 MACs; two 3x3 branches keep round(4.5) = 5 weights each: 22.
  with pytest.warns(IsoFlopToleranceWarning,
                    match=r"transformed Tiny: the iso-FLOP solve reaches a ratio of 1\.0476 "
                          r"\(sparse 22 / budget 21 MACs\).*outside the 0\.5% tolerance"):
    sol = sift.solve(jnp.ones((1, 2)))
  assert sol.iso_flop_ratio == pytest.approx(22 / 21, rel=1e-12)
  assert not sol.within_tolerance
  assert (sol.sparse_macs, sol.base_dense_macs) == (22.0, 21)
