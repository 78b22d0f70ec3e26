r"""GPT-3 Small (125M): the paper's language-model runs as launched on a TPU pod.

12 layers, width 768, 12 heads, context 2048. AdamW (b2 0.95, weight decay 0.1
not on norms and biases), lr 6e-4 with 375 warmup steps and cosine decay to
10%, batch 256 sequences of 2048 tokens (0.5M tokens), 4768 steps (2.5B
tokens, about 20 tokens per parameter), bf16 compute. Sparse-IFT transforms
the attention projections and both MLP layers (embeddings, norms and the
LM head stay dense); widths are rounded to multiples of 128 for the TPU.
The sweep: dense and Sparse Wide at s in {0.5, 0.75, 0.9} with RigL.

The text is TFDS ``lm1b`` (byte tokenizer, 257 symbols) as the data module
provides it; the paper used the Pile with the GPT-2 tokenizer. The mesh
rules shard the MLP and attention kernels over ``model`` when
``--config.mesh.model`` > 1::

  python -m sift_jax.train --config experiments/configs/gpt3_small.py --workdir /shared/gpt_sw50 \
      --jax_distributed --config.model.family=sparse_wide --config.model.sparsity=0.5
"""

from sift_jax.training import default_config
from sift_jax.training.sweep import family_grid


def get_config():
  config = default_config()
  config.dataset.name = "tfds_text:lm1b"
  config.dataset.train_split = "train"
  config.dataset.eval_split = "test"
  config.dataset.options.seq_len = 2048
  config.model.name = "gpt3_small"
  config.model.family = "dense"
  config.model.sparsity = 0.0
  config.model.kwargs.context = 2048
  config.model.kwargs.round_to = 128
  config.sparse.method = "rigl"
  config.sparse.update_every = 100
  config.sparse.drop_fraction = 0.3
  config.sparse.end_fraction = 0.75
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 6e-4
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.95
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.1
  config.optimizer.weight_decay_exclude = r"(bias|scale)$"
  config.optimizer.grad_clip_norm = 1.0
  config.schedule.name = "cosine"
  config.schedule.warmup_steps = 375
  config.schedule.end_value = 6e-5
  config.training.num_steps = 4768
  config.training.batch_size = 256
  config.training.eval_batch_size = 256
  config.training.compute_dtype = "bfloat16"
  config.training.log_every_steps = 50
  config.training.eval_every_steps = 500
  config.training.checkpoint_every_steps = 500
  config.training.keep_checkpoints = 3
  config.mesh.data = -1
  config.mesh.model = 1
  config.mesh.rules = (
      (r"mlp/fc1/kernel$", (None, "model")),
      (r"mlp/fc2/kernel$", ("model", None)),
      (r"attn/(query|key|value)/kernel$", (None, "model")),
      (r"attn/out/kernel$", ("model", None)),
  )
  return config


def get_sweep():
  return family_grid(sparsities=(0.5, 0.75, 0.9), members=("sparse_wide",), method="rigl",
                     static_members=())
