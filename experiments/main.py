r"""The main job: a CPU-scale Sparse-IFT reproduction on MNIST-1D, offline.

The dense baseline against all four Sparse-IFT members at s in {0.5, 0.75, 0.9}
trained with RigL (Sparse Wide also with static masks), several seeds each,
every member iso-FLOP with the dense model. Prints a table (eval accuracy mean
and std over seeds, training FLOPs relative to dense) and writes, under
``--results`` (default ``experiments/results/mnist1d``):

* ``results.json``: per-run and per-seed summaries, the total wall time;
* ``table.md``: the printed table;
* ``accuracy_vs_sparsity.png``: accuracy against sparsity per member, dense as a
  horizontal line.

Usage (from the repository root)::

  python experiments/main.py                  # the full job (16 runs x 3 seeds)
  python experiments/main.py --quick          # a smoke test: 2 runs, 1 seed, few steps
                                              # (in workdirs/mnist1d_quick)

Runs train in ``--workdir`` (default ``workdirs/mnist1d_main``), one directory
per run and seed; finished runs are reused when the job is started again
(``--fresh`` retrains everything). ``--jobs N`` trains N configurations at a
time in separate processes (default: one per CPU core, at most 2); the seeds
of one configuration share a process and its compiled functions.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "experiments", "configs", "mnist1d_cnn.py")


def _parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=DEFAULT_CONFIG, help="config file with get_config() and get_sweep()")
  parser.add_argument("--seeds", type=int, default=3, help="seeds per configuration (default 3)")
  parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                      help="configurations trained in parallel processes")
  parser.add_argument("--workdir", default=None,
                      help="where the runs train (default workdirs/mnist1d_main; with --quick "
                           "workdirs/mnist1d_quick)")
  parser.add_argument("--results", default=None,
                      help="where the table, JSON and plot go (default experiments/results/mnist1d; "
                           "with --quick workdirs/mnist1d_quick/results, so a smoke test never "
                           "overwrites the committed results)")
  parser.add_argument("--fresh", action="store_true", help="delete --workdir first (retrain all)")
  parser.add_argument("--quick", action="store_true",
                      help="smoke test: dense and sparse_wide-0.5-rigl, 1 seed, 60 steps")
  args = parser.parse_args(argv)
  # A smoke test trains other runs (60 steps): it gets its own workdir and
  # results, so it neither overwrites the full job's nor is mistaken for them.
  name = "mnist1d_quick" if args.quick else "mnist1d_main"
  if args.workdir is None:
    args.workdir = os.path.join(REPO, "workdirs", name)
  if args.results is None:
    args.results = (os.path.join(REPO, "workdirs", name, "results") if args.quick
                    else os.path.join(REPO, "experiments", "results", "mnist1d"))
  return args


def _train_group(config_path, base_overrides, run, seeds, workdir):
  """Worker: trains one configuration for all seeds (compiled functions are shared)."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from sift_jax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  from sift_jax.training import sweep  # pylint: disable=import-outside-toplevel
  module = sweep.load_config_module(config_path)
  base = config_lib.apply_overrides(module.get_config(), base_overrides)
  return sweep.run_sweep(base, [run], seeds=seeds, workdir=workdir,
                         log=lambda line: print(line, flush=True))


def _repo_relative(path):
  """``path`` relative to the repository when inside it: results.json does not name the clone."""
  rel = os.path.relpath(path, REPO)
  return path if rel.startswith(os.pardir) else rel


def _cost(run):
  """Rough relative cost for scheduling: masked-dense compute grows like 1 / density."""
  s = float(run.overrides.get("model.sparsity", 0.0))
  return 1.0 / (1.0 - s)


def _plot(rows, dense_row, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(7, 4.5))
  mean, std = 100 * dense_row["final_eval_accuracy_mean"], 100 * dense_row["final_eval_accuracy_std"]
  ax.axhline(mean, color="black", lw=1.5, label=f"dense ({mean:.1f}%)")
  ax.axhspan(mean - std, mean + std, color="black", alpha=0.08)
  series = {}
  for r in rows:
    if r["family"] == "dense":
      continue
    series.setdefault((r["family"], r["method"]), []).append(r)
  for (family, method), rs in sorted(series.items()):
    rs = sorted(rs, key=lambda r: r["sparsity"])
    xs = [r["sparsity"] for r in rs]
    ys = [100 * r["final_eval_accuracy_mean"] for r in rs]
    es = [100 * r["final_eval_accuracy_std"] for r in rs]
    label = family.replace("sparse_", "Sparse ").title().replace("Sparse ", "Sparse ")
    ax.errorbar(xs, ys, yerr=es, marker="o" if method == "rigl" else "s", capsize=3,
                ls="-" if method == "rigl" else "--", label=f"{label} ({method})")
  ax.set_xlabel("sparsity s")
  ax.set_ylabel("eval accuracy (%)")
  ax.set_xticks([0.5, 0.75, 0.9])
  seeds = dense_row["seeds"]
  ax.set_title(f"MNIST-1D, iso-FLOP Sparse-IFT members vs dense (mean ± std, {seeds} seeds)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=130)
  plt.close(fig)


def _table(rows, dense_row):
  dense_mean = dense_row["final_eval_accuracy_mean"]
  head = ["member", "method", "sparsity (nominal / solved)", "eval accuracy % (mean ± std)",
          "Δ vs dense (pp)", "seeds", "train FLOPs / dense", "fwd FLOPs / dense"]
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
  for r in rows:
    acc = f"{100 * r['final_eval_accuracy_mean']:.2f} ± {100 * r['final_eval_accuracy_std']:.2f}"
    delta = "" if r["family"] == "dense" else f"{100 * (r['final_eval_accuracy_mean'] - dense_mean):+.2f}"
    sp = "0" if r["family"] == "dense" else f"{r['sparsity']:g} / {r['solved_sparsity']:.4f}"
    lines.append("| " + " | ".join([
        r["family"], r["method"], sp, acc, delta, str(r["seeds"]),
        f"{r['train_flops_ratio_mean']:.3f}", f"{r['forward_flops_ratio_mean']:.3f}"]) + " |")
  return "\n".join(lines)


def main(argv=None):
  args = _parse_args(argv)
  t0 = time.time()
  sys.path.insert(0, REPO)
  from sift_jax.training import sweep  # pylint: disable=import-outside-toplevel

  module = sweep.load_config_module(args.config)
  runs = sweep.runs_from_module(module)
  seeds = list(range(args.seeds))
  base_overrides = {"training.progress_bar": False}
  if args.quick:
    runs = [r for r in runs if r.name in ("dense", "sparse_wide-0.5-rigl")]
    seeds = [0]
    base_overrides.update({"training.num_steps": 60, "training.eval_every_steps": 30,
                           "sparse.update_every": 10})
  if args.seeds < 1:
    raise SystemExit("--seeds must be >= 1")
  workdir = os.path.abspath(args.workdir)
  if args.fresh and os.path.isdir(workdir):
    shutil.rmtree(workdir)
  os.makedirs(args.results, exist_ok=True)
  print(f"[main] {len(runs)} configurations x {len(seeds)} seeds = {len(runs) * len(seeds)} runs, "
        f"{args.jobs} parallel job(s); runs in {workdir}", flush=True)

  order = sorted(range(len(runs)), key=lambda i: -_cost(runs[i]))
  results = [None] * len(runs)
  if args.jobs <= 1:
    for i in order:
      results[i] = _train_group(args.config, base_overrides, runs[i], seeds, workdir)
  else:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
      futures = {pool.submit(_train_group, args.config, base_overrides, runs[i], seeds, workdir): i
                 for i in order}
      for future in concurrent.futures.as_completed(futures):
        results[futures[future]] = future.result()
  records = [rec for group in results for rec in group]
  rows = sweep.aggregate(records)
  dense_row = next(r for r in rows if r["family"] == "dense")
  wall = time.time() - t0

  table = _table(rows, dense_row)
  print()
  print(table)
  print(f"\ntotal wall time: {wall:.1f} s ({wall / 60:.2f} min) for {len(records)} runs "
        f"on {os.cpu_count()} CPU core(s), {args.jobs} job(s)")
  cfg = records[0]["summary"]["config"]
  model_kwargs = ", ".join(f"{k}={tuple(v) if isinstance(v, list) else v}"
                           for k, v in sorted(cfg["model"]["kwargs"].items()))
  header = (f"MNIST-1D ({cfg['model']['name']}: {model_kwargs}), "
            f"{records[0]['summary']['total_steps']} steps of batch {cfg['training']['batch_size']}, "
            f"{cfg['optimizer']['name']} lr {cfg['optimizer']['learning_rate']}; "
            f"{len(seeds)} seed(s); accuracy = final eval accuracy on the MNIST-1D test split.\n"
            "train FLOPs / dense: training FLOPs (docs/method.md, section 5, RigL's dense-gradient steps "
            "included) over the dense baseline's; fwd FLOPs / dense: sparse forward FLOPs per "
            "example over the dense model's (1.000 = iso-FLOP).\n")
  with open(os.path.join(args.results, "table.md"), "w", encoding="utf-8") as f:
    f.write(header + "\n" + table + f"\n\nTotal wall time: {wall:.1f} s for {len(records)} runs.\n")
  _plot(rows, dense_row, os.path.join(args.results, "accuracy_vs_sparsity.png"))
  slim = [{"name": r["name"], "seed": r["seed"],
           **{k: _repo_relative(v) if k == "workdir" else v
              for k, v in r["summary"].items() if k != "config"}} for r in records]
  with open(os.path.join(args.results, "results.json"), "w", encoding="utf-8") as f:
    json.dump({"rows": rows, "runs": slim, "config": cfg, "wall_seconds": wall,
               "num_runs": len(records), "seeds": seeds, "jobs": args.jobs, "quick": args.quick,
               "cpu_count": os.cpu_count(), "platform": platform.platform()}, f, indent=2)
  print(f"wrote {args.results}/table.md, results.json, accuracy_vs_sparsity.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
