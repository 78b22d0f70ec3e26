"""Two jax.distributed processes on localhost (gloo CPU collectives) train like one process.

The test starts this file twice as a script (``--worker``); each process has 4
CPU devices, together one 4 x 2 ``("data", "model")`` mesh. Every process reads
its half of each batch and the loop assembles global arrays with
``jax.make_array_from_process_local_data``; checkpoints are written by both
processes into one directory, metrics and the summary by process 0.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np

STEPS = 16


def make_config():
  from sift_jax import training  # pylint: disable=import-outside-toplevel
  return training.apply_overrides(training.default_config(), {
      "dataset.options.num_samples": 1000,  # 800 train / 200 test signals: quick to generate
      "model.name": "mlp_mnist1d", "model.kwargs.hidden": [32, 32, 32], "model.kwargs.round_to": 8, "model.family": "sparse_wide",
      "model.sparsity": 0.5, "sparse.method": "rigl", "sparse.update_every": 4,
      "training.num_steps": STEPS, "training.batch_size": 64, "training.eval_batch_size": 200,
      "training.log_every_steps": 4, "training.checkpoint_every_steps": 8,
      "training.progress_bar": False, "optimizer.learning_rate": 0.05,
      "mesh.data": 4, "mesh.model": 2,
      "mesh.rules": ((r"^stem/kernel$", (None, "model")), (r"^fc_0/kernel$", ("model", None))),
  })


def _final_params_hook(store):
  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  import sift_jax  # pylint: disable=import-outside-toplevel

  def hook(step, state):
    if step == STEPS:
      flat, _ = jax.tree_util.tree_flatten_with_path(state.params)
      # Leaves sharded over "model" span devices of this process only, but gather anyway so the
      # comparison does not depend on the mesh layout.
      store["params"] = {sift_jax.path_str(p): np.asarray(multihost_utils.process_allgather(x, tiled=True))
                         for p, x in flat}
  return hook


def worker(process_id: int, port: int, workdir: str, out: str) -> None:
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
  from sift_jax import training  # pylint: disable=import-outside-toplevel
  store = {}
  summary = training.train_and_evaluate(make_config(), workdir, hooks=[_final_params_hook(store)])
  if process_id == 0:
    np.savez(out + ".npz", **store["params"])
    with open(out + ".json", "w") as f:
      json.dump({k: v for k, v in summary.items() if k != "config"}, f)
  jax.distributed.shutdown()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
  from sift_jax import training  # pylint: disable=import-outside-toplevel

  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = str(tmp_path / "multi")
  workdir = str(tmp_path / "multi_run")
  procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(pid), str(port), workdir, out],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for pid in (0, 1)]
  logs = []
  try:
    # Meanwhile, the same run in this process (8 devices, the same 4 x 2 mesh).
    store = {}
    single = training.train_and_evaluate(make_config(), str(tmp_path / "single"),
                                         hooks=[_final_params_hook(store)])
    for p in procs:
      logs.append(p.communicate(timeout=150)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-4000:]
  multi_params = np.load(out + ".npz")
  assert sorted(multi_params.files) == sorted(store["params"])
  for path, value in store["params"].items():
    np.testing.assert_allclose(multi_params[path], value, rtol=2e-5, atol=2e-6, err_msg=path)
  with open(out + ".json") as f:
    multi = json.load(f)
  assert multi["steps"] == single["steps"] == STEPS
  np.testing.assert_allclose(multi["final_eval_loss"], single["final_eval_loss"], rtol=1e-5)
  assert multi["final_eval_accuracy"] == single["final_eval_accuracy"]
  # Both processes wrote their shards of the checkpoints; process 0 the metrics and summary.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["16", "8"]
  assert os.path.exists(os.path.join(workdir, "summary.json"))
  train_steps = [json.loads(l)["step"] for l in open(os.path.join(workdir, "metrics.jsonl"))
                 if '"train"' in l]
  assert train_steps == [4, 8, 12, 16]


if __name__ == "__main__":
  if len(sys.argv) == 6 and sys.argv[1] == "--worker":
    worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
  else:
    raise SystemExit(f"usage: {sys.argv[0]} --worker PROCESS_ID PORT WORKDIR OUT")
