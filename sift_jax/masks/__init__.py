"""Mask transforms on parameter pytrees: selection, densities, masks, statistics."""

from sift_jax.masks.densities import DISTRIBUTIONS, check_sparsity, layer_densities
from sift_jax.masks.ops import (apply_masks, check_densities, check_masks, check_stacked, conform,
                                init_masks, mask_stats, slice_size, target_count)
from sift_jax.masks.selection import (NON_WEIGHT_NAMES, WEIGHT_NAMES, LeafDecision, SparsityPolicy,
                                      detect_stacked, explain_selection, select_sparse, stacked_axes)
from sift_jax.masks.topk import float_keys, flat_index_hash, select_top_k
from sift_jax.masks.tree_paths import leaf_paths, map_with_path_str, path_str

__all__ = [
    "DISTRIBUTIONS", "LeafDecision", "NON_WEIGHT_NAMES", "SparsityPolicy", "WEIGHT_NAMES",
    "apply_masks", "check_densities", "check_masks", "check_sparsity", "check_stacked", "conform",
    "detect_stacked", "explain_selection", "flat_index_hash", "float_keys", "init_masks",
    "layer_densities", "leaf_paths", "map_with_path_str", "mask_stats", "path_str",
    "select_sparse", "select_top_k", "slice_size", "stacked_axes", "target_count",
]
