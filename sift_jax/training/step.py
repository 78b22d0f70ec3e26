"""Train and eval steps: loss, gradient accumulation, mixed precision.

Both steps are pure functions of ``(state, batch)`` meant to be jitted once per
run shape. Every optimizer step, mask-update steps included, goes through the
same compiled function (the sparse optimizers choose with ``lax.cond``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from sift_jax.optim import sparse as sparse_lib
from sift_jax.training.state import TrainState

__all__ = ["cross_entropy", "make_train_step", "make_eval_step", "TASKS"]

TASKS = ("classification", "lm")


def cross_entropy(logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0
                  ) -> jax.Array:
  """Per-example (per-token) cross-entropy with optional label smoothing.

  Args:
    logits: ``[..., num_classes]``, any float dtype (computed in float32).
    labels: Integer labels ``[...]``.
    label_smoothing: ``alpha``: targets ``(1 - alpha) * onehot + alpha / K``
      (Szegedy et al., 2016).

  Returns:
    float32 ``[...]``.
  """
  logits = logits.astype(jnp.float32)
  if label_smoothing > 0:
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32),
                                  label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _cast_floats(tree: Any, dtype: Any) -> Any:
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _forward(module: Any, params: Any, model_state: dict, x: jax.Array, *, train: bool,
             rng: Optional[jax.Array], compute_dtype: Any) -> tuple[jax.Array, dict]:
  """Applies the model in ``compute_dtype``; returns float32 logits and new model state."""
  if compute_dtype != jnp.float32:
    # f32 master weights, low-precision compute: the cast is differentiated,
    # so gradients come back in float32.
    params = _cast_floats(params, compute_dtype)
    if jnp.issubdtype(x.dtype, jnp.floating):
      x = x.astype(compute_dtype)
  variables = {"params": params, **model_state}
  rngs = {"dropout": rng} if rng is not None else None
  mutable = list(model_state.keys()) if train else False
  if mutable:
    logits, new_state = module.apply(variables, x, train=train, mutable=mutable, rngs=rngs)
    # Running statistics stay float32 whatever the compute dtype.
    new_state = jax.tree.map(lambda new, old: new.astype(old.dtype), dict(new_state), model_state)
  else:
    logits = module.apply(variables, x, train=train, rngs=rngs)
    new_state = model_state
  return logits.astype(jnp.float32), new_state


def make_train_step(module: Any, tx: optax.GradientTransformation, *, input_key: str,
                    target_key: str, learning_rate_fn: Optional[optax.Schedule] = None,
                    label_smoothing: float = 0.0, compute_dtype: Any = jnp.float32,
                    grad_accum_steps: int = 1,
                    micro_batch_sharding: Optional[jax.sharding.NamedSharding] = None
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """A jittable ``train_step(state, batch) -> (state, metrics)``.

  The batch is split into ``grad_accum_steps`` micro-batches (example ``i``
  goes to micro-batch ``i % grad_accum_steps``, so each micro-batch keeps the
  batch's data-parallel sharding) and their gradients are averaged in a
  ``lax.scan``: one optimizer step per call, equal to the full-batch step for
  models without batch statistics. Batch statistics are threaded through the
  micro-batches in order.

  Args:
    module: Flax Linen module (``apply(variables, x, train=..., mutable=...)``).
    tx: The optimizer (sparse or dense).
    input_key: Batch key of the model input.
    target_key: Batch key of the integer targets.
    learning_rate_fn: Logged as ``learning_rate`` when given.
    label_smoothing: Of the training loss.
    compute_dtype: ``jnp.float32`` or ``jnp.bfloat16`` (parameters stay f32).
    grad_accum_steps: Micro-batches per optimizer step.
    micro_batch_sharding: Sharding of one micro-batch's leading axis (the
      data-parallel sharding of the batch).

  Returns:
    ``train_step``; metrics: ``loss`` (the training objective), ``accuracy``
    (top-1, per token for language models), ``grad_norm``, ``learning_rate``
    and, for sparse runs, :func:`sift_jax.sparse_stats`.
  """
  compute_dtype = jnp.dtype(compute_dtype)
  if grad_accum_steps < 1:
    raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")

  def loss_fn(params, model_state, x, y, rng):
    logits, new_state = _forward(module, params, model_state, x, train=True, rng=rng,
                                 compute_dtype=compute_dtype)
    loss = jnp.mean(cross_entropy(logits, y, label_smoothing=label_smoothing))
    accuracy = jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32))
    return loss, (new_state, accuracy)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    x, y = batch[input_key], batch[target_key]
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if grad_accum_steps == 1:
      (loss, (model_state, accuracy)), grads = grad_fn(state.params, state.model_state, x, y, rng)
    else:
      a = grad_accum_steps

      def split(v):
        # [B, ...] -> [A, B/A, ...] with micro-batch j = examples j, j+A, ...:
        # each device's contiguous block of the batch stays on that device.
        v = v.reshape(v.shape[0] // a, a, *v.shape[1:])
        v = jnp.swapaxes(v, 0, 1)
        if micro_batch_sharding is not None:
          v = jax.lax.with_sharding_constraint(
              v, jax.sharding.NamedSharding(micro_batch_sharding.mesh,
                                            jax.sharding.PartitionSpec(None, *micro_batch_sharding.spec)))
        return v

      xs, ys = split(x), split(y)

      def body(carry, inputs):
        grads_sum, loss_sum, acc_sum, model_state = carry
        xi, yi, i = inputs
        (loss_i, (model_state, acc_i)), g = grad_fn(state.params, model_state, xi, yi,
                                                    jax.random.fold_in(rng, i))
        grads_sum = jax.tree.map(jnp.add, grads_sum, g)
        return (grads_sum, loss_sum + loss_i, acc_sum + acc_i, model_state), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), state.model_state)
      (grads, loss, accuracy, model_state), _ = jax.lax.scan(
          body, init, (xs, ys, jnp.arange(a, dtype=jnp.int32)))
      grads = jax.tree.map(lambda g: g / a, grads)
      loss, accuracy = loss / a, accuracy / a

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = dataclasses.replace(state, step=state.step + 1, params=params,
                                    model_state=model_state, opt_state=opt_state)
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": optax.tree.norm(grads)}
    if learning_rate_fn is not None:
      metrics["learning_rate"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
    try:
      stats = sparse_lib.sparse_stats(opt_state)
    except ValueError:
      stats = {}
    metrics.update({f"sparse/{k}": jnp.asarray(v, jnp.float32) for k, v in stats.items()})
    return new_state, metrics

  return train_step


def make_eval_step(module: Any, *, input_key: str, target_key: str,
                   compute_dtype: Any = jnp.float32) -> Callable[[TrainState, dict], dict]:
  """A jittable ``eval_step(state, batch) -> sums``.

  ``batch["weight"]`` (1 for real examples, 0 for padding) lets the last,
  partial eval batch be padded to the fixed batch shape.

  Returns:
    ``{"loss_sum", "correct_sum", "count"}`` summed over weighted examples
    (tokens for language models).
  """
  compute_dtype = jnp.dtype(compute_dtype)

  def eval_step(state: TrainState, batch: dict) -> dict:
    x, y = batch[input_key], batch[target_key]
    logits, _ = _forward(module, state.params, state.model_state, x, train=False, rng=None,
                         compute_dtype=compute_dtype)
    weight = batch["weight"].astype(jnp.float32)
    weight = weight.reshape(weight.shape + (1,) * (y.ndim - 1))
    weight = jnp.broadcast_to(weight, y.shape)
    loss = cross_entropy(logits, y)
    correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    return {"loss_sum": jnp.sum(loss * weight), "correct_sum": jnp.sum(correct * weight),
            "count": jnp.sum(weight)}

  return eval_step
