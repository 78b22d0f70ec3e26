"""The claims benchmark (experiments/claims.py): statistics, diagnostics, --quick end to end."""

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "experiments", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


claims = _load("claims")


def _scipy_welch(a, b):
  res = stats.ttest_ind(a, b, equal_var=False)
  ci = res.confidence_interval(0.95)
  return float(ci.low), float(ci.high), float(res.pvalue)


def test_welch_matches_scipy_and_a_hand_computed_case():
  a, b = [0.91, 0.93, 0.95, 0.92, 0.94], [0.90, 0.89, 0.92, 0.905, 0.88]
  w = claims.welch(a, b)
  low, high, p = _scipy_welch(a, b)
  assert w["diff"] == pytest.approx(np.mean(a) - np.mean(b), abs=1e-15)
  assert (w["low"], w["high"], w["p"]) == pytest.approx((low, high, p), rel=1e-10)
  # Welch-Satterthwaite by hand: var_a/n = var_b/n = 2.5e-5 / 5 ... df = 7.998...
  va, vb = np.var(a, ddof=1) / 5, np.var(b, ddof=1) / 5
  assert w["df"] == pytest.approx((va + vb) ** 2 / (va ** 2 / 4 + vb ** 2 / 4), rel=1e-12)
  # Constant groups: a point interval, no division by zero.
  assert claims.welch([0.5, 0.5], [0.4, 0.4]) == pytest.approx(
      {"diff": 0.1, "low": 0.1, "high": 0.1, "df": math.inf, "p": 0.0, "se": 0.0})
  m, lo, hi = claims.mean_ci(a)
  ref = stats.t.interval(0.95, 4, loc=np.mean(a), scale=stats.sem(a))
  assert (lo, hi) == pytest.approx(ref, rel=1e-12) and m == pytest.approx(np.mean(a))


def test_branch_overlap_against_chance():
  rng = np.random.default_rng(0)
  shape, d, n = (64, 64), 0.1, 10
  same = rng.random(shape) < d
  collapsed = {"conv": {f"branch_{i}": {"kernel": same} for i in range(n)}}
  out = claims.branch_overlap(collapsed)
  # Identical masks: overlap d against chance d^2, and every active position in all branches.
  assert out["mean_ratio"] == pytest.approx(1.0 / same.mean()) == out["max_ratio"]
  assert out["layers"]["conv"]["all_active"] == int(same.sum())
  independent = {"conv": {f"branch_{i}": {"kernel": rng.random(shape) < d} for i in range(n)}}
  out = claims.branch_overlap(independent)
  assert out["layers"]["conv"]["branches"] == n
  assert 0.8 < out["mean_ratio"] < 1.2  # 45 pairs of 4096 positions at d = 0.1
  assert out["layers"]["conv"]["all_active"] == 0
  assert out["layers"]["conv"]["all_active_chance"] == pytest.approx(4096 * 0.1 ** 10, rel=0.5)
  assert claims.branch_overlap({"conv": {"kernel": same}}) is None


def _rec(name, seed, acc, family="sparse_wide", diverged=False):
  return {"name": name, "seed": seed, "family": family, "method": "dense" if family == "dense" else "rigl",
          "sparsity": 0.0 if family == "dense" else 0.9, "solved_sparsity": None if diverged else 0.93,
          "accuracy": float("nan") if diverged else acc, "diverged": diverged, "final_train_loss": 0.3,
          "ever_active_fraction": None, "train_flops_ratio": 1.0, "forward_flops_ratio": 1.0,
          "wall_seconds": 1.0, "branch_overlap": None}


def test_summarise_counts_diverged_seeds_and_never_lets_them_win():
  dense = [_rec("dense", s, a, "dense") for s, a in enumerate([0.90, 0.91, 0.89])]
  good = [_rec("sparse_wide-0.9-rigl", s, a) for s, a in enumerate([0.95, 0.96, 0.97])]
  bad = [_rec("sparse_doped-0.9-rigl", 0, 0.0, "sparse_doped", diverged=True)] + [
      _rec("sparse_doped-0.9-rigl", s, a, "sparse_doped") for s, a in ((1, 0.99), (2, 0.98))]
  rows = claims.summarise(dense + good + bad)
  wide, doped = rows[1], rows[2]
  assert wide["beats_dense"] and wide["n"] == 3 and wide["diverged"] == 0
  assert (wide["vs_dense"]["low"], wide["vs_dense"]["high"]) == pytest.approx(
      _scipy_welch([0.95, 0.96, 0.97], [0.90, 0.91, 0.89])[:2])
  assert doped["n"] == 2 and doped["diverged"] == 1 and doped["solved_sparsity"] == 0.93
  assert doped["vs_dense"]["low"] > 0 and not doped["beats_dense"]
  v = claims.verdicts({"a": rows})
  assert v["members"]["sparse_wide"]["goal_met"] and not v["members"]["sparse_doped"]["goal_met"]
  assert v["members"]["sparse_parallel"]["settings"] == {} and not v["goal_met"]
  assert "| sparse_doped-0.9-rigl | 0.9 / 0.9300 |" in claims.format_setting_table(rows)


def test_claims_arguments():
  full, quick = claims.parse_args([]), claims.parse_args(["--quick"])
  assert full.workdir == os.path.join(REPO, "workdirs", "claims")
  assert full.results == os.path.join(REPO, "experiments", "results", "claims")
  assert full.setting_names == list(claims.SETTINGS) and len(full.setting_names) >= 3
  assert quick.workdir == os.path.join(REPO, "workdirs", "claims_quick")
  assert quick.results == os.path.join(REPO, "workdirs", "claims_quick", "results")
  with pytest.raises(SystemExit):
    claims.parse_args(["--settings", "nope"])
  with pytest.raises(SystemExit):
    claims.parse_args(["--seeds", "1"])
  # One learning rate per setting: the same for dense and every member.
  assert all(len({"optimizer.learning_rate"} & set(s.overrides)) == 1 for s in claims.SETTINGS.values())
  assert [n for n, _ in claims.grid()].count("dense") == 1 and len(claims.grid()) == 16


def test_main_job_runs_the_claims_benchmark_quick(tmp_path):
  results = tmp_path / "results"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", MPLBACKEND="Agg")
  # A session of its own: on a timeout the job's worker processes are killed with it.
  proc = subprocess.Popen([sys.executable, os.path.join(REPO, "experiments", "main.py"), "--quick",
                           "--jobs", "2", "--workdir", str(tmp_path / "runs"), "--results",
                           str(results)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
  try:
    stdout, stderr = proc.communicate(timeout=600)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  assert proc.returncode == 0, stderr[-3000:]
  assert "## Verdicts at s = 0.9" in stdout
  data = json.loads((results / "results.json").read_text())
  assert data["quick"] and data["num_runs"] == 6 and data["seeds"] == [0, 1]
  assert data["ci_method"].startswith("Welch t")
  rows = data["settings"]["mnist1d_cnn"]["rows"]
  assert [r["name"] for r in rows] == list(claims.QUICK_RUNS)
  dense = rows[0]
  for run in data["runs"]:
    assert run["steps"] == 40 and 0.0 < run["accuracy"] <= 1.0 and not run["diverged"]
    assert math.isfinite(run["final_train_loss"])
  for r in rows[1:]:
    # The stored interval is Welch's on the stored per-seed values (independent computation).
    low, high, p = _scipy_welch(r["accuracies"], dense["accuracies"])
    assert (r["vs_dense"]["low"], r["vs_dense"]["high"], r["vs_dense"]["p"]) == pytest.approx(
        (low, high, p), rel=1e-9, abs=1e-12)
    assert r["beats_dense"] == (low > 0)
    assert 0.0 < r["ever_active_fraction"] <= 1.0
    assert r["forward_flops_ratio"] == pytest.approx(1.0, abs=0.02)
  parallel = rows[2]
  assert parallel["branch_overlap_mean_ratio"] > 0 and parallel["branch_all_active_chance"] >= 0
  run = next(r for r in data["runs"] if r["name"] == "sparse_parallel-0.5-rigl")
  assert set(run["branch_overlap"]["layers"]) == {"conv_0", "conv_1", "conv_2"}
  assert all(layer["branches"] == 2 for layer in run["branch_overlap"]["layers"].values())
  assert data["verdicts"]["members"]["sparse_wide"]["settings"]["mnist1d_cnn"]["diff"] == \
      pytest.approx(rows[1]["vs_dense"]["diff"])
  png = (results / "mnist1d_cnn.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
  table = (results / "table.md").read_text()
  assert "| sparse_wide-0.9-rigl | 0.9 / " in table and "95% Welch CI" in table
