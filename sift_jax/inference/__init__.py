"""From a trained Sparse-IFT model to inference: fold, compress and export.

* :func:`fold`: members that are linear at inference (Sparse Parallel,
  Factorized with a linear or BatchNorm mid, Doped) become the original dense
  layer again: the original architecture, its parameter count and speed.
* :func:`compress`: any model (Sparse Wide included) with its masked kernels
  stored sparse, and an inference function that uses them.
* :mod:`sift_jax.inference.export`: a finished training run to an orbax
  checkpoint of the inference variables and a serialized ``jax.export``
  artifact that plain JAX reloads (``python -m sift_jax.export``).
"""

from sift_jax.inference.fold import FOLDABLE_FAMILIES, FoldError, dense_counterpart, fold, member_config

from sift_jax.inference.compress import (ELL_MAX_DENSITY, FORMAT_CHOICES, FORMATS, CompressedModel, compress,
                                         variable_bytes)

__all__ = ["ELL_MAX_DENSITY", "FORMAT_CHOICES", "FORMATS", "CompressedModel", "FOLDABLE_FAMILIES",
           "FoldError", "compress", "dense_counterpart", "fold", "member_config", "variable_bytes"]
