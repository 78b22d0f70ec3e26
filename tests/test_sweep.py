"""The sweep runner (the main job, experiments/main.py, is tested in test_claims.py)."""

import json
import os

import numpy as np
import pytest

from sift_jax import training
from sift_jax.training import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_base():
  return training.apply_overrides(training.default_config(), {
      "model.kwargs.hidden": [32, 32, 32], "training.num_steps": 12, "training.batch_size": 32,
      "training.eval_batch_size": 250, "training.log_every_steps": 6, "training.progress_bar": False,
      "sparse.update_every": 4, "mesh.data": 1})


def test_family_grid_is_the_papers_grid():
  runs = sweep.family_grid()
  names = [r.name for r in runs]
  assert names[0] == "dense" and len(names) == 16 and len(set(names)) == 16
  assert sum(n.endswith("-rigl") for n in names) == 12
  assert [n for n in names if n.endswith("-static")] == [
      "sparse_wide-0.5-static", "sparse_wide-0.75-static", "sparse_wide-0.9-static"]
  by_name = {r.name: r.overrides for r in runs}
  assert by_name["sparse_doped-0.75-rigl"] == {"model.family": "sparse_doped", "model.sparsity": 0.75,
                                               "sparse.method": "rigl"}
  assert by_name["dense"]["sparse.method"] == "none"


def test_run_sweep_aggregates_and_skips_finished_runs(tmp_path):
  runs = [("dense", {"model.family": "dense", "sparse.method": "none"}),
          ("wide", {"model.family": "sparse_wide", "model.sparsity": 0.5})]
  calls = []

  def counting(config, workdir):
    calls.append((config.model.family, config.seed))
    return training.train_and_evaluate(config, workdir)

  lines = []
  records = sweep.run_sweep(tiny_base(), runs, seeds=[0, 1], workdir=str(tmp_path), train_fn=counting,
                            log=lines.append)
  assert calls == [("dense", 0), ("dense", 1), ("sparse_wide", 0), ("sparse_wide", 1)]
  assert [(r["name"], r["seed"]) for r in records] == [("dense", 0), ("dense", 1), ("wide", 0), ("wide", 1)]
  assert os.path.exists(tmp_path / "wide" / "seed_1" / "summary.json")
  assert len(lines) == 4 and "wide seed 1" in lines[-1]
  rows = sweep.aggregate(records)
  assert [r["name"] for r in rows] == ["dense", "wide"]
  accs = [r["summary"]["final_eval_accuracy"] for r in records if r["name"] == "wide"]
  assert rows[1]["final_eval_accuracy_mean"] == pytest.approx(np.mean(accs))
  assert rows[1]["final_eval_accuracy_std"] == pytest.approx(np.std(accs, ddof=1))
  assert rows[1]["family"] == "sparse_wide" and rows[1]["method"] == "rigl" and rows[1]["seeds"] == 2
  assert rows[0]["train_flops_ratio_mean"] == 1.0
  assert rows[1]["forward_flops_ratio_mean"] == pytest.approx(1.0, abs=0.02)
  # Different seeds really differ.
  assert len({r["summary"]["final_eval_loss"] for r in records}) == 4
  table = sweep.format_table(rows)
  assert "| dense |" in table and "| wide | sparse_wide | 0.5 / " in table

  # A second sweep over the same directory trains nothing new.
  calls.clear()
  again = sweep.run_sweep(tiny_base(), runs, seeds=[0, 1], workdir=str(tmp_path), train_fn=counting,
                          log=lines.append)
  assert calls == []
  assert [r["summary"]["final_eval_loss"] for r in again] == [r["summary"]["final_eval_loss"]
                                                               for r in records]
  # Operational keys may differ; anything else in a finished run's config is an error, not a
  # result taken for this sweep's.
  relogged = training.apply_overrides(tiny_base(), {"training.log_every_steps": 4})
  sweep.run_sweep(relogged, runs, seeds=[0, 1], workdir=str(tmp_path), train_fn=counting,
                  log=lines.append)
  assert calls == []
  longer = training.apply_overrides(tiny_base(), {"training.num_steps": 13})
  with pytest.raises(ValueError, match=r"dense/seed_0 holds a finished run with another config "
                                       r"\(training.num_steps: finished run has 12, this sweep 13\)"):
    sweep.run_sweep(longer, runs, seeds=[0, 1], workdir=str(tmp_path), train_fn=counting,
                    log=lines.append)
  assert calls == []


def test_run_sweep_rejects_bad_entries_before_training(tmp_path):
  def never(config, workdir):
    raise AssertionError("must not train")

  with pytest.raises(ValueError, match="unique"):
    sweep.run_sweep(tiny_base(), [("a", {}), ("a", {})], seeds=[0], workdir=str(tmp_path), train_fn=never)
  with pytest.raises(ValueError, match="unknown config key 'model.sparsty'"):
    sweep.run_sweep(tiny_base(), [("a", {}), ("b", {"model.sparsty": 0.5})], seeds=[0],
                    workdir=str(tmp_path), train_fn=never)
  with pytest.raises(ValueError, match="model.sparsity=1.5"):
    sweep.run_sweep(tiny_base(), [("b", {"model.sparsity": 1.5})], seeds=[0], workdir=str(tmp_path),
                    train_fn=never)
  with pytest.raises(ValueError, match="cannot be a directory name"):
    sweep.run_sweep(tiny_base(), [("a/b", {})], seeds=[0], workdir=str(tmp_path), train_fn=never)
  assert not os.listdir(tmp_path)


def test_sweep_cli(tmp_path, capsys):
  config = os.path.join(REPO, "experiments", "configs", "mnist1d_mlp.py")
  rc = sweep.main(["--config", config, "--workdir", str(tmp_path), "--seeds", "0",
                   "--only", "dense,sparse_doped-0.5-rigl", "--config.training.num_steps=10",
                   "--config.training.eval_every_steps=5", "--config.model.kwargs.hidden=[32, 32, 32]"])
  out = capsys.readouterr().out
  assert rc == 0
  assert "| sparse_doped-0.5-rigl | sparse_doped | 0.5 / " in out
  data = json.loads((tmp_path / "sweep.json").read_text())
  assert [r["name"] for r in data["rows"]] == ["dense", "sparse_doped-0.5-rigl"]
  assert data["records"][0]["summary"]["steps"] == 10
  assert sweep.main(["--config", config, "--workdir", str(tmp_path), "--only", "nope"]) == 1
  assert "--only names ['nope']" in capsys.readouterr().err


def test_config_file_that_is_not_python_is_refused(tmp_path):
  path = tmp_path / "config.txt"
  path.write_text("def get_config():\n  return None\n")
  with pytest.raises(ValueError, match=r"config file .*config\.txt is not an importable Python file"):
    sweep.load_config_module(str(path))
