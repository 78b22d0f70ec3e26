"""Training runs that survive faults: kill -9, a damaged checkpoint, a workdir in use, write errors.

The fault-injection test starts this file as a script (``--worker``) that runs
the command line ``python -m sift_jax.train`` in-process, with a kill planted:
SIGKILL after a few steps (plus a random delay, so it lands anywhere in the
following steps, writes and saves) or right after a checkpoint save was handed
to orbax's writer thread (a half-written checkpoint). The resumed result must
equal an uninterrupted run bitwise: parameters, optimizer state and every
record of ``metrics.jsonl`` and TensorBoard (wall-clock fields aside).
"""

import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

CONFIG = {
    "dataset.options.num_samples": 1000, "model.name": "mlp_mnist1d", "model.kwargs.hidden": [32, 32, 32],
    "model.family": "sparse_wide", "model.sparsity": 0.5, "sparse.method": "rigl", "sparse.update_every": 4,
    "training.num_steps": 40, "training.batch_size": 32, "training.eval_batch_size": 200,
    "training.log_every_steps": 3, "training.eval_every_steps": 8, "training.checkpoint_every_steps": 2,
    "training.keep_checkpoints": 2, "training.progress_bar": False, "optimizer.learning_rate": 0.05,
    "mesh.data": 1,
}
CONFIG_FILE = textwrap.dedent(f'''
    from sift_jax import training

    def get_config():
      return training.apply_overrides(training.default_config(), {CONFIG!r})
    ''')


def _config(**overrides):
  from sift_jax import training  # pylint: disable=import-outside-toplevel
  return training.apply_overrides(training.default_config(), {**CONFIG, **overrides})


# ------------------------------------------------------------------------------------------
# The worker: the training CLI with a planted fault.


def worker(mode: str, arg: str, config_path: str, workdir: str) -> None:
  import signal  # pylint: disable=import-outside-toplevel
  import threading  # pylint: disable=import-outside-toplevel

  def die():
    os.kill(os.getpid(), signal.SIGKILL)

  if mode == "write_limit":  # every file write beyond `arg` bytes fails with EFBIG
    import resource  # pylint: disable=import-outside-toplevel
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(arg), int(arg)))
  from sift_jax.training import checkpointing, loop  # pylint: disable=import-outside-toplevel
  if mode == "kill_after":  # SIGKILL `delay` seconds after this process's `offset`-th step
    offset, delay = arg.split(",")
    counter = [0]

    def kill_hook(step, state):  # pylint: disable=unused-argument
      counter[0] += 1
      if counter[0] == int(offset):
        threading.Timer(float(delay), die).start()

    real_train = loop.train_and_evaluate
    loop.train_and_evaluate = lambda config, wd, **kw: real_train(config, wd, hooks=[kill_hook], **kw)
  elif mode == "kill_in_save":  # SIGKILL while orbax writes this process's `arg`-th save
    real_save = checkpointing.Checkpointer.save
    saves = [0]

    def save_then_die(self, step, state, data_state):
      real_save(self, step, state, data_state)
      saves[0] += 1
      if saves[0] == int(arg):
        die()

    checkpointing.Checkpointer.save = save_then_die
  from sift_jax import train  # pylint: disable=import-outside-toplevel
  sys.argv = ["sift_jax.train", "--config", config_path, "--workdir", workdir]
  train.run()


def _run_worker(tmp_path, workdir, mode="none", arg="0", timeout=180):
  config_path = tmp_path / "fault_config.py"
  if not config_path.exists():
    config_path.write_text(CONFIG_FILE)
  env = dict(os.environ)
  if mode == "write_limit":  # the cache's files would hit the limit too
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
  else:
    # Restarts reuse the compiled steps; the executables are the same, so are the results.
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return subprocess.run([sys.executable, __file__, "--worker", mode, arg, str(config_path), str(workdir)],
                        env=env, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------
# Comparisons.

def _newest_state(config, workdir):
  """The newest checkpoint's state of ``workdir`` as host arrays."""
  import jax  # pylint: disable=import-outside-toplevel
  from sift_jax import training  # pylint: disable=import-outside-toplevel
  from sift_jax.data import get_dataset_info  # pylint: disable=import-outside-toplevel
  from sift_jax.training import loop  # pylint: disable=import-outside-toplevel
  info = get_dataset_info("mnist1d", split="train", num_samples=1000)
  steps_per_epoch, total = loop.training_length(config, info)
  funcs = training.build_run(config, mesh=loop._make_mesh(config), train_info=info, total_steps=total,
                             steps_per_epoch=steps_per_epoch)
  ckpt = training.Checkpointer(str(workdir / "checkpoints"), keep=10,
                               run_fingerprint=loop._run_fingerprint(config))
  try:
    state, _, step = ckpt.restore(funcs.abstract_state)
  finally:
    ckpt.close()
  return step, jax.device_get(state)


def _assert_trees_equal(a, b):
  import jax  # pylint: disable=import-outside-toplevel
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def _records(workdir):
  from sift_jax import training  # pylint: disable=import-outside-toplevel
  return [{k: v for k, v in r.items() if k not in training.metrics.TIMING_KEYS}
          for r in training.read_metrics(str(workdir))]


def _tensorboard_scalars(workdir):
  """``[(tag, step, value)]`` as TensorBoard shows them: purged events dropped, torn tails ignored."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  from sift_jax import training  # pylint: disable=import-outside-toplevel
  tb_dir = workdir / "tensorboard"
  scalars = []
  for name in sorted(os.listdir(tb_dir)):
    data = (tb_dir / name).read_bytes()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      if pos + 12 + length + 4 > len(data):
        break  # a record cut short by a kill
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        scalars = [s for s in scalars if s[1] < event.step]  # purge_step of a resumed run
      for value in event.summary.value:
        if value.tag.split("/")[-1] not in training.metrics.TIMING_KEYS:
          scalars.append((value.tag, event.step, value.simple_value))
  return sorted(scalars)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run of CONFIG (in this process)."""
  from sift_jax import training  # pylint: disable=import-outside-toplevel
  workdir = tmp_path_factory.mktemp("reference")
  summary = training.train_and_evaluate(_config(), str(workdir))
  return workdir, summary


def _tmp_dirs(workdir):
  directory = workdir / "checkpoints"
  return [n for n in os.listdir(directory) if ".orbax-checkpoint-tmp" in n] if directory.exists() else []


def test_kill9_at_random_moments_then_resume_is_bitwise_equal(reference, tmp_path):
  ref_dir, ref_summary = reference
  workdir = tmp_path / "run"
  rng = np.random.default_rng(0)
  kills, half_written, attempts = 0, 0, 0
  while kills < 10 and attempts < 20:
    attempts += 1
    if attempts % 3 == 0:
      mode, arg = "kill_in_save", str(int(rng.integers(1, 3)))
    else:
      mode, arg = "kill_after", f"{int(rng.integers(1, 5))},{rng.uniform(0.0, 0.05):.4f}"
    out = _run_worker(tmp_path, workdir, mode, arg)
    assert out.returncode in (-9, 0), (mode, arg, out.stderr[-3000:])
    if out.returncode == 0:
      break  # the run ended before the kill
    kills += 1
    half_written += bool(_tmp_dirs(workdir))
  assert kills >= 10, f"only {kills} kills landed before the run ended"
  assert half_written >= 1  # some kills hit a save in progress
  final = _run_worker(tmp_path, workdir)
  assert final.returncode == 0, final.stderr[-3000:]
  assert "final_eval_accuracy=" in final.stdout

  config = _config()
  step, state = _newest_state(config, workdir)
  ref_step, ref_state = _newest_state(config, ref_dir)
  assert step == ref_step == 40
  _assert_trees_equal(state.params, ref_state.params)
  _assert_trees_equal(state.opt_state, ref_state.opt_state)
  _assert_trees_equal(state, ref_state)
  assert _records(workdir) == _records(ref_dir)
  assert _tensorboard_scalars(workdir) == _tensorboard_scalars(ref_dir)
  summary = json.loads((workdir / "summary.json").read_text())
  for key in ("final_eval_loss", "final_eval_accuracy", "best_eval_accuracy", "train_flops", "steps"):
    assert summary[key] == ref_summary[key], key
  assert not _tmp_dirs(workdir)  # the half-written saves were cleaned up
  assert sorted(os.listdir(workdir / "checkpoints")) == sorted(os.listdir(ref_dir / "checkpoints"))
  assert not os.path.exists(workdir / "checkpoints.damaged")


def test_sigterms_then_resume_write_the_records_of_an_uninterrupted_run(reference, tmp_path):
  import signal  # pylint: disable=import-outside-toplevel
  from sift_jax import training  # pylint: disable=import-outside-toplevel
  ref_dir, ref_summary = reference
  workdir = tmp_path / "run"
  for at in (13, 14, 29):  # mid log window; the first step after a resume; mid window again
    def preempt(step, state, at=at):  # pylint: disable=unused-argument
      if step == at:
        os.kill(os.getpid(), signal.SIGTERM)

    partial = training.train_and_evaluate(_config(), str(workdir), hooks=[preempt])
    assert partial["preempted"]
  summary = training.train_and_evaluate(_config(), str(workdir))
  assert summary["final_eval_loss"] == ref_summary["final_eval_loss"]
  assert _records(workdir) == _records(ref_dir)
  assert _tensorboard_scalars(workdir) == _tensorboard_scalars(ref_dir)
  _assert_trees_equal(_newest_state(_config(), workdir)[1], _newest_state(_config(), ref_dir)[1])


def _largest_file(directory):
  files = [os.path.join(root, f) for root, _, names in os.walk(directory) for f in names]
  return max(files, key=os.path.getsize)


# orbax leaves the read coroutines of a failed restore un-awaited.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate", "delete", "flip_bit", "delete_meta"])
def test_damaged_newest_checkpoint_is_moved_aside_and_an_older_one_resumes(reference, tmp_path, damage,
                                                                           caplog):
  from sift_jax import training  # pylint: disable=import-outside-toplevel
  ref_dir, ref_summary = reference
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir, workdir)
  newest = workdir / "checkpoints" / "40"
  target = _largest_file(newest / ("meta" if damage == "delete_meta" else "state"))
  if damage == "truncate":
    with open(target, "r+b") as f:
      f.truncate(os.path.getsize(target) // 2)
  elif damage in ("delete", "delete_meta"):
    os.remove(target)
  else:
    with open(target, "r+b") as f:
      f.seek(os.path.getsize(target) // 2)
      byte = f.read(1)
      f.seek(-1, os.SEEK_CUR)
      f.write(bytes([byte[0] ^ 0x10]))
  # A half-written save of a killed process, as orbax names them.
  os.makedirs(workdir / "checkpoints" / "44.orbax-checkpoint-tmp-1700000000")
  with caplog.at_level(logging.WARNING, logger="sift_jax"):
    summary = training.train_and_evaluate(_config(), str(workdir))
  warnings = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
  assert len(warnings) == 1 and "checkpoint step 40" in warnings[0], warnings
  assert str(workdir / "checkpoints.damaged" / "40") in warnings[0]
  assert os.listdir(workdir / "checkpoints.damaged") == ["40"]  # moved aside, not deleted
  assert summary["final_eval_loss"] == ref_summary["final_eval_loss"]
  assert summary["final_eval_accuracy"] == ref_summary["final_eval_accuracy"]
  _assert_trees_equal(_newest_state(_config(), workdir)[1], _newest_state(_config(), ref_dir)[1])
  assert _records(workdir) == _records(ref_dir)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["38", "40"]


def test_a_flipped_bit_that_reads_back_is_caught_by_the_checksums(tmp_path, caplog):
  import jax  # pylint: disable=import-outside-toplevel
  from sift_jax import training  # pylint: disable=import-outside-toplevel
  directory = str(tmp_path / "ckpt")
  state = {"w": jax.numpy.arange(4096.0), "b": jax.numpy.ones((64,), jax.numpy.int32)}
  ckpt = training.Checkpointer(directory, keep=3, run_fingerprint={}, async_save=False)
  ckpt.save(1, state, {})
  ckpt.save(2, state, {})
  assert training.state_checksums(state) == {"b": 64, "w": int(np.sum(np.arange(4096.0, dtype=np.float32)
                                                                     .view(np.uint32), dtype=np.uint32))}
  ckpt.close()
  target = _largest_file(os.path.join(directory, "2", "state"))
  with open(target, "r+b") as f:  # uncompressed float data: tensorstore reads it back without error
    f.seek(os.path.getsize(target) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 1]))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)
  ckpt = training.Checkpointer(directory, keep=3, run_fingerprint={})
  with pytest.raises(ValueError, match=r"step 2 is damaged: checksum mismatch in 1 state leaves, e.g. 'w'"):
    ckpt.restore(abstract, 2)
  with caplog.at_level(logging.WARNING, logger="sift_jax"):
    restored, _, step = ckpt.restore_newest(abstract)
  ckpt.close()
  assert step == 1 and os.listdir(directory + ".damaged") == ["2"]
  assert [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()] == [
      f"sift_jax: checkpoint step 2 in {directory} is damaged (checksum mismatch in 1 state leaves, "
      f"e.g. 'w'); moved it to {directory}.damaged/2, falling back to an older checkpoint"]
  _assert_trees_equal(jax.device_get(restored), jax.device_get(state))


def _hold_lock_in_child(workdir):
  """A child process (plain Python) holding the workdir's lock the way a run does."""
  code = textwrap.dedent(f'''
      import fcntl, json, os, socket, sys, time
      os.makedirs({str(workdir)!r}, exist_ok=True)
      fd = os.open(os.path.join({str(workdir)!r}, ".lock"), os.O_RDWR | os.O_CREAT)
      fcntl.flock(fd, fcntl.LOCK_EX)
      os.write(fd, json.dumps({{"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}}).encode())
      print("locked", flush=True)
      time.sleep(600)
      ''')
  child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
  assert child.stdout.readline().strip() == "locked"
  return child


def test_a_second_process_on_a_workdir_fails_at_once_and_a_stale_lock_is_taken_over(tmp_path, caplog):
  from sift_jax import training  # pylint: disable=import-outside-toplevel
  from sift_jax.training import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "run"
  child = _hold_lock_in_child(workdir)
  try:
    started = time.time()
    with pytest.raises(workdir_lib.WorkdirLockedError,
                       match=rf"in use by another run: pid {child.pid} on host '{socket.gethostname()}'"):
      training.train_and_evaluate(_config(**{"training.num_steps": 4}), str(workdir))
    assert time.time() - started < 30
    assert os.listdir(workdir) == [".lock"]  # nothing else touched
  finally:
    child.kill()  # kill -9: the kernel releases its flock, its line stays in the file
    child.wait()
  with caplog.at_level(logging.WARNING, logger="sift_jax"):
    summary = training.train_and_evaluate(_config(**{"training.num_steps": 4}), str(workdir))
  assert summary["steps"] == 4
  assert any(f"left by pid {child.pid}" in r.getMessage() and "is gone" in r.getMessage()
             for r in caplog.records)
  assert (workdir / ".lock").read_text() == ""  # a clean end empties it

  # Two runs in one process conflict as well: a hook of run A starts run B on the same workdir.
  errors = []
  nested = tmp_path / "nested"

  def start_another(step, state):  # pylint: disable=unused-argument
    if step == 1:
      try:
        training.train_and_evaluate(_config(**{"training.num_steps": 4}), str(nested))
      except workdir_lib.WorkdirLockedError as e:
        errors.append(str(e))

  training.train_and_evaluate(_config(**{"training.num_steps": 4}), str(nested), hooks=[start_another])
  assert len(errors) == 1 and f"pid {os.getpid()}" in errors[0]


def test_environment_failures_end_in_one_error_line(reference, tmp_path, monkeypatch):
  """A write limit at the storage layer (a full disk for every file write), a workdir that is a
  file, under a file, or not writable: one `error:` line, exit 1, the last good checkpoint kept."""
  from sift_jax import train, training  # pylint: disable=import-outside-toplevel
  ref_dir, _ = reference
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir, workdir)
  shutil.rmtree(workdir / "checkpoints" / "40")  # resumes at 38, must save again at 40
  kept = sorted(os.listdir(workdir / "checkpoints"))
  # The records still fit, the checkpoint's data does not.
  limit = os.path.getsize(workdir / "metrics.jsonl") + 2048
  assert os.path.getsize(_largest_file(workdir / "checkpoints" / "38")) > limit
  out = _run_worker(tmp_path, workdir, "write_limit", str(limit))
  assert out.returncode == 1, out.stderr[-3000:]
  lines = [l for l in out.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert out.stderr.strip().splitlines()[-1] == lines[0]  # the last word
  assert "[Errno 27] File too large" in lines[0] and str(workdir) in lines[0]
  assert "Checkpoints already written are kept" in lines[0]
  assert sorted(n for n in os.listdir(workdir / "checkpoints") if "tmp" not in n) == kept
  # The kept checkpoint resumes (and the half-written one is cleaned up).
  summary = training.train_and_evaluate(_config(), str(workdir))
  assert summary["steps"] == 40 and not _tmp_dirs(workdir)

  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  for bad in (a_file, a_file / "run"):
    with pytest.raises(OSError) as err:
      training.train_and_evaluate(_config(**{"training.num_steps": 2}), str(bad))
    line = train.error_line(err.value, str(bad))
    assert line.startswith("error: cannot write the run in workdir") and "\n" not in line
    assert ("File exists" in line) if bad == a_file else ("Not a directory" in line)

  # A read-only workdir (simulated: root may write anywhere).
  real_open = os.open

  def read_only(path, *args, **kwargs):
    if str(path).startswith(str(tmp_path / "ro")):
      raise PermissionError(13, "Permission denied", str(path))
    return real_open(path, *args, **kwargs)

  (tmp_path / "ro").mkdir()
  monkeypatch.setattr(os, "open", read_only)
  with pytest.raises(PermissionError) as err:
    training.train_and_evaluate(_config(**{"training.num_steps": 2}), str(tmp_path / "ro"))
  monkeypatch.undo()
  line = train.error_line(err.value, str(tmp_path / "ro"))
  assert "[Errno 13] Permission denied" in line and "ro/.lock" in line


def test_a_stop_requested_before_the_first_step_trains_nothing(reference, tmp_path):
  from sift_jax import training  # pylint: disable=import-outside-toplevel
  ref_dir, _ = reference
  summary = training.train_and_evaluate(_config(), str(tmp_path / "new"), stop_requested=lambda: True)
  assert summary["preempted"] and summary["steps"] == 0 and summary["checkpoint_step"] is None
  assert not os.listdir(tmp_path / "new" / "checkpoints")
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir, workdir)
  shutil.rmtree(workdir / "checkpoints" / "40")
  before = _records(workdir)
  summary = training.train_and_evaluate(_config(), str(workdir), stop_requested=lambda: True)
  assert summary["preempted"] and summary["steps"] == summary["checkpoint_step"] == 38
  assert os.listdir(workdir / "checkpoints") == ["38"]
  assert _records(workdir) == [r for r in before if r["step"] <= 38]


def test_bad_config_files_end_in_one_error_line(tmp_path, capsys):
  from sift_jax import train  # pylint: disable=import-outside-toplevel
  cases = {
      "syntax.py": ("def get_config(:\n", "{path}: syntax error at line 1: invalid syntax"),
      "raises.py": ("def get_config():\n  raise RuntimeError('no such sweep')\n",
                    "{path}: get_config() raised RuntimeError at line 2: no such sweep"),
      "empty.py": ("X = 1\n", "{path} defines no get_config() function"),
  }
  for name, (text, message) in cases.items():
    path = tmp_path / name
    path.write_text(text)
    # ml_collections loads every config file as module "config_config": parsing several in one
    # process would keep the previous file's get_config.
    sys.modules.pop("config_config", None)
    with pytest.raises(SystemExit) as exit_:
      train._parse_flags(["sift_jax.train", "--config", str(path), "--workdir", str(tmp_path / "w")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == ["error: --config " + message.format(path=path)]
  assert not (tmp_path / "w").exists()


if __name__ == "__main__":
  if len(sys.argv) == 6 and sys.argv[1] == "--worker":
    worker(*sys.argv[2:])
