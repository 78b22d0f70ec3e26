"""Inference latency and stored bytes: transformed vs folded / compressed vs the dense original.

For each Sparse-IFT member at s in {0.5, 0.9} on ``cnn_mnist1d`` (registry
size) and an eighth-width CIFAR ResNet-18 (8-16-32-64 channels, 32x32x3
inputs), in one process, this builds the member, draws masks at its iso-FLOP
sparsity (``sift_jax.init_masks`` over the registry policy: stem and
classifier dense, Doped's U V dense), fills every variable with random
values (inference cost does not depend on training), and times:

* ``transformed``: the member as trained (masked dense tensors);
* ``inference``: :func:`sift_jax.fold` where the member folds (Parallel with
  per-branch BatchNorms, Factorized with a BatchNorm mid, Doped), else
  :func:`sift_jax.compress` with its default ``format="auto"`` (Sparse Wide,
  Factorized with its default BN+ReLU mid);
* ``dense``: the original dense model;
* for compressed members also ``ell``: ``compress(format="ell")`` (a real
  sparse product) at the batches of ``--ell-batches`` (default 1: at larger
  batches it costs seconds per call and GBs of gathered temporaries on the
  ResNet, which is why ``format="auto"`` does not pick it).

Timing (jitted, CPU): every variant is warmed up, then calibrated to a
number of calls per sample of at least ``--sample-ms``; samples are taken in
interleaved rounds (the variants' order rotates each round) so that machine
noise hits all variants alike. A cell is the median of its samples; the
ratio inference / dense is the median over rounds of the per-round ratio
(paired), with the ratio of the minima beside it. For folded members the
benchmark also lowers the folded and the dense model and compares their
StableHLO text: identical text means the folded model runs the dense
model's program, so their latencies can differ only by noise.

It checks that inference outputs equal the transformed ones and that folded
parameter counts equal the dense model's exactly, prints the table and
writes JSON after every row.

Usage:
  python experiments/benchmarks/inference_latency.py [--rounds 9] [--out FILE]
  python experiments/benchmarks/inference_latency.py --table FILE   # markdown of a results JSON
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

#: Batches per model (batch 16 of the ResNet is left out to keep the run under 15 min).
BATCHES = {"cnn_mnist1d": (1, 16, 128), "resnet18_cifar_eighth": (1, 128)}
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
  return module, variables, shape, sol.solved_sparsity



_DENSE_FNS: dict = {}  # model name -> (base module, jitted apply): compiled once per batch shape


def _dense_fn(model_name):
  if model_name not in _DENSE_FNS:
    base, _ = MODELS[model_name](FamilyConfig(norm="batch"))
    _DENSE_FNS[model_name] = (base, jax.jit(lambda v, x: base.apply(v, x, train=False)))
  return _DENSE_FNS[model_name]


def _hlo(fn, variables, x):
  return fn.lower(variables, x).as_text()


class _Sampler:
  """One variant's timed samples at one batch: warm-up, then ``calls`` calls per sample."""

  def __init__(self, fn, variables, x, sample_s, max_calls=1000):
    self.fn, self.variables, self.x = fn, variables, x
    fn(variables, x).block_until_ready()  # compile and warm up
    t = time.perf_counter()
    fn(variables, x).block_until_ready()
    self.single = time.perf_counter() - t
    self.calls = int(min(max_calls, max(1, np.ceil(sample_s / max(self.single, 1e-7)))))
    self.samples = []

  def sample(self):
    t = time.perf_counter()
    for _ in range(self.calls):
      out = self.fn(self.variables, self.x)
    out.block_until_ready()
    self.samples.append((time.perf_counter() - t) / self.calls)


def bench(model_name, family, options, sparsity, args, rng):
  module, variables, shape, solved = _build(model_name, family, sparsity, options, rng)
  base, dense_fn = _dense_fn(model_name)
  x1 = jax.ShapeDtypeStruct((1,) + shape, jnp.float32)
  base_vars = _random_variables(jax.eval_shape(lambda k: base.init(k, jnp.zeros(x1.shape), train=False),
                                               jax.random.key(0)), rng)
  x_check = jnp.asarray(rng.standard_normal((4,) + shape), jnp.float32)
  ell = None
  try:
    dense_module, inf_vars = fold(module, variables, example_input=x_check)
    how, formats = "fold", {}
    inf_fn = jax.jit(lambda v, x: dense_module.apply(v, x, train=False))
  except FoldError:
    small = compress(module, variables, example_input=x_check)
    how, inf_vars, inf_fn, formats = "compress", small.variables, jax.jit(small.apply), small.formats
    ell = compress(module, variables, example_input=x_check, format="ell")
  member_fn = jax.jit(lambda v, x: module.apply(v, x, train=False))
  want = member_fn(variables, x_check)
  rel = lambda got: float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
  err = rel(inf_fn(inf_vars, x_check))
  n_params = lambda v: sum(int(np.size(l)) for l in jax.tree.leaves(v["params"]))
  same_hlo = None
  if how == "fold":
    assert n_params(inf_vars) == n_params(base_vars), (n_params(inf_vars), n_params(base_vars))
    same_hlo = _hlo(inf_fn, inf_vars, x1) == _hlo(dense_fn, base_vars, x1)
  variants = {"transformed": (member_fn, variables), "inference": (inf_fn, inf_vars),
              "dense": (dense_fn, base_vars)}
  if ell is not None:
    ell_fn = jax.jit(ell.apply)
    err = max(err, rel(ell_fn(ell.variables, x_check)))
  latency, ratios, skipped = {}, {}, {}
  for batch in BATCHES[model_name]:
    x = jnp.asarray(rng.standard_normal((batch,) + shape), jnp.float32)
    cell = dict(variants)
    if ell is not None:
      if batch in args.ell_batches:
        cell["ell"] = (ell_fn, ell.variables)
      else:
        skipped[str(batch)] = "ell not timed at this batch (--ell-batches)"
    samplers = {k: _Sampler(fn, v, x, args.sample_ms / 1e3) for k, (fn, v) in cell.items()}
    slowest = max(s.single * s.calls for s in samplers.values())
    rounds = args.rounds if slowest < 0.5 else max(3, args.rounds // 2)
    names = list(samplers)
    for r in range(rounds):
      for k in names[r % len(names):] + names[:r % len(names)]:
        samplers[k].sample()
    latency[str(batch)] = {k: statistics.median(s.samples) for k, s in samplers.items()}
    paired = [a / b for a, b in zip(samplers["inference"].samples, samplers["dense"].samples)]
    ratios[str(batch)] = {"median_paired": statistics.median(paired),
                          "of_minima": min(samplers["inference"].samples) / min(samplers["dense"].samples),
                          "rounds": rounds, "calls": {k: s.calls for k, s in samplers.items()}}
  by = {"transformed": variable_bytes(variables), "inference": variable_bytes(inf_vars),
        "dense": variable_bytes(base_vars)}
  if ell is not None:
    by["ell"] = variable_bytes(ell.variables)
  return {
      "model": model_name, "family": family, "options": {k: str(v) for k, v in options.items()},
      "sparsity": sparsity, "solved_sparsity": solved, "how": how, "max_rel_err": err,
      "formats": sorted(set(formats.values())), "compressed_layers": len(formats),
      "folded_hlo_equals_dense": same_hlo, "latency_s": latency, "ratio_inference_dense": ratios,
      "skipped": skipped, "bytes": by, "load_average_1min": os.getloadavg()[0],
      "params": {"transformed": n_params(variables), "inference": n_params(inf_vars),
                 "dense": n_params(base_vars)},
  }


def _name(r):
  return r["family"].replace("sparse_", "") + (
      f" ({r['options']['factorized_mid']})" if "factorized_mid" in r["options"] else "")


def _row(r, batches):
  lat, ratio = r["latency_s"], r["ratio_inference_dense"]
  cells = []
  for b in batches:
    if str(b) not in lat:
      cells.append("")
      continue
    l, q = lat[str(b)], ratio[str(b)]
    ell = f" [ell {l['ell']*1e3:.2f}]" if "ell" in l else ""
    cells.append(f"{l['transformed']*1e3:.3g} / {l['inference']*1e3:.3g} / {l['dense']*1e3:.3g} "
                 f"(**{q['median_paired']:.2f}x**, min {q['of_minima']:.2f}x){ell}")
  by = r["bytes"]
  if r["how"] == "fold":
    how = "fold, HLO " + ("= dense" if r["folded_hlo_equals_dense"] else "differs")
  else:
    how = "compress (" + (", ".join(r["formats"]) or "nothing below max_density") + ")"
  ell = f" [ell {by['ell']/1e3:.0f}]" if "ell" in by else ""
  return (f"| {r['model']} | {_name(r)} | {r['sparsity']} | {how} | " + " | ".join(cells) +
          f" | {by['transformed']/1e3:.0f} / {by['inference']/1e3:.0f} / {by['dense']/1e3:.0f}{ell} |")


def _header(batches):
  return ("| model | member | s | inference path | " + " | ".join(
      f"batch {b}: transformed / inference / dense ms (inference / dense)" for b in batches) +
          " | kB transformed / inference / dense |\n|" + "---|" * (5 + len(batches)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--table", default=None, help="print the markdown table of a results JSON")
  parser.add_argument("--rounds", type=int, default=9)
  parser.add_argument("--sample-ms", type=float, default=20.0,
                      help="minimum duration of one timed sample (calls are repeated to reach it)")
  parser.add_argument("--ell-batches", default="1", help="batches at which ELL is timed")
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--sparsities", default="0.5,0.9")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "inference_latency.json"))
  args = parser.parse_args()
  args.ell_batches = tuple(int(b) for b in args.ell_batches.split(",") if b)
  batches = sorted({b for bs in BATCHES.values() for b in bs})
  if args.table:
    with open(args.table, encoding="utf-8") as f:
      print(_header(batches))
      print("\n".join(_row(r, batches) for r in json.load(f)["results"]))
    return
  rng = np.random.default_rng(0)
  results = []
  start = time.time()
  print(_header(batches))
  for model_name in args.models.split(","):
    for s in (float(v) for v in args.sparsities.split(",")):
      for family, options in MEMBERS:
        r = bench(model_name, family, options, s, args, rng)
        results.append(r)
        print(_row(r, batches), f"err {r['max_rel_err']:.1e}", f"[{time.time() - start:.0f} s]",
              flush=True)
        # Written after every row: a long run that is stopped keeps what it measured.
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
          json.dump({"device": str(jax.devices()[0]), "cpu_count": os.cpu_count(),
                     "jax": jax.__version__, "rounds": args.rounds, "sample_ms": args.sample_ms,
                     "load_average": os.getloadavg(), "elapsed_s": time.time() - start,
                     "results": results}, f, indent=2)


if __name__ == "__main__":
  main()
