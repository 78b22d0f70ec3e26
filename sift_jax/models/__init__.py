"""The paper's models (ResNets, MobileNetV2, GPT, MNIST-1D) and ViT/BERT under any Sparse-IFT member."""

from sift_jax.models.bert import BERT
from sift_jax.models.gpt import GPT
from sift_jax.models.mnist1d import CNN1D, MLP
from sift_jax.models.mobilenet import MobileNetV2
from sift_jax.models.registry import ModelSpec, describe_transformed, get_model, list_models
from sift_jax.models.resnet import ResNet
from sift_jax.models.vit import ViT

__all__ = ["BERT", "CNN1D", "GPT", "MLP", "MobileNetV2", "ModelSpec", "ResNet", "ViT",
           "describe_transformed", "get_model", "list_models"]
