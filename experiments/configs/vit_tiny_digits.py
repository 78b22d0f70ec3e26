r"""ViT-Tiny (DeiT-Ti) on scikit-learn's 8x8 digits (CPU, offline).

``vit_tiny`` at full size (width 192, 12 blocks, 3 heads, MLP 768) with
2x2 patches: an 8x8 digit is 16 patch tokens and a class token. AdamW with
a warmup-cosine schedule, the DeiT recipe's optimizer scaled to a small set
(1437 training images). The sweep: dense and the four Sparse-IFT members at
s in {0.5, 0.75, 0.9} with RigL::

  python -m sift_jax.train --config experiments/configs/vit_tiny_digits.py --workdir /tmp/vit
  python -m sift_jax.training.sweep --config experiments/configs/vit_tiny_digits.py \
      --workdir /tmp/vit_sweep --seeds 0

Shrink it for a quick check with ``--config.model.kwargs.width=32
--config.model.kwargs.depth=2 --config.model.kwargs.num_heads=2``.
"""

from sift_jax.training import default_config
from sift_jax.training.sweep import family_grid


def get_config():
  config = default_config()
  config.dataset.name = "digits"
  config.model.name = "vit_tiny"
  config.model.family = "dense"
  config.model.sparsity = 0.0
  config.model.kwargs.patch_size = 2
  config.sparse.method = "rigl"
  config.sparse.update_every = 50
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.b2 = 0.999
  config.optimizer.weight_decay = 0.05
  config.optimizer.weight_decay_exclude = r"(bias|scale|cls_token|pos_embed)$"
  config.optimizer.grad_clip_norm = 1.0
  config.schedule.name = "cosine"
  config.schedule.warmup_steps = 100
  config.schedule.end_value = 1e-5
  config.training.num_epochs = 50.0
  config.training.batch_size = 64
  config.training.eval_batch_size = 128
  config.training.log_every_steps = 100
  config.training.eval_every_steps = 500
  config.training.checkpoint_every_steps = 500
  config.training.keep_checkpoints = 2
  config.mesh.data = 1
  return config


def get_sweep():
  return family_grid(sparsities=(0.5, 0.75, 0.9), method="rigl", static_members=())
