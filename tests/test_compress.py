"""compress(): sparse kernels (auto, scatter, bitmask, ELL, BCOO) give the masked model's outputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sift_jax
from sift_jax.inference import compress, variable_bytes
from sift_jax.transformations.family import FamilyConfig

from test_fold import ARCHS, _init, _inputs, _rel_err, _trained_like


def _masked(variables, density, seed=0):
  rng = np.random.default_rng(seed)

  def mask(path, leaf):
    if str(path[-1].key) != "kernel":
      return leaf
    return leaf * jnp.asarray(rng.uniform(size=leaf.shape) < density, leaf.dtype)

  return jax.tree_util.tree_map_with_path(mask, variables)


@pytest.mark.parametrize("arch,fmt", [("cnn_mnist1d", "ell"), ("cnn_mnist1d", "bcoo"),
                                      ("cnn_mnist1d", "bitmask"), ("resnet_basic_cifar", "ell"),
                                      ("gpt", "ell")])
def test_compressed_sparse_wide_equals_the_masked_model(arch, fmt):
  model, shape = ARCHS[arch](FamilyConfig(family="sparse_wide", sparsity=0.8))
  x = _inputs(arch, shape)
  variables = _masked(_trained_like(_init(model, x, train=False)), density=0.2)
  want = model.apply(variables, x, train=False)
  small = compress(model, variables, format=fmt, example_input=x)
  kernels = [p for p in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
             if str(p[0][-1].key) == "kernel"]
  assert 0 < len(small.compressed) <= len(kernels)
  got = jax.jit(small.apply)(small.variables, x)
  assert _rel_err(got, want) <= 1e-5
  assert set(small.formats.values()) == {fmt}
  if fmt in ("ell", "bitmask"):
    assert variable_bytes(small.variables) < variable_bytes(variables)


def test_auto_format_picks_ell_only_for_very_sparse_layers():
  model, shape = ARCHS["mlp_mnist1d"](FamilyConfig(family="sparse_wide", sparsity=0.8))
  x = _inputs("mlp_mnist1d", shape)
  variables = _masked(_trained_like(_init(model, x, train=False)), density=0.2)
  want = model.apply(variables, x, train=False)
  for ell_max_density, expected in ((0.01, "scatter"), (0.3, "ell")):
    small = compress(model, variables, example_input=x, ell_max_density=ell_max_density)
    assert small.format == "auto" and set(small.formats.values()) == {expected}
    assert tuple(small.formats) == small.compressed
    assert _rel_err(jax.jit(small.apply)(small.variables, x), want) <= 1e-5


def test_compressed_transformed_user_model_with_strided_padded_dilated_convs():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(6, (3, 3), strides=2, padding="SAME", name="stem")(x))
      x = nn.relu(nn.Conv(8, (3, 3), strides=(2, 1), padding=((1, 0), (2, 1)),
                          kernel_dilation=(1, 2), name="conv")(x))
      x = nn.relu(nn.DenseGeneral(12, axis=(-2, -1), name="mix")(x))
      return nn.Dense(4, name="head")(x)

  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  for family, fmt in (("sparse_wide", "scatter"), ("sparse_wide", "ell"),
                      ("sparse_factorized", "scatter")):
    model = sift_jax.transform(Net(), family=family, sparsity=0.5, output_layers=("head",),
                               factorized_mid="norm_relu")
    variables = _masked(_trained_like(_init(model, x)), density=0.3)
    small = compress(model, variables, format=fmt, example_input=x)
    # The transformed layers (inside the members); Sparse Wide keeps the head as it is.
    assert small.compressed
    assert any(p.startswith("head") for p in small.compressed) == (family != "sparse_wide")
    assert _rel_err(jax.jit(small.apply)(small.variables, x), jax.jit(model.apply)(variables, x)) <= 1e-5


def test_compress_bad_input():
  model, shape = ARCHS["mlp_mnist1d"](FamilyConfig(family="sparse_wide", sparsity=0.5))
  x = jnp.zeros(shape)
  variables = _trained_like(_init(model, x))
  with pytest.raises(ValueError, match=r"unknown format 'csr5'.*'ell'"):
    compress(model, variables, format="csr5", example_input=x)
  with pytest.raises(ValueError, match=r"max_density must be in \(0, 1\], got 0"):
    compress(model, variables, max_density=0, example_input=x)
  with pytest.raises(ValueError, match=r"ell_max_density must be in \[0, 1\], got 2"):
    compress(model, variables, ell_max_density=2, example_input=x)
  masks = jax.tree.map(lambda p: jnp.ones(p.shape, bool), variables["params"])
  masks["fc_0"].pop("kernel")
  with pytest.raises(ValueError, match=r"masks.*missing.*fc_0/kernel"):
    compress(model, variables, masks, example_input=x)
