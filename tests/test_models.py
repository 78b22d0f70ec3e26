"""The paper's models: golden sizes (SPEC section 5), reference options, policies, training."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import pytest

from sift_jax import flops, models
from sift_jax.masks import init_masks, select_sparse, target_count, tree_paths


def _n_params(spec):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(spec.abstract_variables()["params"]))


# SPEC section 5 (reference numbers); ResNet-50 / MobileNetV2 / GPT-3 Small: torchvision and GPT-3.
GOLDEN = [
    ("resnet18_cifar", {}, 555_468_800, 11_220_132),
    ("resnet18_cifar", {"num_classes": 10}, 555_422_720, 11_173_962),
    ("resnet18_imagenet", {}, 1_814_073_344, 11_689_512),
    ("resnet34_imagenet", {}, 3_663_761_408, 21_797_672),
    ("resnet50_imagenet", {}, 4_089_184_256, 25_557_032),
    ("mobilenet_v2", {}, 300_774_272, 3_504_872),
    ("gpt3_small", {}, None, 125_226_240),
]


@pytest.mark.parametrize("name,kw,macs,params", GOLDEN, ids=[f"{g[0]}{g[1]}" for g in GOLDEN])
def test_dense_golden_sizes(name, kw, macs, params):
  spec = models.get_model(name, **kw)
  assert spec.family == "dense" and spec.solved_sparsity == 0.0
  if macs is not None:
    assert spec.mac_count().total == macs
    assert spec.base_dense_macs == macs
  assert _n_params(spec) == params


def test_gpt3_small_configuration():
  spec = models.get_model("gpt3_small")
  assert spec.input_shape == (2048,) and spec.input_dtype == jnp.int32 and spec.task == "lm"
  assert spec.vocab_size == 50257 and spec.num_classes is None
  m = spec.module
  assert (m.depth, m.width, m.num_heads, m.head_dim, m.mlp_width) == (12, 768, 12, 64, 3072)
  # Per token: 12 blocks x (4*768^2 + 2*768*3072) linear MACs, QK^T and AV over 2048 keys, LM head.
  per_token = 12 * (4 * 768**2 + 2 * 768 * 3072) + 12 * 2 * 2048 * 768 + 768 * 50257
  assert spec.mac_count().total == 2048 * per_token
  assert spec.mac_count().unattributed == 2048 * 12 * 2 * 2048 * 768


LAYER_TYPES = ["layer1_0/conv1", "layer2_0/conv1", "layer2_0/conv2", "layer3_0/conv1",
               "layer3_0/conv2", "layer4_0/conv1", "layer4_0/conv2"]
REF_RANKS = {
    ("sparse_factorized", 0.5): [116, 210, 231, 419, 461, 838, 922],
    ("sparse_factorized", 0.75): [231, 419, 461, 838, 922, 1676, 1844],
    ("sparse_factorized", 0.9): [577, 1048, 1153, 2095, 2305, 4190, 4609],
    ("sparse_doped", 0.5): [28, 52, 57, 104, 115, 209, 230],
    ("sparse_doped", 0.75): [43, 78, 86, 157, 172, 314, 345],
    ("sparse_doped", 0.9): [51, 94, 103, 188, 207, 377, 414],
}
REF_DOPED_RATIO = {0.5: 0.745, 0.75: 0.437, 0.9: 0.191}


@pytest.mark.parametrize("family,s", sorted(REF_RANKS))
def test_reference_rank_tables_in_cifar_resnet18(family, s):
  spec = models.get_model("resnet18_cifar", family=family, sparsity=s, reference=True)
  assert [spec.info["ranks"][layer] for layer in LAYER_TYPES] == REF_RANKS[(family, s)]
  assert spec.solve_method == "nominal" and spec.solved_sparsity == s
  if family == "sparse_doped":
    # The reference masks U and V too: only 0.745x / 0.437x / 0.191x of the dense FLOPs.
    assert spec.info["iso_flop_ratio"] == pytest.approx(REF_DOPED_RATIO[s], abs=1e-3)
    policy_sparse = dict(zip(tree_paths.leaf_paths(spec.abstract_variables()["params"]),
                             jax.tree.leaves(select_sparse(spec.abstract_variables()["params"],
                                                           spec.policy))))
    assert policy_sparse["layer1_0/conv1/U/kernel"] and policy_sparse["layer1_0/conv1/V/kernel"]


@pytest.mark.parametrize("s,width,spec_sparsity", [(0.5, 90, 0.49604), (0.75, 128, 0.75193),
                                                   (0.9, 202, 0.90111)])
def test_reference_sparse_wide_cifar_resnet18(s, width, spec_sparsity):
  spec = models.get_model("resnet18_cifar", family="sparse_wide", sparsity=s, reference=True)
  assert spec.info["widths"]["stages"] == [width, 2 * width, 4 * width, 8 * width]
  assert spec.solve_method == "reference_bisection"
  # The bisection stops within 0.1% of the budget; the reference's profiler also counts
  # norms and activations, so its stopping point differs slightly from ours.
  assert abs(spec.info["iso_flop_ratio"] - 1.0) <= 1e-3
  assert spec.solved_sparsity == pytest.approx(spec_sparsity, abs=1.5e-3)


def test_reference_parallel_norm_per_branch():
  cifar = models.get_model("resnet18_cifar", family="sparse_parallel", sparsity=0.75, reference=True)
  paths = tree_paths.leaf_paths(cifar.abstract_variables()["params"])
  assert "layer1_0/conv1/branch_3_norm/scale" in paths
  assert not any(p.startswith("layer1_0/bn1/") for p in paths)
  assert cifar.module.sift.parallel_activation is None
  imagenet = models.get_model("resnet18_imagenet", family="sparse_parallel", sparsity=0.75,
                              reference=True)
  assert imagenet.module.sift.parallel_activation is nn.relu
  # Per-branch BatchNorms are the default with the paper's sizes too (they break the symmetry
  # of the branches under RigL); parallel_norm=False is the paper's plain sum and the block's BN.
  default = models.get_model("resnet18_cifar", family="sparse_parallel", sparsity=0.75)
  paths = tree_paths.leaf_paths(default.abstract_variables()["params"])
  assert "layer1_0/conv1/branch_3_norm/scale" in paths
  assert not any(p.startswith("layer1_0/bn1/") for p in paths)
  assert default.info["branches"]["layer4_1/conv2"] == 4
  paper = models.get_model("resnet18_cifar", family="sparse_parallel", sparsity=0.75,
                           parallel_norm=False)
  paths = tree_paths.leaf_paths(paper.abstract_variables()["params"])
  assert "layer1_0/bn1/scale" in paths and not any("_norm/" in p for p in paths)
  assert paper.info["branches"]["layer4_1/conv2"] == 4
  with pytest.raises(ValueError, match="parallel_norm=False contradicts"):
    models.get_model("resnet18_cifar", family="sparse_parallel", sparsity=0.75, reference=True,
                     parallel_norm=False)
  with pytest.raises(ValueError, match="parallel_norm must be True or False, got 'no'"):
    models.get_model("mlp_mnist1d", family="sparse_parallel", sparsity=0.75, parallel_norm="no")


@pytest.mark.parametrize("name,norm_keys", [
    ("mlp_mnist1d", {"bias", "scale"}),      # BatchNorm per branch (foldable, measured best)
    ("cnn_mnist1d", {"bias", "scale"}),
    ("gpt_tiny", {"bias", "scale"}),          # LayerNorm per branch
])
def test_parallel_branch_norms_by_default(name, norm_keys):
  spec = models.get_model(name, family="sparse_parallel", sparsity=0.75)
  variables = spec.abstract_variables()
  paths = tree_paths.leaf_paths(variables["params"])
  branch_norms = [p for p in paths if re.search(r"/branch_\d+_norm/", p)]
  kernels = [p for p in paths if re.search(r"/branch_\d+/kernel$", p)]
  assert kernels and len(branch_norms) == 2 * len(kernels)
  assert {p.rsplit("/", 1)[1] for p in branch_norms} == norm_keys
  stats = tree_paths.leaf_paths(variables.get("batch_stats", {}))
  has_bn_stats = any("_norm/" in p for p in stats)
  assert has_bn_stats == (name != "gpt_tiny")
  # The norm that followed the layer is replaced, not stacked (CNN's bn_{i}).
  assert not any(re.match(r"bn_\d+/", p) for p in paths)


def _sparse_flags(spec):
  params = spec.abstract_variables()["params"]
  return dict(zip(tree_paths.leaf_paths(params), jax.tree.leaves(select_sparse(params, spec.policy))))


def test_policies_follow_spec_section_3():
  flags = _sparse_flags(models.get_model("resnet18_cifar", family="sparse_doped", sparsity=0.9))
  assert not flags["stem/kernel"] and not flags["head/kernel"]
  assert flags["layer2_0/shortcut/kernel"]  # 1x1 shortcuts are masked (reference rule)
  assert flags["layer1_0/conv1/S/kernel"]
  assert not flags["layer1_0/conv1/U/kernel"] and not flags["layer1_0/conv1/V/kernel"]
  assert not flags["layer1_0/bn1/scale"]
  flags = _sparse_flags(models.get_model("mobilenet_v2", family="sparse_factorized", sparsity=0.5))
  assert not flags["block3/dw/kernel"] and not flags["stem/kernel"] and not flags["head/kernel"]
  assert flags["block3/expand/U/kernel"] and flags["block3/project/V/kernel"]
  assert flags["conv_last/U/kernel"]
  flags = _sparse_flags(models.get_model("gpt_tiny", family="sparse_parallel", sparsity=0.5))
  assert not flags["embed/embedding"] and not flags["pos_embed"]
  assert flags["block_1/attn/out/branch_1/kernel"] and flags["block_0/mlp/fc1/branch_0/kernel"]
  assert not flags["block_0/ln_1/scale"]
  flags = _sparse_flags(models.get_model("resnet50_imagenet", family="sparse_factorized",
                                         sparsity=0.5))
  assert all(flags[f"layer3_2/{c}/U/kernel"] for c in ("conv1", "conv2", "conv3"))


def test_wide_widths_and_shapes():
  spec = models.get_model("resnet18_cifar", family="sparse_wide", sparsity=0.75)
  assert spec.info["widths"]["stages"] == [128, 256, 512, 1024]
  params = spec.abstract_variables()["params"]
  assert params["stem"]["kernel"].shape == (3, 3, 3, 128)
  assert params["head"]["kernel"].shape == (1024, 100)
  gpt = models.get_model("gpt_tiny", family="sparse_wide", sparsity=0.75, round_to=32)
  assert gpt.info["widths"] == {"width": 64, "head_dim": 32, "attention_width": 128,
                                "mlp_width": 512}
  assert gpt.abstract_output().shape == (1, 64, 256)


# One member per model, each trained for a step with real masks at the solved sparsity.
TRAIN_CASES = [("mlp_mnist1d", "dense", 0.5), ("mlp_mnist1d", "sparse_wide", 0.9),
               ("cnn_mnist1d", "sparse_parallel", 0.75), ("cnn_mnist1d", "sparse_factorized", 0.9),
               ("gpt_tiny", "sparse_doped", 0.75), ("gpt_tiny", "sparse_wide", 0.5)]


def _numpy_init(abstract, seed):
  """Random values for an abstract tree without compiling an init (XLA compiles of the random
  initialisers dominate otherwise); BatchNorm variances must stay positive."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(np.abs(rng.normal(size=a.shape)) * 0.1 + 0.01
                                            if a.ndim < 2 else rng.normal(size=a.shape) * 0.1,
                                            a.dtype), abstract)


def _numpy_masks(params, densities, seed):
  """Masks with exactly ``target_count(d, size)`` ones per leaf, at random positions."""
  rng = np.random.default_rng(seed)

  def one(p, d):
    mask = np.zeros(p.size, bool)
    mask[rng.permutation(p.size)[:target_count(d, p.size)]] = True
    return jnp.asarray(mask.reshape(p.shape))

  return jax.tree.map(one, params, densities)


def test_spec_init_matches_the_abstract_variables():
  spec = models.get_model("mlp_mnist1d", family="sparse_factorized", sparsity=0.75)
  variables = jax.jit(spec.init, static_argnums=1)(jax.random.key(0), 2)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), variables) == jax.tree.map(
      lambda a: (a.shape, a.dtype), spec.abstract_variables())
  densities = spec.layer_densities(variables["params"])
  masks = jax.jit(lambda k: init_masks(k, variables["params"], densities))(jax.random.key(1))
  report = flops.model_report(spec, masks=masks)
  assert abs(report.iso_flop_ratio - 1.0) < 0.005


@pytest.mark.parametrize("name,family,s", TRAIN_CASES)
def test_train_step_with_masks_is_iso_flop(name, family, s):
  spec = models.get_model(name, family=family, sparsity=s)
  variables = _numpy_init(spec.abstract_variables(), 0)
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}
  densities = spec.layer_densities(params)
  masks = _numpy_masks(params, densities, 1)
  if spec.task == "lm":
    x = jax.random.randint(jax.random.key(2), (2,) + spec.input_shape, 0, spec.vocab_size)
  else:
    x = jax.random.normal(jax.random.key(2), (2,) + spec.input_shape)

  @jax.jit
  def loss_and_grad(p):
    def loss(p):
      p = jax.tree.map(lambda w, m: w * m, p, masks)
      if rest:
        out, _ = spec.module.apply({"params": p, **rest}, x, train=True, mutable=list(rest))
      else:
        out = spec.module.apply({"params": p}, x, train=True)
      return jnp.mean(out ** 2)
    return jax.value_and_grad(loss)(p)

  value, grads = loss_and_grad(params)
  assert np.isfinite(float(value))
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  report = flops.model_report(spec, masks=masks)
  assert report.base_dense_macs == models.get_model(name).mac_count().total
  if family == "dense":  # the plain sparse baseline: stem 40x256 and head 256x10 stay dense
    expected = (40 * 256 + 256 * 10 + (1 - s) * 2 * 256 * 256) / (40 * 256 + 2 * 256**2 + 2560)
    assert report.iso_flop_ratio == pytest.approx(expected, rel=1e-9)
  else:
    assert abs(report.iso_flop_ratio - 1.0) < 0.005
  assert report.nonzero_params == sum(int(m.sum()) for m in jax.tree.leaves(masks))


def test_bad_input_is_named():
  with pytest.raises(ValueError, match="unknown model 'resnet19'.*resnet18_cifar"):
    models.get_model("resnet19")
  with pytest.raises(ValueError, match="unknown Sparse-IFT family 'wide'"):
    models.get_model("mlp_mnist1d", family="wide", sparsity=0.5)
  with pytest.raises(ValueError, match=r"must be in \[0, 1\), got 1.0"):
    models.get_model("mlp_mnist1d", family="sparse_wide", sparsity=1.0)
  with pytest.raises(ValueError, match=r"unknown keyword argument\(s\) \['depth'\]"):
    models.get_model("gpt_tiny", depth=3)
  with pytest.raises(ValueError, match="num_classes=10 does not apply"):
    models.get_model("gpt_tiny", num_classes=10)
  with pytest.raises(ValueError, match="round_to must be an integer >= 1, got 0"):
    models.get_model("mlp_mnist1d", family="sparse_wide", sparsity=0.5, round_to=0)
  with pytest.raises(ValueError, match="'block_0/attn/query' rank: the exact size 0 rounds to 0"):
    models.get_model("gpt_tiny", family="sparse_doped", sparsity=0.0, round_to=128)
  # round_to=128 lifts every Doped rank (8 to 64 exact) to 128: the dense U V alone cost 2.5x
  # the budget, which the solver reports with the largest dense parts.
  with pytest.raises(ValueError, match=r"gpt_tiny \(sparse_doped, s=0.5\): .*parts that stay dense "
                     r"cost 20,971,520 MACs, at least the dense budget 8,388,608.*Largest dense "
                     r"parts .*'block_0/mlp/fc1/V/kernel' \(2,097,152, 25.0%\)"):
    models.get_model("gpt_tiny", family="sparse_doped", sparsity=0.5, round_to=128)
  with pytest.raises(ValueError, match="gpt_tiny .*parts that stay dense cost"):
    models.get_model("gpt_tiny", family="sparse_wide", sparsity=0.99)
  with pytest.raises(ValueError, match="factorized_mid must be one of"):
    models.get_model("cnn_mnist1d", family="sparse_factorized", sparsity=0.5, factorized_mid="x")
