"""Train and eval steps: training objectives, gradient accumulation, mixed precision.

Both steps are pure functions of ``(state, batch)`` meant to be jitted once per
run shape. Every optimizer step, mask-update steps included, goes through the
same compiled function (the sparse optimizers choose with ``lax.cond``).

The objective is a :class:`Task` from the table :data:`TASKS`
(:func:`get_task`): ``"classification"`` (images to labels), ``"lm"`` (causal
next-token prediction) and ``"masked_lm"`` (BERT's masked-token prediction,
Devlin et al., 2019: the inputs are corrupted inside the jitted step by
:func:`mask_tokens` from the step's rng and the loss and accuracy count only
the masked positions).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from sift_jax.optim import sparse as sparse_lib
from sift_jax.training.state import TrainState

__all__ = ["cross_entropy", "make_train_step", "make_eval_step", "TASKS", "Task", "get_task",
           "mask_tokens", "MaskedTokens", "masked_lm_counts", "EVAL_MASK_SEED"]

# Key of the masking of every eval batch of a masked-LM run: evaluations of
# one run (and of runs that differ only in their seed) score the same positions.
EVAL_MASK_SEED = 0
# fold_in tag of the task's key off the step's key.
_PREPARE_TAG = 0x6D6C6D


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


class MaskedTokens(NamedTuple):
  """Output of :func:`mask_tokens`.

  Attributes:
    inputs: The corrupted token ids (the model's input).
    targets: The original token ids (the labels).
    predict: bool ``[..., L]``, True at the positions the loss counts.
  """

  inputs: jax.Array
  targets: jax.Array
  predict: jax.Array


def masked_lm_counts(seq_len: int, *, mask_rate: float = 0.15) -> tuple[int, int, int]:
  """The per-sequence counts of :func:`mask_tokens`.

  ``n = max(1, round(mask_rate * seq_len))`` positions are predicted; of those
  ``round(0.8 n)`` become the mask id, ``round(0.1 n)`` a random token and the
  rest keep their token (BERT's 80/10/10 rule, made exact per sequence).

  Returns:
    ``(n, n_mask, n_random)``; ``n - n_mask - n_random`` positions keep their token.
  """
  if not 0.0 < float(mask_rate) <= 1.0:
    raise ValueError(f"mask_rate must be in (0, 1], got {mask_rate!r}")
  n = max(1, int(round(float(mask_rate) * int(seq_len))))
  n_mask = int(round(0.8 * n))
  n_random = min(n - n_mask, int(round(0.1 * n)))
  return n, n_mask, n_random


def mask_tokens(rng: jax.Array, tokens: jax.Array, *, vocab_size: int, mask_token_id: int,
                mask_rate: float = 0.15) -> MaskedTokens:
  """BERT's masked-LM corruption of a batch of token ids (jittable, deterministic in ``rng``).

  In every sequence (last axis, length ``L``) exactly ``n`` positions are
  chosen uniformly without replacement (:func:`masked_lm_counts`), as
  BERT's pre-training data does (Devlin et al., 2019, section 3.1); of the
  chosen positions, in random order, the first 80% are replaced by
  ``mask_token_id``, the next 10% by a token drawn uniformly from
  ``[0, vocab_size)`` and the last 10% keep their token. Exact counts instead of
  per-position coin flips keep the number of predicted tokens, and so the
  loss's normaliser, the same in every step.

  Args:
    rng: PRNG key (the step's key in the training step).
    tokens: Integer ids ``[..., L]`` in ``[0, vocab_size)``.
    vocab_size: Number of real tokens (random replacements are drawn from them).
    mask_token_id: Id of the mask token (the BERT registry models reserve
      ``vocab_size``).
    mask_rate: Fraction of each sequence to predict.

  Returns:
    :class:`MaskedTokens`.
  """
  tokens = jnp.asarray(tokens)
  seq_len = int(tokens.shape[-1])
  n, n_mask, n_random = masked_lm_counts(seq_len, mask_rate=mask_rate)
  k_order, k_random = jax.random.split(rng)
  # rank[i] = place of position i in a uniformly random order of the sequence.
  noise = jax.random.uniform(k_order, tokens.shape)
  rank = jnp.argsort(jnp.argsort(noise, axis=-1), axis=-1)
  predict = rank < n
  to_mask = rank < n_mask
  to_random = (rank >= n_mask) & (rank < n_mask + n_random)
  random_tokens = jax.random.randint(k_random, tokens.shape, 0, int(vocab_size), dtype=tokens.dtype)
  inputs = jnp.where(to_mask, jnp.asarray(mask_token_id, tokens.dtype),
                     jnp.where(to_random, random_tokens, tokens))
  return MaskedTokens(inputs=inputs, targets=tokens, predict=predict)


# prepare(batch, rng) -> (model input, targets, weights or None): None weighs every target alike.
Prepare = Callable[[dict, jax.Array], tuple[jax.Array, jax.Array, Optional[jax.Array]]]


class Task(NamedTuple):
  """A training objective: which batch entries it reads and how it builds the targets.

  Attributes:
    name: The task's name in :data:`TASKS`.
    data_task: The kind of dataset it trains on (``DatasetInfo.task``:
      ``"classification"`` or ``"lm"``).
    batch_keys: The batch entries it reads (split into micro-batches).
    prepare: ``prepare(batch, rng) -> (inputs, targets, weights)``;
      ``weights`` (float, the targets' shape) weighs the per-target losses,
      None weighs them alike (a plain mean).
  """

  name: str
  data_task: str
  batch_keys: tuple[str, ...]
  prepare: Prepare


def _classification_task(**options: Any) -> Task:
  _no_options("classification", options)
  return Task("classification", "classification", ("image", "label"),
              lambda batch, rng: (batch["image"], batch["label"], None))


def _causal_lm_task(**options: Any) -> Task:
  _no_options("lm", options)
  return Task("lm", "lm", ("inputs", "targets"),
              lambda batch, rng: (batch["inputs"], batch["targets"], None))


def _masked_lm_task(*, vocab_size: Optional[int] = None, mask_token_id: Optional[int] = None,
                    mask_rate: float = 0.15) -> Task:
  if vocab_size is None or mask_token_id is None:
    raise ValueError(f"task 'masked_lm' needs vocab_size and mask_token_id, got "
                     f"vocab_size={vocab_size!r}, mask_token_id={mask_token_id!r}")
  masked_lm_counts(1, mask_rate=mask_rate)  # validates mask_rate

  def prepare(batch, rng):
    m = mask_tokens(rng, batch["inputs"], vocab_size=int(vocab_size),
                    mask_token_id=int(mask_token_id), mask_rate=mask_rate)
    return m.inputs, m.targets, m.predict.astype(jnp.float32)

  # Only the inputs are read: the targets are the uncorrupted inputs.
  return Task("masked_lm", "lm", ("inputs",), prepare)


def _no_options(name: str, options: dict) -> None:
  if options:
    raise ValueError(f"task {name!r} takes no options, got {sorted(options)}")


# name -> builder(**options) -> Task; a model's ModelSpec.task names its entry.
TASKS: dict[str, Callable[..., Task]] = {
    "classification": _classification_task,
    "lm": _causal_lm_task,
    "masked_lm": _masked_lm_task,
}


def get_task(name: str, **options: Any) -> Task:
  """The :class:`Task` ``name`` of :data:`TASKS`, built with ``options``.

  Args:
    name: ``"classification"``, ``"lm"`` (causal) or ``"masked_lm"``.
    **options: ``masked_lm``: ``vocab_size``, ``mask_token_id``, ``mask_rate``.

  Raises:
    ValueError: for an unknown name (listing the known ones) or bad options.
  """
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; expected one of {tuple(TASKS)}")
  return TASKS[name](**options)


def _task_for_keys(input_key: str, target_key: str) -> Task:
  """A plain task reading ``input_key`` and ``target_key`` (the keyword form of the steps)."""
  kind = "lm" if target_key == "targets" else "classification"
  return Task(kind, kind, (input_key, target_key),
              lambda batch, rng: (batch[input_key], batch[target_key], None))


def _weighted_loss(logits: jax.Array, targets: jax.Array, weights: Optional[jax.Array], *,
                   label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """``(loss, accuracy)``: means over the targets, weighted by ``weights`` when given."""
  ce = cross_entropy(logits, targets, label_smoothing=label_smoothing)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  if weights is None:
    return jnp.mean(ce), jnp.mean(correct)
  total = jnp.maximum(jnp.sum(weights), 1.0)
  return jnp.sum(ce * weights) / total, jnp.sum(correct * weights) / total


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


def make_train_step(module: Any, tx: optax.GradientTransformation, *,
                    input_key: Optional[str] = None, target_key: Optional[str] = None,
                    task: Optional[Task] = None, learning_rate_fn: Optional[optax.Schedule] = None,
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
    input_key: Batch key of the model input (without ``task``).
    target_key: Batch key of the integer targets (without ``task``).
    task: The objective (:func:`get_task`); replaces ``input_key`` and
      ``target_key``. A masked-LM task corrupts every micro-batch with its
      own key ``fold_in(step_key, i)``.
    learning_rate_fn: Logged as ``learning_rate`` when given.
    label_smoothing: Of the training loss.
    compute_dtype: ``jnp.float32`` or ``jnp.bfloat16`` (parameters stay f32).
    grad_accum_steps: Micro-batches per optimizer step.
    micro_batch_sharding: Sharding of one micro-batch's leading axis (the
      data-parallel sharding of the batch).

  Returns:
    ``train_step``; metrics: ``loss`` (the training objective), ``accuracy``
    (top-1, per token for language models, per masked token for masked
    LM), ``grad_norm``, ``learning_rate``
    and, for sparse runs, :func:`sift_jax.sparse_stats`.
  """
  compute_dtype = jnp.dtype(compute_dtype)
  if grad_accum_steps < 1:
    raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
  task = _resolve_task(task, input_key, target_key)

  def loss_fn(params, model_state, batch, rng):
    # The corruption key is derived from the dropout key, which stays as it was (a masked-LM
    # model's dropout and masks are independent; other tasks ignore the key).
    x, y, weights = task.prepare(batch, jax.random.fold_in(rng, _PREPARE_TAG))
    logits, new_state = _forward(module, params, model_state, x, train=True, rng=rng,
                                 compute_dtype=compute_dtype)
    loss, accuracy = _weighted_loss(logits, y, weights, label_smoothing=label_smoothing)
    return loss, (new_state, accuracy)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    inputs = {k: batch[k] for k in task.batch_keys}
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if grad_accum_steps == 1:
      (loss, (model_state, accuracy)), grads = grad_fn(state.params, state.model_state, inputs, rng)
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

      micro = {k: split(v) for k, v in inputs.items()}

      def body(carry, xs):
        grads_sum, loss_sum, acc_sum, model_state = carry
        batch_i, i = xs
        (loss_i, (model_state, acc_i)), g = grad_fn(state.params, model_state, batch_i,
                                                    jax.random.fold_in(rng, i))
        grads_sum = jax.tree.map(jnp.add, grads_sum, g)
        return (grads_sum, loss_sum + loss_i, acc_sum + acc_i, model_state), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), state.model_state)
      (grads, loss, accuracy, model_state), _ = jax.lax.scan(
          body, init, (micro, jnp.arange(a, dtype=jnp.int32)))
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


def make_eval_step(module: Any, *, input_key: Optional[str] = None,
                   target_key: Optional[str] = None, task: Optional[Task] = None,
                   compute_dtype: Any = jnp.float32) -> Callable[[TrainState, dict], dict]:
  """A jittable ``eval_step(state, batch) -> sums``.

  ``batch["weight"]`` (1 for real examples, 0 for padding) lets the last,
  partial eval batch be padded to the fixed batch shape. A masked-LM task
  corrupts every eval batch with the fixed key :data:`EVAL_MASK_SEED` and
  counts its masked positions only.

  Returns:
    ``{"loss_sum", "correct_sum", "count"}`` summed over weighted examples
    (tokens for language models, masked tokens for masked LM).
  """
  compute_dtype = jnp.dtype(compute_dtype)
  task = _resolve_task(task, input_key, target_key)

  def eval_step(state: TrainState, batch: dict) -> dict:
    x, y, target_weights = task.prepare({k: batch[k] for k in task.batch_keys},
                                        jax.random.key(EVAL_MASK_SEED))
    logits, _ = _forward(module, state.params, state.model_state, x, train=False, rng=None,
                         compute_dtype=compute_dtype)
    weight = batch["weight"].astype(jnp.float32)
    weight = weight.reshape(weight.shape + (1,) * (y.ndim - 1))
    weight = jnp.broadcast_to(weight, y.shape)
    if target_weights is not None:
      weight = weight * target_weights
    loss = cross_entropy(logits, y)
    correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    return {"loss_sum": jnp.sum(loss * weight), "correct_sum": jnp.sum(correct * weight),
            "count": jnp.sum(weight)}

  return eval_step


def _resolve_task(task: Optional[Task], input_key: Optional[str], target_key: Optional[str]) -> Task:
  if task is not None:
    if input_key is not None or target_key is not None:
      raise ValueError(f"pass either task= or input_key=/target_key=, not both (task={task.name!r}, "
                       f"input_key={input_key!r}, target_key={target_key!r})")
    return task
  if input_key is None or target_key is None:
    raise ValueError(f"the step needs task= or both input_key= and target_key=, got "
                     f"input_key={input_key!r}, target_key={target_key!r}")
  return _task_for_keys(input_key, target_key)
