"""sift_jax: Sparse Iso-FLOP Transformations (Sparse-IFT) in JAX/Flax.

Pure mask transforms on parameter pytrees (:mod:`sift_jax.masks`), sparse
training as optax gradient transformations (:mod:`sift_jax.optim`), the
Sparse-IFT family as Flax layers and model transforms
(:mod:`sift_jax.transformations`), models, FLOP accounting, data, sharded
training, spectral analysis of masks, and inference (:mod:`sift_jax.inference`: fold a
trained member back into the dense layer, compress sparse kernels, export).
"""

# First: `python -m sift_jax.train` handles SIGTERM from its start (see there).
from sift_jax import _sigterm
_sigterm.install_for_training_cli()

from sift_jax import flops  # pylint: disable=g-import-not-at-top,wrong-import-position
from sift_jax import masks
from sift_jax import models
from sift_jax import optim
from sift_jax import sharding
from sift_jax import spectral
from sift_jax import transformations
from sift_jax.masks import (DISTRIBUTIONS, NON_WEIGHT_NAMES, SparsityPolicy, apply_masks, detect_stacked,
                            explain_selection, init_masks, layer_densities, mask_stats, path_str,
                            select_sparse, stacked_axes, target_count)
from sift_jax.models import ModelSpec, get_model, list_models
from sift_jax.transformations import (FAMILIES, IsoFlopToleranceWarning, SparseDoped, SparseFactorized,
                                      SparseParallel, TransformedModel, solve_sparsity, transform,
                                      transformed_policy, WideAnalysisError)
from sift_jax import inference
from sift_jax.inference import CompressedModel, FoldError, compress, fold
from sift_jax.inference.export import export_model, export_run
from sift_jax.optim import (SparseState, SparseStats, dynamic_sparse, get_masks, get_sparse_state,
                            gradual_magnitude_pruning, magnitude_masks, oneshot_magnitude_pruning,
                            parallel_branch_groups, rigl, set_sparse, sparse_stats, static_sparse)

__version__ = "0.1.0"

# Heavy, optional subpackages (grain/TFDS, orbax) load on first attribute access;
# their dependencies come with the [train] extra.
_LAZY_SUBMODULES = ("data", "training")


def __getattr__(name):
  if name in _LAZY_SUBMODULES:
    import importlib  # pylint: disable=g-import-not-at-top
    try:
      module = importlib.import_module(f"sift_jax.{name}")
    except ModuleNotFoundError as e:
      raise ModuleNotFoundError(f"sift_jax.{name} needs {e.name!r}, which comes with the [train] "
                                "extra: pip install 'sift_jax[train]'", name=e.name) from e
    globals()[name] = module
    return module
  raise AttributeError(f"module 'sift_jax' has no attribute {name!r}")

__all__ = [
    "FAMILIES", "IsoFlopToleranceWarning", "ModelSpec", "SparseDoped", "SparseFactorized", "SparseParallel", "TransformedModel",
    "flops", "get_model", "list_models", "models", "solve_sparsity", "transform", "transformations", "WideAnalysisError",
    "transformed_policy",
    "DISTRIBUTIONS", "SparseState", "SparseStats", "SparsityPolicy", "apply_masks",
    "explain_selection", "get_masks", "get_sparse_state", "init_masks", "layer_densities",
    "mask_stats", "masks", "optim", "path_str", "rigl", "select_sparse", "set_sparse", "sharding",
    "sparse_stats", "spectral", "static_sparse", "target_count", "data",
    "CompressedModel", "FoldError", "compress", "export_model", "export_run", "fold", "inference",
    "dynamic_sparse", "gradual_magnitude_pruning", "magnitude_masks", "oneshot_magnitude_pruning",
    "parallel_branch_groups", "NON_WEIGHT_NAMES", "detect_stacked", "stacked_axes",
]
