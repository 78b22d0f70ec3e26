r"""ImageNet ResNet-18: the paper's ImageNet runs as launched on a TPU pod.

Recipe (docs/method.md, section 6): 90 epochs of batch 256, SGD lr 0.256 with momentum
0.875, weight decay 2^-15 not on norms and biases, cosine decay to 0 without
warmup, label smoothing 0.1, random-resized crops and flips; uniform sparsity,
RigL every 100 steps, f0 = 0.3 cosine, ending at 75% of training. The sweep:
dense, Sparse Wide and Sparse Parallel at s in {0.5, 0.75, 0.9} with RigL.
Needs TFDS ``imagenet2012`` prepared in ``dataset.data_dir``. On a pod every
host runs (the workdir must be a directory all hosts share)::

  python -m sift_jax.train --config experiments/configs/imagenet_resnet18.py \
      --workdir /shared/runs/r18_sw90 --jax_distributed \
      --config.model.family=sparse_wide --config.model.sparsity=0.9
"""

from sift_jax.training import default_config
from sift_jax.training.sweep import family_grid


def get_config():
  config = default_config()
  config.dataset.name = "imagenet2012"
  config.dataset.train_split = "train"
  config.dataset.eval_split = "validation"
  config.model.name = "resnet18_imagenet"
  config.model.family = "dense"
  config.model.sparsity = 0.0
  config.sparse.method = "rigl"
  config.sparse.update_every = 100
  config.sparse.drop_fraction = 0.3
  config.sparse.end_fraction = 0.75
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.256
  config.optimizer.momentum = 0.875
  config.optimizer.weight_decay = 2.0 ** -15
  config.optimizer.weight_decay_exclude = r"(bias|scale)$"  # not on norms and biases
  config.schedule.name = "cosine"
  config.schedule.warmup_epochs = 0.0
  config.schedule.end_value = 0.0
  config.training.num_epochs = 90.0
  config.training.batch_size = 256
  config.training.eval_batch_size = 1024
  config.training.compute_dtype = "bfloat16"
  config.training.label_smoothing = 0.1
  config.training.log_every_steps = 100
  config.training.eval_every_steps = 5004  # one epoch: 1,281,167 / 256
  config.training.checkpoint_every_steps = 5004
  config.training.keep_checkpoints = 3
  config.mesh.data = -1
  config.mesh.model = 1
  return config


def get_sweep():
  return family_grid(sparsities=(0.5, 0.75, 0.9), members=("sparse_wide", "sparse_parallel"),
                     method="rigl", static_members=())
