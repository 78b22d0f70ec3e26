"""Time of the spectral metrics of one large masked layer (issue 5's target).

The target is "a 512 x 4608 layer in about a second on this machine": the last
3x3 convolution of a ResNet-18 (``C_in = C_out = 512``, so ``D_in = 4608``
unrolled inputs and ``D_out = 512`` outputs), with weights, at the Sparse-IFT
sparsities. For each case this prints the median of ``--repeats`` calls of
:func:`sift_jax.spectral.layer_metrics` (all metrics, the weighted ones and the
iterative mean included) and writes them as JSON.

Usage:
  python experiments/benchmarks/spectral_layer_time.py [--repeats 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

from sift_jax import spectral

CASES = (
    # (name, Flax kernel shape): the conv and its transposed dense twin.
    ("conv3x3_512x512 (D_in 4608, D_out 512)", (3, 3, 512, 512)),
    ("dense_512x4608 (D_in 512, D_out 4608)", (512, 4608)),
)
DENSITIES = (0.1, 0.25, 0.5)  # s = 0.9, 0.75, 0.5


def _exact_count_mask(rng, shape, density):
  size = int(np.prod(shape))
  flat = np.zeros(size, bool)
  flat[rng.choice(size, int(round(density * size)), replace=False)] = True
  return flat.reshape(shape)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "spectral_layer_time.json"))
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  results = []
  for name, shape in CASES:
    for density in DENSITIES:
      mask = _exact_count_mask(rng, shape, density)
      weights = rng.normal(size=shape).astype(np.float32)
      spectral.layer_metrics(mask, weights)  # warm-up (imports, BLAS threads)
      times = []
      for _ in range(args.repeats):
        t0 = time.perf_counter()
        metrics = spectral.layer_metrics(mask, weights)
        times.append(time.perf_counter() - t0)
      med = statistics.median(times)
      results.append({"layer": name, "shape": list(shape), "density": density, "median_s": med,
                      "times_s": times, "ramanujan_gap": metrics["ramanujan_gap"],
                      "num_regular_groups": metrics["num_regular_groups"]})
      print(f"{name:40s} density {density:4.2f}: median {med:6.3f} s over {args.repeats} "
            f"(min {min(times):.3f}, max {max(times):.3f}); ramanujan gap {metrics['ramanujan_gap']:.3f}, "
            f"{metrics['num_regular_groups']} left-regular groups")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"cpu_count": os.cpu_count(), "results": results}, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
