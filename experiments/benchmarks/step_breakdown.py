"""Where the time of a sift_jax ResNet-18 training step goes on XLA:CPU.

For each setting of ``torch_step_time.py`` (dense / Sparse Wide s = 0.5, full
width batch 128 / quarter width batch 32) this times, in one process:

* ``step``: the project's jitted, donated train step (as the training loop);
* ``forward``: the training-mode forward and loss (batch statistics updated);
* ``forward+backward``: ``value_and_grad`` of the loss, no optimizer;
* every convolution of the network alone, forward and backward (the VJP with
  respect to input and kernel), with the shapes and dimension numbers read
  from the forward's jaxpr;
* ``optimizer``: the optimizer update and ``apply_updates`` alone (inner SGD
  with momentum, and for Sparse Wide ``static_sparse`` around it: the
  difference is the mask multiply of gradients and updates);

and derives the breakdown: convolutions forward / backward, the rest of the
forward and backward (BatchNorm, ReLU, residual adds, pooling, head, loss),
optimizer, mask multiply and the remainder (step - forward+backward -
optimizer: metrics, copies between fusions). From the compiled step's HLO it
counts convolutions, transposes, copies and fusions; it checks that repeated
steps do not recompile (one executable in the jit cache) and that they make
no host-device transfers (``jax.transfer_guard("disallow")``).

Per-op times measured alone overlap imperfectly with the fused step (XLA can
fuse BatchNorm into neighbouring loops); read the categories as estimates.

Usage:
  python experiments/benchmarks/step_breakdown.py [--configs dense_quarter,...] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import sift_jax  # noqa: E402
import torch_step_time as bench  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "step_breakdown.json")


def _median_time(fn, args, steps):
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _conv_eqns(jaxpr):
  """Every ``conv_general_dilated`` equation of a jaxpr, sub-jaxprs included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      found.append(eqn)
    for v in eqn.params.values():
      sub = getattr(v, "jaxpr", v)
      if hasattr(sub, "eqns"):
        found.extend(_conv_eqns(sub))
  return found


def hlo_op_counts(hlo_text: str) -> dict[str, int]:
  """Instruction counts of an optimized HLO module, by opcode family."""
  counts = {}
  for op in ("convolution", "transpose", "copy", "fusion", "custom-call", "dot"):
    counts[op] = len(re.findall(rf"= \S+ {re.escape(op)}\(", hlo_text))
  return counts


def breakdown(name: str, steps: int) -> dict:
  config = bench.CONFIGS[name]
  train_step, state, batch = bench.make_jax_step(config)
  module, policy = bench.build_flax(config)
  x, y = batch["image"], batch["label"]

  def loss_fn(params, model_state):
    logits, new_state = module.apply({"params": params, **model_state}, x, train=True,
                                     mutable=list(model_state))
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_state

  fwd = jax.jit(loss_fn)
  grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  t_fwd = _median_time(fwd, (state.params, state.model_state), steps)
  t_grad = _median_time(grad, (state.params, state.model_state), steps)

  convs = _conv_eqns(jax.make_jaxpr(loss_fn)(state.params, state.model_state).jaxpr)
  t_conv_fwd = t_conv_bwd = 0.0
  for eqn in convs:
    lhs, rhs = (jnp.ones(v.aval.shape, v.aval.dtype) for v in eqn.invars)
    params = dict(eqn.params)

    def conv(a, b, params=params):
      return jax.lax.conv_general_dilated_p.bind(a, b, **params)

    out = jax.eval_shape(conv, lhs, rhs)
    cot = jnp.ones(out.shape, out.dtype)
    t_conv_fwd += _median_time(jax.jit(conv), (lhs, rhs), steps)
    t_conv_bwd += _median_time(jax.jit(lambda a, b, c: jax.vjp(conv, a, b)[1](c)), (lhs, rhs, cot),
                               steps)

  grads = grad(state.params, state.model_state)[1]
  inner = optax.sgd(bench.LEARNING_RATE, momentum=bench.MOMENTUM)

  def opt_fn(tx):
    def apply(g, opt_state, p):
      updates, opt_state = tx.update(g, opt_state, p)
      return optax.apply_updates(p, updates), opt_state
    return jax.jit(apply)

  t_inner = _median_time(opt_fn(inner), (grads, inner.init(state.params), state.params), steps)
  t_opt = t_inner
  t_mask = 0.0
  if config.family != "dense":
    tx = sift_jax.static_sparse(inner, sparsity=config.sparsity, policy=policy)
    t_opt = _median_time(opt_fn(tx), (grads, state.opt_state, state.params), steps)
    t_mask = t_opt - t_inner

  compiled = train_step.lower(state, batch).compile()
  counts = hlo_op_counts(compiled.as_text())
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  state, metrics = train_step(state, batch)
  jax.block_until_ready((state, metrics))
  times = []
  with jax.transfer_guard("disallow"):
    for _ in range(steps):
      t0 = time.perf_counter()
      state, metrics = train_step(state, batch)
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - t0)
  t_step = statistics.median(times)
  n_exec = train_step._cache_size()  # pylint: disable=protected-access
  parts = {
      "conv_forward": t_conv_fwd,
      "conv_backward": t_conv_bwd,
      "bn_relu_add_pool_loss_forward": t_fwd - t_conv_fwd,
      "bn_relu_add_pool_loss_backward": (t_grad - t_fwd) - t_conv_bwd,
      "optimizer": t_inner,
      "mask_multiply": t_mask,
      "rest_metrics_copies": t_step - t_grad - t_opt,
  }
  return {"config": config._asdict(), "step_s": t_step, "forward_s": t_fwd,
          "forward_backward_s": t_grad, "num_convolutions": len(convs), "parts_s": parts,
          "parts_fraction": {k: v / t_step for k, v in parts.items()},
          "hlo_op_counts": counts, "step_gflop": flops / 1e9,
          "achieved_gflop_per_s": flops / 1e9 / t_step, "executables_in_jit_cache": n_exec,
          "host_device_transfers": 0}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default=",".join(bench.CONFIGS))
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--out", default=RESULTS)
  args = parser.parse_args()
  load_before = os.getloadavg()
  results = {}
  for name in args.configs.split(","):
    if name not in bench.CONFIGS:
      raise SystemExit(f"unknown config {name!r}; expected one of {sorted(bench.CONFIGS)}")
    r = breakdown(name, args.steps)
    results[name] = r
    print(f"{name}: step {r['step_s'] * 1e3:.1f} ms, {r['achieved_gflop_per_s']:.1f} GFLOP/s, "
          f"HLO {r['hlo_op_counts']}, executables {r['executables_in_jit_cache']}")
    for k, v in r["parts_s"].items():
      print(f"  {k:34s} {v * 1e3:9.1f} ms  {100 * v / r['step_s']:5.1f}%")
  out = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__,
         "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
         "results": results}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
