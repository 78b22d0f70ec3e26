"""Decoder-only GPT (GPT-2/GPT-3 style, pre-LayerNorm) with Sparse-IFT linear layers.

``gpt3_small`` is GPT-3 Small (Brown et al., 2020): 12 layers, width 768, 12
heads, context 2048, GPT-2 BPE vocabulary of 50,257, learned position
embeddings, GELU MLP of width 4 x 768, untied LM head without bias.

Sparse-IFT (docs/method.md): the attention projections ``query``, ``key``,
``value``, ``out`` and both MLP layers ``fc1``, ``fc2`` of every block are
transformed and sparse; the embeddings, the LayerNorms and the LM head stay
dense. Sparse Wide widens the block-internal widths, the attention inner
width (``head_dim`` per head) and the MLP width, by ``k_sw``; the residual
stream (``width``), the embeddings and the LM head keep the dense model's
size. Widening the residual stream too would scale the dense LM head and the
dense ``QK^T``/``AV`` products by ``k_sw``, which at ``s = 0.9`` alone
exceeds GPT-3 Small's dense budget, so no sparsity could make it iso-FLOP.
The same rule is what :func:`sift_jax.transform` does to a transformer block
whose residual writers (``out``, ``fc2``) are its ``output_layers``.

Parameter names: ``embed/embedding``, ``pos_embed``, ``block_{i}/ln_1``,
``block_{i}/attn/{query,key,value,out}``, ``block_{i}/ln_2``,
``block_{i}/mlp/{fc1,fc2}``, ``ln_f`` (and ``head`` if untied).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from sift_jax.transformations.family import FamilyConfig

__all__ = ["GPT"]


class _Attention(nn.Module):
  num_heads: int
  head_dim: int
  width: int
  out_init: nn.initializers.Initializer
  sift: FamilyConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    b, t, _ = x.shape
    inner = self.num_heads * self.head_dim
    init = nn.initializers.normal(0.02)

    def proj(name, features, kernel_init):
      return self.sift.layer(nn.Dense, features, kernel_init=kernel_init, name=name,
                             use_running_average=not train)

    q, k, v = (proj(n, inner, init)(x).reshape(b, t, self.num_heads, self.head_dim)
               for n in ("query", "key", "value"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.head_dim)
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    probs = nn.softmax(scores, axis=-1)
    y = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, inner)
    return proj("out", self.width, self.out_init)(y)


class _MLP(nn.Module):
  hidden: int
  width: int
  out_init: nn.initializers.Initializer
  sift: FamilyConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    x = self.sift.layer(nn.Dense, self.hidden, kernel_init=nn.initializers.normal(0.02), name="fc1",
                        use_running_average=not train)(x)
    x = nn.gelu(x)
    return self.sift.layer(nn.Dense, self.width, kernel_init=self.out_init, name="fc2",
                           use_running_average=not train)(x)


class _Block(nn.Module):
  num_heads: int
  head_dim: int
  width: int
  mlp_width: int
  out_init: nn.initializers.Initializer
  sift: FamilyConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    h = nn.LayerNorm(epsilon=1e-5, name="ln_1")(x)
    x = x + _Attention(self.num_heads, self.head_dim, self.width, self.out_init, self.sift,
                       name="attn")(h, train)
    h = nn.LayerNorm(epsilon=1e-5, name="ln_2")(x)
    return x + _MLP(self.mlp_width, self.width, self.out_init, self.sift, name="mlp")(h, train)


class GPT(nn.Module):
  """Causal language model over token ids of shape ``(batch, time)``.

  Attributes:
    vocab_size: Vocabulary size.
    context: Maximum sequence length (size of the position embedding).
    width: Residual stream width ``d_model``.
    depth: Number of blocks.
    num_heads: Attention heads.
    head_dim: Per-head width (``width // num_heads`` dense; widened for Sparse Wide).
    mlp_width: MLP hidden width (``4 * width`` dense; widened for Sparse Wide).
    sift: The Sparse-IFT member applied to the block linears.
    tie_embeddings: LM head = transposed token embedding (GPT-2/GPT-3);
      otherwise a separate ``head`` Dense without bias.
  """

  vocab_size: int
  context: int
  width: int
  depth: int
  num_heads: int
  head_dim: int
  mlp_width: int
  sift: FamilyConfig = FamilyConfig(norm="layer")
  tie_embeddings: bool = True

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    if tokens.ndim != 2:
      raise ValueError(f"GPT expects token ids of shape (batch, time), got {tokens.shape}")
    t = tokens.shape[1]
    if t > self.context:
      raise ValueError(f"sequence length {t} exceeds the context {self.context}")
    init = nn.initializers.normal(0.02)
    # GPT-2: residual projections scaled by 1/sqrt(2 * depth).
    out_init = nn.initializers.normal(0.02 / math.sqrt(2 * self.depth))
    embed = nn.Embed(self.vocab_size, self.width, embedding_init=init, name="embed")
    x = embed(tokens)
    pos = self.param("pos_embed", init, (self.context, self.width))
    x = x + pos[None, :t]
    for i in range(self.depth):
      x = _Block(self.num_heads, self.head_dim, self.width, self.mlp_width, out_init, self.sift,
                 name=f"block_{i}")(x, train)
    x = nn.LayerNorm(epsilon=1e-5, name="ln_f")(x)
    if self.tie_embeddings:  # GPT-2/GPT-3: the LM head is the transposed token embedding
      return embed.attend(x)
    return nn.Dense(self.vocab_size, use_bias=False, kernel_init=init, name="head")(x)
