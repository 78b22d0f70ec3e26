"""ResNets for CIFAR and ImageNet with Sparse-IFT 3x3 convolutions.

Architecture as in the reference (``ComputerVision/*/models``) and
torchvision: post-activation basic blocks (ResNet-18/34) or bottlenecks with
the stride on the 3x3 convolution (ResNet-50, "v1.5"), BatchNorm with
PyTorch's momentum/epsilon, Kaiming-normal (fan-out) convolution
initialisation, and the last BatchNorm of every residual branch initialised
to zero. The CIFAR variant has a 3x3 stride-1 stem and no max-pool (docs/method.md);
padding is PyTorch's symmetric padding, so MAC counts match the
reference exactly.

Sparse-IFT (docs/method.md): the convolutions inside the residual branches
are transformed (through :meth:`FamilyConfig.wrap`): both 3x3 convolutions of
a basic block, and all three convolutions (1x1, 3x3, 1x1) of a bottleneck, as
the reference's bottleneck Parallel block does. Transforming only the 3x3 of a
bottleneck would leave two thirds of its MACs in untransformed but masked 1x1
convolutions, and the iso-FLOP sparsity would fall far below the nominal one
(0.32 at s = 0.5 for Sparse Parallel). The stem, the 1x1 projection
shortcuts, the classifier and the norms are not transformed; the shortcuts
are masked (reference rule). Under Sparse Wide every
width grows (``widths`` and ``stem_width`` are already widened by the
registry). Parameter names: ``stem``, ``stem_bn``, ``layer{i}_{j}/conv1``,
``bn1``, ``conv2``, ``bn2`` (``conv3``, ``bn3``), ``shortcut``,
``shortcut_bn``, ``head``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from sift_jax.transformations import layers as layers_lib
from sift_jax.transformations.family import FamilyConfig

__all__ = ["ResNet", "CONV_INIT", "LINEAR_INIT"]

#: PyTorch ``kaiming_normal_(mode="fan_out", nonlinearity="relu")`` (untruncated).
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
#: PyTorch's default ``nn.Linear`` weight initialisation.
LINEAR_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _bn(name: str, train: bool, zero: bool = False) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=layers_lib.BATCH_NORM_MOMENTUM,
                      epsilon=layers_lib.BATCH_NORM_EPSILON,
                      scale_init=nn.initializers.zeros if zero else nn.initializers.ones, name=name)


def _pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
  p = (k - 1) // 2
  return ((p, p), (p, p))


class _Block(nn.Module):
  """A residual block; ``bottleneck`` selects 1x1-3x3-1x1, else 3x3-3x3."""

  width: int
  strides: int
  bottleneck: bool
  sift: FamilyConfig
  zero_init_last: bool

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    # The reference's Parallel blocks put a BatchNorm on every branch instead of one after the sum.
    branch_norm = self.sift.branch_norms

    def sift_conv(y, features, kernel, strides, name, bn_name, zero=False):
      conv = self.sift.layer(nn.Conv, features, (kernel, kernel), strides=strides,
                             padding=_pad(kernel), use_bias=False, kernel_init=CONV_INIT, name=name,
                             use_running_average=not train)
      y = conv(y)
      return y if branch_norm else _bn(bn_name, train, zero)(y)

    out_width = self.width * (4 if self.bottleneck else 1)
    if self.bottleneck:
      y = nn.relu(sift_conv(x, self.width, 1, 1, "conv1", "bn1"))
      y = nn.relu(sift_conv(y, self.width, 3, self.strides, "conv2", "bn2"))
      y = sift_conv(y, out_width, 1, 1, "conv3", "bn3", zero=self.zero_init_last)
    else:
      y = nn.relu(sift_conv(x, self.width, 3, self.strides, "conv1", "bn1"))
      y = sift_conv(y, self.width, 3, 1, "conv2", "bn2", zero=self.zero_init_last)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != out_width:
      shortcut = nn.Conv(out_width, (1, 1), strides=self.strides, padding="VALID", use_bias=False,
                         kernel_init=CONV_INIT, name="shortcut")(x)
      shortcut = _bn("shortcut_bn", train)(shortcut)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """ResNet-18/34/50 for CIFAR (3x3 stem) or ImageNet (7x7 stem + max-pool).

  Attributes:
    stage_sizes: Blocks per stage, e.g. ``(2, 2, 2, 2)``.
    widths: Block width of every stage (already widened for Sparse Wide).
    stem_width: Output channels of the stem.
    num_classes: Classifier outputs.
    bottleneck: Bottleneck blocks (ResNet-50) instead of basic blocks.
    cifar_stem: 3x3 stride-1 stem without max-pool.
    sift: The Sparse-IFT member applied to the 3x3 convolutions.
    zero_init_residual: Zero-initialise the last BatchNorm of every block.
  """

  stage_sizes: Sequence[int]
  widths: Sequence[int]
  stem_width: int
  num_classes: int
  bottleneck: bool = False
  cifar_stem: bool = True
  sift: FamilyConfig = FamilyConfig()
  zero_init_residual: bool = True

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    if self.cifar_stem:
      x = nn.Conv(self.stem_width, (3, 3), padding=_pad(3), use_bias=False, kernel_init=CONV_INIT,
                  name="stem")(x)
      x = nn.relu(_bn("stem_bn", train)(x))
    else:
      x = nn.Conv(self.stem_width, (7, 7), strides=2, padding=_pad(7), use_bias=False,
                  kernel_init=CONV_INIT, name="stem")(x)
      x = nn.relu(_bn("stem_bn", train)(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, (n_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(n_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = _Block(width, strides, self.bottleneck, self.sift, self.zero_init_residual,
                   name=f"layer{i + 1}_{j}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=LINEAR_INIT, name="head")(x)
