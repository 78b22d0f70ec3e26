"""Inference latency and stored bytes: transformed vs folded / compressed vs the dense original.

For each Sparse-IFT member at s in {0.5, 0.9} on ``cnn_mnist1d`` (registry
size) and an eighth-width CIFAR ResNet-18 (8-16-32-64 channels, 32x32x3
inputs), in one process, this builds the member, draws masks at its iso-FLOP
sparsity (``sift_jax.init_masks`` over the registry policy: stem and
classifier dense, Doped's U V dense), fills every variable with random
values (inference cost does not depend on training), and times, interleaved
round by round so that machine noise hits all variants alike:

* ``transformed``: the member as trained (masked dense tensors);
* ``inference``: :func:`sift_jax.fold` where the member folds (Parallel with
  per-branch BatchNorms, Factorized with a BatchNorm mid, Doped), else
  :func:`sift_jax.compress` (ELL format: Sparse Wide, Factorized with its
  default BN+ReLU mid);
* ``dense``: the original dense model;
* for compressed members also ``scatter``: :func:`sift_jax.compress` with
  ``format="scatter"`` (nonzeros scattered into a dense kernel per call).

Each at batch 1, 16 and 128 (jitted, median over rounds of the mean of a
few calls). It prints the table, checks that folded outputs equal the
transformed ones and that folded parameter counts equal the dense model's
exactly, and writes JSON.

Usage:
  python experiments/benchmarks/inference_latency.py [--rounds 7] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import sift_jax
from sift_jax import flops
from sift_jax.inference import FoldError, compress, fold, variable_bytes
from sift_jax.models import mnist1d as mnist1d_lib
from sift_jax.models import resnet as resnet_lib
from sift_jax.transformations import isoflop
from sift_jax.transformations.family import FamilyConfig

BATCHES = (1, 16, 128)
MEMBERS = (
    ("sparse_wide", {}),
    ("sparse_parallel", {"parallel_norm": True}),        # per-branch BatchNorms: folds
    ("sparse_factorized", {"factorized_mid": "norm"}),    # BN mid: folds
    ("sparse_factorized", {"factorized_mid": "norm_relu"}),  # registry default: compressed
    ("sparse_doped", {}),
)


def _cnn(cfg):
  stem = cfg.width(32)
  return mnist1d_lib.CNN1D(stem_width=stem, channels=tuple(cfg.width(c) for c in (32, 64, 64)),
                           strides=(1, 2, 2), sift=cfg), (40, 1)


def _resnet(cfg):
  widths = tuple(cfg.width(w) for w in (8, 16, 32, 64))
  return resnet_lib.ResNet(stage_sizes=(2, 2, 2, 2), widths=widths, stem_width=widths[0],
                           num_classes=100, sift=cfg), (32, 32, 3)


MODELS = {"cnn_mnist1d": _cnn, "resnet18_cifar_eighth": _resnet}


def _random_variables(abstract, rng):
  def draw(path, leaf):
    name, shape = str(path[-1].key), tuple(leaf.shape)
    if name == "var":
      return jnp.asarray(rng.uniform(0.5, 2.0, shape), jnp.float32)
    if name in ("mean", "bias"):
      return jnp.asarray(0.1 * rng.standard_normal(shape), jnp.float32)
    if name == "scale":
      return jnp.asarray(rng.uniform(0.5, 1.5, shape), jnp.float32)
    fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return jnp.asarray(rng.standard_normal(shape) / np.sqrt(fan_in), jnp.float32)
  return jax.tree_util.tree_map_with_path(draw, abstract)


def _build(model_name, family, sparsity, options, rng):
  cfg = FamilyConfig(family=family, sparsity=sparsity, norm="batch", **options)
  module, shape = MODELS[model_name](cfg)
  base, _ = MODELS[model_name](FamilyConfig(norm="batch", factorized_mid=cfg.factorized_mid))
  x1 = jax.ShapeDtypeStruct((1,) + shape, jnp.float32)
  dense = (r"^stem/", r"^head/") + ((r"/U/kernel$", r"/V/kernel$") if family == "sparse_doped" else ())
  policy = sift_jax.SparsityPolicy(dense=dense)
  trace = flops.trace_macs(module, x1, train=False)
  budget = flops.trace_macs(base, x1, train=False).macs.total
  sol = isoflop.solve_sparsity(trace.macs, trace.variables["params"], policy, base_dense_macs=budget,
                               nominal_sparsity=sparsity, what=f"{model_name} {family}")
  variables = _random_variables(trace.variables, rng)
  densities = sift_jax.layer_densities(variables["params"], sol.solved_sparsity, policy=policy)
  masks = sift_jax.init_masks(jax.random.key(0), variables["params"], densities)
  variables = dict(variables, params=sift_jax.apply_masks(variables["params"], masks))
  base_vars = _random_variables(jax.eval_shape(lambda k: base.init(k, jnp.zeros(x1.shape),
                                                                   train=False), jax.random.key(0)),
                                rng)
  return module, base, variables, base_vars, shape, sol.solved_sparsity


def _timer(fn, variables, x, calls):
  fn(variables, x).block_until_ready()

  def once():
    t = time.perf_counter()
    for _ in range(calls):
      out = fn(variables, x)
    out.block_until_ready()
    return (time.perf_counter() - t) / calls
  return once


def bench(model_name, family, options, sparsity, rounds, rng):
  module, base, variables, base_vars, shape, solved = _build(model_name, family, sparsity, options, rng)
  x_check = jnp.asarray(rng.standard_normal((4,) + shape), jnp.float32)
  try:
    dense_module, inf_vars = fold(module, variables, example_input=x_check)
    how = "fold"
    inf_fn = jax.jit(lambda v, x: dense_module.apply(v, x, train=False))
  except FoldError:
    small = compress(module, variables, example_input=x_check, format="ell")
    how, inf_vars, inf_fn = "compress", small.variables, jax.jit(small.apply)
    scattered = compress(module, variables, example_input=x_check, format="scatter")
  member_fn = jax.jit(lambda v, x: module.apply(v, x, train=False))
  dense_fn = jax.jit(lambda v, x: base.apply(v, x, train=False))
  want = member_fn(variables, x_check)
  err = float(jnp.max(jnp.abs(inf_fn(inf_vars, x_check) - want)) / jnp.max(jnp.abs(want)))
  n_params = lambda v: sum(int(np.size(l)) for l in jax.tree.leaves(v["params"]))
  if how == "fold":
    assert n_params(inf_vars) == n_params(base_vars), (n_params(inf_vars), n_params(base_vars))
  variants = {"transformed": (member_fn, variables), "inference": (inf_fn, inf_vars),
              "dense": (dense_fn, base_vars)}
  if how == "compress":
    variants["scatter"] = (jax.jit(scattered.apply), scattered.variables)
    err = max(err, float(jnp.max(jnp.abs(variants["scatter"][0](scattered.variables, x_check) - want))
                         / jnp.max(jnp.abs(want))))
  latency = {}
  for batch in BATCHES:
    x = jnp.asarray(rng.standard_normal((batch,) + shape), jnp.float32)
    calls = 20 if batch == 1 else (4 if batch == 16 else 1)
    timers = {k: _timer(fn, v, x, calls) for k, (fn, v) in variants.items()}
    times = {k: [] for k in timers}
    for _ in range(rounds):
      for k, t in timers.items():
        times[k].append(t())
    latency[batch] = {k: statistics.median(v) for k, v in times.items()}
  return {
      "model": model_name, "family": family, "options": {k: str(v) for k, v in options.items()},
      "sparsity": sparsity, "solved_sparsity": solved, "how": how, "max_rel_err": err,
      "latency_s": {str(b): v for b, v in latency.items()},
      "bytes": {"transformed": variable_bytes(variables), "inference": variable_bytes(inf_vars),
                "dense": variable_bytes(base_vars),
                **({"scatter": variable_bytes(scattered.variables)} if how == "compress" else {})},
      "params": {"transformed": n_params(variables), "inference": n_params(inf_vars),
                 "dense": n_params(base_vars)},
  }


def _row(r):
  lat = r["latency_s"]
  name = r["family"].replace("sparse_", "") + (
      f" ({r['options']['factorized_mid']})" if "factorized_mid" in r["options"] else "")
  cells = []
  for b in BATCHES:
    l = lat[str(b)]
    scatter = f" [scatter {l['scatter']*1e3:.2f}, {l['scatter']/l['dense']:.2f}x]" if "scatter" in l else ""
    cells.append(f"{l['transformed']*1e3:.2f} / {l['inference']*1e3:.2f} / {l['dense']*1e3:.2f} "
                 f"(**{l['inference']/l['dense']:.2f}x**){scatter}")
  by = r["bytes"]
  scatter = f" [scatter {by['scatter']/1e3:.0f}]" if "scatter" in by else ""
  how = "fold" if r["how"] == "fold" else "compress (ELL)"
  return (f"| {r['model']} | {name} | {r['sparsity']} | {how} | " + " | ".join(cells) +
          f" | {by['transformed']/1e3:.0f} / {by['inference']/1e3:.0f} / {by['dense']/1e3:.0f}{scatter} |")


HEADER = ("| model | member | s | path | " + " | ".join(
    f"batch {b}: transformed / inference / dense ms (inference / dense)" for b in BATCHES) +
          " | kB transformed / inference / dense |\n|" + "---|" * (5 + len(BATCHES)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--table", default=None, help="print the markdown table of a results JSON")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--sparsities", default="0.5,0.9")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "inference_latency.json"))
  args = parser.parse_args()
  if args.table:
    with open(args.table, encoding="utf-8") as f:
      print(HEADER)
      print("\n".join(_row(r) for r in json.load(f)["results"]))
    return
  rng = np.random.default_rng(0)
  results = []
  print(HEADER)
  for model_name in args.models.split(","):
    for s in (float(v) for v in args.sparsities.split(",")):
      for family, options in MEMBERS:
        r = bench(model_name, family, options, s, args.rounds, rng)
        results.append(r)
        print(_row(r), f"err {r['max_rel_err']:.1e}", flush=True)
        # Written after every row: a long run that is stopped keeps what it measured.
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
          json.dump({"device": str(jax.devices()[0]), "cpu_count": os.cpu_count(),
                     "jax": jax.__version__, "rounds": args.rounds, "results": results}, f, indent=2)


if __name__ == "__main__":
  main()
