"""Model registry: the paper's models as :class:`ModelSpec` for any Sparse-IFT member.

``get_model(name, family=..., sparsity=...)`` builds the Linen module, the mask
policy of docs/method.md, section 3 for the transformed parameters, and solves the mask
sparsity that makes the sparse forward MACs equal the dense model's
(:mod:`sift_jax.transformations.isoflop`). The training code then uses::

    spec = get_model("resnet18_cifar", family="sparse_wide", sparsity=0.9)
    variables = spec.init(key)
    densities = spec.layer_densities(variables["params"])   # uniform at the solved s
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from sift_jax import flops
from sift_jax.masks import selection, tree_paths
from sift_jax.masks.densities import check_sparsity, layer_densities
from sift_jax.models import bert as bert_lib
from sift_jax.models import gpt as gpt_lib
from sift_jax.models import mnist1d as mnist1d_lib
from sift_jax.models import mnist1d_nnx as mnist1d_nnx_lib
from sift_jax.models import mobilenet as mobilenet_lib
from sift_jax.models import resnet as resnet_lib
from sift_jax.models import vit as vit_lib
from sift_jax.transformations import isoflop, members
from sift_jax.transformations.transform import transform_with_config
from sift_jax.transformations.family import FamilyConfig

__all__ = ["ModelSpec", "get_model", "list_models", "describe_transformed"]


@dataclasses.dataclass(frozen=True, eq=False)
class ModelSpec:
  """A model, the masks it trains with, and its iso-FLOP sparsity.

  Attributes:
    name: Registry name.
    module: The (transformed) Linen module, called as
      ``module.apply(variables, x, train=bool, mutable=[...])``.
    base_module: The untransformed dense model (the FLOP budget).
    policy: :class:`sift_jax.SparsityPolicy` of ``module``'s parameters.
    family: The Sparse-IFT family.
    nominal_sparsity: The ``s`` that sized the transformation.
    solved_sparsity: The uniform sparsity the masks of ``policy``'s leaves
      must use (iso-FLOP with ``base_module``; for ``family="dense"`` the given
      sparsity, i.e. the sparse baseline at reduced FLOPs).
    solve_method: How ``solved_sparsity`` was obtained
      (:data:`sift_jax.transformations.SOLVE_METHODS`).
    input_shape: Per-example input shape (no batch dimension).
    input_dtype: Input dtype (float32 images/signals, int32 tokens).
    task: The training objective, a key of :data:`sift_jax.training.step.TASKS`:
      ``"classification"``, ``"lm"`` (causal) or ``"masked_lm"``.
    num_classes: Classes (classification), else None.
    vocab_size: Vocabulary size (lm, masked_lm), else None.
    reference: Built with the reference rules.
    round_to: Width/rank granularity.
    info: Widths, ranks (``{layer: r}``), branches (``{layer: n}``), MACs;
      BERT also ``mask_token_id`` and ``task_options`` (the keyword arguments
      of :func:`sift_jax.training.get_task` for its task).
  """

  name: str
  module: nn.Module
  base_module: nn.Module
  policy: selection.SparsityPolicy
  family: str
  nominal_sparsity: float
  solved_sparsity: float
  solve_method: str
  input_shape: tuple[int, ...]
  input_dtype: Any
  task: str
  num_classes: Optional[int]
  vocab_size: Optional[int]
  reference: bool
  round_to: int
  info: Mapping[str, Any]
  _cache: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

  def example_input(self, batch_size: int = 1) -> jax.ShapeDtypeStruct:
    """Abstract input batch of ``batch_size`` examples."""
    return jax.ShapeDtypeStruct((int(batch_size),) + tuple(self.input_shape), self.input_dtype)

  def init(self, key: jax.Array, batch_size: int = 1) -> Any:
    """Initialises the variables (``params``, and ``batch_stats`` where used)."""
    x = jnp.zeros((int(batch_size),) + tuple(self.input_shape), self.input_dtype)
    return self.module.init(key, x, train=False)

  def _trace(self) -> None:
    if "macs" not in self._cache:
      trace = flops.trace_macs(self.module, self.example_input(), train=False)
      self._cache.update(macs=trace.macs, variables=trace.variables, output=trace.output)

  def abstract_variables(self) -> Any:
    """The variables as ``jax.ShapeDtypeStruct`` (no compute; cached)."""
    self._trace()
    return self._cache["variables"]

  def abstract_output(self) -> Any:
    """The model's output for :meth:`example_input` as ``jax.ShapeDtypeStruct`` (cached)."""
    self._trace()
    return self._cache["output"]

  def mac_count(self) -> flops.MacCount:
    """Per-row dense MACs of ``module`` for one example (batch 1; cached)."""
    self._trace()
    return self._cache["macs"]

  @property
  def base_dense_macs(self) -> int:
    """Dense MACs of the untransformed model for one example."""
    if "base_dense_macs" not in self._cache:
      if not members.get_member(self.family).transforms:
        self._cache["base_dense_macs"] = self.mac_count().total
      else:
        self._cache["base_dense_macs"] = _dense_macs(self.base_module, self.example_input())
    return self._cache["base_dense_macs"]

  def layer_densities(self, params: Any, distribution: str = "uniform") -> Any:
    """Per-leaf densities at the solved sparsity over the policy's sparse leaves."""
    return layer_densities(params, self.solved_sparsity, distribution=distribution,
                           policy=self.policy)


_BASE_MACS: dict[tuple, int] = {}


def _dense_macs(module: nn.Module, x: jax.ShapeDtypeStruct) -> int:
  """Dense MACs of an untransformed model, cached by its configuration."""
  key = (repr(module), tuple(x.shape), str(x.dtype))
  if key not in _BASE_MACS:
    _BASE_MACS[key] = flops.trace_macs(module, x, train=False).macs.total
  return _BASE_MACS[key]


def describe_transformed(params: Any) -> dict[str, dict[str, int]]:
  """Reads the members' sizes off a (transformed) parameter tree.

  Returns:
    ``{"ranks": {layer: r}, "branches": {layer: n}}`` where ``layer`` is the
    path of a Factorized/Doped layer (rank = outputs of its ``U``) or of a
    Parallel layer (number of ``branch_{i}`` kernels).
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  ranks: dict[str, int] = {}
  branches: dict[str, int] = {}
  for kp, leaf in flat:
    path = tree_paths.path_str(kp)
    m = re.fullmatch(r"(.*)/U/kernel", path)
    if m:
      ranks[m.group(1)] = int(leaf.shape[-1])
    m = re.fullmatch(r"(.*)/branch_(\d+)/kernel", path)
    if m:
      branches[m.group(1)] = max(branches.get(m.group(1), 0), int(m.group(2)) + 1)
  return {"ranks": ranks, "branches": branches}


# ----------------------------------------------------------------------------- builders


@dataclasses.dataclass(frozen=True)
class _Built:
  module: nn.Module
  input_shape: tuple[int, ...]
  input_dtype: Any
  task: str
  num_classes: Optional[int]
  vocab_size: Optional[int]
  dense: tuple[str, ...]  # policy regexes of leaves that stay dense
  widths: Mapping[str, Any]
  sparse: tuple[str, ...] = ()  # policy regexes of the sparse leaves (empty: the default rule)
  extra_info: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _image_shape(name: str, input_shape: Optional[tuple[int, ...]], default: tuple[int, ...]
                 ) -> tuple[int, ...]:
  """``(H, W, C)`` of a 2-D convnet: the data's, or the model's default."""
  if input_shape is None:
    return default
  if len(input_shape) != 3:
    raise ValueError(f"{name} takes images of shape (height, width, channels), got input_shape="
                     f"{tuple(input_shape)}")
  return tuple(input_shape)


def _resnet_builder(stage_sizes, *, bottleneck: bool, cifar: bool, default_classes: int):
  def build(cfg: FamilyConfig, num_classes: Optional[int], input_shape, kw: dict) -> _Built:
    n_cls = default_classes if num_classes is None else num_classes
    base = (64, 128, 256, 512)
    if cfg.member.widens and cfg.reference:
      # Reference (Sparse Wide): base width int(64 * sqrt(round(1/d))), stages 1x, 2x, 4x, 8x of it.
      w0 = cfg.width(64, what="base width")
      widths = tuple(w0 * m for m in (1, 2, 4, 8))
    else:
      widths = tuple(cfg.width(w, what=f"stage {i + 1} width") for i, w in enumerate(base))
    if cfg.family == "sparse_parallel" and cfg.reference:
      # Reference Parallel: a BatchNorm per branch; ImageNet also a ReLU inside each branch.
      cfg = dataclasses.replace(cfg, parallel_norm=True,
                                parallel_activation=None if cifar else nn.relu)
    # The reference zero-initialises the last BatchNorm only of its plain blocks (dense, wide):
    # those of members whose layer is the template itself.
    zero_init = not cfg.reference or cfg.member.layer is None
    module = resnet_lib.ResNet(stage_sizes=tuple(stage_sizes), widths=widths, stem_width=widths[0],
                               num_classes=n_cls, bottleneck=bottleneck, cifar_stem=cifar, sift=cfg,
                               zero_init_residual=zero_init)
    shape = _image_shape("ResNet", input_shape, (32, 32, 3) if cifar else (224, 224, 3))
    return _Built(module, shape, jnp.float32, "classification", n_cls, None,
                  (r"^stem/", r"^head/"), {"stem": widths[0], "stages": list(widths)})
  return build


def _mobilenet_build(cfg: FamilyConfig, num_classes: Optional[int], input_shape, kw: dict
                     ) -> _Built:
  n_cls = 1000 if num_classes is None else num_classes
  stem = cfg.width(32, what="stem width")
  blocks = tuple(cfg.width(c, what=f"stage {i} width")
                 for i, (_, c, _, _) in enumerate(mobilenet_lib.INVERTED_RESIDUAL_SETTING))
  last = cfg.width(1280, what="last width")
  module = mobilenet_lib.MobileNetV2(num_classes=n_cls, stem_width=stem, block_widths=blocks,
                                     last_width=last, sift=cfg)
  return _Built(module, _image_shape("MobileNetV2", input_shape, (224, 224, 3)), jnp.float32,
                "classification", n_cls, None, (r"^stem/", r"^head/", r"/dw/"),
                {"stem": stem, "stages": list(blocks), "last": last})


def _gpt_builder(*, depth: int, width: int, heads: int, context: int, vocab: int):
  def build(cfg: FamilyConfig, num_classes: Optional[int], input_shape, kw: dict) -> _Built:
    if num_classes is not None:
      raise ValueError(f"GPT models are language models; num_classes={num_classes!r} does not "
                       "apply (use vocab_size=)")
    ctx = int(kw.get("context", context))
    if input_shape is not None:
      if len(input_shape) != 1 or ("context" in kw and int(input_shape[0]) != ctx):
        raise ValueError(f"GPT models take token sequences of shape (context,), got input_shape="
                         f"{tuple(input_shape)} (context={kw.get('context')!r})")
      ctx = int(input_shape[0])
    voc = int(kw.get("vocab_size", vocab))
    if ctx < 1 or voc < 1:
      raise ValueError(f"context and vocab_size must be positive, got {ctx}, {voc}")
    head_dim = cfg.width(width // heads, what="attention head_dim")
    mlp = cfg.width(4 * width, what="MLP width")
    module = gpt_lib.GPT(vocab_size=voc, context=ctx, width=width, depth=depth, num_heads=heads,
                         head_dim=head_dim, mlp_width=mlp, sift=cfg)
    return _Built(module, (ctx,), jnp.int32, "lm", None, voc,
                  (r"^embed/", r"^pos_embed$", r"^head/"),
                  {"width": width, "head_dim": head_dim, "attention_width": heads * head_dim,
                   "mlp_width": mlp})
  return build


# The transformed, sparse layers of the encoder blocks (ViT, BERT); explicit, so the policy does
# not depend on the default selection rule.
_ENCODER_SPARSE = (r"^block_\d+/(attn/(query|key|value|out)|mlp/fc[12])/(.+/)?kernel$",)
# Sparse Wide keeps the width of the layers that write the residual stream and of the
# embedding and head layers.
_ENCODER_OUTPUT_LAYERS = (r"^block_\d+/attn/out$", r"^block_\d+/mlp/fc2$", r"^patch_embed$",
                          r"^head$", r"^mlm/")


def _encoder_module(dense_model: nn.Module, cfg: FamilyConfig) -> nn.Module:
  """The dense encoder, or it under ``cfg``'s member through :func:`sift_jax.transform`.

  The blocks use Flax's own attention (whose projections no model code can
  wrap), so the member replaces the layers by interception: those the policy
  makes sparse, or under Sparse Wide all but :data:`_ENCODER_OUTPUT_LAYERS`.
  """
  if not cfg.member.transforms:
    return dense_model
  return transform_with_config(dense_model, cfg,
                               policy=selection.SparsityPolicy(sparse=_ENCODER_SPARSE),
                               output_layers=_ENCODER_OUTPUT_LAYERS)


def _encoder_sizes(name: str, kw: dict, *, width: int, depth: int, heads: int
                   ) -> tuple[int, int, int, int]:
  """``(width, depth, heads, mlp_width)``: the model's, or the overrides of ``kw``."""
  w = int(kw.get("width", width))
  d = int(kw.get("depth", depth))
  h = int(kw.get("num_heads", heads))
  m = int(kw.get("mlp_width", 4 * w))
  if min(w, d, h, m) < 1 or w % h:
    raise ValueError(f"{name}: width={w}, depth={d}, num_heads={h}, mlp_width={m} must be "
                     "positive with width divisible by num_heads")
  return w, d, h, m


def _vit_builder(*, width: int, depth: int, heads: int):
  def build(cfg: FamilyConfig, num_classes: Optional[int], input_shape, kw: dict) -> _Built:
    n_cls = 1000 if num_classes is None else num_classes
    shape = _image_shape("ViT", input_shape, (224, 224, 3))
    patch = int(kw.get("patch_size", 16))
    if patch < 1 or shape[0] % patch or shape[1] % patch:
      raise ValueError(f"ViT: images of shape {shape} cannot be cut into patches of "
                       f"patch_size={patch} (height and width must be multiples of it)")
    w, d, h, m = _encoder_sizes("ViT", kw, width=width, depth=depth, heads=heads)
    dense = vit_lib.ViT(num_classes=n_cls, patch_size=patch, width=w, depth=d, num_heads=h,
                        mlp_width=m, dropout_rate=float(kw.get("dropout_rate", 0.0)))
    widths = {"width": w, "head_dim": cfg.width(w // h, what="attention head_dim"),
              "mlp_width": cfg.width(m, what="MLP width"), "patch_size": patch,
              "num_patches": (shape[0] // patch) * (shape[1] // patch)}
    return _Built(_encoder_module(dense, cfg), shape, jnp.float32, "classification", n_cls, None,
                  (r"^patch_embed/", r"^cls_token$", r"^pos_embed$", r"^head/"), widths,
                  sparse=_ENCODER_SPARSE)
  return build


def _bert_builder(*, width: int, depth: int, heads: int, context: int, vocab: int):
  def build(cfg: FamilyConfig, num_classes: Optional[int], input_shape, kw: dict) -> _Built:
    if num_classes is not None:
      raise ValueError(f"BERT models are masked language models; num_classes={num_classes!r} "
                       "does not apply (use vocab_size=)")
    ctx = int(kw.get("context", context))
    if input_shape is not None:
      if len(input_shape) != 1 or ("context" in kw and int(input_shape[0]) != ctx):
        raise ValueError(f"BERT models take token sequences of shape (context,), got "
                         f"input_shape={tuple(input_shape)} (context={kw.get('context')!r})")
      ctx = int(input_shape[0])
    voc = int(kw.get("vocab_size", vocab))
    if ctx < 1 or voc < 1:
      raise ValueError(f"context and vocab_size must be positive, got {ctx}, {voc}")
    w, d, h, m = _encoder_sizes("BERT", kw, width=width, depth=depth, heads=heads)
    dense = bert_lib.BERT(vocab_size=voc, context=ctx, width=w, depth=d, num_heads=h, mlp_width=m,
                          dropout_rate=float(kw.get("dropout_rate", 0.1)),
                          tie_embeddings=bool(kw.get("tie_embeddings", True)))
    widths = {"width": w, "head_dim": cfg.width(w // h, what="attention head_dim"),
              "mlp_width": cfg.width(m, what="MLP width")}
    return _Built(_encoder_module(dense, cfg), (ctx,), jnp.int32, "masked_lm", None, voc,
                  (r"^embed/", r"^pos_embed$", r"^mlm/"), widths, sparse=_ENCODER_SPARSE,
                  extra_info={"mask_token_id": voc,
                              "task_options": {"vocab_size": voc, "mask_token_id": voc}})
  return build


def _mlp_dense_layers(cfg: FamilyConfig) -> tuple[str, ...]:
  """Policy regexes of the MLP layers that stay dense.

  The stem and the head are dense and untransformed (docs/method.md), except
  under Sparse Wide: it widens the stem's output by ``k = sqrt(1/d)``, and a
  dense stem would then cost ``k`` times its dense MACs, more than the whole
  budget once the input is wide (64 pixels at s = 0.9, 784 at any s). So under
  Sparse Wide (any widening member) the stem keeps its input width, has ``k``
  times the outputs and is masked at the solved sparsity like the hidden
  layers: it costs ``d * k = sqrt(d)`` of its dense MACs. The head (``k``
  times the inputs, fixed outputs) stays dense, as in the ResNets.
  """
  if cfg.member.widens:
    return (r"^head/",)
  return (r"^stem/", r"^head/")


def _mlp_build(cfg: FamilyConfig, num_classes: Optional[int], input_shape, kw: dict) -> _Built:
  n_cls = 10 if num_classes is None else num_classes
  hidden = tuple(int(h) for h in kw.get("hidden", (256, 256, 256)))
  if len(hidden) < 2:
    raise ValueError(f"mlp_mnist1d needs at least two hidden widths, got hidden={hidden}")
  widths = tuple(cfg.width(h, what=f"hidden width {i}") for i, h in enumerate(hidden))
  module = mnist1d_lib.MLP(hidden=widths, num_classes=n_cls, sift=cfg)
  # Any input shape: the MLP flattens it.
  shape = (40,) if input_shape is None else tuple(input_shape)
  return _Built(module, shape, jnp.float32, "classification", n_cls, None,
                _mlp_dense_layers(cfg), {"hidden": list(widths)})


def _mlp_nnx_build(cfg: FamilyConfig, num_classes: Optional[int], input_shape, kw: dict) -> _Built:
  """The NNX MLP, converted to Linen and transformed by :func:`sift_jax.transform`.

  The member replaces the layers that the policy makes sparse (``fc_{i}``;
  under Sparse Wide every layer but ``head`` is widened), with the drop-in
  transform's LayerNorms inside the members; ``doped_low_rank_init`` keeps
  the transform's default.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sift_jax.transformations import nnx_bridge  # pylint: disable=g-import-not-at-top
  from sift_jax.transformations.transform import transform  # pylint: disable=g-import-not-at-top
  n_cls = 10 if num_classes is None else num_classes
  hidden = tuple(int(h) for h in kw.get("hidden", (256, 256, 256)))
  if len(hidden) < 2:
    raise ValueError(f"mlp_nnx needs at least two hidden widths, got hidden={hidden}")
  shape = (40,) if input_shape is None else tuple(input_shape)
  in_features = 1
  for d in shape:
    in_features *= int(d)
  model = mnist1d_nnx_lib.MLPNnx(in_features, hidden, n_cls, rngs=nnx.Rngs(0))
  dense = _mlp_dense_layers(cfg)
  module: nn.Module = nnx_bridge.as_linen(model, keep_values=False)
  if cfg.member.transforms:
    module = transform(module, family=cfg.family, sparsity=cfg.sparsity, reference=cfg.reference,
                       round_to=cfg.round_to, factorized_mid=cfg.factorized_mid,
                       parallel_norm=cfg.parallel_norm,
                       policy=selection.SparsityPolicy(dense=dense), output_layers=("^head$",))
  widths = [cfg.width(h, what=f"hidden width {i}") for i, h in enumerate(hidden)]
  return _Built(module, shape, jnp.float32, "classification", n_cls, None, dense,
                {"hidden": widths})


def _signal_shape(input_shape: Optional[tuple[int, ...]]) -> tuple[int, int]:
  """``(length, channels)`` of the 1-D CNN: signals as they are, images scanned row by row."""
  if input_shape is None:
    return (40, 1)
  if len(input_shape) == 1:
    return (int(input_shape[0]), 1)
  if len(input_shape) == 2:
    return int(input_shape[0]), int(input_shape[1])
  if len(input_shape) == 3:
    return (int(input_shape[0]) * int(input_shape[1]), int(input_shape[2]))
  raise ValueError(f"cnn_mnist1d takes signals (length,), (length, channels) or images (height, "
                   f"width, channels), got input_shape={tuple(input_shape)}")


def _cnn_build(cfg: FamilyConfig, num_classes: Optional[int], input_shape, kw: dict) -> _Built:
  n_cls = 10 if num_classes is None else num_classes
  channels = tuple(int(c) for c in kw.get("channels", (32, 64, 64)))
  strides = tuple(int(s) for s in kw.get("strides", (1, 2, 2)))
  if len(channels) != len(strides) or not channels:
    raise ValueError(f"cnn_mnist1d: channels {channels} and strides {strides} must be non-empty "
                     "and of equal length")
  stem = cfg.width(int(kw.get("stem_width", 32)), what="stem width")
  widths = tuple(cfg.width(c, what=f"conv_{i} width") for i, c in enumerate(channels))
  module = mnist1d_lib.CNN1D(stem_width=stem, channels=widths, strides=strides, num_classes=n_cls,
                             sift=cfg)
  return _Built(module, _signal_shape(input_shape), jnp.float32, "classification", n_cls, None,
                (r"^stem/", r"^head/"), {"stem": stem, "channels": list(widths)})


@dataclasses.dataclass(frozen=True)
class _Entry:
  build: Callable[[FamilyConfig, Optional[int], Optional[tuple[int, ...]], dict], _Built]
  conv: bool  # convolutional: BN+ReLU between Factorized's U and V by default
  kwargs: tuple[str, ...] = ()
  # Kind of the norms inside the members (Parallel branches, Factorized mid): BatchNorm keeps
  # Parallel foldable into one kernel at inference (RepVGG); transformers use LayerNorm.
  norm: str = "batch"


_ENCODER_KWARGS = ("width", "depth", "num_heads", "mlp_width", "dropout_rate")
_VIT_KWARGS = ("patch_size",) + _ENCODER_KWARGS
_BERT_KWARGS = ("context", "vocab_size", "tie_embeddings") + _ENCODER_KWARGS

_MODELS: dict[str, _Entry] = {
    "resnet18_cifar": _Entry(_resnet_builder((2, 2, 2, 2), bottleneck=False, cifar=True,
                                             default_classes=100), True),
    "resnet34_cifar": _Entry(_resnet_builder((3, 4, 6, 3), bottleneck=False, cifar=True,
                                             default_classes=100), True),
    "resnet18_imagenet": _Entry(_resnet_builder((2, 2, 2, 2), bottleneck=False, cifar=False,
                                                default_classes=1000), True),
    "resnet34_imagenet": _Entry(_resnet_builder((3, 4, 6, 3), bottleneck=False, cifar=False,
                                                default_classes=1000), True),
    "resnet50_imagenet": _Entry(_resnet_builder((3, 4, 6, 3), bottleneck=True, cifar=False,
                                                default_classes=1000), True),
    "mobilenet_v2": _Entry(_mobilenet_build, True),
    "gpt3_small": _Entry(_gpt_builder(depth=12, width=768, heads=12, context=2048, vocab=50257),
                         False, ("context", "vocab_size"), "layer"),
    "gpt_mini": _Entry(_gpt_builder(depth=4, width=128, heads=4, context=128, vocab=256), False,
                       ("context", "vocab_size"), "layer"),
    "gpt_tiny": _Entry(_gpt_builder(depth=2, width=64, heads=4, context=64, vocab=256), False,
                       ("context", "vocab_size"), "layer"),
    "vit_tiny": _Entry(_vit_builder(width=192, depth=12, heads=3), False, _VIT_KWARGS, "layer"),
    "vit_small": _Entry(_vit_builder(width=384, depth=12, heads=6), False, _VIT_KWARGS, "layer"),
    "bert_mini": _Entry(_bert_builder(width=256, depth=4, heads=4, context=512, vocab=30522),
                        False, _BERT_KWARGS, "layer"),
    "bert_base": _Entry(_bert_builder(width=768, depth=12, heads=12, context=512, vocab=30522),
                        False, _BERT_KWARGS, "layer"),
    "mlp_mnist1d": _Entry(_mlp_build, False, ("hidden",)),
    "mlp_nnx": _Entry(_mlp_nnx_build, False, ("hidden",), "layer"),
    "cnn_mnist1d": _Entry(_cnn_build, True, ("channels", "strides", "stem_width")),
}


# Keywords every model accepts (see get_model).
_MEMBER_KWARGS = ("factorized_mid", "parallel_norm", "doped_low_rank_init")


def list_models() -> tuple[str, ...]:
  """Names accepted by :func:`get_model`."""
  return tuple(_MODELS)


def get_model(name: str, *, family: str = "dense", sparsity: float = 0.0, reference: bool = False,
              round_to: int = 1, num_classes: Optional[int] = None,
              input_shape: Optional[tuple[int, ...]] = None, **kw: Any) -> ModelSpec:
  """Builds a registered model under a Sparse-IFT member and solves its iso-FLOP sparsity.

  Args:
    name: One of :func:`list_models`.
    family: ``"dense"`` or a member (:data:`sift_jax.transformations.FAMILIES`, or one
      added with :func:`sift_jax.transformations.register_member`).
    sparsity: Nominal sparsity ``s`` in [0, 1). For ``"dense"`` it is the
      sparsity of the plain (non-iso-FLOP) sparse baseline.
    reference: Use the authors' PyTorch rules (ranks, widths, Parallel norms,
      Doped masking of U and V, no re-solve except Sparse Wide's bisection).
    round_to: Round widths and ranks to this multiple (paper rules).
    num_classes: Classifier outputs (default: the dataset's; not for GPT or BERT).
    input_shape: Per-example shape of the data (no batch dimension); the
      training loop passes the dataset's. ``None``: the model's own default
      (CIFAR 32x32x3, ImageNet and ViT 224x224x3, MNIST-1D 40). The MLP takes any
      shape (it flattens); the 1-D CNN takes ``(L,)``, ``(L, C)`` or an image
      ``(H, W, C)`` scanned row by row as ``(H*W, C)``; the 2-D convnets take
      ``(H, W, C)``, so do the ViTs; GPTs and BERTs ``(context,)``. The returned ``input_shape`` is the
      model's view of the data (same number of elements).
    **kw: ``factorized_mid`` (``"linear"``, ``"norm"``, ``"norm_relu"``;
      default ``"norm_relu"`` for convolutional models as in the reference
      CIFAR configuration, ``"linear"`` otherwise), ``parallel_norm``
      (default True: every Sparse Parallel branch gets its own norm, BatchNorm
      in the convnets and the MLP, LayerNorm in the GPTs, in place of the
      norm that follows the layer where there is one; False: the paper's
      plain sum), ``doped_low_rank_init`` (``"step_matched"``, default, or
      ``"template"``: see :class:`sift_jax.transformations.FamilyConfig`) and
      model-specific options:
      GPT ``context``, ``vocab_size``; ViT ``patch_size`` (default 16;
      the image size is ``input_shape``'s), BERT ``context``, ``vocab_size``,
      ``tie_embeddings``, and both ``width``, ``depth``, ``num_heads``,
      ``mlp_width`` (default ``4 * width``), ``dropout_rate`` (ViT 0, BERT
      0.1) for smaller variants; ``mlp_mnist1d`` and ``mlp_nnx`` (the same
      MLP written in Flax NNX, converted to Linen) ``hidden``;
      ``cnn_mnist1d`` ``channels``, ``strides``, ``stem_width``.

  Returns:
    A :class:`ModelSpec`.

  Raises:
    ValueError: unknown model, family or keyword; sparsity outside [0, 1);
      a width or rank whose exact size rounds to zero (``round_to`` itself
      never rounds a positive size to zero: it gives at least one multiple);
      a budget no sparsity can meet (the message names the largest dense
      parts, e.g. Sparse Doped's dense ``U V`` at ``round_to=128``).
  """
  if name not in _MODELS:
    raise ValueError(f"unknown model {name!r}; expected one of {list_models()}")
  entry = _MODELS[name]
  member = members.get_member(family)
  s = check_sparsity(sparsity)
  unknown = sorted(set(kw) - set(entry.kwargs) - set(_MEMBER_KWARGS))
  if unknown:
    raise ValueError(f"{name}: unknown keyword argument(s) {unknown}; accepted: "
                     f"{sorted(set(entry.kwargs) | set(_MEMBER_KWARGS))}")
  if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) < 1):
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
  mid = kw.pop("factorized_mid", "norm_relu" if entry.conv else "linear")
  parallel_norm = kw.pop("parallel_norm", True)
  if not isinstance(parallel_norm, bool):
    raise ValueError(f"{name}: parallel_norm must be True or False, got {parallel_norm!r}")
  if reference and family == "sparse_parallel" and not parallel_norm and entry.conv:
    raise ValueError(f"{name}: reference=True builds the reference's per-branch BatchNorms; "
                     "parallel_norm=False contradicts it")
  doped_init = kw.pop("doped_low_rank_init", "step_matched")
  norm = entry.norm
  cfg = FamilyConfig(family=family, sparsity=s, reference=reference, round_to=round_to,
                     factorized_mid=mid, norm=norm, parallel_norm=parallel_norm,
                     doped_low_rank_init=doped_init)
  if input_shape is not None:
    input_shape = tuple(input_shape)
    if not input_shape or any(isinstance(d, bool) or int(d) < 1 for d in input_shape):
      raise ValueError(f"{name}: input_shape must be a non-empty tuple of positive sizes, got "
                       f"{input_shape!r}")
    input_shape = tuple(int(d) for d in input_shape)
  built = entry.build(cfg, num_classes, input_shape, kw)
  base = entry.build(FamilyConfig(norm=norm, factorized_mid=mid), num_classes, input_shape,
                     kw).module
  dense = built.dense + member.dense_regexes(reference)  # e.g. Sparse Doped's U V (paper)
  policy = selection.SparsityPolicy(sparse=built.sparse, dense=dense)
  x = jax.ShapeDtypeStruct((1,) + tuple(built.input_shape), built.input_dtype)
  info: dict[str, Any] = {"widths": dict(built.widths), "factorized_mid": mid,
                          **built.extra_info}
  cache: dict[str, Any] = {}
  method = member.solve_method(reference)
  if not member.transforms:
    solved = s
  else:
    macs, variables, output = flops.trace_macs(built.module, x, train=False)
    budget = _dense_macs(base, x)
    sol = isoflop.solve_sparsity(macs, variables["params"], policy, base_dense_macs=budget,
                                 nominal_sparsity=s, method=method,
                                 what=f"{name} ({family}, s={s})")
    solved = sol.solved_sparsity
    cache.update(variables=variables, macs=macs, output=output, base_dense_macs=budget)
    info.update(describe_transformed(variables["params"]))
    info.update(base_dense_macs=budget, dense_macs=sol.dense_macs, sparse_macs=sol.sparse_macs,
                iso_flop_ratio=sol.iso_flop_ratio)
  return ModelSpec(name=name, module=built.module, base_module=base, policy=policy, family=family,
                   nominal_sparsity=s, solved_sparsity=float(solved), solve_method=method,
                   input_shape=tuple(built.input_shape), input_dtype=built.input_dtype,
                   task=built.task, num_classes=built.num_classes, vocab_size=built.vocab_size,
                   reference=bool(reference), round_to=int(round_to), info=info, _cache=cache)
