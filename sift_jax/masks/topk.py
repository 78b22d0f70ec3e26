"""Exact top-k selection that stays sharded: radix search over integer keys.

RigL needs, per tensor, the ``k`` positions with the largest score. A sort or
``lax.top_k`` on a tensor sharded across devices makes XLA gather the whole
tensor on every device. Instead we find the k-th largest key bit by bit from
the most significant bit (a bisection over the key's bit pattern): every probe
is ``sum(keys >= candidate)``, which partitions into local counts plus one
scalar all-reduce, so no parameter-sized array ever crosses devices.

Scores are non-negative float32 values whose IEEE bit patterns, read as int32,
are ordered like the floats themselves. Ties (frequent for bf16 weights or
exact zeros) are broken by a second radix search over a seeded bijective hash
of the flat index, so ties are broken pseudo-randomly, never by index, and the
selected count is exactly ``k``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

__all__ = ["float_keys", "flat_index_hash", "select_top_k", "select_top_k_many"]

EXCLUDED = -1  # key of positions that must not be selected


def float_keys(scores: jax.Array, candidates: jax.Array | None = None) -> jax.Array:
  """Maps non-negative scores to order-preserving int32 keys (-1: excluded).

  Scores are taken as ``|scores|`` in float32 whatever their dtype, so that
  bf16 parameters are compared exactly; NaN scores rank lowest.
  """
  x = jnp.abs(scores.astype(jnp.float32))
  x = jnp.where(jnp.isnan(x), 0.0, x)
  keys = lax.bitcast_convert_type(x, jnp.int32)
  if candidates is not None:
    keys = jnp.where(candidates, keys, EXCLUDED)
  return keys


def _fmix32(x: jax.Array) -> jax.Array:
  # MurmurHash3's finaliser: a bijection on uint32 with good avalanche.
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def flat_index_hash(shape: tuple[int, ...], seed: jax.Array) -> jax.Array:
  """Returns a uint32 array of ``shape``: a seeded bijective hash of the flat index.

  Built from per-dimension iotas (no reshape of a flat range), so under SPMD
  every device computes just its own shard. Distinct positions always get
  distinct values, which is what makes the top-k count exact.
  """
  size = int(np.prod(shape)) if shape else 1
  if size >= 2**32:
    raise ValueError(f"tensor of shape {shape} is too large for 32-bit tie-breaking")
  seed = jnp.asarray(seed, jnp.uint32)
  idx = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(len(shape))):
    idx = idx + lax.broadcasted_iota(jnp.uint32, shape, dim) * jnp.uint32(stride)
    stride *= shape[dim]
  return _fmix32(_fmix32(idx ^ seed) + (seed * jnp.uint32(0x9E3779B9) + jnp.uint32(1)))


def _radix_thresholds(keys: list[jax.Array], ks: jax.Array, nbits: int, dtype) -> jax.Array:
  """Per tensor i, the largest t (built bit by bit) with ``count(keys[i] >= t) >= ks[i]``.

  All tensors are searched in one loop, so a model with many layers compiles
  one small while loop rather than one per layer.
  """

  def body(b, prefixes):
    bit = jnp.asarray(1, dtype) << (nbits - 1 - b).astype(dtype)
    cands = prefixes | bit
    counts = jnp.stack([jnp.sum(k >= cands[i], dtype=jnp.int32) for i, k in enumerate(keys)])
    return jnp.where(counts >= ks, cands, prefixes)

  return lax.fori_loop(0, nbits, body, jnp.zeros((len(keys),), dtype))


def select_top_k_many(keys: list[jax.Array], ks: Sequence[jax.typing.ArrayLike],
                      seeds: list[jax.Array]) -> list[jax.Array]:
  """:func:`select_top_k` for several tensors at once (two loops in all)."""
  if not keys:
    return []
  n_cand = jnp.stack([jnp.sum(k >= 0, dtype=jnp.int32) for k in keys])
  clipped_ks = jnp.minimum(jnp.stack([jnp.asarray(k, jnp.int32) for k in ks]), n_cand)
  thresholds = _radix_thresholds(keys, clipped_ks, 31, jnp.int32)
  above = [k > thresholds[i] for i, k in enumerate(keys)]
  ties = [k == thresholds[i] for i, k in enumerate(keys)]
  remaining = clipped_ks - jnp.stack([jnp.sum(a, dtype=jnp.int32) for a in above])
  tie_counts = jnp.stack([jnp.sum(t, dtype=jnp.int32) for t in ties])

  def take_all_ties(_):
    # Every tensor needs all of its ties (the usual case for float scores).
    return [(above[i] | (ties[i] & (remaining[i] > 0))) & (clipped_ks[i] > 0) for i in range(len(keys))]

  def break_ties(_):
    hashes = [jnp.where(t, flat_index_hash(k.shape, seed), jnp.uint32(0))
              for k, t, seed in zip(keys, ties, seeds)]
    # Among ties, take the `remaining` largest hashes (all distinct, so exact).
    hash_thresholds = _radix_thresholds(hashes, remaining, 32, jnp.uint32)
    return [(above[i] | (ties[i] & (hashes[i] >= hash_thresholds[i]) & (remaining[i] > 0))) & (clipped_ks[i] > 0)
            for i in range(len(keys))]

  # The second search only runs when some tensor has more ties at its
  # threshold than it may take (bf16 weights, zero gradients, SET's draws).
  return lax.cond(jnp.any(tie_counts > remaining), break_ties, take_all_ties, None)


def select_top_k(keys: jax.Array, k: jax.Array, seed: jax.Array) -> jax.Array:
  """Boolean mask of exactly ``min(k, #candidates)`` positions with the largest keys.

  Args:
    keys: int32 keys, ``>= 0`` for candidates and ``-1`` for excluded positions
      (see :func:`float_keys`).
    k: Number of positions to select (traced int32 scalar allowed).
    seed: uint32 seed of the tie-breaking hash.

  Returns:
    A bool array of ``keys.shape``.
  """
  return select_top_k_many([keys], [k], [seed])[0]
