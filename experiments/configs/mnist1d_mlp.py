r"""MNIST-1D MLP: the main job's grid with a multi-layer perceptron (CPU, offline).

The dense baseline is ``mlp_mnist1d`` with three hidden layers of 64 units;
the Sparse-IFT members transform the two hidden-to-hidden layers (the stem
and the classifier stay dense, docs/method.md, section 3) and train them sparse with
RigL, iso-FLOP with the dense model. On MNIST-1D an MLP is limited by its
lack of translation invariance more than by its width: expect the members
to trail the dense MLP at 2000 steps::

  python -m sift_jax.train --config experiments/configs/mnist1d_mlp.py --workdir /tmp/mlp \
      --config.model.family=sparse_wide --config.model.sparsity=0.9
  python experiments/main.py --config experiments/configs/mnist1d_mlp.py \
      --results experiments/results/mnist1d_mlp --workdir workdirs/mnist1d_mlp
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
