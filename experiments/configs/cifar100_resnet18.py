r"""CIFAR-100 ResNet-18: the paper's CIFAR runs as launched on a TPU slice.

Recipe (docs/method.md, section 6): 200 epochs of batch 128, SGD with Nesterov momentum
0.9, lr 0.1 decayed x0.2 at epochs 60/120/160, weight decay 5e-4 on all
parameters, random crop + flip; uniform sparsity, RigL every 100 steps with
f0 = 0.3 and a cosine drop schedule ending at 75% of training.

  python -m sift_jax.train --config experiments/configs/cifar100_resnet18.py --workdir DIR \
      --config.model.family=sparse_wide --config.model.sparsity=0.9
  python -m sift_jax.training.sweep --config experiments/configs/cifar100_resnet18.py --workdir DIR

The sweep is the paper's grid: dense, every member x s in {0.5, 0.75, 0.9} with
RigL, and Sparse Wide also with static masks. Needs the TFDS ``cifar100``
dataset prepared in ``dataset.data_dir`` (or ``TFDS_DATA_DIR``).
"""

from sift_jax.training import default_config
from sift_jax.training.sweep import family_grid


def get_config():
  config = default_config()
  config.dataset.name = "cifar100"
  config.dataset.eval_split = "test"
  config.model.name = "resnet18_cifar"
  config.model.family = "dense"
  config.model.sparsity = 0.0
  config.sparse.method = "rigl"
  config.sparse.distribution = "uniform"
  config.sparse.update_every = 100
  config.sparse.drop_fraction = 0.3
  config.sparse.drop_schedule = "cosine"
  config.sparse.end_fraction = 0.75
  config.optimizer.name = "nesterov"
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.optimizer.weight_decay_exclude = ""  # all parameters, as the paper
  config.schedule.name = "multistep"
  config.schedule.boundaries_epochs = (60.0, 120.0, 160.0)
  config.schedule.decay_factor = 0.2
  config.training.num_epochs = 200.0
  config.training.batch_size = 128
  config.training.eval_batch_size = 1000
  config.training.compute_dtype = "bfloat16"
  config.training.label_smoothing = 0.0
  config.training.log_every_steps = 100
  # 390 steps per epoch: 50,000 // 128, the training pipeline drops the partial batch.
  config.training.eval_every_steps = 3900  # every 10 epochs
  config.training.checkpoint_every_steps = 1950  # every 5 epochs
  config.training.keep_checkpoints = 3
  config.mesh.data = -1
  config.mesh.model = 1
  return config


def get_sweep():
  return family_grid(sparsities=(0.5, 0.75, 0.9), method="rigl", static_members=("sparse_wide",))
