"""Sparse training as optax gradient transformations.

:func:`dynamic_sparse` is the engine; :func:`static_sparse`, :func:`set_sparse`,
:func:`rigl`, :func:`gradual_magnitude_pruning` and
:func:`oneshot_magnitude_pruning` are thin factories over it, listed by name in
:data:`METHODS`.
"""

from sift_jax.optim.branch_growth import GROW_GROUPINGS, parallel_branch_groups
from sift_jax.optim.pruning import (cubic_sparsity_schedule, gradual_magnitude_pruning, magnitude_masks,
                                    oneshot_magnitude_pruning)
from sift_jax.optim.schedules import DROP_SCHEDULES, MaskUpdateSchedule, make_mask_update_schedule
from sift_jax.optim.sparse import (SCOPES, SCORE_FNS, ScoreFn, ScoreInputs, SparseState, SparseStats,
                                   dynamic_sparse, get_masks, get_sparse_state, gradient_score,
                                   magnitude_score, random_score, rigl, set_sparse, sparse_stats,
                                   static_sparse)

METHODS = {
    "static": static_sparse,
    "set": set_sparse,
    "rigl": rigl,
    "gmp": gradual_magnitude_pruning,
    "oneshot": oneshot_magnitude_pruning,
}
"""The sparse-training factories by the name configs use for them."""

__all__ = ["DROP_SCHEDULES", "GROW_GROUPINGS", "METHODS", "MaskUpdateSchedule", "SCOPES", "SCORE_FNS", "ScoreFn",
           "ScoreInputs", "SparseState", "SparseStats", "cubic_sparsity_schedule", "dynamic_sparse",
           "get_masks", "get_sparse_state", "gradient_score", "gradual_magnitude_pruning",
           "magnitude_masks", "magnitude_score", "make_mask_update_schedule",
           "oneshot_magnitude_pruning", "parallel_branch_groups", "random_score", "rigl", "set_sparse", "sparse_stats",
           "static_sparse"]
