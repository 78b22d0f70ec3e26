r"""MNIST-1D MLP written in Flax NNX: the ``mnist1d_mlp`` recipe and grid with ``mlp_nnx``.

``mlp_nnx`` (:class:`sift_jax.models.mnist1d_nnx.MLPNnx`) is the MLP of
``mnist1d_mlp`` written as an ``nnx.Module``; the registry converts it to
Linen (:func:`sift_jax.transformations.as_linen`) and applies the member with
:func:`sift_jax.transform`, so the same loop trains it, with the same
checkpoints and evaluation::

  python -m sift_jax.train --config experiments/configs/mnist1d_mlp_nnx.py --workdir /tmp/mlp_nnx \
      --config.model.family=sparse_factorized --config.model.sparsity=0.75
"""

import os

from sift_jax.training.sweep import load_config_module

_MLP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mnist1d_mlp.py")


def get_config():
  config = load_config_module(_MLP).get_config()
  config.model.name = "mlp_nnx"
  return config


def get_sweep():
  """The ``mnist1d_mlp`` grid."""
  return load_config_module(_MLP).get_sweep()
