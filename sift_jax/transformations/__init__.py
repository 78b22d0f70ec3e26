"""Sparse Iso-FLOP Transformations: size rules, Linen layers, drop-in transform, iso-FLOP solve."""

from sift_jax.transformations.diagnostics import BranchOverlap, branch_mask_overlap
from sift_jax.transformations.family import FamilyConfig
from sift_jax.transformations.isoflop import (ISO_FLOP_TOLERANCE, SOLVE_METHODS, IsoFlopSolution,
                                              IsoFlopToleranceWarning, reference_bisection,
                                              solve_sparsity)
from sift_jax.transformations.layers import (BATCH_NORM_EPSILON, BATCH_NORM_MOMENTUM,
                                             DOPED_LOW_RANK_INITS, FACTORIZED_MIDS, NORMS,
                                             SparseDoped, SparseFactorized,
                                             SparseParallel, layer_kind, template_dims, widen)
from sift_jax.transformations.members import (DOPED_DENSE_PARTS, LayerFactory, Member, MemberFold,
                                              WidthRule, get_member, member_names,
                                              register_member, unregister_member)
from sift_jax.transformations.sizes import (FAMILIES, MEMBERS, check_family, check_round_to,
                                            layer_dims, round_to_multiple, sparse_doped_rank,
                                            sparse_factorized_rank, sparse_parallel_branches,
                                            sparse_wide_factor, sparse_wide_width)
from sift_jax.transformations.nnx_bridge import (NNX_LAYERS, NnxAsLinen, NotAModuleError,
                                                 TransformedNnxModel, as_linen, transform_nnx)
from sift_jax.transformations.transform import (TransformedModel, transform, transform_with_config,
                                                transformed_policy)
from sift_jax.transformations.wide_analysis import (WideAnalysisError, WidePlan,
                                                    exact_output_layers, plan_sparse_wide)

__all__ = [
    "BATCH_NORM_EPSILON", "BATCH_NORM_MOMENTUM", "BranchOverlap", "DOPED_DENSE_PARTS",
    "DOPED_LOW_RANK_INITS", "LayerFactory", "Member", "MemberFold", "WidthRule", "get_member",
    "member_names", "register_member", "unregister_member",
    "FACTORIZED_MIDS", "FAMILIES", "FamilyConfig", "branch_mask_overlap",
    "ISO_FLOP_TOLERANCE", "IsoFlopSolution", "IsoFlopToleranceWarning", "MEMBERS", "NORMS",
    "SOLVE_METHODS", "SparseDoped", "SparseFactorized", "SparseParallel", "TransformedModel",
    "check_family", "check_round_to", "layer_dims", "layer_kind", "reference_bisection",
    "round_to_multiple", "solve_sparsity", "sparse_doped_rank", "sparse_factorized_rank",
    "sparse_parallel_branches", "sparse_wide_factor", "sparse_wide_width", "template_dims",
    "transform", "transform_with_config", "transformed_policy", "widen",
    "NNX_LAYERS", "NnxAsLinen", "NotAModuleError", "TransformedNnxModel", "as_linen", "transform_nnx",
    "WideAnalysisError", "WidePlan", "exact_output_layers", "plan_sparse_wide",
]
