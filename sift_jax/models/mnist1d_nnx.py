"""The MNIST-1D MLP written in Flax NNX (registry name ``mlp_nnx``).

The same network as :class:`sift_jax.models.MLP`: ``stem`` in -> h_0,
``fc_{i}`` h_i -> h_{i+1}, ``head`` -> classes, ReLU, inputs flattened. The
registry converts it to Linen (:func:`sift_jax.transformations.as_linen`)
and applies the member with :func:`sift_jax.transform`, so it trains in the
same loop, with the same checkpoints and evaluation, as the Linen models;
its parameter paths are the NNX ones (``stem``, ``fc_0``, ..., ``head``).
"""

from __future__ import annotations

from typing import Sequence

from flax import nnx
import jax.numpy as jnp

__all__ = ["MLPNnx"]


class MLPNnx(nnx.Module):
  """Multi-layer perceptron on flat inputs, in NNX.

  Args:
    in_features: Input size (the product of the per-example input shape).
    hidden: Hidden widths; at least two, so that at least one
      hidden-to-hidden layer is transformed.
    num_classes: Classifier outputs.
    rngs: ``nnx.Rngs`` for the initial parameters.
  """

  def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int = 10, *,
               rngs: nnx.Rngs):
    hidden = tuple(int(h) for h in hidden)
    if len(hidden) < 2:
      raise ValueError(f"MLPNnx needs at least two hidden widths, got hidden={hidden}")
    self.stem = nnx.Linear(int(in_features), hidden[0], rngs=rngs)
    # Attributes fc_0, fc_1, ... (not a list): the paths match the Linen MLP's.
    self.num_fc = len(hidden) - 1
    for i, (a, b) in enumerate(zip(hidden[:-1], hidden[1:])):
      setattr(self, f"fc_{i}", nnx.Linear(a, b, rngs=rngs))
    self.head = nnx.Linear(hidden[-1], int(num_classes), rngs=rngs)

  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train  # no dropout or batch norm
    x = x.reshape(x.shape[0], -1)
    x = nnx.relu(self.stem(x))
    for i in range(self.num_fc):
      x = nnx.relu(getattr(self, f"fc_{i}")(x))
    return self.head(x)
