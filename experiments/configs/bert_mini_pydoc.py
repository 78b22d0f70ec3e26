r"""BERT-Mini masked-LM pre-training on Python's help texts (CPU, offline).

``bert_mini`` at full size (4 blocks, width 256, 4 heads, MLP 1024) on the
character-level ``pydoc_chars`` corpus, sequences of 128 characters, BERT's
masked-LM objective (15% of the positions predicted, 80/10/10 corruption,
loss and accuracy on the predicted positions; ``sift_jax.training.mask_tokens``).
AdamW with BERT's warmup and decay. The sweep: dense and the four Sparse-IFT
members at s in {0.5, 0.75, 0.9} with RigL::

  python -m sift_jax.train --config experiments/configs/bert_mini_pydoc.py --workdir /tmp/bert
  python -m sift_jax.training.sweep --config experiments/configs/bert_mini_pydoc.py \
      --workdir /tmp/bert_sweep --seeds 0

The vocabulary comes from the corpus (the loop passes the dataset's
``vocab_size``; the model adds the mask token). Shrink it for a quick check
with ``--config.model.kwargs.width=32 --config.model.kwargs.depth=1
--config.model.kwargs.num_heads=2``.
"""

from sift_jax.training import default_config
from sift_jax.training.sweep import family_grid


def get_config():
  config = default_config()
  config.dataset.name = "pydoc_chars"
  config.dataset.options.seq_len = 128
  config.model.name = "bert_mini"
  config.model.family = "dense"
  config.model.sparsity = 0.0
  config.model.kwargs.context = 128
  config.sparse.method = "rigl"
  config.sparse.update_every = 100
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-6
  config.optimizer.weight_decay = 0.01
  config.optimizer.weight_decay_exclude = r"(bias|scale)$"
  config.optimizer.grad_clip_norm = 1.0
  config.schedule.name = "cosine"
  config.schedule.warmup_steps = 200
  config.schedule.end_value = 0.0
  config.training.num_steps = 5000
  config.training.batch_size = 64
  config.training.eval_batch_size = 64
  config.training.log_every_steps = 100
  config.training.eval_every_steps = 1000
  config.training.checkpoint_every_steps = 1000
  config.training.keep_checkpoints = 2
  config.mesh.data = 1
  return config


def get_sweep():
  return family_grid(sparsities=(0.5, 0.75, 0.9), method="rigl", static_members=())
