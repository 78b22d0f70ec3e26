"""FLOP accounting: MACs from the jaxpr, sparse MACs, training FLOPs, and a CLI.

Conventions (docs/method.md, section 5):

* A MAC is one multiply-accumulate; FLOPs = 2 x MACs. Tables print both,
  labelled.
* Counts are for **one example** (batch 1; for a language model one sequence
  of the model's context length), forward pass only.
* Only ``dot_general`` (``Dense``, ``DenseGeneral``, ``einsum``, matmul) and
  ``conv_general_dilated`` (with ``feature_group_count``) are counted; norms,
  activations, pooling and adds are not, as in the reference numbers.

How MACs are attributed. :func:`count_macs` traces ``module.apply`` with
``jax.make_jaxpr`` on abstract inputs (no compute happens) and walks the
equations, recursing into ``jit``/``remat``/``custom_jvp``/``custom_vjp``
sub-jaxprs and into ``scan`` bodies (multiplied by the scan length). A
forward dataflow labels each value with the parameter leaves it derives from
and whether it depends on the model's inputs. The operand of a product that
does not depend on the inputs is its weight, and the product's MACs are
charged to that weight's parameter leaf; a product of two input-dependent
operands (attention ``QK^T`` and ``AV``) is charged to no parameter and is
always dense. Sparse MACs scale every row by the density of its parameter's
mask.

Run ``python -m sift_jax.flops --model resnet18_cifar --family sparse_wide
--sparsity 0.9`` for a per-layer table, ``--json`` for one JSON object.
"""


from sift_jax.flops._count import MacCount, MacRow, MacTrace, count_macs, trace_macs
from sift_jax.flops._report import FlopsReport, LayerFlops, effective_densities, flops_report, model_report
from sift_jax.flops._training import TRAINING_METHODS, TrainingFlops, training_flops

__all__ = [
    "MacRow", "MacCount", "count_macs", "MacTrace", "trace_macs", "LayerFlops", "FlopsReport", "flops_report",
    "effective_densities", "TrainingFlops", "training_flops", "TRAINING_METHODS", "model_report",
    "main",
]


def __getattr__(name):
  # The CLI imports the models, which import this package: loading it on
  # first use keeps the import graph acyclic (flops <- transformations <- models <- CLI).
  if name == "main":
    from sift_jax.flops._cli import main  # pylint: disable=g-import-not-at-top
    return main
  raise AttributeError(f"module 'sift_jax.flops' has no attribute {name!r}")
