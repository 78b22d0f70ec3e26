"""sift_jax: Sparse Iso-FLOP Transformations (Sparse-IFT) in JAX/Flax.

Pure mask transforms on parameter pytrees (:mod:`sift_jax.masks`), sparse
training as optax gradient transformations (:mod:`sift_jax.optim`), the
Sparse-IFT family as Flax layers and model transforms
(:mod:`sift_jax.transformations`), models, FLOP accounting, data, sharded
training and spectral analysis of masks.
"""

from sift_jax import data
from sift_jax import masks
from sift_jax import optim
from sift_jax import sharding
from sift_jax import spectral
from sift_jax.masks import (DISTRIBUTIONS, SparsityPolicy, apply_masks, explain_selection, init_masks,
                            layer_densities, mask_stats, path_str, select_sparse, target_count)
from sift_jax.optim import (SparseState, SparseStats, get_masks, get_sparse_state, rigl, set_sparse,
                            sparse_stats, static_sparse)

__version__ = "0.1.0"

__all__ = [
    "DISTRIBUTIONS", "SparseState", "SparseStats", "SparsityPolicy", "apply_masks",
    "explain_selection", "get_masks", "get_sparse_state", "init_masks", "layer_densities",
    "mask_stats", "masks", "optim", "path_str", "rigl", "select_sparse", "set_sparse", "sharding",
    "sparse_stats", "spectral", "static_sparse", "target_count", "data",
]
