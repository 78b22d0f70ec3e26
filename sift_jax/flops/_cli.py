"""``python -m sift_jax.flops``: the per-layer FLOP table of a registry model.

The CLI sits above the models in the import graph, so the package
``__init__`` loads it only on first use of :func:`main`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from sift_jax import models
from sift_jax.flops._report import model_report
from sift_jax.transformations import members

def main(argv: Optional[Sequence[str]] = None) -> int:
  """CLI: ``python -m sift_jax.flops --model NAME --family FAMILY --sparsity S [--json]``."""



  parser = argparse.ArgumentParser(
      prog="python -m sift_jax.flops",
      description="Per-layer forward MACs (batch 1) of a Sparse-IFT model, dense and sparse.")
  parser.add_argument("--model", required=True, help=f"one of {', '.join(models.list_models())}")
  parser.add_argument("--family", default="dense",
                      help=f"one of {', '.join(members.member_names())}")
  parser.add_argument("--sparsity", type=float, default=0.0, help="nominal sparsity s in [0, 1)")
  parser.add_argument("--reference", action="store_true", help="reproduce the authors' PyTorch rules")
  parser.add_argument("--round-to", type=int, default=1, help="round widths and ranks to this multiple")
  parser.add_argument("--num-classes", type=int, default=None, help="override the number of classes")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  args = parser.parse_args(argv)
  try:
    spec = models.get_model(args.model, family=args.family, sparsity=args.sparsity,
                            reference=args.reference, round_to=args.round_to,
                            num_classes=args.num_classes)
    report = model_report(spec)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(report.to_dict()))
  else:
    print(f"model {spec.name}  family {spec.family}  reference={spec.reference}  "
          f"round_to={spec.round_to}  input {tuple(spec.input_shape)}")
    print(report.format_table())
  return 0
