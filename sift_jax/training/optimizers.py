"""Optimizer, learning-rate schedule, weight-decay mask and sparse wrapper from a config.

The inner optimizer follows the paper's recipes (Thangarasa et al. 2023,
arXiv 2303.11525, appendix; docs/method.md): SGD with
(Nesterov) momentum and coupled L2 weight decay (PyTorch's ``weight_decay``,
added to the gradient before momentum), or AdamW with decoupled decay. The
sparse wrapper (one of :data:`SPARSE_METHOD_BUILDERS`: :func:`sift_jax.rigl`,
:func:`sift_jax.set_sparse`, :func:`sift_jax.static_sparse`, gradual or
one-shot magnitude pruning) goes outermost, so the inner optimizer only ever
sees masked gradients and inactive weights stay exactly zero.

Schedules, inner optimizers and sparse methods are tables of builders keyed by
the config's names; a name the tables do not know raises, naming it and the
known ones.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Optional

import ml_collections
import optax

from sift_jax.masks import selection, tree_paths
from sift_jax.optim import branch_growth
from sift_jax.optim import pruning as pruning_lib
from sift_jax.optim import sparse as sparse_lib

__all__ = ["make_schedule", "weight_decay_mask", "make_inner_optimizer", "make_optimizer",
           "is_sparse_run", "tree_has_sparse_state", "SCHEDULE_BUILDERS", "OPTIMIZER_BUILDERS",
           "SPARSE_METHOD_BUILDERS"]


def _epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
  return int(round(float(epochs) * steps_per_epoch))


def make_schedule(config: ml_collections.ConfigDict, *, total_steps: int,
                  steps_per_epoch: int) -> optax.Schedule:
  """The learning-rate schedule of ``config.schedule`` in optimizer steps.

  Epoch-valued options are converted with ``steps_per_epoch``.

  Args:
    config: A full training config (:func:`sift_jax.training.default_config`).
    total_steps: Training length in optimizer steps.
    steps_per_epoch: Optimizer steps per pass over the training split.

  Returns:
    An ``optax.Schedule``.

  Raises:
    ValueError: for an unknown schedule name or a warmup not shorter than
      training.
  """
  lr = float(config.optimizer.learning_rate)
  if total_steps < 1 or steps_per_epoch < 1:
    raise ValueError(f"total_steps={total_steps} and steps_per_epoch={steps_per_epoch} must be >= 1")
  build = _lookup(SCHEDULE_BUILDERS, config.schedule.name, "config.schedule.name", "schedule")
  return build(config.schedule, lr, total_steps, steps_per_epoch)


def _lookup(table: dict[str, Any], name: Any, key: str, what: str) -> Any:
  """``table[name]``, or a ValueError naming ``key``, the value and the known names."""
  if not isinstance(name, str) or name not in table:
    raise ValueError(f"{key}={name!r} is not a known {what}; known: {sorted(table)}")
  return table[name]


def _constant_schedule(sched, lr, total_steps, steps_per_epoch):
  del sched, total_steps, steps_per_epoch
  return optax.constant_schedule(lr)


def _step_schedule(sched, lr, total_steps, steps_per_epoch):
  del total_steps
  every = max(1, _epochs_to_steps(sched.step_epochs, steps_per_epoch))
  return optax.exponential_decay(lr, transition_steps=every, decay_rate=float(sched.decay_factor),
                                 staircase=True)


def _multistep_schedule(sched, lr, total_steps, steps_per_epoch):
  del total_steps
  boundaries = {_epochs_to_steps(e, steps_per_epoch): float(sched.decay_factor)
                for e in sched.boundaries_epochs}
  return optax.piecewise_constant_schedule(lr, boundaries)


def _cosine_schedule(sched, lr, total_steps, steps_per_epoch):
  if sched.warmup_steps > 0:
    warmup, what = int(sched.warmup_steps), f"config.schedule.warmup_steps={sched.warmup_steps}"
  else:
    warmup = _epochs_to_steps(sched.warmup_epochs, steps_per_epoch)
    what = f"config.schedule.warmup_epochs={sched.warmup_epochs}"
  if warmup >= total_steps:
    raise ValueError(f"{what} gives {warmup} warmup steps, not fewer than the {total_steps} "
                     "training steps")
  if warmup == 0:
    return optax.cosine_decay_schedule(lr, decay_steps=total_steps,
                                       alpha=float(sched.end_value) / lr)
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=warmup, decay_steps=total_steps,
                                            end_value=float(sched.end_value))


# ``config.schedule.name`` -> (schedule section, peak lr, total steps, steps per epoch) -> schedule.
SCHEDULE_BUILDERS: dict[str, Callable[..., optax.Schedule]] = {
    "constant": _constant_schedule,
    "step": _step_schedule,
    "multistep": _multistep_schedule,
    "cosine": _cosine_schedule,
}


def weight_decay_mask(exclude: str) -> Optional[Callable[[Any], Any]]:
  """A mask function for optax: True where weight decay applies.

  Args:
    exclude: Regex ``re.search``-ed on each "/"-joined parameter path; matching
      parameters get no decay (e.g. ``r"(bias|scale)$"`` for norms and biases,
      the paper's ImageNet recipe). ``""`` decays everything.

  Returns:
    ``None`` (decay all) or a function ``params -> bool tree``.

  Raises:
    ValueError: for an invalid regex.
  """
  if not exclude:
    return None
  try:
    regex = re.compile(exclude)
  except re.error as e:
    raise ValueError(f"config.optimizer.weight_decay_exclude={exclude!r} is not a valid regex: {e}") from None
  return lambda params: tree_paths.map_with_path_str(lambda path, _: regex.search(path) is None, params)


def make_inner_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule
                         ) -> optax.GradientTransformation:
  """The dense optimizer of ``config.optimizer`` (no sparsity).

  ``sgd`` and ``nesterov`` add ``weight_decay * p`` to the gradient before
  momentum (coupled L2, as the paper's PyTorch recipes); ``adamw`` decays
  decoupled from the adaptive step.
  """
  opt = config.optimizer
  build = _lookup(OPTIMIZER_BUILDERS, opt.name, "config.optimizer.name", "optimizer")
  parts = []
  if float(opt.grad_clip_norm) > 0:
    parts.append(optax.clip_by_global_norm(float(opt.grad_clip_norm)))
  parts.extend(build(opt, schedule, weight_decay_mask(opt.weight_decay_exclude)))
  return parts[0] if len(parts) == 1 else optax.chain(*parts)


def _sgd(opt, schedule, mask, *, nesterov=False):
  parts = []
  if float(opt.weight_decay) > 0:
    parts.append(optax.add_decayed_weights(float(opt.weight_decay), mask=mask))
  momentum = float(opt.momentum)
  parts.append(optax.sgd(schedule, momentum=momentum if momentum > 0 else None, nesterov=nesterov))
  return parts


def _adamw(opt, schedule, mask):
  return [optax.adamw(schedule, b1=float(opt.b1), b2=float(opt.b2), eps=float(opt.eps),
                      weight_decay=float(opt.weight_decay), mask=mask)]


# ``config.optimizer.name`` -> (optimizer section, lr schedule, weight-decay mask) -> transforms.
OPTIMIZER_BUILDERS: dict[str, Callable[..., list[optax.GradientTransformation]]] = {
    "sgd": _sgd,
    "nesterov": functools.partial(_sgd, nesterov=True),
    "adamw": _adamw,
}


def _static_method(inner, sp, common, total_steps):
  del sp, total_steps
  return sparse_lib.static_sparse(inner, **common)


def _regrowing_method(factory):
  def build(inner, sp, common, total_steps):
    return factory(inner, **common, total_steps=total_steps, update_every=int(sp.update_every),
                   start_step=int(sp.start_step), end_fraction=float(sp.end_fraction),
                   drop_fraction=float(sp.drop_fraction), drop_schedule=sp.drop_schedule,
                   optimizer_step_on_update=bool(sp.optimizer_step_on_update),
                   grow_groups=_lookup(branch_growth.GROW_GROUPINGS,
                                       sp.get("branch_growth", "exclusive"),
                                       "config.sparse.branch_growth", "branch growth"))
  return build


def _gmp_method(inner, sp, common, total_steps):
  return pruning_lib.gradual_magnitude_pruning(
      inner, **common, scope=sp.scope, total_steps=total_steps, update_every=int(sp.update_every),
      start_step=int(sp.start_step), end_fraction=float(sp.end_fraction),
      optimizer_step_on_update=bool(sp.optimizer_step_on_update))


def _oneshot_method(inner, sp, common, total_steps):
  del total_steps
  return pruning_lib.oneshot_magnitude_pruning(inner, **common, scope=sp.scope,
                                               prune_step=int(sp.start_step))


# ``config.sparse.method`` -> (inner optimizer, sparse section, {sparsity, policy,
# distribution, seed}, total steps) -> sparse transformation. "none" (dense
# training) is not a sparse method and has no entry.
SPARSE_METHOD_BUILDERS: dict[str, Callable[..., optax.GradientTransformationExtraArgs]] = {
    "static": _static_method,
    "set": _regrowing_method(sparse_lib.set_sparse),
    "rigl": _regrowing_method(sparse_lib.rigl),
    "gmp": _gmp_method,
    "oneshot": _oneshot_method,
}


def is_sparse_run(config: ml_collections.ConfigDict) -> bool:
  """Whether ``config`` trains with masks (``sparse.method`` set and ``s > 0``)."""
  return config.sparse.method != "none" and float(config.model.sparsity) > 0


def make_optimizer(config: ml_collections.ConfigDict, *, total_steps: int, steps_per_epoch: int,
                   policy: Optional[selection.SparsityPolicy] = None,
                   sparsity: Optional[float] = None,
                   seed: Any = 0) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The full optimizer of a run: inner optimizer, wrapped for sparse training.

  Args:
    config: A full training config.
    total_steps: Training length in optimizer steps (RigL's ``end_step`` is
      ``config.sparse.end_fraction * total_steps``).
    steps_per_epoch: For epoch-valued schedule options.
    policy: Which leaves are sparse (the model's ``ModelSpec.policy``).
    sparsity: The sparsity the masks get (``ModelSpec.solved_sparsity``, which
      may differ slightly from the nominal ``config.model.sparsity`` for
      Sparse Wide); defaults to ``config.model.sparsity``.
    seed: int or PRNG key of the initial masks and RigL's tie-breaking. It
      only affects ``init``: the ``update`` of two optimizers that differ only
      in ``seed`` is the same function.

  Returns:
    ``(optimizer, learning_rate_schedule)``.
  """
  schedule = make_schedule(config, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
  inner = make_inner_optimizer(config, schedule)
  if not is_sparse_run(config):
    return inner, schedule
  sp = config.sparse
  build = _lookup(SPARSE_METHOD_BUILDERS, sp.method, "config.sparse.method", "sparse method")
  s = float(config.model.sparsity if sparsity is None else sparsity)
  common = dict(sparsity=s, policy=policy, distribution=sp.distribution, seed=seed)
  return build(inner, sp, common, total_steps), schedule


def tree_has_sparse_state(opt_state: Any) -> bool:
  """Whether ``opt_state`` carries masks."""
  try:
    sparse_lib.get_sparse_state(opt_state)
  except ValueError:
    return False
  return True
