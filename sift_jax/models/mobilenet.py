"""MobileNetV2 (Sandler et al., CVPR 2018) with Sparse-IFT pointwise convolutions.

Layout and initialisation follow torchvision's ``mobilenet_v2`` (width
multiplier 1: 3,504,872 parameters at 1000 classes), without the classifier
dropout (no dropout RNG is needed to train it).

Sparse-IFT choice: the 1x1 (pointwise) convolutions, the expansion and
projection of every inverted residual block and the final 1x1 to 1280
channels, are transformed and masked; they hold almost all of the MACs. The
3x3 depthwise convolutions stay as they are, dense and unmasked: a depthwise
filter has only 9 weights per channel, the Factorized/Doped rank formulas do
not apply to grouped convolutions, and sparsifying them saves almost no FLOPs
(the reference offers the same as ``sp_use_layer_specialization``). The stem
and the classifier are dense (docs/method.md). Under Sparse Wide every
channel count grows (depthwise channels follow their input).

Parameter names: ``stem``, ``stem_bn``, ``block{i}/expand``, ``expand_bn``,
``dw``, ``dw_bn``, ``project``, ``project_bn``, ``conv_last``,
``conv_last_bn``, ``head``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from sift_jax.transformations import layers as layers_lib
from sift_jax.transformations.family import FamilyConfig

__all__ = ["MobileNetV2", "INVERTED_RESIDUAL_SETTING"]

#: (expansion t, output channels c, repeats n, first stride s), as in the paper.
INVERTED_RESIDUAL_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                             (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _bn(name: str, train: bool) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=layers_lib.BATCH_NORM_MOMENTUM,
                      epsilon=layers_lib.BATCH_NORM_EPSILON, name=name)


def _after_sift(sift: FamilyConfig, name: str, train: bool, y: jnp.ndarray) -> jnp.ndarray:
  """The BatchNorm after a transformed convolution, unless Parallel's branch norms replace it."""
  return y if sift.branch_norms else _bn(name, train)(y)


class _InvertedResidual(nn.Module):
  out_channels: int
  strides: int
  expansion: int
  sift: FamilyConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    in_channels = x.shape[-1]
    hidden = in_channels * self.expansion
    y = x
    if self.expansion != 1:
      y = self.sift.layer(nn.Conv, hidden, (1, 1), use_bias=False, kernel_init=_CONV_INIT,
                          name="expand", use_running_average=not train)(y)
      y = nn.relu6(_after_sift(self.sift, "expand_bn", train, y))
    y = nn.Conv(hidden, (3, 3), strides=self.strides, padding=((1, 1), (1, 1)),
                feature_group_count=hidden, use_bias=False, kernel_init=_CONV_INIT, name="dw")(y)
    y = nn.relu6(_bn("dw_bn", train)(y))
    y = self.sift.layer(nn.Conv, self.out_channels, (1, 1), use_bias=False, kernel_init=_CONV_INIT,
                        name="project", use_running_average=not train)(y)
    y = _after_sift(self.sift, "project_bn", train, y)
    if self.strides == 1 and in_channels == self.out_channels:
      y = y + x
    return y


class MobileNetV2(nn.Module):
  """MobileNetV2 for 224x224 ImageNet-style inputs.

  Attributes:
    num_classes: Classifier outputs.
    stem_width: Stem output channels (32).
    block_widths: Output channels of the 7 stages (widened for Sparse Wide).
    last_width: Channels of the final 1x1 convolution (1280).
    sift: The Sparse-IFT member applied to the pointwise convolutions.
  """

  num_classes: int = 1000
  stem_width: int = 32
  block_widths: Sequence[int] = tuple(c for _, c, _, _ in INVERTED_RESIDUAL_SETTING)
  last_width: int = 1280
  sift: FamilyConfig = FamilyConfig()

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    x = nn.Conv(self.stem_width, (3, 3), strides=2, padding=((1, 1), (1, 1)), use_bias=False,
                kernel_init=_CONV_INIT, name="stem")(x)
    x = nn.relu6(_bn("stem_bn", train)(x))
    index = 0
    for (t, _, n, s), c in zip(INVERTED_RESIDUAL_SETTING, self.block_widths):
      for j in range(n):
        x = _InvertedResidual(c, s if j == 0 else 1, t, self.sift, name=f"block{index}")(x, train)
        index += 1
    x = self.sift.layer(nn.Conv, self.last_width, (1, 1), use_bias=False, kernel_init=_CONV_INIT,
                        name="conv_last", use_running_average=not train)(x)
    x = nn.relu6(_after_sift(self.sift, "conv_last_bn", train, x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01), name="head")(x)
