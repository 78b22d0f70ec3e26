r"""MNIST-1D 1-D CNN (CPU, offline, minutes).

The dense baseline is ``cnn_mnist1d`` with a 4-channel stem and three 3-tap
convolutions of 4, 8 and 8 channels (strides 1, 2, 2), BatchNorm and ReLU,
global average pooling and a linear classifier: small enough to be
capacity-limited on MNIST-1D, so extra (sparse) capacity can show. The
Sparse-IFT members transform the three hidden convolutions (the stem and the
classifier stay dense, docs/method.md) and train them sparse with RigL,
iso-FLOP with the dense model. SGD with momentum 0.9, lr 0.1 with cosine
decay, weight decay 5e-4, 2000 steps of batch 128 (64 epochs of the 4000
training signals). The main job (the claims benchmark,
``experiments/claims.py``) starts from this file with its own steps, widths
and tuned learning rates::

  python -m sift_jax.training.sweep --config experiments/configs/mnist1d_cnn.py \
      --workdir /tmp/sweep --seeds 0,1,2             # get_sweep() x 3 seeds: a table
  python -m sift_jax.train --config experiments/configs/mnist1d_cnn.py --workdir /tmp/cnn \
      --config.model.family=sparse_wide --config.model.sparsity=0.75
"""

from sift_jax.training import default_config
from sift_jax.training.sweep import family_grid


def get_config():
  config = default_config()
  config.dataset.name = "mnist1d"
  config.model.name = "cnn_mnist1d"
  config.model.family = "dense"
  config.model.sparsity = 0.0
  config.model.kwargs.stem_width = 4
  config.model.kwargs.channels = (4, 8, 8)
  config.model.kwargs.strides = (1, 2, 2)
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
