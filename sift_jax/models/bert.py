"""BERT-style encoder with a masked-LM head (Devlin et al., 2019).

``bert_base`` is BERT-Base (12 layers, width 768, 12 heads, MLP 3072,
context 512) and ``bert_mini`` the 4-layer, width-256, 4-head model of Turc
et al. (2019, "Well-read students learn better"). Token and learned position
embeddings, an embedding LayerNorm, post-LayerNorm encoder blocks with Flax's
``nn.MultiHeadDotProductAttention`` (:class:`sift_jax.models.vit.EncoderBlock`)
and BERT's MLM head: a dense ``width -> width`` transform, GELU, LayerNorm and
the output projection, by default tied to the token embedding, plus an output
bias. Segment embeddings and the next-sentence head are left out (the
masked-LM objective does not use them).

Token ids: ``0 .. vocab_size - 1`` are the data's tokens; the embedding has one
row more, id ``vocab_size``, the mask token of the masked-LM objective
(:func:`sift_jax.training.mask_tokens`). The logits cover the ``vocab_size``
real tokens only.

Sparse-IFT as in :mod:`sift_jax.models.vit`: the attention and MLP layers of
the blocks are transformed and sparse; the embeddings, the norms and the MLM
head stay dense.

Parameter names: ``embed/embedding``, ``pos_embed``, ``ln_embed``,
``block_{i}/attn/{query,key,value,out}``, ``block_{i}/ln_1``,
``block_{i}/mlp/{fc1,fc2}``, ``block_{i}/ln_2``, ``mlm/dense``, ``mlm/ln``,
``mlm/bias`` (and ``mlm/decoder`` if untied).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from sift_jax.models.vit import EncoderBlock

__all__ = ["BERT"]


class _MLMHead(nn.Module):
  vocab_size: int
  width: int
  tie_embeddings: bool

  @nn.compact
  def __call__(self, x: jnp.ndarray, embed: nn.Embed) -> jnp.ndarray:
    init = nn.initializers.truncated_normal(0.02)
    x = nn.Dense(self.width, kernel_init=init, name="dense")(x)
    x = nn.gelu(x, approximate=False)
    x = nn.LayerNorm(epsilon=1e-12, name="ln")(x)
    if self.tie_embeddings:
      logits = embed.attend(x)[..., :self.vocab_size]  # the mask token is never predicted
    else:
      logits = nn.Dense(self.vocab_size, use_bias=False, kernel_init=init, name="decoder")(x)
    return logits + self.param("bias", nn.initializers.zeros, (self.vocab_size,)).astype(x.dtype)


class BERT(nn.Module):
  """Masked language model over token ids of shape ``(batch, time)``.

  Attributes:
    vocab_size: Number of real tokens (the embedding adds the mask token
      ``vocab_size``; the logits have ``vocab_size`` classes).
    context: Maximum sequence length (size of the position embedding).
    width: Hidden width.
    depth: Number of encoder blocks.
    num_heads: Attention heads.
    mlp_width: MLP hidden width (``4 * width`` in BERT).
    dropout_rate: Dropout on the embeddings and in the blocks (0.1 in BERT).
    tie_embeddings: MLM output projection = transposed token embedding.
  """

  vocab_size: int
  context: int
  width: int
  depth: int
  num_heads: int
  mlp_width: int
  dropout_rate: float = 0.1
  tie_embeddings: bool = True

  @property
  def mask_token_id(self) -> int:
    """Id of the mask token."""
    return self.vocab_size

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    if tokens.ndim != 2:
      raise ValueError(f"BERT expects token ids of shape (batch, time), got {tokens.shape}")
    t = tokens.shape[1]
    if t > self.context:
      raise ValueError(f"sequence length {t} exceeds the context {self.context}")
    init = nn.initializers.truncated_normal(0.02)
    embed = nn.Embed(self.vocab_size + 1, self.width, embedding_init=init, name="embed")
    pos = self.param("pos_embed", init, (self.context, self.width))
    x = embed(tokens) + pos[None, :t]
    x = nn.LayerNorm(epsilon=1e-12, name="ln_embed")(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, self.width, self.mlp_width, pre_norm=False,
                       dropout_rate=self.dropout_rate, epsilon=1e-12, name=f"block_{i}")(x, train)
    return _MLMHead(self.vocab_size, self.width, self.tie_embeddings, name="mlm")(x, embed)
