"""Checkpointing of training runs: resume, preemption, keep-N, incompatible dirs, non-finite loss."""

import hashlib
import os
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
  summary_b = training.train_and_evaluate(tiny_config(), str(tmp_path), hooks=[_grab(store, 40)])
  assert summary_b["steps"] == 40 and not summary_b["preempted"]
  _assert_trees_equal(final_state, store["state"])
  assert summary_b["final_eval_accuracy"] == summary_a["final_eval_accuracy"]
  assert summary_b["final_eval_loss"] == summary_a["final_eval_loss"]


def test_restore_is_typed_sharded_and_equals_the_saved_state(tmp_path):
  config = tiny_config(**{"training.num_steps": 20, "training.checkpoint_every_steps": 8})
  store = {}
  training.train_and_evaluate(config, str(tmp_path), hooks=[_grab(store, 16)])
  info = get_dataset_info("mnist1d", split="train")
  funcs = training.build_run(config, mesh=loop._make_mesh(config), train_info=info, total_steps=20,
                             steps_per_epoch=info.batches_per_epoch(32))
  ckpt = training.Checkpointer(str(tmp_path / "checkpoints"), keep=2,
                               run_fingerprint=loop._run_fingerprint(config))
  state, loop_state, step = ckpt.restore(funcs.abstract_state, 16)
  ckpt.close()
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


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  training.train_and_evaluate(tiny_config(**{"training.num_steps": 10}), str(tmp_path))
  assert os.listdir(tmp_path / "checkpoints") == ["10"]
  exploding = tiny_config(**{"training.num_steps": 40, "training.checkpoint_every_steps": 2,
                             "training.log_every_steps": 2, "optimizer.learning_rate": 1e12,
                             "schedule.name": "constant", "model.sparsity": 0.5})
  with pytest.raises(training.NonFiniteLossError, match=r"non-finite training loss .* at step \d+") as err:
    training.train_and_evaluate(exploding, str(tmp_path))
  bad_step = err.value.step
  assert 10 <= bad_step < 40
  kept = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
  assert kept and max(kept) <= bad_step and err.value.last_checkpoint == max(kept)
  assert f"step {max(kept)}" in str(err.value)
  # The newest kept checkpoint restores and is finite.
  info = get_dataset_info("mnist1d", split="train")
  funcs = training.build_run(exploding, mesh=loop._make_mesh(exploding), train_info=info,
                             total_steps=40, steps_per_epoch=info.batches_per_epoch(32))
  ckpt = training.Checkpointer(str(tmp_path / "checkpoints"), keep=2,
                               run_fingerprint=loop._run_fingerprint(exploding))
  state, _, step = ckpt.restore(funcs.abstract_state)
  ckpt.close()
  assert step == max(kept)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


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
