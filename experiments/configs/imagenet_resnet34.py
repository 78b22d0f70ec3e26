r"""ImageNet ResNet-34: the paper's ImageNet runs as launched on a TPU pod.

The ResNet-18 recipe of ``imagenet_resnet18.py`` (docs/method.md, section 6) with the
34-layer model; same sweep (dense, Sparse Wide and Sparse Parallel at s in
{0.5, 0.75, 0.9} with RigL). On a pod every host runs::

  python -m sift_jax.train --config experiments/configs/imagenet_resnet34.py \
      --workdir /shared/runs/r34_sw90 --jax_distributed \
      --config.model.family=sparse_wide --config.model.sparsity=0.9
"""

import os

from sift_jax.training.sweep import load_config_module

_RESNET18 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_resnet18.py")


def get_config():
  config = load_config_module(_RESNET18).get_config()
  config.model.name = "resnet34_imagenet"
  return config


def get_sweep():
  return load_config_module(_RESNET18).get_sweep()
