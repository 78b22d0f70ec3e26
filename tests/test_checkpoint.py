"""Checkpointing of training runs: resume, preemption, keep-N, incompatible dirs, non-finite loss."""

import hashlib
import json
import math
import os
import shutil
import signal

import jax
import numpy as np
import pytest

import sift_jax
from sift_jax import training
from sift_jax.data import get_dataset_info
from sift_jax.training import loop


def tiny_config(**overrides):
  base = {
      "model.name": "mlp_mnist1d", "model.kwargs.hidden": [32, 32, 32], "model.family": "sparse_wide",
      "model.sparsity": 0.5, "sparse.method": "rigl", "sparse.update_every": 8,
      "training.num_steps": 40, "training.batch_size": 32, "training.eval_batch_size": 250,
      "training.log_every_steps": 10, "training.checkpoint_every_steps": 16,
      "training.keep_checkpoints": 2, "training.progress_bar": False, "mesh.data": 1,
      "optimizer.learning_rate": 0.05,
  }
  base.update(overrides)
  return training.apply_overrides(training.default_config(), base)


def _grab(store, at):
  def hook(step, state):
    if step == at:
      store["state"] = jax.device_get(state)
  return hook


def _assert_trees_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


def _dir_digest(path):
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  store = {}
  summary = training.train_and_evaluate(tiny_config(), str(workdir), hooks=[_grab(store, 40)])
  return workdir, store["state"], summary


def test_uninterrupted_run_outputs(uninterrupted):
  workdir, state, summary = uninterrupted
  assert summary["steps"] == 40 and not summary["preempted"]
  # keep_checkpoints=2 of the saves at 16, 32 and the final 40.
  assert sorted(os.listdir(workdir / "checkpoints")) == ["32", "40"]
  records = training.read_metrics(str(workdir))
  assert [r["step"] for r in records if r["split"] == "train"] == [10, 20, 30, 40]
  assert [r["step"] for r in records if r["split"] == "eval"] == [40]
  assert os.listdir(workdir / "tensorboard")
  import json
  with open(workdir / "summary.json") as f:
    on_disk = json.load(f)
  for key in ("final_eval_accuracy", "best_eval_accuracy", "train_flops", "dense_train_flops",
              "sparse_macs", "steps", "wall_seconds", "config"):
    assert key in on_disk, key
  assert on_disk["config"]["model"]["family"] == "sparse_wide"
  assert 0.0 <= on_disk["final_eval_accuracy"] <= 1.0
  assert on_disk["final_eval_accuracy"] == pytest.approx(summary["final_eval_accuracy"])
  # Masked weights are exactly zero and the counts are exact.
  masks = sift_jax.get_masks(state.opt_state)
  for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(masks)):
    assert np.all(p[~m] == 0)
  assert on_disk["nonzero_params"] == sum(int(m.sum()) for m in jax.tree.leaves(masks))


def test_sigterm_then_resume_is_bitwise_equal(uninterrupted, tmp_path):
  _, final_state, summary_a = uninterrupted

  def preempt(step, state):
    if step == 27:
      os.kill(os.getpid(), signal.SIGTERM)

  handler_before = signal.getsignal(signal.SIGTERM)
  partial = training.train_and_evaluate(tiny_config(), str(tmp_path), hooks=[preempt])
  assert partial["preempted"] and partial["steps"] == 27
  assert not (tmp_path / "summary.json").exists()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["16", "27"]
  # The previous SIGTERM handler is back after the run.
  assert signal.getsignal(signal.SIGTERM) is handler_before

  store = {}
  # Operational keys may change on resume: the trained state stays bitwise equal.
  resumed = tiny_config(**{"training.log_every_steps": 4, "training.keep_checkpoints": 3,
                           "training.checkpoint_every_steps": 6, "training.progress_bar": True})
  summary_b = training.train_and_evaluate(resumed, str(tmp_path), hooks=[_grab(store, 40)])
  assert summary_b["steps"] == 40 and not summary_b["preempted"]
  _assert_trees_equal(final_state, store["state"])
  # Train records up to the preemption (none at the SIGTERM step itself: its unlogged steps
  # 21..27 are in the checkpoint), then every 4 steps of the resumed run.
  assert [r["step"] for r in training.read_metrics(str(tmp_path), "train")] == [
      10, 20, 28, 32, 36, 40]
  assert summary_b["final_eval_accuracy"] == summary_a["final_eval_accuracy"]
  assert summary_b["final_eval_loss"] == summary_a["final_eval_loss"]


def _restore(config, workdir, step, *, total_steps):
  """The run's functions and ``(state, data_state, step)`` of checkpoint ``step`` in ``workdir``."""
  info = get_dataset_info("mnist1d", split="train")
  funcs = training.build_run(config, mesh=loop._make_mesh(config), train_info=info,
                             total_steps=total_steps, steps_per_epoch=info.batches_per_epoch(32))
  ckpt = training.Checkpointer(str(workdir / "checkpoints"), keep=2,
                               run_fingerprint=loop._run_fingerprint(config))
  try:
    return funcs, ckpt.restore(funcs.abstract_state, step)
  finally:
    ckpt.close()


def test_restore_is_typed_sharded_and_equals_the_saved_state(tmp_path):
  config = tiny_config(**{"training.num_steps": 20, "training.checkpoint_every_steps": 8})
  store = {}
  training.train_and_evaluate(config, str(tmp_path), hooks=[_grab(store, 16)])
  funcs, (state, loop_state, step) = _restore(config, tmp_path, 16, total_steps=20)
  assert step == 16 and loop_state["train_iterator"]["next_batch"] == 16
  assert isinstance(state, training.TrainState)
  assert isinstance(state.opt_state, sift_jax.SparseState)
  assert type(state.opt_state.inner_state) is type(store["state"].opt_state.inner_state)
  for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(funcs.state_shardings)):
    assert leaf.sharding == sharding
  _assert_trees_equal(jax.device_get(state), store["state"])


def test_incompatible_checkpoint_is_refused_and_left_untouched(uninterrupted):
  workdir, _, _ = uninterrupted
  before = _dir_digest(workdir)
  with pytest.raises(training.IncompatibleCheckpointError, match=r"fc_0/kernel"):
    training.train_and_evaluate(tiny_config(**{"model.kwargs.hidden": [24, 24, 24]}), str(workdir))
  with pytest.raises(training.IncompatibleCheckpointError, match=r"family: checkpoint has 'sparse_wide'"):
    training.train_and_evaluate(tiny_config(**{"model.family": "sparse_parallel"}), str(workdir))
  assert _dir_digest(workdir) == before


def test_resume_with_changed_hyperparameters_is_refused(uninterrupted, tmp_path):
  workdir, _, summary = uninterrupted
  before = _dir_digest(workdir)
  for overrides, match in [
      ({"optimizer.learning_rate": 0.5}, r"optimizer.learning_rate: checkpoint has 0.05, this run 0.5"),
      ({"training.num_steps": 50, "seed": 3},
       r"seed: checkpoint has 0, this run 3; training.num_steps: checkpoint has 40, this run 50"),
      ({"dataset.options.data_seed": 7}, r"dataset.options.data_seed: checkpoint has no such key, this run 7"),
      ({"sparse.drop_fraction": 0.5}, r"sparse.drop_fraction: checkpoint has 0.3, this run 0.5"),
  ]:
    with pytest.raises(training.IncompatibleCheckpointError, match=match) as err:
      training.train_and_evaluate(tiny_config(**overrides), str(workdir))
    assert "use another --workdir" in str(err.value)
  assert _dir_digest(workdir) == before

  # Operational keys may change: a finished run is reopened without training or evaluating
  # again, and metrics.jsonl gets no duplicate records.
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  records = [(r["step"], r["split"]) for r in training.read_metrics(str(copy))]
  again = training.train_and_evaluate(tiny_config(**{
      "training.log_every_steps": 3, "training.eval_every_steps": 7, "training.keep_checkpoints": 1,
      "training.checkpoint_every_steps": 5, "training.progress_bar": True,
      "training.spectral_every_steps": 9}), str(copy))
  assert again["final_eval_accuracy"] == summary["final_eval_accuracy"]
  assert again["final_eval_loss"] == summary["final_eval_loss"]
  assert [(r["step"], r["split"]) for r in training.read_metrics(str(copy))] == records
  # Its final checkpoint was verified by the final eval: keep_checkpoints=1 keeps only it.
  assert sorted(os.listdir(copy / "checkpoints")) == ["40"]


def test_checkpointer_keeps_verified_checkpoints_before_unverified_ones(tmp_path):
  state = {"w": jax.numpy.arange(4.0)}
  directory = str(tmp_path / "ckpt")

  def opened(keep=1):
    return training.Checkpointer(directory, keep=keep, run_fingerprint={}, async_save=False)

  ckpt = opened()
  for step in (2, 4):
    ckpt.save(step, state, {})
  assert ckpt.all_steps() == [2, 4] and ckpt.last_verified_step() is None  # nothing verified yet
  ckpt.mark_verified(3)  # the losses of steps 0..3 were finite: checkpoint 2 is good
  assert ckpt.all_steps() == [2, 4] and ckpt.verified_steps() == [2]
  ckpt.mark_verified(4)  # checkpoint 4 verified: keep=1 drops 2 only now
  assert ckpt.all_steps() == [4] and ckpt.last_verified_step() == 4
  ckpt.save(6, state, {})
  ckpt.save(8, state, {})  # (the loop never saves twice unverified; retention still keeps both)
  assert ckpt.all_steps() == [4, 6, 8]
  ckpt.discard_from(6)  # a non-finite loss at step 6: 6 and 8 hold that state
  assert ckpt.all_steps() == [4] and ckpt.last_verified_step() == 4
  ckpt.save(6, state, {})
  ckpt.close()
  # Reopened: every checkpoint but the newest counts as verified.
  ckpt = opened(keep=2)
  assert ckpt.verified_steps() == [4] and ckpt.all_steps() == [4, 6]
  ckpt.mark_verified(6)
  assert ckpt.verified_steps() == [4, 6]
  ckpt.close()
  with pytest.raises(ValueError, match="keep must be an int >= 1, got 0"):
    opened(keep=0)


def _exploding(**overrides):
  # lr 10 with a constant schedule: finite losses for a few steps, then NaN.
  base = {"training.num_steps": 40, "training.checkpoint_every_steps": 2, "training.log_every_steps": 2,
          "optimizer.learning_rate": 10.0, "schedule.name": "constant"}
  base.update(overrides)
  return tiny_config(**base)


@pytest.mark.parametrize("keep", [1, 2])
def test_non_finite_loss_keeps_a_verified_checkpoint_that_resumes(tmp_path, keep):
  config = _exploding(**{"training.keep_checkpoints": keep})
  with pytest.raises(training.NonFiniteLossError, match=r"non-finite training loss .* at step \d+") as err:
    training.train_and_evaluate(config, str(tmp_path))
  bad, good = err.value.step, err.value.last_checkpoint
  assert 4 <= bad < 40
  kept = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
  # The checkpoint of step `bad` is the state whose loss was not finite: it is gone, and the
  # newest kept one is strictly older, with `keep` verified checkpoints kept.
  assert kept and max(kept) == good < bad
  assert kept == [s for s in range(2, bad, 2)][-keep:]
  assert f"at step {bad}" in str(err.value) and f"last good checkpoint" in str(err.value)
  assert f"is step {good}" in str(err.value)
  # The kept checkpoint restores with finite parameters...
  info = get_dataset_info("mnist1d", split="train")
  funcs = training.build_run(config, mesh=loop._make_mesh(config), train_info=info,
                             total_steps=40, steps_per_epoch=info.batches_per_epoch(32))
  ckpt = training.Checkpointer(str(tmp_path / "checkpoints"), keep=keep,
                               run_fingerprint=loop._run_fingerprint(config))
  state, _, step = ckpt.restore(funcs.abstract_state)
  ckpt.close()
  assert step == good
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
  # ...and resuming the workdir continues from it: its own loss (step `good`) is finite, the
  # run diverges again at the same step and keeps the same checkpoint.
  steps = []
  with pytest.raises(training.NonFiniteLossError) as again:
    training.train_and_evaluate(config, str(tmp_path), hooks=[lambda s, _: steps.append(s)])
  assert steps[0] == good + 1
  assert (again.value.step, again.value.last_checkpoint) == (bad, good)
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints")) == kept


def test_non_finite_loss_is_caught_before_evals_and_every_100_steps(tmp_path):
  seen = []
  hook = lambda step, _: seen.append(step)  # noqa: E731
  # No logging, no checkpoints, an eval every 2 steps: the first eval after the divergence
  # stops the run instead of writing a NaN record.
  quiet = {"training.log_every_steps": 0, "training.checkpoint_every_steps": 0, "training.num_steps": 300}
  with pytest.raises(training.NonFiniteLossError, match=r"at step \d+") as err:
    training.train_and_evaluate(_exploding(**quiet, **{"training.eval_every_steps": 2}),
                                str(tmp_path / "evals"), hooks=[hook])
  bad = err.value.step
  assert 4 <= bad < 100 and bad <= max(seen) <= bad + 2 and err.value.last_checkpoint is None
  evals = training.read_metrics(str(tmp_path / "evals"), "eval")
  assert evals and all(isinstance(r["loss"], float) and math.isfinite(r["loss"]) for r in evals)
  assert max(r["step"] for r in evals) <= bad
  # Nothing but the training loss: it is checked every 100 steps.
  seen.clear()
  with pytest.raises(training.NonFiniteLossError) as err:
    training.train_and_evaluate(_exploding(**quiet), str(tmp_path / "silent"), hooks=[hook])
  assert err.value.step == bad and max(seen) == 100
  assert not os.listdir(tmp_path / "silent" / "checkpoints")


def test_metrics_after_a_crash_and_resume_have_no_duplicates(tmp_path):
  config = tiny_config(**{"training.num_steps": 20, "training.log_every_steps": 5,
                          "training.checkpoint_every_steps": 10, "training.eval_every_steps": 5})

  class Crash(Exception):
    pass

  def crash(step, _):
    if step == 17:
      raise Crash()

  with pytest.raises(Crash):
    training.train_and_evaluate(config, str(tmp_path), hooks=[crash])
  assert [r["step"] for r in training.read_metrics(str(tmp_path), "train")] == [5, 10, 15]
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 16, "split": "tr')  # a record the crash cut short
  training.train_and_evaluate(config, str(tmp_path))
  records = training.read_metrics(str(tmp_path))
  assert [r["step"] for r in records if r["split"] == "train"] == [5, 10, 15, 20]
  assert [r["step"] for r in records if r["split"] == "eval"] == [5, 10, 15, 20]
  assert [r["step"] for r in records if r["split"] == "summary"] == [20]
  assert not os.path.exists(tmp_path / "metrics.jsonl.tmp")


def test_eval_split_is_built_once_and_reused_with_identical_results(uninterrupted, tmp_path, monkeypatch):
  workdir, _, summary = uninterrupted
  config = tiny_config()
  funcs, (state, _, _) = _restore(config, workdir, 40, total_steps=40)
  dataset = loop.make_eval_dataset(config, funcs.batch_sharding)
  first = training.evaluate(funcs, state, config, dataset=dataset)
  second = training.evaluate(funcs, state, config, dataset=dataset)
  fresh = training.evaluate(funcs, state, config)
  assert first == second == fresh
  assert first["count"] == get_dataset_info("mnist1d", split="test").num_examples  # each example once
  assert first["loss"] == summary["final_eval_loss"] and first["accuracy"] == summary["final_eval_accuracy"]

  import sift_jax.data
  calls = []
  real = sift_jax.data.make_dataset

  def counting(name, *, split, **kwargs):
    calls.append(split)
    return real(name, split=split, **kwargs)

  monkeypatch.setattr(sift_jax.data, "make_dataset", counting)
  training.train_and_evaluate(tiny_config(**{"training.num_steps": 12, "training.eval_every_steps": 3}),
                              str(tmp_path / "run"))
  assert calls == ["train", "test"]
  assert [r["step"] for r in training.read_metrics(str(tmp_path / "run"), "eval")] == [3, 6, 9, 12]


def test_bad_inputs_fail_before_touching_the_workdir(tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match="batch_size=12 is not divisible by the data-parallel size 8"):
    training.train_and_evaluate(tiny_config(**{"training.batch_size": 12, "mesh.data": 8}), str(workdir))
  with pytest.raises(ValueError, match="data-parallel size 2 x grad_accum_steps 4"):
    training.train_and_evaluate(tiny_config(**{"training.batch_size": 36, "mesh.data": 2,
                                               "training.grad_accum_steps": 4}), str(workdir))
  with pytest.raises(FileNotFoundError, match="cifar10"):
    training.train_and_evaluate(
        tiny_config(**{"dataset.name": "cifar10", "dataset.data_dir": str(tmp_path / "empty"),
                       "model.name": "resnet18_cifar"}), str(workdir))
  with pytest.raises(ValueError, match="unknown config key"):
    config = tiny_config()
    with config.unlocked():
      config.training.learning_rate = 0.1
    training.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()
