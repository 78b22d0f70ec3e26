"""fold(): trained Sparse-IFT members back into the original dense layers, outputs equal."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sift_jax
from sift_jax.inference import FoldError, fold
from sift_jax.models import gpt as gpt_lib
from sift_jax.models import mnist1d as mnist1d_lib
from sift_jax.models import mobilenet as mobilenet_lib
from sift_jax.models import resnet as resnet_lib
from sift_jax.transformations.family import FamilyConfig

RTOL = 1e-5


def _rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _trained_like(variables, seed=0):
  """Random variables of the given (abstract) shapes, with non-trivial norms and statistics.

  Drawn with numpy: no compiled init, which costs far more than these tests on a busy CPU.
  """
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
  out = []
  for path, leaf in leaves:
    name, shape = str(path[-1].key), tuple(np.shape(leaf))
    if name == "var":
      value = rng.uniform(0.5, 2.0, shape)
    elif name in ("mean", "bias"):
      value = 0.3 * rng.standard_normal(shape)
    elif name == "scale":
      value = rng.uniform(0.5, 1.5, shape)
    else:  # kernels, embeddings
      fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
      value = rng.standard_normal(shape) / np.sqrt(fan_in)
    out.append(jnp.asarray(value, jnp.float32))
  return jax.tree_util.tree_unflatten(treedef, out)


def _init(model, x, **kw):
  return jax.eval_shape(lambda k: model.init(k, x, **kw), jax.random.key(0))


def _shapes(tree):
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {sift_jax.path_str(kp): tuple(np.shape(leaf)) for kp, leaf in flat}


def _n_params(tree):
  return sum(int(np.size(l)) for l in jax.tree.leaves(tree))


# Every registry architecture at a reduced size, built directly with a member config.
def _cnn(cfg):
  return mnist1d_lib.CNN1D(stem_width=8, channels=(8, 16, 16), strides=(1, 2, 2), sift=cfg), (2, 40, 1)


def _mlp(cfg):
  return mnist1d_lib.MLP(hidden=(16, 24, 16), sift=cfg), (2, 40)


def _resnet_basic(cfg):
  return resnet_lib.ResNet(stage_sizes=(1, 1), widths=(8, 16), stem_width=8, num_classes=10,
                           sift=cfg), (2, 8, 8, 3)


def _resnet_bottleneck_imagenet(cfg):
  return resnet_lib.ResNet(stage_sizes=(1, 1), widths=(4, 8), stem_width=8, num_classes=10,
                           bottleneck=True, cifar_stem=False, sift=cfg), (1, 32, 32, 3)


def _mobilenet(cfg):
  return mobilenet_lib.MobileNetV2(num_classes=10, stem_width=8, block_widths=(8, 8, 8, 16, 16, 16, 16),
                                   last_width=16, sift=cfg), (1, 32, 32, 3)


def _gpt(cfg):
  cfg = dataclasses.replace(cfg, norm="layer")
  return gpt_lib.GPT(vocab_size=32, context=8, width=16, depth=1, num_heads=2, head_dim=8,
                     mlp_width=32, sift=cfg), (2, 8)


ARCHS = {"cnn_mnist1d": _cnn, "mlp_mnist1d": _mlp, "resnet_basic_cifar": _resnet_basic,
         "resnet_bottleneck_imagenet": _resnet_bottleneck_imagenet, "mobilenet_v2": _mobilenet,
         "gpt": _gpt}

MEMBERS = {
    "parallel_sum": FamilyConfig(family="sparse_parallel", sparsity=0.5, parallel_norm=False),
    "parallel_bn": FamilyConfig(family="sparse_parallel", sparsity=0.5),  # the default
    "doped": FamilyConfig(family="sparse_doped", sparsity=0.8),
    "factorized_linear": FamilyConfig(family="sparse_factorized", sparsity=0.5),
    "factorized_bn": FamilyConfig(family="sparse_factorized", sparsity=0.5, factorized_mid="norm"),
}
# LayerNorm members (GPT) are not linear: those pairs raise (tested below).
LAYERNORM_ARCHS = ("gpt",)
# The deep convnets (17 MobileNet blocks, bottlenecks) cost the most on a shared CPU: they run
# the members whose folds differ there (per-branch BatchNorms replacing the block's, 1x1 U V
# products with a BatchNorm mid); the plain sum, linear Factorized and Doped run on the others.
DEEP_ARCHS = ("resnet_bottleneck_imagenet", "mobilenet_v2")
FOLDING = [(a, m) for a in ARCHS for m in MEMBERS
           if not (a in LAYERNORM_ARCHS and m in ("parallel_bn", "factorized_bn"))
           and not (a in DEEP_ARCHS and m not in ("parallel_bn", "factorized_bn"))]


def _inputs(arch, shape):
  if arch == "gpt":
    return jax.random.randint(jax.random.key(1), shape, 0, 32)
  return jax.random.normal(jax.random.key(1), shape)


@pytest.mark.parametrize("arch,member", FOLDING)
def test_folded_outputs_equal_the_members(arch, member):
  model, shape = ARCHS[arch](MEMBERS[member])
  x = _inputs(arch, shape)
  variables = _trained_like(_init(model, x, train=False))
  want = model.apply(variables, x, train=False)
  dense_model, dense_vars = fold(model, variables, example_input=x)
  dense_ref = model.clone(sift=FamilyConfig(norm=model.sift.norm,
                                            factorized_mid=model.sift.factorized_mid))
  assert dense_model == dense_ref
  ref_vars = jax.eval_shape(lambda k: dense_ref.init(k, x, train=False), jax.random.key(0))
  assert _shapes(dense_vars) == _shapes(ref_vars)
  got = dense_model.apply(dense_vars, x, train=False)
  assert _rel_err(got, want) <= RTOL


@pytest.mark.parametrize("member", ["parallel_bn", "factorized_bn"])
def test_layernorm_members_do_not_fold(member):
  arch = "gpt"
  model, shape = ARCHS[arch](MEMBERS[member])
  x = _inputs(arch, shape)
  variables = _trained_like(_init(model, x, train=False))
  with pytest.raises(FoldError, match=r"LayerNorm.*not linear.*compress"):
    fold(model, variables, example_input=x)


@pytest.fixture(scope="module")
def cnn_spec():
  return sift_jax.get_model("cnn_mnist1d", family="sparse_doped", sparsity=0.9,
                            channels=(8, 16), strides=(1, 2), stem_width=8)


def test_registry_model_folds_into_its_dense_model_with_equal_parameter_count(cnn_spec):
  spec = cnn_spec
  variables = _trained_like(spec.abstract_variables())
  masks = sift_jax.init_masks(jax.random.key(3), variables["params"],
                              spec.layer_densities(variables["params"]))
  masked = dict(variables, params=sift_jax.apply_masks(variables["params"], masks))
  x = jax.random.normal(jax.random.key(1), (3,) + spec.input_shape)
  want = jax.jit(lambda v, x: spec.module.apply(v, x, train=False))(masked, x)
  dense_model, dense_vars = fold(spec, variables, masks)  # masks applied by fold
  assert dense_model is spec.base_module
  dense_ref = _init(spec.base_module, x, train=False)
  assert _n_params(dense_vars["params"]) == _n_params(dense_ref["params"])
  got = jax.jit(lambda v, x: dense_model.apply(v, x, train=False))(dense_vars, x)
  assert _rel_err(got, want) <= RTOL
  # masks=None reads the zeros already in the (masked) weights: the same result.
  _, from_zeros = fold(spec, masked)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), dense_vars, from_zeros))


class _UserNet(nn.Module):
  """A user's model: Conv with stride/padding, DenseGeneral over two axes, Dense with bias."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3), strides=2, padding="SAME", name="stem")(x))
    x = nn.relu(nn.Conv(8, (3, 3), strides=(2, 1), padding=((1, 0), (2, 1)), name="conv")(x))
    x = nn.relu(nn.DenseGeneral(12, axis=(-2, -1), name="mix")(x))
    x = nn.relu(nn.Dense(10, name="hidden")(x))
    return nn.Dense(4, name="head")(x)


@pytest.mark.parametrize("family,kw", [("sparse_parallel", {"parallel_norm": False}), ("sparse_doped", {}),
                                       ("sparse_factorized", {"factorized_mid": "linear"})])
def test_transformed_user_model_folds_back_to_the_user_model(family, kw):
  user = _UserNet()
  model = sift_jax.transform(user, family=family, sparsity=0.6, layers=("conv", "mix", "hidden"), **kw)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  variables = _trained_like(_init(model, x))
  dense_model, dense_vars = fold(model, variables, example_input=x)
  assert dense_model == user
  assert _rel_err(user.apply(dense_vars, x), model.apply(variables, x)) <= RTOL
  assert _shapes(dense_vars) == _shapes(jax.eval_shape(user.init, jax.random.key(0), x))
  # Without example_input the same variables come out (the biases are the layers' own).
  _, again = fold(model, variables)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), dense_vars, again))


def test_transformed_parallel_default_has_layernorm_branches_and_says_so():
  model = sift_jax.transform(_UserNet(), family="sparse_parallel", sparsity=0.6, layers=("hidden",))
  x = jnp.zeros((1, 8, 8, 3))
  with pytest.raises(FoldError, match=r"hidden.*LayerNorm on every branch.*compress"):
    fold(model, _trained_like(_init(model, x)))


def test_member_layer_with_biased_template_and_branch_batchnorms_folds():
  layer = sift_jax.SparseParallel(nn.Conv(5, (3, 3), strides=2, padding="SAME"), num_branches=3,
                                  branch_norm="batch", use_running_average=True)
  x = jax.random.normal(jax.random.key(1), (2, 9, 7, 3))
  variables = _trained_like(_init(layer, x))
  template, dense_vars = fold(layer, variables)
  assert isinstance(template, nn.Conv) and template.strides == 2
  assert _rel_err(template.apply(dense_vars, x), layer.apply(variables, x)) <= RTOL


def test_sparse_wide_and_nonlinear_members_say_why_and_point_to_compress():
  cfg = FamilyConfig(family="sparse_wide", sparsity=0.5)
  model, shape = _cnn(cfg)
  x = jnp.zeros(shape)
  variables = _trained_like(_init(model, x))
  with pytest.raises(FoldError, match=r"Sparse Wide cannot fold.*wider network.*compress"):
    fold(model, variables, example_input=x)
  model, _ = _cnn(FamilyConfig(family="sparse_factorized", sparsity=0.5, factorized_mid="norm_relu"))
  variables = _trained_like(_init(model, x))
  with pytest.raises(FoldError, match=r"conv_0.*ReLU between U and V.*compress"):
    fold(model, variables, example_input=x)
  model, _ = _resnet_bottleneck_imagenet(FamilyConfig(family="sparse_parallel", sparsity=0.5,
                                                      parallel_norm=True,
                                                      parallel_activation=nn.relu))
  x = jnp.zeros((1, 32, 32, 3))
  variables = _trained_like(_init(model, x))
  with pytest.raises(FoldError, match=r"layer1_0/conv1.*nonlinearity.*compress"):
    fold(model, variables, example_input=x)


def test_bad_input_raises_naming_the_problem(cnn_spec):
  spec = cnn_spec
  variables = _trained_like(spec.abstract_variables())
  masks = jax.tree.map(lambda p: jnp.ones(p.shape, bool), variables["params"])
  masks["conv_1"]["S"].pop("kernel")
  with pytest.raises(ValueError, match=r"masks.*missing.*conv_1/S/kernel"):
    fold(spec, variables, masks)
  bad_shape = jax.tree.map(lambda p: jnp.ones(p.shape, bool), variables["params"])
  bad_shape["conv_0"]["U"]["kernel"] = jnp.ones((1, 1), bool)
  with pytest.raises(ValueError, match=r"conv_0/U/kernel.*shape"):
    fold(spec, variables, bad_shape)
  with pytest.raises(ValueError, match=r"'params' collection"):
    fold(spec, variables["params"])
  with pytest.raises(ValueError, match=r"expected a sift_jax.ModelSpec"):
    fold(object(), variables)
  # Train mode: the BatchNorm statistics are missing.
  model, shape = _cnn(MEMBERS["parallel_bn"])
  x = jnp.zeros(shape)
  params = _trained_like(_init(model, x))["params"]
  with pytest.raises(ValueError, match=r"conv_0/branch_0_norm.*running statistics.*inference mode"):
    fold(model, {"params": params}, example_input=x)
  layer = sift_jax.SparseParallel(nn.Dense(4), num_branches=2, branch_norm="batch",
                                  use_running_average=False)
  with pytest.raises(ValueError, match=r"train mode.*use_running_average=False"):
    fold(layer, {"params": {}})
  # An unknown member.
  odd = FamilyConfig(family="sparse_parallel", sparsity=0.5)
  object.__setattr__(odd, "family", "sparse_diagonal")
  model, shape = _cnn(odd)
  with pytest.raises(ValueError, match=r"unknown member 'sparse_diagonal'"):
    fold(model, {"params": params}, example_input=jnp.zeros(shape))
