"""The command line: python -m sift_jax.train --config FILE --workdir DIR [--config.KEY=VALUE]."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_CONFIG = '''
from sift_jax.training import default_config

def get_config():
  c = default_config()
  c.dataset.options.num_samples = 1000  # 800 train / 200 test signals: quick to generate
  c.model.name = "mlp_mnist1d"
  c.model.kwargs.hidden = (32, 32, 32)
  c.model.family = "sparse_parallel"
  c.model.sparsity = 0.5
  c.sparse.update_every = 5
  c.training.num_steps = 20
  c.training.batch_size = 32
  c.training.eval_batch_size = 250
  c.training.log_every_steps = 5
  c.training.checkpoint_every_steps = 10
  c.mesh.data = 1
  return c
'''


def _env():
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  # One device per process is enough here (and faster to start).
  env["XLA_FLAGS"] = ""
  return env


def _train(tmp_path, *args, timeout=120):
  config = tmp_path / "tiny.py"
  config.write_text(TINY_CONFIG)
  cmd = [sys.executable, "-m", "sift_jax.train", "--config", str(config), *args]
  return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def test_cli_trains_writes_summary_and_refuses_unknown_keys(tmp_path):
  workdir = tmp_path / "run"
  # dataset.options.data_seed and model.kwargs.round_to are not in the config file: the
  # free-form sections accept new keys from the command line.
  out = _train(tmp_path, "--workdir", str(workdir), "--config.training.num_steps=12",
               "--config.optimizer.learning_rate=0.05", "--config.dataset.options.data_seed=7",
               "--config.model.kwargs.round_to=8")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "final_eval_accuracy=" in out.stdout
  summary = json.loads((workdir / "summary.json").read_text())
  for key in ("final_eval_accuracy", "best_eval_accuracy", "train_flops", "dense_train_flops",
              "sparse_macs", "steps", "wall_seconds", "config"):
    assert key in summary, key
  assert summary["steps"] == 12
  assert summary["config"]["optimizer"]["learning_rate"] == 0.05
  assert summary["config"]["model"]["family"] == "sparse_parallel"
  assert summary["config"]["dataset"]["options"] == {"num_samples": 1000, "data_seed": 7}
  assert summary["config"]["model"]["kwargs"] == {"hidden": [32, 32, 32], "round_to": 8}
  # Iso-FLOP forward cost, and RigL's dense-gradient steps cost a little more.
  assert summary["forward_flops_ratio"] == pytest.approx(1.0, abs=0.02)
  assert 1.0 < summary["train_flops_ratio"] < 1.1
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines if '"train"' in l] == [5, 10, 12]

  bad = _train(tmp_path, "--workdir", str(tmp_path / "bad"), "--config.training.nmu_steps=3")
  assert bad.returncode == 2
  assert "nmu_steps" in bad.stderr and "Traceback" not in bad.stderr
  assert "known keys of training: ['batch_size'" in bad.stderr
  assert not (tmp_path / "bad").exists()
  missing = subprocess.run([sys.executable, "-m", "sift_jax.train", "--config", str(tmp_path / "nope.py"),
                            "--workdir", str(tmp_path / "bad")], cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=120)
  assert missing.returncode == 2 and "nope.py" in missing.stderr and "Traceback" not in missing.stderr
  assert not (tmp_path / "bad").exists()

  # The workdir holds another run's checkpoint: a clear error, exit 1, nothing changed.
  before = sorted(os.listdir(workdir / "checkpoints"))
  clash = _train(tmp_path, "--workdir", str(workdir), "--config.model.family=sparse_wide")
  assert clash.returncode == 1
  assert "incompatible checkpoint" in clash.stderr and "Traceback" not in clash.stderr
  assert sorted(os.listdir(workdir / "checkpoints")) == before


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  workdir = tmp_path / "run"
  config = tmp_path / "tiny.py"
  config.write_text(TINY_CONFIG)
  cmd = [sys.executable, "-m", "sift_jax.train", "--config", str(config), "--workdir", str(workdir),
         "--config.training.num_steps=100000", "--config.training.checkpoint_every_steps=0",
         "--config.training.progress_bar=False"]
  proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  try:
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
      if metrics.exists() and metrics.read_text().count("\n") >= 2:
        break
      assert proc.poll() is None, proc.communicate()[1][-3000:]
      time.sleep(0.2)
    else:
      pytest.fail("training did not start within 120 s")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, stderr[-3000:]
  assert "preempted at step" in stdout
  step = int(stdout.split("preempted at step ")[1].split(";")[0])
  assert step >= 10
  assert os.listdir(workdir / "checkpoints") == [str(step)]
  assert not (workdir / "summary.json").exists()


def test_override_keys_outside_free_sections_must_exist():
  from sift_jax import train
  argv = ["--config", "c.py", "--config.dataset.options.num_samples=10", "--config.model.kwargs.width",
          "3", "--noconfig.training.progress_bar", "--workdir=x"]
  assert train.override_keys(argv) == ["dataset.options.num_samples", "model.kwargs.width",
                                       "training.progress_bar"]
  train._check_override_keys(argv)  # new keys in free-form sections: accepted
  with pytest.raises(ValueError, match=r"unknown config key 'optimizer.lr'; known keys of optimizer: "):
    train._check_override_keys(["--config.optimizer.lr=0.1"])
  with pytest.raises(ValueError, match=r"no section 'dataset.option'"):
    train._check_override_keys(["--config.dataset.option.num_samples=10"])


def test_sigterm_during_start_up_stops_cleanly(tmp_path):
  """SIGTERM while the process still imports and compiles: exit 0, nothing trained or lost."""
  config = tmp_path / "tiny.py"
  config.write_text(TINY_CONFIG)
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "sift_jax.train", "--config", str(config), "--workdir", str(workdir)]
  proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  time.sleep(0.5)  # the package import takes seconds
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-3000:]
  assert "preempted at step 0; no checkpoint yet" in stdout
  assert not (workdir / "summary.json").exists()
