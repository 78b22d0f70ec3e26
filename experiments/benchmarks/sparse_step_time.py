"""Step time of dense, static sparse and RigL training, measured side by side.

Runs in one process on a small MLP (MNIST-1D sized) and a quarter-width CIFAR
ResNet-18. For each model it times, interleaved round by round so machine
noise hits all variants alike:

* dense: the inner optimizer alone (SGD, Nesterov momentum 0.9);
* static: ``sift_jax.static_sparse`` around the same optimizer;
* RigL: ``sift_jax.rigl`` (update every 100 steps) on ordinary steps and on
  mask-update steps; the amortised step time is
  ``(99 * ordinary + update) / 100``;

and prints medians and the ratios, and writes them as JSON. Targets:
static / dense <= 1.03, RigL amortised / dense <= 1.05, and RigL ordinary /
static <= 1.02 and RigL ordinary / dense <= 1.02 (an ordinary RigL step does
what a static step does: mask the gradients and the update; the selection and
the moment reset of a mask update run under ``lax.cond`` on update steps only).
Every step donates its params, batch statistics and optimizer state, as the
training loop does. Every ratio compares medians measured in the same rounds of
the same process;
the machine may be shared, so read the ratios, not the absolute times.

Usage:
  python experiments/benchmarks/sparse_step_time.py [--rounds 12] [--out FILE]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sift_jax
from sift_jax.models import get_model
from sift_jax.models import resnet as resnet_lib

UPDATE_EVERY = 100


def _mlp():
  spec = get_model("mlp_mnist1d")
  x = jnp.asarray(np.random.default_rng(0).normal(size=(128,) + spec.input_shape), jnp.float32)
  y = jnp.asarray(np.arange(128) % 10, jnp.int32)
  return "mlp_mnist1d", spec.module, spec.policy, x, y


def _resnet18_quarter():
  # Quarter width (16-32-64-128), CIFAR stem, 100 classes; masks follow the
  # registry's ResNet policy (stem and classifier dense).
  spec = get_model("resnet18_cifar")
  module = resnet_lib.ResNet(stage_sizes=(2, 2, 2, 2), widths=(16, 32, 64, 128), stem_width=16,
                             num_classes=100, cifar_stem=True)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(128, 32, 32, 3)), jnp.float32)
  y = jnp.asarray(np.arange(128) % 100, jnp.int32)
  return "resnet18_cifar_quarter", module, spec.policy, x, y


def _make_step(module, tx):
  def loss_fn(params, batch_stats, x, y):
    variables = {"params": params}
    if batch_stats is not None:
      variables["batch_stats"] = batch_stats
      logits, new_vars = module.apply(variables, x, train=True, mutable=["batch_stats"])
      new_stats = new_vars["batch_stats"]
    else:
      logits, new_stats = module.apply(variables, x, train=True), None
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, new_stats

  # Params, batch statistics and optimizer state are donated, as in the
  # training loop, so XLA may update them in place.
  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def step(params, batch_stats, opt_state, x, y):
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  return step


def _time_block(step, carry, x, y, n, set_count=None):
  params, stats, opt_state = carry
  if set_count is not None:
    # Set once per block, outside the timed loop: the count then runs on from
    # set_count, and blocks are short enough (< 99 steps) never to reach an
    # update step when set_count is 1.
    opt_state = opt_state._replace(count=jnp.asarray(set_count, jnp.int32))
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    params, stats, opt_state, loss = step(params, stats, opt_state, x, y)
    jax.block_until_ready((params, opt_state, loss))
    times.append(time.perf_counter() - t0)
  return (params, stats, opt_state), times


def bench(name, module, policy, x, y, rounds, steps_per_round, sparsity=0.9):
  variables = module.init(jax.random.key(0), x[:2], train=False)
  params, stats = variables["params"], variables.get("batch_stats")
  inner = optax.sgd(0.01, momentum=0.9, nesterov=True)
  txs = {
      "dense": inner,
      "static": sift_jax.static_sparse(inner, sparsity=sparsity, policy=policy),
      "rigl": sift_jax.rigl(inner, sparsity=sparsity, policy=policy, total_steps=10**6,
                            update_every=UPDATE_EVERY),
  }
  steps = {k: _make_step(module, tx) for k, tx in txs.items()}
  # Each variant owns its buffers: the steps donate them.
  carries = {k: jax.tree.map(jnp.copy, (params, stats, tx.init(params))) for k, tx in txs.items()}
  # Compile and warm up every variant (RigL: both branches are one function).
  for k in txs:
    carries[k], _ = _time_block(steps[k], carries[k], x, y, 2, set_count=1 if k == "rigl" else None)
  times = {"dense": [], "static": [], "rigl_ordinary": [], "rigl_update": []}
  order = ["dense", "static", "rigl_ordinary", "rigl_update"]
  for r in range(rounds):
    for variant in order[r % 4:] + order[:r % 4]:
      if variant in ("dense", "static"):
        carries[variant], t = _time_block(steps[variant], carries[variant], x, y, steps_per_round)
      elif variant == "rigl_ordinary":
        carries["rigl"], t = _time_block(steps["rigl"], carries["rigl"], x, y, steps_per_round, set_count=1)
      else:
        carries["rigl"], t = _time_block(steps["rigl"], carries["rigl"], x, y, 1, set_count=UPDATE_EVERY)
      times[variant].extend(t)
  med = {k: statistics.median(v) for k, v in times.items()}
  amortised = ((UPDATE_EVERY - 1) * med["rigl_ordinary"] + med["rigl_update"]) / UPDATE_EVERY
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  return {
      "model": name, "params": n_params, "batch": int(x.shape[0]), "sparsity": sparsity,
      "rounds": rounds, "steps_per_round": steps_per_round,
      "median_step_s": {"dense": med["dense"], "static": med["static"],
                        "rigl_ordinary": med["rigl_ordinary"], "rigl_update_step": med["rigl_update"],
                        "rigl_amortised": amortised},
      "mask_update_s": med["rigl_update"] - med["rigl_ordinary"],
      "ratio_static_to_dense": med["static"] / med["dense"],
      "ratio_rigl_amortised_to_dense": amortised / med["dense"],
      "ratio_rigl_ordinary_to_static": med["rigl_ordinary"] / med["static"],
      "ratio_rigl_ordinary_to_dense": med["rigl_ordinary"] / med["dense"],
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=12)
  parser.add_argument("--mlp-steps", type=int, default=50, help="timed steps per round, MLP")
  parser.add_argument("--resnet-steps", type=int, default=3, help="timed steps per round, ResNet")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "sparse_step_time.json"))
  parser.add_argument("--models", default="mlp,resnet", help="comma list of mlp,resnet")
  args = parser.parse_args()
  results = []
  for which in args.models.split(","):
    build, n = {"mlp": (_mlp, args.mlp_steps), "resnet": (_resnet18_quarter, args.resnet_steps)}[which]
    name, module, policy, x, y = build()
    load_before = os.getloadavg()[0]
    res = bench(name, module, policy, x, y, args.rounds, n)
    # The machine may be shared: the 1-minute load average around the run.
    res["load_average_1min"] = [load_before, os.getloadavg()[0]]
    results.append(res)
    m = res["median_step_s"]
    print(f"{name}: {res['params']:,} params, batch {res['batch']}, s={res['sparsity']}, "
          f"load average {res['load_average_1min'][0]:.1f} -> {res['load_average_1min'][1]:.1f}")
    print(f"  median step  dense {m['dense']*1e3:8.2f} ms | static {m['static']*1e3:8.2f} ms | "
          f"rigl ordinary {m['rigl_ordinary']*1e3:8.2f} ms | rigl update step {m['rigl_update_step']*1e3:8.2f} ms")
    print(f"  mask update {res['mask_update_s']*1e3:.2f} ms | rigl amortised (every {UPDATE_EVERY}) "
          f"{m['rigl_amortised']*1e3:.2f} ms")
    print(f"  ratio static/dense {res['ratio_static_to_dense']:.3f} (target <= 1.03) | "
          f"rigl amortised/dense {res['ratio_rigl_amortised_to_dense']:.3f} (target <= 1.05)")
    print(f"  ratio rigl ordinary/static {res['ratio_rigl_ordinary_to_static']:.3f} (target <= 1.02) | "
          f"rigl ordinary/dense {res['ratio_rigl_ordinary_to_dense']:.3f} (target <= 1.02)")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"device": str(jax.devices()[0]), "jax": jax.__version__, "results": results}, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
