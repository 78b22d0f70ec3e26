"""sift_jax's training step against the same network in plain PyTorch, on CPU.

Times one training step (forward, backward, SGD with momentum 0.9, batch
statistics updated) of the CIFAR ResNet-18 of :mod:`sift_jax.models.resnet`,
dense and Sparse Wide at s = 0.5 (the widened widths ``get_model`` builds,
trained with ``sift_jax.static_sparse``: dense kernels multiplied by fixed
masks, the FLOP structure of our masked training), at full width with batch
128 and at quarter width (16-32-64-128, widened likewise) with batch 32.

The PyTorch side is a plain ``torch.nn`` ResNet-18 written here (not the
authors' code) with the same architecture, widths and parameter count
(asserted); its Sparse Wide step masks the gradients before and the weights
after ``SGD.step``, as ``static_sparse`` does. Both sides run float32 on the
same number of threads (``torch.set_num_threads``; for XLA:CPU the Eigen pool
is limited with ``--xla_cpu_multi_thread_eigen`` and
``intra_op_parallelism_threads``, and ``taskset`` when available pins both to
the same cores).

Each round starts one fresh process per framework (the order alternates
between rounds), which compiles/warms up and then times ``--steps`` steps;
the result is the median over all timed steps, in images/s, and the ratio
sift_jax / PyTorch (> 1: sift_jax faster). The load average is recorded with
the results: on a shared machine read the ratios, not the absolute numbers.

Requires ``pip install -e .[bench]`` (PyTorch, CPU is enough).

Usage:
  python experiments/benchmarks/torch_step_time.py [--rounds 3] [--steps 2]
      [--configs dense_full,wide_full,dense_quarter,wide_quarter] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, NamedTuple

NUM_CLASSES = 100
IMAGE_SHAPE = (32, 32, 3)
MOMENTUM = 0.9
LEARNING_RATE = 0.01
SPARSITY = 0.5
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "torch_step_time.json")


class BenchConfig(NamedTuple):
  """One benchmarked setting: member, nominal sparsity, width divisor and batch."""

  family: str
  sparsity: float
  width_divisor: int
  batch: int


CONFIGS = {
    "dense_full": BenchConfig("dense", 0.0, 1, 128),
    "wide_full": BenchConfig("sparse_wide", SPARSITY, 1, 128),
    "dense_quarter": BenchConfig("dense", 0.0, 4, 32),
    "wide_quarter": BenchConfig("sparse_wide", SPARSITY, 4, 32),
}


def xla_thread_flags(threads: int) -> str:
  """XLA:CPU flags that give XLA ``threads`` intra-op threads (none change numerics)."""
  return f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}"


def images_per_second(batch: int, step_seconds: float) -> float:
  """Throughput of one step of ``batch`` images taking ``step_seconds``."""
  if step_seconds <= 0:
    raise ValueError(f"step_seconds must be positive, got {step_seconds}")
  return batch / step_seconds


def network_widths(family: str, sparsity: float, width_divisor: int) -> tuple[int, tuple[int, ...]]:
  """``(stem_width, stage widths)`` of ``resnet18_cifar`` under ``family``.

  Full width (``width_divisor=1``) takes the widths ``get_model`` builds; a
  divisor divides the base widths (64-128-256-512) first and applies the
  member's width rule to those, as ``get_model`` does to the full ones.
  """
  from sift_jax.transformations.family import FamilyConfig

  if width_divisor < 1 or 64 % width_divisor:
    raise ValueError(f"width_divisor must divide 64, got {width_divisor}")
  cfg = FamilyConfig(family=family, sparsity=sparsity)
  widths = tuple(cfg.width(w // width_divisor) for w in (64, 128, 256, 512))
  return widths[0], widths


def build_flax(config: BenchConfig) -> tuple[Any, Any]:
  """``(module, sparsity policy)``: the registry's ResNet-18 at the config's widths."""
  from sift_jax.models import get_model
  from sift_jax.models import resnet as resnet_lib

  spec = get_model("resnet18_cifar", family=config.family, sparsity=config.sparsity,
                   num_classes=NUM_CLASSES)
  stem, widths = network_widths(config.family, config.sparsity, config.width_divisor)
  module = spec.module
  if tuple(module.widths) != widths or module.stem_width != stem:
    module = resnet_lib.ResNet(stage_sizes=(2, 2, 2, 2), widths=widths, stem_width=stem,
                               num_classes=NUM_CLASSES, cifar_stem=True, sift=module.sift,
                               zero_init_residual=module.zero_init_residual)
  return module, spec.policy


def make_jax_step(config: BenchConfig):
  """``(jitted train_step, state, batch)``: the project's step, state donated as in the loop."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import sift_jax
  from sift_jax.training import state as state_lib
  from sift_jax.training import step as step_lib

  module, policy = build_flax(config)
  inner = optax.sgd(LEARNING_RATE, momentum=MOMENTUM)

  def make_tx(mask_key):
    if config.family == "dense":
      return inner
    return sift_jax.static_sparse(inner, sparsity=config.sparsity, policy=policy, seed=mask_key)

  init = state_lib.make_init_fn(module, make_tx, input_shape=IMAGE_SHAPE, input_dtype=jnp.float32)
  state = jax.jit(init)(jnp.asarray(0, jnp.int32))
  train_step = step_lib.make_train_step(module, make_tx(jax.random.key(1)), input_key="image",
                                        target_key="label")
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(config.batch,) + IMAGE_SHAPE), jnp.float32),
           "label": jnp.asarray(np.arange(config.batch) % NUM_CLASSES, jnp.int32)}
  # The static_sparse state is built from the same policy and sparsity; its masks come from
  # init (make_tx(mask_key)) and are carried in the state, so the step's tx only needs the
  # same structure.
  return jax.jit(train_step, donate_argnums=0), state, batch


def flax_param_count(config: BenchConfig) -> int:
  """Parameters (not batch statistics) of the flax network."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  module, _ = build_flax(config)
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0),
                                                 jnp.zeros((1,) + IMAGE_SHAPE), train=False))
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))


def build_torch(config: BenchConfig):
  """A plain ``torch.nn`` CIFAR ResNet-18 at the config's widths (NCHW, float32)."""
  import torch
  from torch import nn

  class BasicBlock(nn.Module):
    def __init__(self, cin, width, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(width)
      self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(width)
      self.shortcut = nn.Sequential()
      if stride != 1 or cin != width:
        self.shortcut = nn.Sequential(nn.Conv2d(cin, width, 1, stride, bias=False),
                                      nn.BatchNorm2d(width))

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      return torch.relu(y + self.shortcut(x))

  class ResNet18(nn.Module):
    def __init__(self, stem, widths, num_classes):
      super().__init__()
      self.stem = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
      self.stem_bn = nn.BatchNorm2d(stem)
      blocks, cin = [], stem
      for i, w in enumerate(widths):
        for j in range(2):
          blocks.append(BasicBlock(cin, w, 2 if i > 0 and j == 0 else 1))
          cin = w
      self.blocks = nn.Sequential(*blocks)
      self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
      x = torch.relu(self.stem_bn(self.stem(x)))
      x = self.blocks(x)
      return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

  stem, widths = network_widths(config.family, config.sparsity, config.width_divisor)
  return ResNet18(stem, widths, NUM_CLASSES)


def torch_param_count(config: BenchConfig) -> int:
  return sum(p.numel() for p in build_torch(config).parameters())


def _torch_masks(model, sparsity: float):
  """Random masks of the masked kernels (``static_sparse``'s policy: not stem, not head)."""
  import torch

  gen = torch.Generator().manual_seed(0)
  masks = {}
  for name, p in model.named_parameters():
    if p.ndim >= 2 and not name.startswith(("stem.", "head.")):
      n = p.numel()
      flat = torch.zeros(n)
      flat[torch.randperm(n, generator=gen)[: n - int(round(sparsity * n))]] = 1.0
      masks[name] = flat.view_as(p)
  return masks


def _time_torch(config: BenchConfig, steps: int, threads: int) -> list[float]:
  import numpy as np
  import torch

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = build_torch(config)
  model.train()
  opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
  params = dict(model.named_parameters())
  masks = _torch_masks(model, config.sparsity) if config.family != "dense" else {}
  with torch.no_grad():
    for name, m in masks.items():
      params[name].mul_(m)
  rng = np.random.default_rng(0)
  x = torch.from_numpy(rng.normal(size=(config.batch, 3, 32, 32)).astype(np.float32))
  y = torch.from_numpy((np.arange(config.batch) % NUM_CLASSES).astype(np.int64))

  def step():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    with torch.no_grad():
      for name, m in masks.items():
        params[name].grad.mul_(m)
    opt.step()
    with torch.no_grad():
      for name, m in masks.items():
        params[name].mul_(m)
    return loss

  step()  # warm-up: oneDNN primitive creation, allocator
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  return times


def _time_jax(config: BenchConfig, steps: int) -> list[float]:
  import jax

  train_step, state, batch = make_jax_step(config)
  state, metrics = train_step(state, batch)  # compile + warm-up
  jax.block_until_ready((state, metrics))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = train_step(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  return times


def _worker(framework: str, name: str, steps: int, threads: int) -> None:
  config = CONFIGS[name]
  times = _time_jax(config, steps) if framework == "jax" else _time_torch(config, steps, threads)
  print(json.dumps({"times": times}))


def _run_worker(framework: str, name: str, steps: int, threads: int, cache_dir: str) -> list[float]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_thread_flags(threads)).strip()
  env["JAX_PLATFORMS"] = "cpu"
  # Compiles are not timed; the cache only saves wall time between rounds.
  env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
  env["OMP_NUM_THREADS"] = str(threads)
  env["PYTHONPATH"] = os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))]
      + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", framework, "--configs", name,
         "--steps", str(steps), "--threads", str(threads)]
  out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])["times"]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=2, help="timed steps per process")
  parser.add_argument("--quarter-steps", type=int, default=5, help="timed steps, quarter width")
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--configs", default=",".join(CONFIGS))
  parser.add_argument("--worker", choices=("jax", "torch"), default=None)
  parser.add_argument("--out", default=RESULTS)
  args = parser.parse_args()
  names = args.configs.split(",")
  unknown = [n for n in names if n not in CONFIGS]
  if unknown:
    raise SystemExit(f"unknown config(s) {unknown}; expected some of {sorted(CONFIGS)}")
  if args.worker is not None:
    _worker(args.worker, names[0], args.steps, args.threads)
    return
  load_before = os.getloadavg()
  # Results of earlier runs (other configs) are kept: a long run may be done in parts.
  results = {}
  if os.path.exists(args.out):
    with open(args.out) as f:
      results = json.load(f).get("results", {})
  with tempfile.TemporaryDirectory(prefix="torch_step_time_xla_cache_") as cache_dir:
    for name in names:
      config = CONFIGS[name]
      steps = args.steps if config.width_divisor == 1 else args.quarter_steps
      n_jax, n_torch = flax_param_count(config), torch_param_count(config)
      assert n_jax == n_torch, (name, n_jax, n_torch)
      times: dict[str, list[float]] = {"jax": [], "torch": []}
      load_start = list(os.getloadavg())
      for r in range(args.rounds):
        order = ("jax", "torch") if r % 2 == 0 else ("torch", "jax")
        for fw in order:
          times[fw].extend(_run_worker(fw, name, steps, args.threads, cache_dir))
          print(f"{name} round {r} {fw}: {times[fw][-steps:]}", flush=True)
      med = {fw: statistics.median(t) for fw, t in times.items()}
      ips = {fw: images_per_second(config.batch, m) for fw, m in med.items()}
      results[name] = {
          **config._asdict(), "params": n_jax,
          "widths": list(network_widths(config.family, config.sparsity, config.width_divisor)[1]),
          "rounds": args.rounds, "steps_per_round": steps, "median_step_s": med,
          "images_per_s": ips, "ratio_sift_jax_to_torch": ips["jax"] / ips["torch"],
          "step_times_s": times, "loadavg_during": [load_start, list(os.getloadavg())],
      }
      _write(args, results)
      print(f"{name}: sift_jax {ips['jax']:.1f} img/s, PyTorch {ips['torch']:.1f} img/s, "
            f"ratio {ips['jax'] / ips['torch']:.2f}", flush=True)
  print(f"wrote {args.out} (load average before: {load_before})")


def _write(args, results) -> None:
  import jax
  import torch

  out = {"threads": args.threads, "xla_flags": xla_thread_flags(args.threads),
         "jax": jax.__version__, "torch": torch.__version__, "results": results}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=2)

if __name__ == "__main__":
  main()
