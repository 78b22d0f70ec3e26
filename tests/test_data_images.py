"""Tests of image augmentation and the TFDS (ArrayRecord) image pipelines.

The TFDS pipelines are exercised through the real call
``tfds.data_source(name, split=..., data_dir=...)`` under
``tfds.testing.mock_data``: in tensorflow-datasets 4.9.10 the mock patches
``DatasetBuilder.as_data_source`` (used by ``tfds.data_source``) to return a
genuine ``ArrayRecordDataSource`` whose reader yields deterministic random
examples with the real feature specs (uint8 images, int labels), so no fake
ArrayRecord files are needed. (Its batched ``__getitems__`` is broken, which is
why ``TfdsImageSource`` only uses ``__getitem__``.)
"""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from sift_jax import data
from sift_jax.data import augment as augment_lib


def _mock(n=24):
  return tfds.testing.mock_data(num_examples=n)


# ---------------------------------------------------------------------------
# NumPy augmentations.


def test_normalize_applies_per_channel_constants():
  image = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3) * 20
  out = data.normalize(image, mean=data.CIFAR100_MEAN, std=data.CIFAR100_STD)
  expected = (image / 255.0 - np.array(data.CIFAR100_MEAN)) / np.array(
      data.CIFAR100_STD)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="std must be positive"):
    data.normalize(image, mean=(0.0,), std=(0.0,))


def test_flip_really_flips():
  image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
  rng = np.random.default_rng(0)
  flipped = data.random_horizontal_flip(image, rng, probability=1.0)
  np.testing.assert_array_equal(flipped[:, 0], image[:, 4])
  np.testing.assert_array_equal(flipped, image[:, ::-1])
  np.testing.assert_array_equal(
      data.random_horizontal_flip(image, rng, probability=0.0), image)
  outcomes = [
      np.array_equal(data.random_horizontal_flip(image, np.random.default_rng(s)),
                     image[:, ::-1])
      for s in range(200)
  ]
  assert 70 < sum(outcomes) < 130  # ~Binomial(200, 0.5)


def test_cifar_crop_is_a_window_of_the_zero_padded_image():
  image = np.random.default_rng(0).integers(1, 256, (32, 32, 3), np.uint8)
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  offsets = set()
  for seed in range(60):
    crop = data.random_crop_with_padding(
        image, np.random.default_rng(seed), size=32, padding=4)
    assert crop.shape == (32, 32, 3)
    hits = [(t, l) for t in range(9) for l in range(9)
            if np.array_equal(padded[t:t + 32, l:l + 32], crop)]
    assert len(hits) == 1
    offsets.add(hits[0])
  assert len(offsets) > 20  # offsets vary over the 9 x 9 positions


def test_cifar_train_transform_crops_and_flips():
  transform = data.ImageClassificationTransform(
      recipe="cifar_train", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
      scale=1.0)
  image = np.random.default_rng(0).integers(1, 256, (32, 32, 3), np.uint8)
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0))).astype(np.float32)
  kinds = []
  for seed in range(40):
    out = transform.random_map({"image": image, "label": 0},
                               np.random.default_rng(seed))["image"]
    windows = [padded[t:t + 32, l:l + 32] for t in range(9) for l in range(9)]
    plain = any(np.array_equal(w, out) for w in windows)
    mirrored = any(np.array_equal(w[:, ::-1], out) for w in windows)
    assert plain != mirrored  # exactly one of the two explains the output
    kinds.append(mirrored)
  assert 8 < sum(kinds) < 32  # both flipped and unflipped crops occur


def test_cifar_train_transform_ranges_and_determinism():
  transform = data.ImageClassificationTransform(
      recipe="cifar_train", mean=data.CIFAR10_MEAN, std=data.CIFAR10_STD)
  image = np.full((32, 32, 3), 255, np.uint8)
  out = transform.random_map({"image": image, "label": 7},
                             np.random.default_rng(1))
  assert out["image"].shape == (32, 32, 3) and out["label"] == 7
  low = (0.0 - np.array(data.CIFAR10_MEAN)) / np.array(data.CIFAR10_STD)
  high = (1.0 - np.array(data.CIFAR10_MEAN)) / np.array(data.CIFAR10_STD)
  # A white image padded with black: only the two extreme values appear.
  values = np.unique(out["image"].reshape(-1, 3), axis=0)
  assert len(values) <= 2
  np.testing.assert_allclose(values.max(0), high, rtol=1e-6)
  assert np.all(out["image"] >= low.astype(np.float32) - 1e-6)
  again = transform.random_map({"image": image, "label": 7},
                               np.random.default_rng(1))
  np.testing.assert_array_equal(out["image"], again["image"])
  with pytest.raises(ValueError, match="unknown recipe='mixup'"):
    data.ImageClassificationTransform(recipe="mixup", mean=(0.,), std=(1.,))


@pytest.mark.parametrize("shape", [(10, 25, 3), (300, 200, 3), (64, 64, 3)])
def test_random_resized_crop_shapes(shape):
  image = np.random.default_rng(0).integers(0, 256, shape, np.uint8)
  for seed in range(5):
    out = data.random_resized_crop(image, np.random.default_rng(seed), size=224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8


def _coordinate_image(height, width):
  """uint8 image whose pixel (y, x) holds (y, x, 0): a crop reveals where it was cut."""
  assert height <= 256 and width <= 256
  yy, xx = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  return np.stack([yy, xx, np.zeros_like(yy)], -1).astype(np.uint8)


def test_random_resized_crop_respects_scale_and_aspect_ratio_bounds(monkeypatch):
  crops = []
  monkeypatch.setattr(augment_lib, "_resize", lambda crop, h, w: crops.append(crop) or crop)
  scale, ratio = (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0)
  for height, width in ((200, 240), (256, 90), (64, 64)):
    image = _coordinate_image(height, width)
    area = height * width
    fractions, aspects = [], []
    for seed in range(300):
      crops.clear()
      data.random_resized_crop(image, np.random.default_rng(seed), size=224)
      (crop,) = crops
      h, w = crop.shape[:2]
      top, left = int(crop[0, 0, 0]), int(crop[0, 0, 1])
      # A window of the image, inside it.
      assert 0 < h <= height and 0 < w <= width
      np.testing.assert_array_equal(crop, image[top:top + h, left:left + w])
      # Area a scale-fraction of the image and aspect ratio in bounds, up to the
      # rounding of the crop's sides to whole pixels.
      assert (h + 0.5) * (w + 0.5) >= scale[0] * area
      assert (h - 0.5) * (w - 0.5) <= scale[1] * area
      assert (w - 0.5) / (h + 0.5) <= ratio[1] and (w + 0.5) / (h - 0.5) >= ratio[0]
      fractions.append(h * w / area)
      aspects.append(w / h)
    # The whole range is sampled, not just one corner of it (a 256 x 90 image has no
    # in-bounds crop of more than half its area).
    assert min(fractions) < 0.2 and max(fractions) > (0.4 if width < height / 2 else 0.8)
    assert min(aspects) < 0.85 and max(aspects) > 1.2
  # An image too elongated for any in-bounds crop: the central crop of the largest
  # in-bounds aspect ratio.
  image = _coordinate_image(20, 200)
  crops.clear()
  data.random_resized_crop(image, np.random.default_rng(0), size=224)
  (crop,) = crops
  assert crop.shape[:2] == (20, round(20 * 4 / 3))
  left = (200 - crop.shape[1]) // 2
  np.testing.assert_array_equal(crop, image[:, left:left + crop.shape[1]])


def test_imagenet_eval_resize_and_center_crop():
  image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), np.uint8)
  resized = data.resize_shorter_side(image, size=256)
  assert resized.shape == (256, 341, 3)
  grid = np.arange(6 * 8).reshape(6, 8, 1)
  np.testing.assert_array_equal(data.center_crop(grid, size=4)[..., 0],
                                grid[1:5, 2:6, 0])
  out = data.ImageClassificationTransform(
      recipe="imagenet_eval", mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD,
      image_size=224).map({"image": image, "label": 3})
  assert out["image"].shape == (224, 224, 3) and out["image"].dtype == np.float32


# ---------------------------------------------------------------------------
# TFDS pipelines.


@pytest.mark.parametrize("name", ["cifar100", "imagenet2012"])
def test_unprepared_tfds_dataset_raises_clear_error(tmp_path, name):
  for data_dir in (tmp_path, tmp_path / "missing"):
    with pytest.raises(data.DatasetNotPreparedError) as exc:
      data.make_dataset(name, split="train", batch_size=8, data_dir=data_dir,
                        process_index=0, process_count=1)
    message = str(exc.value)
    assert isinstance(exc.value, FileNotFoundError)
    assert repr(name) in message and str(data_dir) in message
    assert f"tfds build {name}" in message and "array_record" in message


def test_tfds_copy_in_tfrecord_format_is_reported(tmp_path):
  version_dir = tmp_path / "cifar10" / "3.0.2"
  version_dir.mkdir(parents=True)
  (version_dir / "dataset_info.json").write_text(json.dumps({"name": "cifar10"}))
  with pytest.raises(data.DatasetNotPreparedError, match=r"\['tfrecord'\]"):
    data.make_dataset("cifar10", split="test", batch_size=8, data_dir=tmp_path,
                      process_index=0, process_count=1)


@pytest.mark.parametrize(
    "name,split,classes,size",
    [("cifar10", "train", 10, 32), ("cifar10", "test", 10, 32),
     ("cifar100", "train", 100, 32), ("cifar100", "test", 100, 32),
     ("imagenet2012", "train", 1000, 224),
     ("imagenet2012", "validation", 1000, 224)])
def test_tfds_image_pipelines_under_mock_data(tmp_path, name, split, classes,
                                              size):
  with _mock(12):
    it = data.make_dataset(name, split=split, batch_size=4, data_dir=tmp_path,
                           process_index=0, process_count=1, num_epochs=1)
    batches = list(it)
  assert len(batches) == 3
  info = it.info
  assert (info.num_examples, info.num_classes) == (12, classes)
  assert info.input_shape == (size, size, 3)
  for b in batches:
    assert b["image"].shape == (4, size, size, 3)
    assert b["image"].dtype == np.float32 and b["label"].dtype == np.int32
    assert np.all((b["label"] >= 0) & (b["label"] < classes))
    mean, std = np.array(info.mean), np.array(info.std)
    assert np.all(b["image"] >= ((0 - mean) / std).astype(np.float32) - 1e-5)
    assert np.all(b["image"] <= ((1 - mean) / std).astype(np.float32) + 1e-5)


def test_imagenet_train_and_eval_recipes_under_mock_data(tmp_path, monkeypatch):
  """Eval: resize the shorter side to 256, center crop 224; train: random-resized crop + flip."""
  calls = []

  def spy(name):
    real = getattr(augment_lib, name)

    def wrapped(image, *args, **kwargs):
      calls.append((name, kwargs.get("size")))
      return real(image, *args, **kwargs)
    return wrapped

  for name in ("random_resized_crop", "random_horizontal_flip", "resize_shorter_side",
               "center_crop", "random_crop_with_padding"):
    monkeypatch.setattr(augment_lib, name, spy(name))
  eval_tf = data.ImageClassificationTransform(
      recipe="imagenet_eval", mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD, image_size=224)
  kw = dict(batch_size=6, data_dir=tmp_path, process_index=0, process_count=1)
  with _mock(6):
    raw_val = tfds.data_source("imagenet2012", split="validation", data_dir=tmp_path)
    raw_val = [raw_val[i] for i in range(6)]
    raw_train = tfds.data_source("imagenet2012", split="train", data_dir=tmp_path)
    raw_train = [raw_train[i] for i in range(6)]
    calls.clear()
    (val,) = list(data.make_dataset("imagenet2012", split="validation", **kw))
    eval_calls = sorted(set(calls))
    calls.clear()
    train = [next(data.make_dataset("imagenet2012", split="train", seed=seed, shuffle=False, **kw))
             for seed in (0, 1)]
    train_calls = sorted(set(calls))
    plain = next(data.make_dataset("imagenet2012", split="train", shuffle=False, augment=False,
                                   **kw))
  assert eval_calls == [("center_crop", 224), ("resize_shorter_side", 256)]
  assert train_calls == [("random_horizontal_flip", None), ("random_resized_crop", 224)]
  # The eval batch is exactly the eval recipe applied to the source images.
  expected_val = np.stack([eval_tf.map(r)["image"] for r in raw_val])
  np.testing.assert_array_equal(val["image"], expected_val)
  np.testing.assert_array_equal(val["label"], [r["label"] for r in raw_val])
  # Train images without augmentation get the eval recipe; with it they differ from it
  # and from one seed to another, the examples (labels) staying the same.
  expected_train = np.stack([eval_tf.map(r)["image"] for r in raw_train])
  np.testing.assert_array_equal(plain["image"], expected_train)
  for batch in train:
    np.testing.assert_array_equal(batch["label"], plain["label"])
    assert batch["image"].shape == expected_train.shape
    for i in range(6):
      assert not np.array_equal(batch["image"][i], expected_train[i])
  assert all(not np.array_equal(train[0]["image"][i], train[1]["image"][i]) for i in range(6))


def test_cifar_eval_batch_is_the_normalised_source(tmp_path):
  with _mock(10):
    source = tfds.data_source("cifar100", split="test", data_dir=tmp_path)
    raw = [source[i] for i in range(10)]
    (batch,) = list(data.make_dataset(
        "cifar100", split="test", batch_size=10, data_dir=tmp_path,
        process_index=0, process_count=1))
  expected = np.stack([
      data.normalize(r["image"], mean=data.CIFAR100_MEAN, std=data.CIFAR100_STD)
      for r in raw])
  np.testing.assert_array_equal(batch["image"], expected)
  np.testing.assert_array_equal(batch["label"], [r["label"] for r in raw])
  with _mock(10):
    coarse = data.make_dataset("cifar100", split="test", batch_size=10,
                               data_dir=tmp_path, process_index=0,
                               process_count=1, label_key="coarse_label")
    (cbatch,) = list(coarse)
  assert coarse.info.num_classes == 20
  np.testing.assert_array_equal(cbatch["label"], [r["coarse_label"] for r in raw])


def test_cifar_train_augmentation_is_random_but_reproducible(tmp_path):
  kw = dict(split="train", batch_size=8, seed=3, data_dir=tmp_path)
  with _mock(16):
    it = data.make_dataset("cifar10", process_index=0, process_count=1, **kw)
    first = [next(it) for _ in range(5)]
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    resumed = data.make_dataset("cifar10", process_index=0, process_count=1,
                                **kw)
    resumed.set_state(json.loads(json.dumps(state)))
    got = [next(resumed) for _ in range(3)]
    halves = [data.make_dataset("cifar10", process_index=p, process_count=2,
                                **kw) for p in range(2)]
    half_batches = [[next(h) for _ in range(2)] for h in halves]
    plain = data.make_dataset("cifar10", process_index=0, process_count=1,
                              augment=False, **kw)
    plain_batches = [next(plain) for _ in range(2)]
  for a, b in zip(expected, got):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  # Augmentation depends on (seed, stream position) only, not on sharding.
  for step in range(2):
    np.testing.assert_array_equal(
        np.concatenate([h[step]["image"] for h in half_batches]),
        first[step]["image"])
  # Same examples in the same order, but augmented differently.
  np.testing.assert_array_equal(plain_batches[0]["label"], first[0]["label"])
  assert not np.array_equal(plain_batches[0]["image"], first[0]["image"])
  # 16 examples, batch 8: batches 0-1 are epoch 0 and 2-3 epoch 1, which is a
  # new permutation with new augmentations.
  epoch0 = np.concatenate([b["label"] for b in first[:2]])
  epoch1 = np.concatenate([b["label"] for b in first[2:4]])
  np.testing.assert_array_equal(np.sort(epoch0), np.sort(epoch1))
  assert it.info.num_examples == 16


def test_imagenet_split_names_are_checked(tmp_path):
  with pytest.raises(ValueError, match=r"'imagenet2012' has no split='test'"):
    data.make_dataset("imagenet2012", split="test", batch_size=8,
                      data_dir=tmp_path, process_index=0, process_count=1)


def test_random_recipes_need_an_rng():
  image = np.zeros((32, 32, 3), np.uint8)
  transform = data.ImageClassificationTransform(
      recipe="cifar_train", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
  with pytest.raises(ValueError, match="recipe='cifar_train' is random; random_map needs an rng"):
    transform.random_map({"image": image, "label": 0}, None)
  with pytest.raises(ValueError, match="recipe='cifar_train' is random; use random_map"):
    transform.map({"image": image, "label": 0})
