r"""A character-level GPT on Python's help texts (CPU, offline, a few minutes).

``gpt_tiny`` (2 layers, width 64, context 64) on the ``pydoc_chars`` corpus,
AdamW, 1500 steps of 32 sequences. The sweep: dense and Sparse Wide at s in
{0.5, 0.75, 0.9} with RigL. The summary reports eval loss and perplexity::

  python -m sift_jax.train --config experiments/configs/pydoc_chars_gpt.py --workdir /tmp/lm
  python -m sift_jax.training.sweep --config experiments/configs/pydoc_chars_gpt.py \
      --workdir /tmp/lm_sweep --seeds 0
"""

from sift_jax.training import default_config
from sift_jax.training.sweep import family_grid


def get_config():
  config = default_config()
  config.dataset.name = "pydoc_chars"
  config.dataset.options.seq_len = 64
  config.model.name = "gpt_tiny"
  config.model.family = "dense"
  config.model.sparsity = 0.0
  config.model.kwargs.context = 64
  config.sparse.method = "rigl"
  config.sparse.update_every = 50
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 3e-3
  config.optimizer.b2 = 0.99
  config.optimizer.weight_decay = 0.01
  config.optimizer.weight_decay_exclude = r"(bias|scale)$"
  config.optimizer.grad_clip_norm = 1.0
  config.schedule.name = "cosine"
  config.schedule.warmup_steps = 100
  config.schedule.end_value = 3e-4
  config.training.num_steps = 1500
  config.training.batch_size = 32
  config.training.eval_batch_size = 64
  config.training.log_every_steps = 100
  config.training.eval_every_steps = 500
  config.training.checkpoint_every_steps = 500
  config.training.keep_checkpoints = 2
  config.mesh.data = 1
  return config


def get_sweep():
  return family_grid(sparsities=(0.5, 0.75, 0.9), members=("sparse_wide",), method="rigl",
                     static_members=())
