r"""Sweeps: a grid of runs x seeds of one base config, aggregated into a table.

A config file may define ``get_sweep()`` returning a list of
``(name, {"dotted.key": value, ...})`` pairs next to ``get_config()``. Usage::

  python -m sift_jax.training.sweep --config experiments/configs/NAME.py \
      --workdir DIR [--seeds 0,1,2] [--only NAME,NAME] [--config.KEY=VALUE ...]

Each run trains in ``DIR/<name>/seed_<seed>``. A run whose ``summary.json``
exists is not trained again and an interrupted one resumes from its
checkpoint, so a sweep can be stopped and restarted. Either must have been
started with the same config (operational keys such as logging intervals
aside, see :data:`sift_jax.training.config.RESUME_OPERATIONAL_KEYS`): a
finished run with another config (say a ``--quick`` smoke test in the same
``DIR``) is an error, not a result. Runs that differ only in
the seed reuse compiled functions (see :func:`sift_jax.training.train_and_evaluate`).
The table and ``DIR/sweep.json`` give, per run name, the mean and standard
deviation over seeds of the final eval accuracy (or loss and perplexity for
language models) and the training FLOPs relative to the dense baseline.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import ml_collections
import numpy as np

from sift_jax.training import config as config_lib
from sift_jax.training import loop
from sift_jax.transformations import members as members_lib
from sift_jax.transformations import sizes

__all__ = ["SweepRun", "MEMBERS", "family_grid", "run_sweep", "aggregate", "format_table", "load_config_module",
           "runs_from_module", "main"]


@dataclasses.dataclass(frozen=True)
class SweepRun:
  """One point of a sweep: a name and config overrides (``{"dotted.key": value}``)."""

  name: str
  overrides: Mapping[str, Any]


#: The built-in members (a member added with ``register_member`` is swept by passing
#: ``members=``).
MEMBERS = sizes.MEMBERS


def family_grid(*, sparsities: Sequence[float] = (0.5, 0.75, 0.9),
                members: Sequence[str] = MEMBERS, method: str = "rigl",
                static_members: Sequence[str] = ("sparse_wide",),
                include_dense: bool = True) -> list[SweepRun]:
  """The paper's grid: the dense baseline, every member x sparsity with ``method``,
  and ``static_members`` x sparsity with static masks.

  Run names: ``"dense"``, ``"<member>-<s>-<method>"`` (e.g. ``"sparse_wide-0.9-rigl"``).

  Raises:
    ValueError: for a member name that is not registered or an unknown
      ``method``, naming it.
  """
  for member in (*members, *static_members):
    members_lib.get_member(member)
  if method not in config_lib.SPARSE_METHODS:
    raise ValueError(f"family_grid(): method={method!r} is not a sparse method; known: "
                     f"{config_lib.SPARSE_METHODS}")
  runs = [SweepRun("dense", {"model.family": "dense", "model.sparsity": 0.0,
                             "sparse.method": "none"})] if include_dense else []
  for member in members:
    for s in sparsities:
      runs.append(SweepRun(f"{member}-{s:g}-{method}", {"model.family": member,
                                                        "model.sparsity": float(s),
                                                        "sparse.method": method}))
  for member in static_members:
    for s in sparsities:
      runs.append(SweepRun(f"{member}-{s:g}-static", {"model.family": member,
                                                      "model.sparsity": float(s),
                                                      "sparse.method": "static"}))
  return runs


def _as_run(item: Any) -> SweepRun:
  if isinstance(item, SweepRun):
    return item
  if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
    return SweepRun(item[0], dict(item[1]))
  raise ValueError(f"a sweep entry must be SweepRun or (name, overrides), got {item!r}")


def _safe_name(name: str) -> str:
  if not name or any(c in name for c in "/\\") or name in (".", ".."):
    raise ValueError(f"run name {name!r} cannot be a directory name")
  return name


def run_sweep(base: ml_collections.ConfigDict, runs: Sequence[Any], *, seeds: Sequence[int],
              workdir: str, train_fn: Callable[..., dict] = loop.train_and_evaluate,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Trains every run with every seed (skipping finished ones).

  Args:
    base: The base config; each run applies its overrides and ``seed``.
    runs: ``SweepRun`` or ``(name, overrides)`` items.
    seeds: Seeds to run each point with.
    workdir: Root directory of the sweep.
    train_fn: ``train_fn(config, workdir) -> summary``.
    log: Where progress lines go.

  Returns:
    One record per (run, seed): ``{"name", "seed", "workdir", "summary"}``.

  Raises:
    ValueError: for duplicate run names, bad overrides (unknown keys) or
      empty ``seeds``.
  """
  runs = [_as_run(r) for r in runs]
  names = [_safe_name(r.name) for r in runs]
  if len(set(names)) != len(names):
    raise ValueError(f"sweep run names must be unique, got {names}")
  if not seeds:
    raise ValueError("seeds must not be empty")
  # Validate every run's config before training anything.
  configs = []
  for run in runs:
    cfg = config_lib.apply_overrides(base, run.overrides)
    config_lib.validate_config(cfg)
    configs.append(cfg)
  workdir = os.path.abspath(workdir)
  records: list[dict[str, Any]] = []
  total = len(runs) * len(seeds)
  t0 = time.time()
  for run, cfg in zip(runs, configs):
    for seed in seeds:
      run_dir = os.path.join(workdir, run.name, f"seed_{seed}")
      summary_path = os.path.join(run_dir, "summary.json")
      seeded = config_lib.apply_overrides(cfg, {"seed": int(seed)})
      if os.path.exists(summary_path):
        with open(summary_path, encoding="utf-8") as f:
          summary = json.load(f)
        _check_finished_config(summary, seeded, run_dir)
        status = "done before"
      else:
        summary = train_fn(seeded, run_dir)
        if summary.get("preempted"):
          log(f"[sweep] {run.name} seed {seed} preempted at step {summary['steps']}; stopping")
          return records
        status = f"{summary['wall_seconds']:.1f}s"
      records.append({"name": run.name, "seed": int(seed), "workdir": run_dir, "summary": summary})
      log(f"[sweep {len(records)}/{total}, {time.time() - t0:.0f}s] {run.name} seed {seed}: "
          f"{_headline(summary)} ({status})")
  return records


def _check_finished_config(summary: Mapping[str, Any], config: ml_collections.ConfigDict,
                           run_dir: str) -> None:
  """Raises ``ValueError`` if a finished run's summary was trained with another config."""
  saved = summary.get("config")
  if not isinstance(saved, Mapping):
    return  # an old summary without its config: taken as is
  diffs = config_lib.resume_differences(config_lib.resume_config(saved),
                                        config_lib.resume_config(config))
  if diffs:
    shown = "; ".join(f"{k}: finished run has {a!r}, this sweep {b!r}" for k, a, b in diffs[:8])
    more = f"; and {len(diffs) - 8} more" if len(diffs) > 8 else ""
    raise ValueError(f"{run_dir} holds a finished run with another config ({shown}{more}); "
                     "use another --workdir (or delete that run) to train this one")


def _headline(summary: Mapping[str, Any]) -> str:
  if "final_eval_perplexity" in summary:
    return f"eval loss {summary['final_eval_loss']:.4f} ppl {summary['final_eval_perplexity']:.3f}"
  return f"eval accuracy {summary['final_eval_accuracy']:.4f}"


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  arr = np.asarray(values, np.float64)
  return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def aggregate(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Per run name: mean and std (ddof=1) over seeds, FLOPs ratios, sparsities.

  Rows keep the order in which names first appear.
  """
  order: list[str] = []
  groups: dict[str, list[Mapping[str, Any]]] = {}
  for r in records:
    if r["name"] not in groups:
      order.append(r["name"])
      groups[r["name"]] = []
    groups[r["name"]].append(r["summary"])
  rows = []
  for name in order:
    sums = groups[name]
    cfg = sums[0].get("config", {})
    row = {"name": name, "seeds": len(sums),
           "family": cfg.get("model", {}).get("family"),
           "method": sums[0].get("sparse_method"),
           "sparsity": cfg.get("model", {}).get("sparsity"),
           "solved_sparsity": sums[0].get("solved_sparsity")}
    for key in ("final_eval_accuracy", "best_eval_accuracy", "final_eval_loss",
                "final_eval_perplexity", "train_flops_ratio", "forward_flops_ratio", "wall_seconds"):
      if all(key in s for s in sums):
        row[key + "_mean"], row[key + "_std"] = _mean_std([s[key] for s in sums])
    for key in ("train_flops", "dense_train_flops", "sparse_macs", "params", "nonzero_params"):
      if key in sums[0]:
        row[key] = sums[0][key]
    rows.append(row)
  return rows


def format_table(rows: Sequence[Mapping[str, Any]], *, percent: bool = True) -> str:
  """A Markdown table: run, member, sparsity (nominal / solved), method, metric, FLOPs."""
  lm = any("final_eval_perplexity_mean" in r for r in rows)
  metric = "eval perplexity" if lm else "eval accuracy (%)" if percent else "eval accuracy"
  head = ["run", "member", "sparsity (nominal / solved)", "method", f"{metric} mean ± std",
          "seeds", "train FLOPs / dense", "params (nonzero)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
  for r in rows:
    if lm:
      value = f"{r['final_eval_perplexity_mean']:.3f} ± {r['final_eval_perplexity_std']:.3f}"
    else:
      scale = 100.0 if percent else 1.0
      value = (f"{scale * r['final_eval_accuracy_mean']:.2f} ± "
               f"{scale * r['final_eval_accuracy_std']:.2f}")
    s, solved = r.get("sparsity"), r.get("solved_sparsity")
    sparsity = "0" if not s else f"{s:g} / {solved:.4f}" if solved is not None else f"{s:g}"
    ratio = r.get("train_flops_ratio_mean")
    params = (f"{r['params']:,} ({r['nonzero_params']:,})" if "params" in r else "")
    lines.append("| " + " | ".join([
        r["name"], str(r.get("family")), sparsity, str(r.get("method")), value, str(r["seeds"]),
        "" if ratio is None else f"{ratio:.3f}", params]) + " |")
  return "\n".join(lines)


def load_config_module(path: str):
  """Imports a config file (``get_config()`` and optionally ``get_sweep()``)."""
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path} does not exist")
  name = "_sift_jax_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None:
    raise ValueError(f"config file {path} is not an importable Python file (a .py file)")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path} has no get_config()")
  return module


def runs_from_module(module, only: Optional[Sequence[str]] = None) -> list[SweepRun]:
  """The module's ``get_sweep()`` runs (or one run ``"base"``), filtered by name."""
  runs = [_as_run(r) for r in module.get_sweep()] if hasattr(module, "get_sweep") else [
      SweepRun("base", {})]
  if only:
    known = [r.name for r in runs]
    unknown = [n for n in only if n not in known]
    if unknown:
      raise ValueError(f"--only names {unknown} are not in the sweep; its runs are {known}")
    runs = [r for r in runs if r.name in only]
  return runs


def _parse_override_value(text: str) -> Any:
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
  """CLI entry point (see the module docstring)."""
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(prog="python -m sift_jax.training.sweep",
                                   description="Run a config's sweep over seeds and print a table.")
  parser.add_argument("--config", required=True, help="config file with get_config() [and get_sweep()]")
  parser.add_argument("--workdir", required=True, help="root directory of the sweep's runs")
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
  parser.add_argument("--only", default="", help="comma-separated run names to keep")
  args, rest = parser.parse_known_args(argv)
  overrides = {}
  for item in rest:
    if not item.startswith("--config.") or "=" not in item:
      parser.error(f"unrecognised argument {item!r} (overrides are --config.KEY=VALUE)")
    key, value = item[len("--config."):].split("=", 1)
    overrides[key] = _parse_override_value(value)
  try:
    module = load_config_module(args.config)
    base = config_lib.apply_overrides(module.get_config(), overrides)
    runs = runs_from_module(module, [n for n in args.only.split(",") if n])
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    records = run_sweep(base, runs, seeds=seeds, workdir=args.workdir)
  except (ValueError, FileNotFoundError, FloatingPointError, loop.workdir_lib.WorkdirLockedError) as e:
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    return 1
  rows = aggregate(records)
  table = format_table(rows)
  print(table)
  with open(os.path.join(os.path.abspath(args.workdir), "sweep.json"), "w", encoding="utf-8") as f:
    json.dump({"rows": rows, "records": [{k: v for k, v in r.items()} for r in records]}, f, indent=2,
              default=str)
  return 0


if __name__ == "__main__":
  sys.exit(main())
