"""The sift_jax side of experiments/benchmarks/torch_step_time.py and step_breakdown.py.

Tiny widths only: the benchmark's own configs are for the benchmark run.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sift_jax
from sift_jax.models import get_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "experiments", "benchmarks"))

import step_breakdown  # noqa: E402
import torch_step_time as bench  # noqa: E402

# Width divisor 16: widths 4-8-16-32 (dense); Sparse Wide s=0.5: 6-11-23-45 (w * sqrt(2), rounded).
TINY_DENSE = bench.BenchConfig("dense", 0.0, 16, 4)
TINY_WIDE = bench.BenchConfig("sparse_wide", 0.5, 16, 4)


def test_images_per_second():
  assert bench.images_per_second(128, 0.5) == 256.0
  assert bench.images_per_second(32, 2.0) == 16.0
  with pytest.raises(ValueError, match="step_seconds must be positive, got 0"):
    bench.images_per_second(32, 0.0)


def test_widths_follow_the_registry():
  # Full width: exactly what get_model builds.
  assert bench.network_widths("dense", 0.0, 1) == (64, (64, 128, 256, 512))
  assert bench.network_widths("sparse_wide", 0.5, 1) == (91, (91, 181, 362, 724))
  spec = get_model("resnet18_cifar", family="sparse_wide", sparsity=0.5)
  assert tuple(spec.module.widths) == (91, 181, 362, 724)
  # Quarter width: the width rule applied to 16-32-64-128.
  assert bench.network_widths("dense", 0.0, 4) == (16, (16, 32, 64, 128))
  assert bench.network_widths("sparse_wide", 0.5, 4) == (23, (23, 45, 91, 181))
  with pytest.raises(ValueError, match="width_divisor must divide 64, got 3"):
    bench.network_widths("dense", 0.0, 3)


def test_configs():
  assert bench.CONFIGS["dense_full"] == bench.BenchConfig("dense", 0.0, 1, 128)
  assert bench.CONFIGS["wide_full"] == bench.BenchConfig("sparse_wide", 0.5, 1, 128)
  assert bench.CONFIGS["dense_quarter"].batch == bench.CONFIGS["wide_quarter"].batch == 32
  assert bench.xla_thread_flags(2) == ("--xla_cpu_multi_thread_eigen=true "
                                       "intra_op_parallelism_threads=2")


def test_flax_param_count_full_width():
  # ResNet-18, CIFAR stem, 100 classes: the well-known 11.22M.
  assert bench.flax_param_count(bench.CONFIGS["dense_full"]) == 11_220_132
  assert bench.flax_param_count(bench.CONFIGS["wide_full"]) == 22_402_950


@pytest.fixture(scope="module")
def tiny_wide_step():
  return bench.make_jax_step(TINY_WIDE)


def test_jax_step_is_the_masked_project_step(tiny_wide_step):
  train_step, state, batch = tiny_wide_step
  assert batch["image"].shape == (4, 32, 32, 3) and batch["label"].shape == (4,)
  masks = sift_jax.get_masks(state.opt_state)
  # Stem and head stay dense; every block kernel is masked at density 0.5 (uniform).
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): m
          for path, m in jax.tree_util.tree_flatten_with_path(masks)[0]}
  assert flat["stem/kernel"].all() and flat["head/kernel"].all()
  conv = flat["layer1_0/conv1/kernel"]
  assert conv.shape == (3, 3, 6, 6)  # round(4 * sqrt(2))
  assert int(conv.sum()) == int(round(0.5 * conv.size))
  state = jax.tree.map(jnp.copy, state)
  new_state, metrics = train_step(state, batch)
  assert int(new_state.step) == 1
  assert np.isfinite(float(metrics["loss"]))
  kernel = np.asarray(new_state.params["layer1_0"]["conv1"]["kernel"])
  assert np.all(kernel[~np.asarray(conv)] == 0.0)
  # Donated: the old state's buffers are gone.
  assert state.params["layer1_0"]["conv1"]["kernel"].is_deleted()
  # One executable for every step.
  train_step(new_state, batch)
  assert train_step._cache_size() == 1


def test_hlo_op_counts():
  text = ("%a = f32[2]{0} copy(f32[2]{0} %x)\n  %b = f32[2,3]{1,0} transpose(f32[3,2]{1,0} %y)\n"
          "  ROOT %c = f32[2]{0} fusion(%a), kind=kLoop\n  %d = f32[2]{0} copy(%a)\n")
  assert step_breakdown.hlo_op_counts(text) == {"convolution": 0, "transpose": 1, "copy": 2,
                                                "fusion": 1, "custom-call": 0, "dot": 0}


def test_conv_eqns_find_every_convolution():
  module, _ = bench.build_flax(TINY_DENSE)
  # Abstract variables: tracing needs only shapes.
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  jaxpr = jax.make_jaxpr(lambda v: module.apply(v, jnp.zeros((2, 32, 32, 3))))(variables).jaxpr
  # Stem, 8 blocks x 2 convolutions, 3 projection shortcuts.
  assert len(step_breakdown._conv_eqns(jaxpr)) == 1 + 16 + 3


@pytest.mark.parametrize("config", [TINY_DENSE, TINY_WIDE], ids=["dense", "sparse_wide"])
def test_torch_model_matches_flax(config):
  pytest.importorskip("torch")
  model = bench.build_torch(config)
  assert bench.torch_param_count(config) == bench.flax_param_count(config)
  stem, widths = bench.network_widths(config.family, config.sparsity, config.width_divisor)
  assert model.stem.out_channels == stem
  assert [b.conv1.out_channels for b in model.blocks] == [w for w in widths for _ in range(2)]
  masks = bench._torch_masks(model, 0.5)
  assert "stem.weight" not in masks and "head.weight" not in masks
  m = masks["blocks.0.conv1.weight"]
  assert int(m.sum()) == m.numel() - int(round(0.5 * m.numel()))


def test_full_width_torch_param_counts():
  pytest.importorskip("torch")
  assert bench.torch_param_count(bench.CONFIGS["dense_full"]) == 11_220_132
  assert bench.torch_param_count(bench.CONFIGS["wide_full"]) == 22_402_950
