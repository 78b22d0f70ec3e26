"""The optional spectral callback of the training loop (issue 5)."""

import json
import os

import numpy as np
import pytest

from sift_jax import spectral, training


def _config(**overrides):
  base = {
      "model.name": "mlp_mnist1d", "model.kwargs.hidden": [32, 32, 32], "model.family": "sparse_wide",
      "model.sparsity": 0.5, "sparse.method": "rigl", "sparse.update_every": 5,
      "training.num_steps": 12, "training.batch_size": 32, "training.eval_batch_size": 250,
      "training.log_every_steps": 6, "training.progress_bar": False, "mesh.data": 1,
      "training.spectral_every_steps": 4,
  }
  base.update(overrides)
  return training.apply_overrides(training.default_config(), base)


def test_spectral_metrics_logged_every_n_steps_with_trajectory_plot(tmp_path):
  workdir = str(tmp_path / "run")
  training.train_and_evaluate(_config(), workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  spectral_rows = [r for r in records if r["split"] == "spectral"]
  # Step 0 is the initial masks, where the trajectory starts.
  assert [r["step"] for r in spectral_rows] == [0, 4, 8, 12]
  for r in spectral_rows:
    # Sparse Wide masks the MLP's widened stem as well as the two transformed hidden layers.
    assert r["num_layers"] == 3
    assert np.isfinite(r["ramanujan_gap"]) and np.isfinite(r["weighted_spectral_gap"])
    assert set(r) - {"step", "split"} <= set(spectral.SUMMARY_KEYS) | {"num_layers", "num_valid"}
  # RigL changed the masks between the logged steps.
  assert len({r["ramanujan_gap"] for r in spectral_rows}) > 1
  png = os.path.join(workdir, "spectral_trajectory.png")
  assert os.path.getsize(png) > 1000
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_spectral_callback_is_off_by_default_and_rejects_negative(tmp_path):
  workdir = str(tmp_path / "off")
  training.train_and_evaluate(_config(**{"training.spectral_every_steps": 0, "training.num_steps": 4}),
                              workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert not [line for line in f if '"spectral"' in line]
  assert not os.path.exists(os.path.join(workdir, "spectral_trajectory.png"))
  with pytest.raises(ValueError, match="training.spectral_every_steps"):
    training.train_and_evaluate(_config(**{"training.spectral_every_steps": -1}), str(tmp_path / "bad"))
  assert not os.path.exists(tmp_path / "bad")  # rejected before touching the workdir


def test_resumed_run_plots_the_whole_trajectory(tmp_path, monkeypatch):
  plotted = []
  real_plot = spectral.trajectory_plot
  monkeypatch.setattr(spectral, "trajectory_plot",
                      lambda records, path: (plotted.append(records), real_plot(records, path))[1])
  config = _config(**{"training.checkpoint_every_steps": 4})
  workdir = str(tmp_path / "run")

  def crash(step, state):
    if step == 10:
      raise RuntimeError("simulated crash")

  with pytest.raises(RuntimeError, match="simulated crash"):
    training.train_and_evaluate(config, workdir, hooks=(crash,))
  summary = training.train_and_evaluate(config, workdir)  # resumes at step 8
  assert summary["steps"] == 12
  assert len(plotted) == 1
  (points,) = plotted[0].values()
  assert [r["step"] for r in points] == [0, 4, 8, 12]
  logged = [r for r in training.read_metrics(workdir, split="spectral")]
  assert [r["step"] for r in logged] == [0, 4, 8, 12]  # the crash's step-8 record is not duplicated
