"""Export of a finished run: fold / compress, orbax variables, jax.export reloaded without sift_jax."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from sift_jax import training
from sift_jax.inference import export as export_lib

_RELOAD = r"""
import json, sys
import jax, numpy as np
import orbax.checkpoint as ocp
out, inputs = sys.argv[1], sys.argv[2]
with open(f"{out}/model.jax_export", "rb") as f:
  exported = jax.export.deserialize(f.read())
(target, _), _ = jax.tree.unflatten(exported.in_tree, [
    jax.ShapeDtypeStruct(a.shape, a.dtype) for a in exported.in_avals])
variables = ocp.StandardCheckpointer().restore(f"{out}/variables", target)
x = np.load(inputs)
np.save(f"{inputs}.out.npy", np.asarray(exported.call(variables, x)))
assert not any(m == "sift_jax" or m.startswith("sift_jax.") for m in sys.modules), "sift_jax imported"
print("reloaded", exported.platforms)
"""


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  config = training.apply_overrides(training.default_config(), {
      "model.name": "mlp_mnist1d", "model.kwargs.hidden": [16, 16, 16],
      "model.family": "sparse_doped", "model.sparsity": 0.8, "sparse.method": "rigl",
      "sparse.update_every": 2, "training.num_steps": 4, "training.batch_size": 32,
      "training.eval_batch_size": 250, "training.log_every_steps": 2,
      "training.checkpoint_every_steps": 4, "training.progress_bar": False, "mesh.data": 1,
  })
  training.train_and_evaluate(config, str(workdir))
  return workdir


def _reload_in_fresh_process(out, x, tmp_path):
  inputs = str(tmp_path / "x.npy")
  np.save(inputs, x)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["XLA_FLAGS"] = ""
  proc = subprocess.run([sys.executable, "-c", _RELOAD, str(out), inputs], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return np.load(inputs + ".out.npy")


def test_export_folds_the_run_and_plain_jax_reloads_it(finished_run, tmp_path):
  spec, variables, masks, step = export_lib.load_run(str(finished_run))
  assert step == 4 and spec.family == "sparse_doped" and masks is not None
  x = np.random.default_rng(0).standard_normal((5,) + spec.input_shape).astype(np.float32)
  want = np.asarray(spec.module.apply(variables, x, train=False))
  result = export_lib.export_run(str(finished_run), str(tmp_path / "out"))
  assert result.how == "fold" and result.info["step"] == 4
  dense_params = jax.eval_shape(lambda k: spec.base_module.init(k, x, train=False),
                                jax.random.key(0))["params"]
  assert result.info["parameters"] == sum(int(np.size(l)) for l in jax.tree.leaves(dense_params))
  got = _reload_in_fresh_process(tmp_path / "out", x, tmp_path)
  assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
  with pytest.raises(FileExistsError, match="already holds an export"):
    export_lib.export_run(str(finished_run), str(tmp_path / "out"))


def test_export_cli_compresses_and_reloads(finished_run, tmp_path):
  out = tmp_path / "compressed"
  env = dict(os.environ, XLA_FLAGS="")
  proc = subprocess.run([sys.executable, "-m", "sift_jax.export", "--workdir", str(finished_run),
                         "--out", str(out), "--mode", "compress"], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  info = json.loads(proc.stdout)
  assert info["how"] == "compress" and info["model"] == "mlp_mnist1d"
  spec, variables, masks, _ = export_lib.load_run(str(finished_run))
  x = np.random.default_rng(1).standard_normal((3,) + spec.input_shape).astype(np.float32)
  want = np.asarray(spec.module.apply(variables, x, train=False))
  got = _reload_in_fresh_process(out, x, tmp_path)
  assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))

def test_export_cli_bad_workdir_exits_2_naming_it(tmp_path, capsys):
  assert export_lib.main(["--workdir", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
  err = capsys.readouterr().err
  assert "no checkpoints in" in err and str(tmp_path / "nope") in err
