"""experiments/configs: every file loads, validates, encodes the paper's recipes, and its sweep is valid."""

import glob
import math
import os
import re

import pytest
import tensorflow_datasets as tfds

from sift_jax import models, training
from sift_jax.data import get_dataset_info
from sift_jax.training import loop, sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "experiments", "configs")
CONFIG_FILES = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.py")))


def _load(name):
  return sweep.load_config_module(os.path.join(CONFIG_DIR, name))


def test_expected_config_files_exist():
  names = {os.path.basename(p) for p in CONFIG_FILES}
  assert {"cifar100_resnet18.py", "imagenet_resnet18.py", "imagenet_resnet34.py", "gpt3_small.py",
          "mnist1d_mlp.py", "mnist1d_cnn.py", "pydoc_chars_gpt.py"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_validates_and_its_sweep_is_valid(path):
  module = sweep.load_config_module(path)
  config = module.get_config()
  training.validate_config(config)
  assert config.model.name in models.list_models()
  runs = sweep.runs_from_module(module)
  names = [r.name for r in runs]
  assert len(names) == len(set(names))
  for run in runs:
    training.validate_config(training.apply_overrides(config, run.overrides))
  # A locked config refuses unknown keys, as the CLI's --config.KEY=VALUE does.
  config.lock()
  with pytest.raises((AttributeError, KeyError)):
    config.training.nmu_steps = 3


def test_cifar100_resnet18_is_the_papers_recipe_and_grid(tmp_path):
  module = _load("cifar100_resnet18.py")
  c = module.get_config()
  assert (c.dataset.name, c.model.name) == ("cifar100", "resnet18_cifar")
  assert (c.training.num_epochs, c.training.batch_size) == (200.0, 128)
  assert (c.optimizer.name, c.optimizer.learning_rate, c.optimizer.momentum) == ("nesterov", 0.1, 0.9)
  assert c.optimizer.weight_decay == 5e-4 and c.optimizer.weight_decay_exclude == ""
  assert c.schedule.name == "multistep" and tuple(c.schedule.boundaries_epochs) == (60, 120, 160)
  assert c.schedule.decay_factor == 0.2
  assert (c.sparse.distribution, c.sparse.update_every, c.sparse.drop_fraction,
          c.sparse.drop_schedule, c.sparse.end_fraction) == ("uniform", 100, 0.3, "cosine", 0.75)
  names = [r.name for r in sweep.runs_from_module(module)]
  assert len(names) == 16 and "dense" in names
  for member in sweep.MEMBERS:
    for s in ("0.5", "0.75", "0.9"):
      assert f"{member}-{s}-rigl" in names
  assert sorted(n for n in names if n.endswith("static")) == [
      "sparse_wide-0.5-static", "sparse_wide-0.75-static", "sparse_wide-0.9-static"]
  # Steps per epoch as the training loop derives them from the pipeline (TFDS cifar100
  # mocked with the real 50,000 training examples): the partial batch is dropped, 390.
  with tfds.testing.mock_data(num_examples=50_000):
    info = get_dataset_info("cifar100", split="train", data_dir=str(tmp_path))
  assert info.num_examples == 50_000
  spe, total = loop.training_length(c, info)
  assert (spe, total) == (390, 200 * 390)
  assert c.training.eval_every_steps == 10 * spe and c.training.checkpoint_every_steps == 5 * spe
  # The multistep boundaries land on the right steps.
  sched = training.make_schedule(c, total_steps=total, steps_per_epoch=spe)
  assert math.isclose(float(sched(60 * spe - 1)), 0.1, rel_tol=1e-6)
  assert math.isclose(float(sched(60 * spe)), 0.02, rel_tol=1e-6)
  assert math.isclose(float(sched(160 * spe)), 0.1 * 0.2 ** 3, rel_tol=1e-5)


@pytest.mark.parametrize("name,model", [("imagenet_resnet18.py", "resnet18_imagenet"),
                                        ("imagenet_resnet34.py", "resnet34_imagenet")])
def test_imagenet_configs_are_the_papers_recipe(name, model):
  module = _load(name)
  c = module.get_config()
  assert (c.dataset.name, c.dataset.eval_split, c.model.name) == ("imagenet2012", "validation", model)
  assert (c.training.num_epochs, c.training.batch_size, c.training.label_smoothing) == (90.0, 256, 0.1)
  assert (c.optimizer.name, c.optimizer.learning_rate, c.optimizer.momentum) == ("sgd", 0.256, 0.875)
  assert c.optimizer.weight_decay == 2.0 ** -15
  excluded = re.compile(c.optimizer.weight_decay_exclude)
  assert excluded.search("layer1_0/bn1/scale") and excluded.search("head/bias")
  assert not excluded.search("layer1_0/conv1/kernel") and not excluded.search("head/kernel")
  assert c.schedule.name == "cosine" and c.schedule.warmup_epochs == 0 and c.schedule.end_value == 0
  names = [r.name for r in sweep.runs_from_module(module)]
  assert sorted(names) == sorted(["dense"] + [f"{m}-{s}-rigl" for m in ("sparse_wide", "sparse_parallel")
                                              for s in ("0.5", "0.75", "0.9")])


def test_gpt3_small_config_builds_dense_and_sparse_wide():
  module = _load("gpt3_small.py")
  c = module.get_config()
  assert c.model.name == "gpt3_small" and c.dataset.options.seq_len == c.model.kwargs.context == 2048
  assert [r.name for r in sweep.runs_from_module(module)] == [
      "dense", "sparse_wide-0.5-rigl", "sparse_wide-0.75-rigl", "sparse_wide-0.9-rigl"]
  # The model the config names builds under the sweep's members (shapes only, no arrays).
  kwargs = dict(c.model.kwargs)
  spec = models.get_model(c.model.name, family="sparse_wide", sparsity=0.5, vocab_size=257, **kwargs)
  assert spec.task == "lm" and spec.input_shape == (2048,)
  # Attention's activation products are dense and grow with the head width, so the masks
  # get sparser than the nominal s to stay iso-FLOP.
  assert 0.5 <= spec.solved_sparsity < 0.8
  assert spec.info["iso_flop_ratio"] == pytest.approx(1.0, abs=1e-3)
  # Widths rounded for the TPU, so the model-axis rules divide them.
  assert spec.info["widths"]["mlp_width"] % 128 == 0


def test_cpu_configs_train(tmp_path):
  """The CPU-sized LM and CNN configs run end to end (a few steps)."""
  lm = training.apply_overrides(_load("pydoc_chars_gpt.py").get_config(), {
      "training.num_steps": 3, "training.progress_bar": False, "schedule.warmup_steps": 1,
      "model.family": "sparse_wide", "model.sparsity": 0.5})
  summary = training.train_and_evaluate(lm, str(tmp_path / "lm"))
  assert summary["steps"] == 3
  assert summary["final_eval_perplexity"] == pytest.approx(math.exp(summary["final_eval_loss"]))
  assert 1.0 < summary["final_eval_perplexity"] < 1000
  assert summary["best_eval_perplexity"] <= summary["final_eval_perplexity"] + 1e-9
  cnn = training.apply_overrides(_load("mnist1d_cnn.py").get_config(), {
      "training.num_steps": 3, "training.progress_bar": False})
  summary = training.train_and_evaluate(cnn, str(tmp_path / "cnn"))
  assert summary["steps"] == 3 and 0.0 <= summary["final_eval_accuracy"] <= 1.0
