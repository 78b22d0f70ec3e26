"""The train state and its (sharded, jitted) initialisation."""

from __future__ import annotations

from typing import Any, Callable

from flax import struct
import jax
import jax.numpy as jnp
import optax

from sift_jax.optim import sparse as sparse_lib
from sift_jax.masks import ops as mask_ops

__all__ = ["TrainState", "make_init_fn", "split_variables"]


@struct.dataclass
class TrainState:
  """Everything a training step reads and writes; a pytree of arrays.

  Attributes:
    step: Optimizer steps taken (int32 scalar).
    params: The model's ``params`` collection (float32).
    model_state: The other mutable collections, e.g. ``{"batch_stats": ...}``
      (``{}`` for models without any).
    opt_state: Optimizer state; holds the masks of a sparse run
      (:func:`sift_jax.get_masks`).
    rng: Raw ``uint32`` PRNG key data (checkpoint friendly); step ``t`` uses
      ``fold_in(rng, t)`` so a resumed run draws the same numbers.
  """

  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any
  rng: jax.Array


def split_variables(variables: Any) -> tuple[Any, dict[str, Any]]:
  """``(params, other collections)`` of a Linen variables dict."""
  variables = dict(variables)
  params = variables.pop("params")
  return params, {k: v for k, v in variables.items()}


def make_init_fn(module: Any, make_tx: Callable[[jax.Array], optax.GradientTransformation], *,
                 input_shape: tuple[int, ...], input_dtype: Any) -> Callable[[jax.Array], TrainState]:
  """A jittable ``init(seed) -> TrainState``.

  ``seed`` is an int32 scalar array, so one compiled init serves every seed.
  Keys: parameters ``fold_in(key, 0)``, masks ``fold_in(key, 1)``, dropout
  and other per-step randomness ``fold_in(key, 2)``. A sparse run's params
  are masked once here; afterwards the sparse optimizer keeps inactive
  weights at exactly zero.

  Args:
    module: A Flax Linen module called as ``module.init(rngs, x, train=False)``.
    make_tx: ``mask_key -> optimizer``: builds the optimizer whose ``init``
      draws the masks from ``mask_key``.
    input_shape: Per-example input shape (no batch dimension).
    input_dtype: Input dtype.
  """

  def init(seed: jax.Array) -> TrainState:
    key = jax.random.key(seed)
    param_key, mask_key, step_key = (jax.random.fold_in(key, i) for i in range(3))
    dummy = jnp.zeros((1, *input_shape), input_dtype)
    variables = module.init({"params": param_key, "dropout": param_key}, dummy, train=False)
    params, model_state = split_variables(variables)
    tx = make_tx(mask_key)
    opt_state = tx.init(params)
    try:
      masks = sparse_lib.get_masks(opt_state)
    except ValueError:
      masks = None
    if masks is not None:
      params = mask_ops.apply_masks(params, masks)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                      opt_state=opt_state, rng=jax.random.key_data(step_key))

  return init
