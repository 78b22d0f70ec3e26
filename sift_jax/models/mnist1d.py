"""Small MNIST-1D models (Greydanus, 2020): 40-sample signals, 10 classes.

Both follow the ResNet rule of docs/method.md: the first layer (``stem``,
fed by the raw input) and the classifier (``head``) are dense and not
transformed; the hidden layers in between are transformed and sparse. Under
Sparse Wide every hidden width grows.

* :class:`MLP`: ``stem`` 40 -> h_0, ``fc_{i}`` h_i -> h_{i+1}, ``head`` -> 10, ReLU.
* :class:`CNN1D`: input ``(40, 1)``; ``stem`` 5-tap conv, ``conv_{i}`` 3-tap
  convs (stride 2 where given) each with BatchNorm and ReLU, global average
  pooling, ``head``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from sift_jax.transformations import layers as layers_lib
from sift_jax.transformations.family import FamilyConfig

__all__ = ["MLP", "CNN1D"]


class MLP(nn.Module):
  """Multi-layer perceptron on flat inputs.

  Attributes:
    hidden: Hidden widths (already widened for Sparse Wide); at least two,
      so that at least one hidden-to-hidden layer is transformed.
    num_classes: Classifier outputs.
    sift: The Sparse-IFT member applied to ``fc_{i}``.
  """

  hidden: Sequence[int]
  num_classes: int = 10
  sift: FamilyConfig = FamilyConfig(norm="layer")

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden[0], name="stem")(x))
    for i, width in enumerate(self.hidden[1:]):
      x = nn.relu(self.sift.layer(nn.Dense, width, name=f"fc_{i}", use_running_average=not train)(x))
    return nn.Dense(self.num_classes, name="head")(x)


class CNN1D(nn.Module):
  """1-D convolutional network on ``(length, channels)`` inputs.

  Attributes:
    stem_width: Stem output channels.
    channels: Output channels of ``conv_{i}`` (already widened for Sparse Wide).
    strides: Stride of each ``conv_{i}``.
    num_classes: Classifier outputs.
    sift: The Sparse-IFT member applied to ``conv_{i}``.
  """

  stem_width: int
  channels: Sequence[int]
  strides: Sequence[int]
  num_classes: int = 10
  sift: FamilyConfig = FamilyConfig()

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    def bn(name):
      return nn.BatchNorm(use_running_average=not train, momentum=layers_lib.BATCH_NORM_MOMENTUM,
                          epsilon=layers_lib.BATCH_NORM_EPSILON, name=name)

    x = nn.Conv(self.stem_width, (5,), padding=((2, 2),), use_bias=False, name="stem")(x)
    x = nn.relu(bn("stem_bn")(x))
    for i, (c, s) in enumerate(zip(self.channels, self.strides)):
      x = self.sift.layer(nn.Conv, c, (3,), strides=s, padding=((1, 1),), use_bias=False,
                          name=f"conv_{i}", use_running_average=not train)(x)
      # Sparse Parallel's per-branch BatchNorms take the place of bn_{i} (reference blocks).
      x = nn.relu(x if self.sift.branch_norms else bn(f"bn_{i}")(x))
    x = jnp.mean(x, axis=1)
    return nn.Dense(self.num_classes, name="head")(x)
