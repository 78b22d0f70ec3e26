"""Sparse training as optax gradient transformations."""

from sift_jax.optim.schedules import DROP_SCHEDULES, MaskUpdateSchedule, make_mask_update_schedule
from sift_jax.optim.sparse import (METHODS, SparseState, SparseStats, get_masks, get_sparse_state, rigl,
                                   set_sparse, sparse_stats, static_sparse)

__all__ = ["DROP_SCHEDULES", "METHODS", "MaskUpdateSchedule", "SparseState", "SparseStats",
           "get_masks", "get_sparse_state", "make_mask_update_schedule", "rigl", "set_sparse",
           "sparse_stats", "static_sparse"]
