"""Vision Transformer (Dosovitskiy et al., 2021) with the DeiT sizes (Touvron et al., 2021).

``vit_tiny`` (width 192, 12 blocks, 3 heads) and ``vit_small`` (384, 12, 6)
are DeiT-Ti and DeiT-S: a patch embedding (a ``p x p`` convolution of stride
``p``), a learned class token and learned position embeddings, pre-LayerNorm
encoder blocks with Flax's ``nn.MultiHeadDotProductAttention`` and a GELU MLP
of width ``4 x width``, a final LayerNorm and a linear head on the class token.

The blocks are plain Flax layers; the registry applies a Sparse-IFT member to
them with :func:`sift_jax.transform` (docs/method.md, section 3): the attention
projections ``query``, ``key``, ``value``, ``out`` and the MLP layers ``fc1``,
``fc2`` are transformed and sparse, the patch embedding, the tokens, the
norms and the head stay dense. Sparse Wide widens the attention head width
and the MLP width and keeps the residual stream (``width``), as in the GPTs
(:mod:`sift_jax.models.gpt`).

Parameter names: ``patch_embed``, ``cls_token``, ``pos_embed``,
``block_{i}/ln_1``, ``block_{i}/attn/{query,key,value,out}``,
``block_{i}/ln_2``, ``block_{i}/mlp/{fc1,fc2}``, ``ln_f``, ``head``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

__all__ = ["ViT", "EncoderBlock"]


class _MLP(nn.Module):
  hidden: int
  width: int
  dropout_rate: float

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    init = nn.initializers.xavier_uniform()
    x = nn.Dense(self.hidden, kernel_init=init, bias_init=nn.initializers.normal(1e-6),
                 name="fc1")(x)
    x = nn.gelu(x, approximate=False)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.width, kernel_init=init, bias_init=nn.initializers.normal(1e-6),
                    name="fc2")(x)


class EncoderBlock(nn.Module):
  """Transformer encoder block: self-attention and an MLP, each with a residual.

  Attributes:
    num_heads: Attention heads (``width`` must be divisible by it).
    width: Residual stream width.
    mlp_width: MLP hidden width.
    pre_norm: LayerNorm before each sub-layer (ViT) or after each residual
      sum (post-LN, BERT).
    dropout_rate: Dropout on the attention probabilities and on each
      sub-layer's output (active with ``train=True``).
    epsilon: LayerNorm epsilon.
  """

  num_heads: int
  width: int
  mlp_width: int
  pre_norm: bool = True
  dropout_rate: float = 0.0
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False,
               mask: jnp.ndarray | None = None) -> jnp.ndarray:
    attn = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, qkv_features=self.width, out_features=self.width,
        kernel_init=nn.initializers.xavier_uniform(), dropout_rate=self.dropout_rate,
        deterministic=not train, name="attn")
    mlp = _MLP(self.mlp_width, self.width, self.dropout_rate, name="mlp")
    drop = nn.Dropout(self.dropout_rate, deterministic=not train)
    ln_1 = nn.LayerNorm(epsilon=self.epsilon, name="ln_1")
    ln_2 = nn.LayerNorm(epsilon=self.epsilon, name="ln_2")
    if self.pre_norm:
      h = ln_1(x)
      x = x + drop(attn(h, h, mask=mask))
      return x + drop(mlp(ln_2(x), train))
    x = ln_1(x + drop(attn(x, x, mask=mask)))
    return ln_2(x + drop(mlp(x, train)))


class ViT(nn.Module):
  """Image classifier over ``(batch, height, width, channels)`` images.

  Attributes:
    num_classes: Classes of the head.
    patch_size: Side ``p`` of the square patches (height and width of the
      image must be multiples of it).
    width: Residual stream width (token dimension).
    depth: Number of encoder blocks.
    num_heads: Attention heads.
    mlp_width: MLP hidden width (``4 * width`` in ViT/DeiT).
    dropout_rate: Dropout in the blocks (0 in DeiT).
  """

  num_classes: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_width: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, images: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    if images.ndim != 4:
      raise ValueError(f"ViT expects images of shape (batch, height, width, channels), got "
                       f"{images.shape}")
    p = self.patch_size
    if images.shape[1] % p or images.shape[2] % p:
      raise ValueError(f"ViT: image size {images.shape[1:3]} is not a multiple of patch_size={p}")
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", name="patch_embed")(images)
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    cls = self.param("cls_token", nn.initializers.zeros, (1, 1, c))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c)).astype(x.dtype), x], axis=1)
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, h * w + 1, c))
    x = x + pos.astype(x.dtype)
    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, self.width, self.mlp_width, pre_norm=True,
                       dropout_rate=self.dropout_rate, name=f"block_{i}")(x, train)
    x = nn.LayerNorm(epsilon=1e-6, name="ln_f")(x)
    # big_vision: a zero-initialised head (the initial logits are all zero).
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head")(x[:, 0])
