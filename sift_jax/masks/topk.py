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

from typing import Optional, Sequence

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


def _count_at_least(k: jax.Array, t: jax.Array, batch_ndim: int) -> jax.Array:
  """``sum(k >= t)`` over the non-batch axes: one count per slice (a scalar if unbatched)."""
  t = jnp.reshape(t, t.shape + (1,) * (k.ndim - batch_ndim))
  return jnp.sum(k >= t, axis=tuple(range(batch_ndim, k.ndim)), dtype=jnp.int32)


def _radix_thresholds(keys: list[jax.Array], ks: list[jax.Array], batch_ndims: list[int],
                      nbits: int, dtype) -> list[jax.Array]:
  """Per tensor i (per slice of its ``batch_ndims[i]`` leading axes), the largest
  t (built bit by bit) with ``count(keys[i] >= t) >= ks[i]``.

  All tensors are searched in one loop, so a model with many layers compiles
  one small while loop rather than one per layer.
  """

  def body(b, prefixes):
    bit = jnp.asarray(1, dtype) << (nbits - 1 - b).astype(dtype)
    out = []
    for k, n, nb, prefix in zip(keys, ks, batch_ndims, prefixes):
      cand = prefix | bit
      out.append(jnp.where(_count_at_least(k, cand, nb) >= n, cand, prefix))
    return tuple(out)

  init = tuple(jnp.zeros(k.shape[:nb], dtype) for k, nb in zip(keys, batch_ndims))
  return list(lax.fori_loop(0, nbits, body, init))


def _expand(x: jax.Array, k: jax.Array, batch_ndim: int) -> jax.Array:
  """A per-slice value broadcast against the tensor ``k``."""
  return jnp.reshape(x, x.shape + (1,) * (k.ndim - batch_ndim))


def select_top_k_many(keys: list[jax.Array], ks: Sequence[jax.typing.ArrayLike],
                      seeds: list[jax.Array],
                      batch_ndims: Optional[Sequence[int]] = None) -> list[jax.Array]:
  """:func:`select_top_k` for several tensors at once (two loops in all).

  Args:
    keys: int32 keys per tensor (see :func:`select_top_k`).
    ks: Number of positions to select per tensor; for a tensor with batch
      axes a scalar (the same for every slice) or an array of the batch shape.
    seeds: uint32 tie-breaking seed per tensor.
    batch_ndims: Per tensor, the number of leading axes indexing independent
      slices (the layers of an ``nn.scan`` stack): the selection is done per
      slice, each with its own count. None: no batch axes.

  Returns:
    Bool masks of the keys' shapes.
  """
  if not keys:
    return []
  nbs = [0] * len(keys) if batch_ndims is None else [int(n) for n in batch_ndims]
  if len(nbs) != len(keys):
    raise ValueError(f"batch_ndims has {len(nbs)} entries for {len(keys)} tensors")
  n_cand = [_count_at_least(k, jnp.zeros(k.shape[:nb], jnp.int32), nb) for k, nb in zip(keys, nbs)]
  clipped_ks = [jnp.minimum(jnp.broadcast_to(jnp.asarray(n, jnp.int32), c.shape), c)
                for n, c in zip(ks, n_cand)]
  thresholds = _radix_thresholds(keys, clipped_ks, nbs, 31, jnp.int32)
  above = [k > _expand(t, k, nb) for k, t, nb in zip(keys, thresholds, nbs)]
  ties = [k == _expand(t, k, nb) for k, t, nb in zip(keys, thresholds, nbs)]
  batch_axes = [tuple(range(nb, k.ndim)) for k, nb in zip(keys, nbs)]
  remaining = [n - jnp.sum(a, axis=ax, dtype=jnp.int32) for n, a, ax in zip(clipped_ks, above, batch_axes)]
  tie_counts = [jnp.sum(t, axis=ax, dtype=jnp.int32) for t, ax in zip(ties, batch_axes)]

  def take_all_ties(_):
    # Every tensor needs all of its ties (the usual case for float scores).
    return [(above[i] | (ties[i] & _expand(remaining[i] > 0, k, nbs[i])))
            & _expand(clipped_ks[i] > 0, k, nbs[i]) for i, k in enumerate(keys)]

  def break_ties(_):
    hashes = [jnp.where(t, flat_index_hash(k.shape, seed), jnp.uint32(0))
              for k, t, seed in zip(keys, ties, seeds)]
    # Among ties, take the `remaining` largest hashes (all distinct, so exact).
    hash_thresholds = _radix_thresholds(hashes, remaining, nbs, 32, jnp.uint32)
    return [(above[i] | (ties[i] & (hashes[i] >= _expand(hash_thresholds[i], k, nbs[i]))
                         & _expand(remaining[i] > 0, k, nbs[i])))
            & _expand(clipped_ks[i] > 0, k, nbs[i]) for i, k in enumerate(keys)]

  # The second search only runs when some tensor has more ties at its
  # threshold than it may take (bf16 weights, zero gradients, SET's draws).
  needs_break = jnp.any(jnp.stack([jnp.any(t > r) for t, r in zip(tie_counts, remaining)]))
  return lax.cond(needs_break, break_ties, take_all_ties, None)


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
