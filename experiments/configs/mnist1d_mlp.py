r"""MNIST-1D MLP: the main job's grid with a multi-layer perceptron (CPU, offline).

The dense baseline is ``mlp_mnist1d`` with three hidden layers of 64 units;
the Sparse-IFT members transform the two hidden-to-hidden layers (the stem
and the classifier stay dense, SPEC section 3) and train them sparse with
RigL, iso-FLOP with the dense model. On MNIST-1D an MLP is limited by its
lack of translation invariance more than by its width: expect the members
to trail the dense MLP at 2000 steps::

  python -m sift_jax.train --config experiments/configs/mnist1d_mlp.py --workdir /tmp/mlp \
      --config.model.family=sparse_wide --config.model.sparsity=0.9
  python experiments/main.py --config experiments/configs/mnist1d_mlp.py \
      --results experiments/results/mnist1d_mlp --workdir workdirs/mnist1d_mlp
"""

from sift_jax.training import default_config
from sift_jax.training.sweep import family_grid


def get_config():
  config = default_config()
  config.dataset.name = "mnist1d"
  config.model.name = "mlp_mnist1d"
  config.model.family = "dense"
  config.model.sparsity = 0.0
  config.model.kwargs.hidden = (64, 64, 64)
  config.sparse.method = "rigl"
  config.sparse.update_every = 50
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.schedule.name = "cosine"
  config.training.num_steps = 2000
  config.training.batch_size = 128
  config.training.eval_batch_size = 500
  config.training.eval_every_steps = 500
  config.training.log_every_steps = 250
  config.training.checkpoint_every_steps = 0
  config.training.keep_checkpoints = 1
  config.mesh.data = 1
  return config


def get_sweep():
  """Dense; 4 members x s in {0.5, 0.75, 0.9} with RigL; Sparse Wide also static."""
  return family_grid(sparsities=(0.5, 0.75, 0.9), method="rigl", static_members=("sparse_wide",))
