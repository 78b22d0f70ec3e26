"""NumPy image augmentations and normalisation used by the data pipelines.

Everything here runs on the host, one example at a time, inside grain
transforms (see :mod:`sift_jax.data.pipeline`). Random functions take an
explicit :class:`numpy.random.Generator`; the pipeline hands each example a
generator derived from ``(seed, global example index)`` so that augmentation is
reproducible after resuming from a checkpoint and independent of the number of
processes.

The recipes follow SIFT (Saxena et al., 2023), docs/method.md, section 6:

* CIFAR train: random crop 32x32 from the image zero-padded by 4 pixels,
  random horizontal flip, per-channel normalisation.
* ImageNet train: Inception-style random-resized crop to 224x224 (scale
  ``(0.08, 1)``, aspect ratio ``(3/4, 4/3)``, as ``torchvision``'s
  ``RandomResizedCrop``), random horizontal flip, normalisation.
* ImageNet eval: resize the shorter side to 256, center crop 224x224,
  normalisation.

References:
  He et al., "Deep Residual Learning for Image Recognition", CVPR 2016
  (CIFAR crop/flip recipe). Szegedy et al., "Going Deeper with Convolutions",
  CVPR 2015 (random-resized crop).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np
from PIL import Image

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageClassificationTransform",
    "center_crop",
    "normalize",
    "random_crop_with_padding",
    "random_horizontal_flip",
    "random_resized_crop",
    "resize_shorter_side",
]

# Per-channel mean / standard deviation of the training images scaled to
# [0, 1]. CIFAR values are the per-pixel statistics of the 50k training images
# (the frequently copied std (0.2023, 0.1994, 0.2010) is the mean of per-image
# stds, not the dataset std); ImageNet values are the usual torchvision ones.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(
    image: np.ndarray,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    scale: float = 255.0,
) -> np.ndarray:
  """Returns ``(image / scale - mean) / std`` as float32, per channel.

  Args:
    image: ``(..., C)`` array (typically uint8 ``(H, W, C)``).
    mean: per-channel mean on the ``[0, 1]`` scale; length ``C`` or 1.
    std: per-channel standard deviation on the ``[0, 1]`` scale.
    scale: value mapped to 1.0 (255 for uint8 images).
  """
  mean_arr = np.asarray(mean, np.float32)
  std_arr = np.asarray(std, np.float32)
  if np.any(std_arr <= 0):
    raise ValueError(f"normalize: std must be positive, got std={std}")
  out = image.astype(np.float32) * np.float32(1.0 / scale)
  out -= mean_arr
  out /= std_arr
  return out


def random_horizontal_flip(
    image: np.ndarray, rng: np.random.Generator, *, probability: float = 0.5
) -> np.ndarray:
  """Flips ``(H, W, C)`` ``image`` left-right with the given probability."""
  if rng.random() < probability:
    return image[:, ::-1]
  return image


def random_crop_with_padding(
    image: np.ndarray, rng: np.random.Generator, *, size: int, padding: int
) -> np.ndarray:
  """Zero-pads ``(H, W, C)`` ``image`` by ``padding`` and crops ``size^2``.

  Matches ``torchvision.transforms.RandomCrop(size, padding)``: the offset is
  uniform over all ``(H + 2p - size + 1) * (W + 2p - size + 1)`` positions and
  the padding is zeros (black pixels before normalisation).
  """
  height, width = image.shape[:2]
  if height + 2 * padding < size or width + 2 * padding < size:
    raise ValueError(
        f"random_crop_with_padding: image {image.shape[:2]} padded by "
        f"{padding} is smaller than the crop size {size}"
    )
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  top = int(rng.integers(0, height + 2 * padding - size + 1))
  left = int(rng.integers(0, width + 2 * padding - size + 1))
  return padded[top : top + size, left : left + size]


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear (antialiased when shrinking) resize of a uint8 HWC image."""
  if image.shape[0] == height and image.shape[1] == width:
    return image
  squeeze = image.ndim == 3 and image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if squeeze else image)
  out = np.asarray(pil.resize((width, height), resample=Image.Resampling.BILINEAR))
  return out[..., None] if squeeze else out


def random_resized_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    max_attempts: int = 10,
) -> np.ndarray:
  """Inception-style random-resized crop of a uint8 ``(H, W, C)`` image.

  Samples a crop whose area is a ``scale``-fraction of the image and whose
  aspect ratio is log-uniform in ``ratio``; after ``max_attempts`` failures it
  falls back to the largest central crop with an aspect ratio inside
  ``ratio`` (the ``torchvision`` algorithm). The crop is resized to
  ``(size, size)`` with PIL bilinear interpolation.
  """
  height, width = image.shape[:2]
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(max_attempts):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    crop_w = int(round(math.sqrt(target_area * aspect)))
    crop_h = int(round(math.sqrt(target_area / aspect)))
    if 0 < crop_w <= width and 0 < crop_h <= height:
      top = int(rng.integers(0, height - crop_h + 1))
      left = int(rng.integers(0, width - crop_w + 1))
      break
  else:
    in_ratio = width / height
    if in_ratio < ratio[0]:
      crop_w, crop_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
      crop_w, crop_h = int(round(height * ratio[1])), height
    else:
      crop_w, crop_h = width, height
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
  crop = image[top : top + crop_h, left : left + crop_w]
  return _resize(crop, size, size)


def resize_shorter_side(image: np.ndarray, *, size: int) -> np.ndarray:
  """Resizes a uint8 ``(H, W, C)`` image so its shorter side is ``size``."""
  height, width = image.shape[:2]
  if height <= width:
    new_h, new_w = size, max(1, int(round(width * size / height)))
  else:
    new_h, new_w = max(1, int(round(height * size / width))), size
  return _resize(image, new_h, new_w)


def center_crop(image: np.ndarray, *, size: int) -> np.ndarray:
  """Central ``size x size`` crop of an ``(H, W, C)`` image (H, W >= size)."""
  height, width = image.shape[:2]
  if height < size or width < size:
    raise ValueError(
        f"center_crop: image {image.shape[:2]} is smaller than size {size}"
    )
  top, left = (height - size) // 2, (width - size) // 2
  return image[top : top + size, left : left + size]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageClassificationTransform(grain.transforms.RandomMap):
  """Per-example grain transform ``{"image", "label"}`` -> float32/int32.

  Attributes:
    recipe: one of ``"cifar_train"`` (pad-4 random crop + flip),
      ``"imagenet_train"`` (random-resized crop + flip), ``"imagenet_eval"``
      (resize shorter side to ``resize_size`` + center crop) or ``"none"``
      (normalisation only).
    mean: per-channel mean on the ``[0, 1]`` scale.
    std: per-channel std on the ``[0, 1]`` scale.
    image_size: output side length for crops.
    padding: zero padding of the CIFAR random crop.
    resize_size: shorter side before the ImageNet eval center crop.
    scale: value of a white pixel in the raw image (255 for uint8).
  """

  recipe: str
  mean: tuple[float, ...]
  std: tuple[float, ...]
  image_size: int = 32
  padding: int = 4
  resize_size: int = 256
  scale: float = 255.0

  _RECIPES = ("cifar_train", "imagenet_train", "imagenet_eval", "none")

  def __post_init__(self):
    if self.recipe not in self._RECIPES:
      raise ValueError(
          f"ImageClassificationTransform: unknown recipe={self.recipe!r}; "
          f"expected one of {self._RECIPES}"
      )

  @property
  def is_random(self) -> bool:
    return self.recipe in ("cifar_train", "imagenet_train")

  def random_map(
      self, element: Mapping[str, Any], rng: np.random.Generator | None
  ) -> dict[str, np.ndarray | np.generic]:
    image = np.asarray(element["image"])
    if image.ndim == 2:  # grayscale stored without a channel axis
      image = image[..., None]
    if self.recipe == "cifar_train":
      rng = self._rng_of_random_recipe(rng)
      image = random_crop_with_padding(
          image, rng, size=self.image_size, padding=self.padding
      )
      image = random_horizontal_flip(image, rng)
    elif self.recipe == "imagenet_train":
      rng = self._rng_of_random_recipe(rng)
      image = random_resized_crop(image, rng, size=self.image_size)
      image = random_horizontal_flip(image, rng)
    elif self.recipe == "imagenet_eval":
      image = resize_shorter_side(image, size=self.resize_size)
      image = center_crop(image, size=self.image_size)
    return {
        "image": normalize(image, mean=self.mean, std=self.std, scale=self.scale),
        "label": np.int32(element["label"]),
    }

  def map(self, element: Mapping[str, Any]) -> dict[str, np.ndarray | np.generic]:
    """Deterministic application (only valid for non-random recipes)."""
    if self.is_random:
      raise ValueError(
          f"recipe={self.recipe!r} is random; use random_map with an rng"
      )
    return self.random_map(element, None)

  def _rng_of_random_recipe(self, rng: np.random.Generator | None) -> np.random.Generator:
    if rng is None:
      raise ValueError(f"recipe={self.recipe!r} is random; random_map needs an rng, got None")
    return rng
