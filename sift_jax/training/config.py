"""The training configuration: every key, its default, and validation.

Experiment files (``experiments/configs/*.py``) start from
:func:`default_config` and change values; they never add keys outside the
free-form sections ``model.kwargs`` and ``dataset.options`` (whose keys depend
on the model and the dataset). On the CLI, ``--config.KEY=VALUE`` with an
unknown ``KEY`` outside those sections is an error listing the known keys of
its section (:func:`check_key`), while ``--config.model.kwargs.NAME=VALUE`` and
``--config.dataset.options.NAME=VALUE`` may add keys; :func:`validate_config`
rejects unknown keys and bad values in configs built in Python (a sweep's
overrides, a test's config) with a ``ValueError`` naming the key.

A run resumed from a checkpoint must use the config it started with, except
for the operational keys of :data:`RESUME_OPERATIONAL_KEYS` (see there).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import ml_collections

from sift_jax.masks.densities import DISTRIBUTIONS
from sift_jax.optim import branch_growth
from sift_jax.optim.schedules import DROP_SCHEDULES
from sift_jax.optim.sparse import SCOPES
from sift_jax.training import optimizers
from sift_jax.transformations import members, sizes

__all__ = ["default_config", "validate_config", "apply_overrides", "flatten_config", "check_key",
           "resume_config", "resume_differences", "RESUME_OPERATIONAL_KEYS", "FREE_SECTIONS",
           "OPTIMIZERS", "SCHEDULES", "SPARSE_METHODS", "COMPUTE_DTYPES", "FAMILIES"]

# The names come from the builder tables, so a method, optimizer or schedule
# added there is known here too.
OPTIMIZERS = tuple(optimizers.OPTIMIZER_BUILDERS)
SCHEDULES = tuple(optimizers.SCHEDULE_BUILDERS)
SPARSE_METHODS = ("none",) + tuple(optimizers.SPARSE_METHOD_BUILDERS)
BRANCH_GROWTHS = tuple(branch_growth.GROW_GROUPINGS)
# Methods that rank all sparse tensors together when sparse.scope == "global".
GLOBAL_SCOPE_METHODS = ("gmp", "oneshot")
COMPUTE_DTYPES = ("float32", "bfloat16")
# Sections whose keys depend on the model / dataset: free-form.
FREE_SECTIONS = ("model.kwargs", "dataset.options")

# Keys a resumed run may change. They decide what is logged, evaluated, saved and
# shown, how fast data is read, where data lives and how arrays are laid out over
# devices, never what the training computes, so a resumed run trains the same
# state as an uninterrupted one. Two caveats: a changed ``mesh.*`` layout (a
# preempted job resumed on another slice) reduces in another order, so the
# result agrees within float tolerance instead of bitwise; ``eval_batch_size``
# and ``eval_every_steps`` change eval numbers only (``eval_batch_size`` up to
# float rounding of the loss sums, ``eval_every_steps`` which evals
# ``best_eval_*`` sees). Every other key (seed, data, model, sparsity method,
# optimizer, schedule, training length, batch size, precision...) is refused.
RESUME_OPERATIONAL_KEYS = (
    "training.log_every_steps",
    "training.eval_every_steps",
    "training.checkpoint_every_steps",
    "training.keep_checkpoints",
    "training.progress_bar",
    "training.spectral_every_steps",
    "training.eval_batch_size",
    "dataset.data_dir",
    "dataset.options.num_threads",
    "dataset.options.prefetch_buffer_size",
    "mesh.data",
    "mesh.model",
    "mesh.rules",
)


class _Missing:
  def __repr__(self):
    return "MISSING"


# Value of a key one side of :func:`resume_differences` does not have.
MISSING = _Missing()
# The built-in members; model.family accepts every registered one
# (sift_jax.transformations.member_names()).
FAMILIES = sizes.FAMILIES


def default_config() -> ml_collections.ConfigDict:
  """All keys of a training run with their defaults (a CPU-sized MNIST-1D MLP).

  Keys:
    seed: Seed of parameter init, initial masks, data order and dropout.
    dataset.name / train_split / eval_split: passed to
      :func:`sift_jax.data.make_dataset`.
    dataset.data_dir: Where prepared datasets live ('' = the data module's
      default).
    dataset.options: Dataset options (``seq_len``, ``num_samples``...).
    model.name / family / sparsity: passed to :func:`sift_jax.models.get_model`
      (``family`` is the Sparse-IFT member, ``sparsity`` its ``s``).
    model.kwargs: Extra keyword arguments of the model (width, depth...).
    sparse.method: ``rigl``, ``set``, ``static``, ``gmp`` (gradual magnitude
      pruning, dense to target, :func:`sift_jax.optim.gradual_magnitude_pruning`),
      ``oneshot`` (magnitude pruning at ``sparse.start_step``,
      :func:`sift_jax.optim.oneshot_magnitude_pruning`) or ``none`` (dense
      training; forced for ``model.sparsity == 0``).
    sparse.*: RigL / SET options (docs/method.md, "RigL"), see
      :func:`sift_jax.rigl`. ``gmp`` reads ``update_every``, ``start_step``,
      ``end_fraction`` (the target is reached at ``end_fraction *
      total_steps``) and ``optimizer_step_on_update``; ``oneshot`` prunes at
      ``start_step``.
    sparse.scope: ``layerwise`` or ``global`` (``gmp`` and ``oneshot`` only:
      one magnitude ranking over all sparse tensors).
    sparse.branch_growth: ``exclusive`` (default): RigL / SET grow each
      Sparse Parallel branch where no sibling branch is active before they
      duplicate a position (:mod:`sift_jax.optim.branch_growth`; no effect on
      the other members); ``independent``: every tensor grows on its own.
    optimizer.name: ``sgd``, ``nesterov`` (SGD with Nesterov momentum) or
      ``adamw``.
    optimizer.weight_decay_exclude: Regex; parameters whose path matches get
      no weight decay ('' = decay all, as the paper's CIFAR recipe).
    optimizer.grad_clip_norm: Global-norm clipping (0 = off).
    schedule.name: ``constant``, ``step`` (x ``decay_factor`` every
      ``step_epochs``), ``multistep`` (x ``decay_factor`` at each of
      ``boundaries_epochs``) or ``cosine`` (to ``end_value`` after an optional
      linear warmup of ``warmup_steps``, or if that is 0 ``warmup_epochs``).
    training.num_epochs / num_steps: Training length; ``num_steps > 0`` wins.
    training.batch_size: Global batch size of one optimizer step.
    training.grad_accum_steps: Micro-batches per step (``lax.scan``).
    training.compute_dtype: ``float32`` or ``bfloat16`` (parameters stay f32).
    training.label_smoothing: Label smoothing of the cross-entropy.
    training.log/eval/checkpoint_every_steps: Intervals (0 = only at the end).
    training.spectral_every_steps: Spectral metrics of the masks every N steps (0 = off).
    training.keep_checkpoints: How many checkpoints with a verified finite
      loss to keep (the newest, not yet verified one is kept besides them).
    training.progress_bar: Show a tqdm progress bar on process 0.
    mesh.data / mesh.model: Mesh axis sizes (``-1``: all remaining devices).
      A single process with more devices than ``data * model`` uses its first
      ``data * model`` devices; multi-host meshes must cover every device.
    mesh.rules: ``((regex, partition spec tuple), ...)`` for parameters.

  Resuming a run may change only :data:`RESUME_OPERATIONAL_KEYS`.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "mnist1d"
  c.dataset.train_split = "train"
  c.dataset.eval_split = "test"
  c.dataset.data_dir = ""
  c.dataset.options = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.name = "mlp_mnist1d"
  c.model.family = "dense"
  c.model.sparsity = 0.0
  c.model.kwargs = ml_collections.ConfigDict()

  c.sparse = ml_collections.ConfigDict()
  c.sparse.method = "rigl"
  c.sparse.distribution = "uniform"
  c.sparse.update_every = 100
  c.sparse.start_step = 0
  c.sparse.end_fraction = 0.75
  c.sparse.drop_fraction = 0.3
  c.sparse.drop_schedule = "cosine"
  c.sparse.optimizer_step_on_update = False
  c.sparse.scope = "layerwise"
  c.sparse.branch_growth = "exclusive"

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 5e-4
  c.optimizer.weight_decay_exclude = ""
  c.optimizer.grad_clip_norm = 0.0

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = "cosine"
  c.schedule.warmup_epochs = 0.0
  c.schedule.warmup_steps = 0
  c.schedule.end_value = 0.0
  c.schedule.decay_factor = 0.2
  c.schedule.step_epochs = 30.0
  c.schedule.boundaries_epochs = (60.0, 120.0, 160.0)

  c.training = ml_collections.ConfigDict()
  c.training.num_epochs = 1.0
  c.training.num_steps = 0
  c.training.batch_size = 128
  c.training.eval_batch_size = 256
  c.training.grad_accum_steps = 1
  c.training.compute_dtype = "float32"
  c.training.label_smoothing = 0.0
  c.training.log_every_steps = 100
  c.training.eval_every_steps = 0
  c.training.checkpoint_every_steps = 0
  c.training.keep_checkpoints = 3
  c.training.progress_bar = True
  # Spectral metrics of the masks (sift_jax.spectral) every N steps into
  # metrics.jsonl, and their trajectory plot; 0 = off. Host-side, sparse runs only.
  c.training.spectral_every_steps = 0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.model = 1
  c.mesh.rules = ()
  return c


def flatten_config(config: Any, prefix: str = "") -> dict[str, Any]:
  """``{"a.b.c": value}`` of a (nested) ConfigDict or mapping.

  ``model.kwargs`` and ``dataset.options`` are kept as one entry each (their
  keys depend on the model / dataset).
  """
  out = {}
  items = config.items() if hasattr(config, "items") else []
  for key, value in items:
    name = f"{prefix}{key}"
    if name not in FREE_SECTIONS and isinstance(value, (ml_collections.ConfigDict, Mapping)):
      out.update(flatten_config(value, name + "."))
    else:
      out[name] = value
  return out


def _json_value(value: Any) -> Any:
  """``value`` as it reads back from JSON (tuples become lists), or its repr."""
  if isinstance(value, Mapping) or hasattr(value, "items"):
    return {str(k): _json_value(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_value(v) for v in value]
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if hasattr(value, "item") and callable(value.item):  # numpy scalars
    try:
      return _json_value(value.item())
    except (TypeError, ValueError):
      pass
  return repr(value)


def resume_config(config: Any) -> dict[str, Any]:
  """The config as the flat, JSON-able dict stored in checkpoints.

  Every key is dotted (``model.kwargs.hidden``, ``dataset.options.seq_len``:
  the free-form sections are expanded too); tuples become lists.
  """
  out = {}

  def walk(node, prefix):
    for key, value in node.items():
      name = f"{prefix}{key}"
      if isinstance(value, (ml_collections.ConfigDict, Mapping)):
        if len(value) == 0 and name in FREE_SECTIONS:
          continue
        walk(value, name + ".")
      else:
        out[name] = _json_value(value)

  walk(config, "")
  return out


def resume_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
  """``(key, saved value, current value)`` of the keys a resumed run may not change.

  Both arguments are :func:`resume_config` dicts; keys of
  :data:`RESUME_OPERATIONAL_KEYS` are ignored, a key only one side has
  appears with :data:`MISSING` on the other.
  """
  out = []
  for key in sorted(set(saved) | set(current)):
    if key in RESUME_OPERATIONAL_KEYS:
      continue
    a, b = saved.get(key, MISSING), current.get(key, MISSING)
    if a is MISSING or b is MISSING or _json_value(a) != _json_value(b):
      out.append((key, a, b))
  return out


def _section(config: ml_collections.ConfigDict, dotted: str) -> tuple[ml_collections.ConfigDict, str]:
  """``(section, leaf)`` of the dotted key in ``config``.

  Raises:
    ValueError: naming the key and listing the known keys of its section, if
      a section on the way does not exist, or the leaf does not and its section
      is not one of :data:`FREE_SECTIONS`.
  """
  *parents, leaf = dotted.split(".")
  node = config
  for depth, part in enumerate(parents):
    if not isinstance(node, ml_collections.ConfigDict):
      raise ValueError(f"unknown config key {dotted!r}: {'.'.join(parents[:depth])!r} is not a section")
    if part not in node:
      raise ValueError(f"unknown config key {dotted!r}: no section {'.'.join(parents[:depth + 1])!r}; "
                       f"known keys of {'.'.join(parents[:depth]) or 'the config'}: {sorted(node.keys())}")
    node = node[part]
  if not isinstance(node, ml_collections.ConfigDict):
    raise ValueError(f"unknown config key {dotted!r}: {'.'.join(parents)!r} is not a section")
  if leaf not in node and ".".join(parents) not in FREE_SECTIONS:
    raise ValueError(f"unknown config key {dotted!r}; known keys of "
                     f"{'.'.join(parents) or 'the config'}: {sorted(node.keys())}")
  return node, leaf


def check_key(dotted: str) -> None:
  """Raises ``ValueError`` if ``dotted`` is not a key of :func:`default_config`.

  Keys under a free-form section (``model.kwargs.*``, ``dataset.options.*``)
  are always accepted. The message names the key and lists the known keys of
  its section (or says which section does not exist).
  """
  if any(dotted.startswith(section + ".") for section in FREE_SECTIONS):
    return
  _section(default_config(), dotted)


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of ``config`` with ``{"dotted.key": value}`` overrides applied.

  Raises:
    ValueError: for a key ``config`` does not have (with the known keys of
      that section), or a value of the wrong type.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  for dotted, value in overrides.items():
    node, leaf = _section(config, dotted)
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise ValueError(f"bad value {value!r} for config key {dotted!r}: {e}") from None
  return config


def _check(ok: bool, key: str, value: Any, what: str) -> None:
  if not ok:
    raise ValueError(f"config.{key}={value!r}: {what}")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Rejects unknown keys, missing keys and out-of-range values.

  Raises:
    ValueError: naming the offending key and value.
  """
  known = flatten_config(default_config())
  given = flatten_config(config)
  unknown = sorted(set(given) - set(known))
  if unknown:
    raise ValueError(f"unknown config key(s) {unknown}; see "
                     "sift_jax.training.default_config() for the known keys")
  missing = sorted(set(known) - set(given))
  if missing:
    raise ValueError(f"config is missing key(s) {missing}; start configs from "
                     "sift_jax.training.default_config()")
  c = config
  _check(isinstance(c.seed, int) and c.seed >= 0, "seed", c.seed, "must be an int >= 0")
  _check(c.model.family in members.member_names(), "model.family", c.model.family,
         f"must be one of {members.member_names()}")
  _check(0.0 <= float(c.model.sparsity) < 1.0, "model.sparsity", c.model.sparsity, "must be in [0, 1)")
  _check(not members.get_member(c.model.family).transforms or c.model.sparsity > 0, "model.family",
         c.model.family,
         "a Sparse-IFT member needs model.sparsity > 0")
  _check(c.sparse.method in SPARSE_METHODS, "sparse.method", c.sparse.method,
         f"must be one of {SPARSE_METHODS}")
  _check(c.sparse.distribution in DISTRIBUTIONS, "sparse.distribution", c.sparse.distribution,
         f"must be one of {DISTRIBUTIONS}")
  _check(c.sparse.drop_schedule in DROP_SCHEDULES, "sparse.drop_schedule", c.sparse.drop_schedule,
         f"must be one of {DROP_SCHEDULES}")
  _check(c.sparse.scope in SCOPES, "sparse.scope", c.sparse.scope, f"must be one of {SCOPES}")
  _check(c.sparse.scope == "layerwise" or c.sparse.method in GLOBAL_SCOPE_METHODS, "sparse.scope",
         c.sparse.scope, f"is only supported by sparse.method in {GLOBAL_SCOPE_METHODS}, "
         f"not {c.sparse.method!r}")
  _check(c.sparse.branch_growth in BRANCH_GROWTHS, "sparse.branch_growth", c.sparse.branch_growth,
         f"must be one of {BRANCH_GROWTHS}")
  _check(c.optimizer.name in OPTIMIZERS, "optimizer.name", c.optimizer.name,
         f"must be one of {OPTIMIZERS}")
  _check(float(c.optimizer.learning_rate) > 0, "optimizer.learning_rate", c.optimizer.learning_rate,
         "must be > 0")
  _check(float(c.optimizer.weight_decay) >= 0, "optimizer.weight_decay", c.optimizer.weight_decay,
         "must be >= 0")
  _check(float(c.optimizer.grad_clip_norm) >= 0, "optimizer.grad_clip_norm",
         c.optimizer.grad_clip_norm, "must be >= 0")
  _check(c.schedule.name in SCHEDULES, "schedule.name", c.schedule.name, f"must be one of {SCHEDULES}")
  _check(float(c.schedule.warmup_epochs) >= 0, "schedule.warmup_epochs", c.schedule.warmup_epochs,
         "must be >= 0")
  _check(isinstance(c.schedule.warmup_steps, int) and c.schedule.warmup_steps >= 0,
         "schedule.warmup_steps", c.schedule.warmup_steps, "must be an int >= 0")
  _check(0 < float(c.schedule.decay_factor) <= 1, "schedule.decay_factor", c.schedule.decay_factor,
         "must be in (0, 1]")
  _check(float(c.schedule.step_epochs) > 0, "schedule.step_epochs", c.schedule.step_epochs, "must be > 0")
  b = list(c.schedule.boundaries_epochs)
  _check(all(float(x) > 0 for x in b) and b == sorted(b), "schedule.boundaries_epochs", tuple(b),
         "must be increasing positive epochs")
  t = c.training
  _check(isinstance(t.num_steps, int) and t.num_steps >= 0, "training.num_steps", t.num_steps,
         "must be an int >= 0")
  _check(t.num_steps > 0 or (math.isfinite(float(t.num_epochs)) and float(t.num_epochs) > 0),
         "training.num_epochs", t.num_epochs, "must be > 0 when training.num_steps is 0")
  for key in ("batch_size", "eval_batch_size", "grad_accum_steps", "keep_checkpoints"):
    value = t[key]
    _check(isinstance(value, int) and value >= 1, f"training.{key}", value, "must be an int >= 1")
  _check(t.batch_size % t.grad_accum_steps == 0, "training.batch_size", t.batch_size,
         f"must be divisible by training.grad_accum_steps={t.grad_accum_steps}")
  for key in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps", "spectral_every_steps"):
    _check(isinstance(t[key], int) and t[key] >= 0, f"training.{key}", t[key], "must be an int >= 0")
  _check(t.compute_dtype in COMPUTE_DTYPES, "training.compute_dtype", t.compute_dtype,
         f"must be one of {COMPUTE_DTYPES}")
  _check(0.0 <= float(t.label_smoothing) < 1.0, "training.label_smoothing", t.label_smoothing,
         "must be in [0, 1)")
  _check(isinstance(c.mesh.data, int) and (c.mesh.data == -1 or c.mesh.data >= 1), "mesh.data",
         c.mesh.data, "must be -1 or an int >= 1")
  _check(isinstance(c.mesh.model, int) and c.mesh.model >= 1, "mesh.model", c.mesh.model,
         "must be an int >= 1")
  for rule in c.mesh.rules:
    _check(isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str),
           "mesh.rules", rule, "each rule must be a (regex, partition spec) pair")
