"""``train_and_evaluate``: the training loop of a run.

A run is a config and a workdir. The loop builds a ``("data", "model")`` mesh,
the datasets, the model and the optimizer, compiles ONE train step (mask
updates included) and one eval step with explicit NamedShardings, restores the
latest checkpoint of the workdir if there is one, and trains:

* parameters, masks and optimizer state are sharded by the path-regex rules
  of ``config.mesh.rules`` (see :mod:`sift_jax.sharding`), batches over
  ``data``; with several processes (``jax.distributed.initialize``) each
  process reads its part of every global batch and the global arrays are
  assembled with ``jax.make_array_from_process_local_data``;
* one process at a time: the workdir is locked for the whole run
  (:mod:`sift_jax.training.workdir`); a second run on it fails at once naming
  the holder's pid and host;
* every ``checkpoint_every_steps`` a checkpoint holds the state, the data
  iterator's position, the loop's bookkeeping (best evals, the unlogged
  steps' metrics) and the resolved config, so a resumed run is bitwise equal
  to an uninterrupted one on CPU, and so are its ``metrics.jsonl`` records
  (wall-clock fields aside); resuming with a changed config is refused except
  for the operational keys of
  :data:`sift_jax.training.config.RESUME_OPERATIONAL_KEYS`;
* restore takes the newest checkpoint that reads back intact (checksums
  verified); damaged newer ones are moved aside with a warning (see
  :mod:`sift_jax.training.checkpointing`);
* SIGTERM (preemption), from the start of the call, makes the loop save at
  the next step boundary and return cleanly (before the first step: return
  without training);
* a non-finite loss stops the run with :class:`NonFiniteLossError` naming the
  step and the last good checkpoint. The losses are checked on the host every
  ``log_every_steps`` (or 100 when that is 0) steps, before every save and
  every eval, and each eval's loss too: one host sync per interval, none per
  step (:class:`sift_jax.training.checkpointing.VerifiedCheckpointer`, which
  also decides which checkpoints count as good);
* metrics go to ``metrics.jsonl`` and TensorBoard, the outcome to
  ``summary.json``; a resumed run first drops the records its predecessor
  wrote after the checkpoint it resumes from;
* an error closes everything the run opened; a second failure while closing
  (an orbax write that hit the same full disk) is logged in one line and never
  replaces the first.

Compiled functions are cached per process by the run's structure (everything
in the config but the seed), so the runs of a sweep that differ only in the
seed compile once.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import threading
import time
import types
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from sift_jax import sharding as sharding_lib
from sift_jax import spectral as spectral_lib
from sift_jax.optim import sparse as sparse_lib
from sift_jax.training import checkpointing
from sift_jax.training import config as config_lib
from sift_jax.training import metrics as metrics_lib
from sift_jax.training import optimizers
from sift_jax.training import state as state_lib
from sift_jax.training import step as step_lib
from sift_jax.training import workdir as workdir_lib

__all__ = ["train_and_evaluate", "evaluate", "make_eval_dataset", "training_length", "run_task",
           "NonFiniteLossError", "RunFunctions", "build_run", "clear_compilation_cache"]

_log = logging.getLogger("sift_jax")


NonFiniteLossError = checkpointing.NonFiniteLossError


@dataclasses.dataclass(frozen=True)
class RunFunctions:
  """What a run compiles, shared by runs of the same structure.

  Attributes:
    spec: The model's ``ModelSpec``.
    mesh: The device mesh.
    init: Jitted ``init(seed: int32) -> TrainState`` (sharded output).
    train_step: Jitted ``(state, batch) -> (state, metrics)``; donates the state.
    eval_step: Jitted ``(state, batch) -> sums``.
    abstract_state: ``jax.ShapeDtypeStruct`` tree of the state with shardings.
    state_shardings: NamedSharding tree of the state.
    batch_sharding: NamedSharding of batches (leading axis over ``data``).
    input_key: Batch key of the model input (``image`` or ``inputs``).
    schedule: The learning-rate schedule.
    total_steps: Training length.
    steps_per_epoch: Optimizer steps per epoch.
  """

  spec: Any
  mesh: jax.sharding.Mesh
  init: Any
  train_step: Any
  eval_step: Any
  abstract_state: Any
  state_shardings: Any
  batch_sharding: NamedSharding
  input_key: str
  schedule: Any
  total_steps: int
  steps_per_epoch: int


_CACHE: "collections.OrderedDict[str, RunFunctions]" = collections.OrderedDict()
_CACHE_SIZE = 4


def clear_compilation_cache() -> None:
  """Forgets the compiled functions kept for runs of the same structure."""
  _CACHE.clear()


def _structure_key(config: ml_collections.ConfigDict, mesh, train_info, total_steps: int,
                   steps_per_epoch: int) -> str:
  flat = config_lib.flatten_config(config)
  flat.pop("seed")
  for key in ("training.log_every_steps", "training.eval_every_steps",
              "training.checkpoint_every_steps", "training.keep_checkpoints", "training.progress_bar"):
    flat.pop(key)
  flat["model.kwargs"] = dict(flat["model.kwargs"])
  flat["dataset.options"] = dict(flat["dataset.options"])
  flat["_mesh"] = [list(mesh.shape.items()), [d.id for d in mesh.devices.flat]]
  flat["_data"] = [list(train_info.input_shape), str(train_info.input_dtype), train_info.num_classes,
                   train_info.vocab_size, train_info.task]
  flat["_steps"] = [total_steps, steps_per_epoch]
  return json.dumps(flat, sort_keys=True, default=repr)


def _default_get_model(name: str, **kwargs) -> Any:
  from sift_jax import models  # pylint: disable=import-outside-toplevel
  return models.get_model(name, **kwargs)


def _model_kwargs(config: ml_collections.ConfigDict, train_info) -> dict[str, Any]:
  kwargs = dict(config.model.kwargs)
  if train_info.task == "lm":
    kwargs.setdefault("vocab_size", train_info.vocab_size)
  else:
    kwargs.setdefault("num_classes", train_info.num_classes)
    # Models take their input shape from the data (the MLP and CNNs adapt to it).
    kwargs.setdefault("input_shape", tuple(int(d) for d in train_info.input_shape))
  return dict(family=config.model.family, sparsity=float(config.model.sparsity), **kwargs)


def build_run(config: ml_collections.ConfigDict, *, mesh: jax.sharding.Mesh, train_info,
              total_steps: int, steps_per_epoch: int,
              get_model: Optional[Callable[..., Any]] = None) -> RunFunctions:
  """Model, optimizer, shardings and compiled steps of a run (cached by structure).

  Args:
    config: A validated training config.
    mesh: Device mesh with axes ``("data", "model")``.
    train_info: ``DatasetInfo`` of the training split.
    total_steps: Training length (RigL's end step, the schedule).
    steps_per_epoch: Optimizer steps per epoch.
    get_model: ``get_model(name, family=, sparsity=, num_classes= | vocab_size=,
      **model.kwargs) -> ModelSpec`` (default :func:`sift_jax.models.get_model`).

  Returns:
    :class:`RunFunctions`.
  """
  key = _structure_key(config, mesh, train_info, total_steps, steps_per_epoch)
  if get_model is None and key in _CACHE:
    _CACHE.move_to_end(key)
    return _CACHE[key]

  model_kwargs = _model_kwargs(config, train_info)
  try:
    spec = (get_model or _default_get_model)(config.model.name, **model_kwargs)
  except (TypeError, ValueError) as e:
    # e.g. --config.model.kwargs.channels=abc: name the config entries, not
    # only the line of model code that choked on them.
    raise ValueError(f"config.model (name={config.model.name!r}, family={config.model.family!r}, "
                     f"sparsity={config.model.sparsity!r}, kwargs={dict(config.model.kwargs)!r}) "
                     f"does not build a model: {type(e).__name__}: {e}") from e
  if int(np.prod(spec.input_shape)) != int(np.prod(train_info.input_shape)):
    raise ValueError(f"model {config.model.name!r} expects inputs of shape {tuple(spec.input_shape)}, "
                     f"dataset {config.dataset.name!r} gives {tuple(train_info.input_shape)}")
  solved = getattr(spec, "solved_sparsity", None)
  sparsity = float(config.model.sparsity) if solved is None else float(solved)

  def make_tx(seed):
    return optimizers.make_optimizer(config, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                                     policy=spec.policy, sparsity=sparsity, seed=seed)[0]

  # The update of the optimizer does not depend on its seed: build it once.
  tx, schedule = optimizers.make_optimizer(config, total_steps=total_steps,
                                           steps_per_epoch=steps_per_epoch, policy=spec.policy,
                                           sparsity=sparsity, seed=0)
  init_fn = state_lib.make_init_fn(spec.module, make_tx, input_shape=tuple(spec.input_shape),
                                   input_dtype=spec.input_dtype)
  abstract = jax.eval_shape(init_fn, jnp.int32(0))
  repl = sharding_lib.replicated(mesh)
  rules = tuple((pat, P(*spec_axes)) for pat, spec_axes in config.mesh.rules)
  p_shardings = sharding_lib.param_shardings(abstract.params, mesh, rules, log=False)
  # The state's structure with a sharding per leaf: replicated unless param-shaped.
  state_shardings = jax.tree.map(lambda _: repl, abstract).replace(
      params=p_shardings,
      opt_state=sharding_lib.shardings_like_params(abstract.opt_state, abstract.params, p_shardings,
                                                   repl))
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract, state_shardings)
  batch_sharding = NamedSharding(mesh, P("data"))
  compute_dtype = jnp.bfloat16 if config.training.compute_dtype == "bfloat16" else jnp.float32
  task = run_task(spec, train_info, config)
  input_key = "image" if train_info.task == "classification" else "inputs"
  train_step = step_lib.make_train_step(
      spec.module, tx, task=task, learning_rate_fn=schedule,
      label_smoothing=float(config.training.label_smoothing), compute_dtype=compute_dtype,
      grad_accum_steps=int(config.training.grad_accum_steps), micro_batch_sharding=batch_sharding)
  eval_step = step_lib.make_eval_step(spec.module, task=task, compute_dtype=compute_dtype)
  funcs = RunFunctions(
      spec=spec, mesh=mesh,
      init=jax.jit(init_fn, out_shardings=state_shardings),
      train_step=jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                         out_shardings=(state_shardings, repl), donate_argnums=0),
      eval_step=jax.jit(eval_step, in_shardings=(state_shardings, batch_sharding), out_shardings=repl),
      abstract_state=abstract_state, state_shardings=state_shardings, batch_sharding=batch_sharding,
      input_key=input_key, schedule=schedule, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
  if get_model is None:
    _CACHE[key] = funcs
    while len(_CACHE) > _CACHE_SIZE:
      _CACHE.popitem(last=False)
  return funcs


def run_task(spec: Any, train_info: Any, config: ml_collections.ConfigDict) -> step_lib.Task:
  """The objective of a run: the model's task (:data:`sift_jax.training.step.TASKS`).

  A model without a ``task`` attribute (a custom ``get_model``) gets the
  dataset's (classification or causal LM). The task's options come from
  ``spec.info["task_options"]`` (a BERT's ``vocab_size`` and
  ``mask_token_id``).

  Raises:
    ValueError: an unknown task, or one that does not train on this dataset
      (a masked-LM model on images), naming the model and the dataset.
  """
  name = getattr(spec, "task", None) or train_info.task
  options = dict((getattr(spec, "info", None) or {}).get("task_options", {}))
  try:
    task = step_lib.get_task(name, **options)
  except ValueError as e:
    raise ValueError(f"model {config.model.name!r}: {e}") from e
  if task.data_task != train_info.task:
    raise ValueError(f"model {config.model.name!r} trains with task {name!r} on {task.data_task!r} "
                     f"data; dataset {config.dataset.name!r} is a {train_info.task!r} dataset")
  return task


def training_length(config: ml_collections.ConfigDict, train_info) -> tuple[int, int]:
  """``(steps_per_epoch, total_steps)`` of a run.

  An epoch is the training pipeline's full global batches
  (``train_info.batches_per_epoch(batch_size)``: the partial last batch is
  dropped, e.g. 50,000 // 128 = 390 for CIFAR); ``training.num_steps > 0``
  wins over ``num_epochs``.
  """
  t = config.training
  steps_per_epoch = max(1, train_info.batches_per_epoch(int(t.batch_size)))
  total_steps = int(t.num_steps) if t.num_steps > 0 else max(
      1, int(math.ceil(float(t.num_epochs) * steps_per_epoch)))
  return steps_per_epoch, total_steps


def _make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The run's mesh; a single process may use only its first ``data * model`` devices."""
  data, model = int(config.mesh.data), int(config.mesh.model)
  devices = jax.devices()
  if data != -1 and jax.process_count() == 1 and data * model < len(devices):
    devices = devices[:data * model]
  return sharding_lib.make_mesh(data, model, devices=devices)


def _global_batch(local: Mapping[str, np.ndarray], funcs: RunFunctions, global_size: int) -> dict:
  """Global arrays sharded over ``data`` from this process's part of a batch.

  The model input is reshaped to the model's per-example shape when only the
  layout differs (MNIST-1D signals ``(40,)`` for a ``(40, 1)`` conv net).
  """
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    if k == funcs.input_key:
      v = v.reshape((v.shape[0], *funcs.spec.input_shape))
    out[k] = jax.make_array_from_process_local_data(funcs.batch_sharding, v,
                                                    (global_size, *v.shape[1:]))
  return out


def _batch_block(row_ranges: Sequence[tuple[int, int]], global_size: int) -> tuple[int, int]:
  """``(block, num_blocks)``: which equal, contiguous block of the batch rows a process holds.

  Args:
    row_ranges: ``(start, stop)`` batch rows of each device of the process.
    global_size: Rows of the global batch.

  The data pipeline gives a process block ``block`` of ``num_blocks`` of every
  global batch. Processes whose devices hold the same rows (a ``model`` mesh
  axis across processes) get the same block, so replicas read the same data.

  Raises:
    ValueError: if the rows are not one contiguous block of
      ``global_size / num_blocks`` rows starting at a multiple of it.
  """
  distinct = sorted(set((int(a), int(b)) for a, b in row_ranges))
  lo, hi = distinct[0][0], distinct[-1][1]
  covered = sum(b - a for a, b in distinct)
  size = hi - lo
  contiguous = all(distinct[i][1] == distinct[i + 1][0] for i in range(len(distinct) - 1))
  if not contiguous or covered != size or size <= 0 or global_size % size or lo % size:
    raise ValueError(
        f"this process's devices hold batch rows {distinct} of the global batch of {global_size}; "
        "the data pipeline needs every process to hold one contiguous, equal block of the rows "
        "(processes holding the same rows read the same data). Order the mesh's devices so that "
        "each process's devices cover a contiguous run of the 'data' axis (jax.devices() order "
        "does, with mesh.data a multiple of the number of processes or mesh.model a multiple of "
        "the devices per process)")
  return lo // size, global_size // size


def _process_block(sharding: NamedSharding, global_size: int) -> tuple[int, int]:
  """:func:`_batch_block` of this process for batches with ``sharding``."""
  index_map = sharding.addressable_devices_indices_map((int(global_size),))
  ranges = []
  for index in index_map.values():
    assert index is not None  # every device holds a block of a batch-sharded array
    start, stop, _ = index[0].indices(int(global_size))
    ranges.append((start, stop))
  return _batch_block(ranges, int(global_size))


def _dataset_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  kwargs = dict(config.dataset.options)
  if config.dataset.data_dir:
    kwargs["data_dir"] = config.dataset.data_dir
  return kwargs


def _make_datasets_module():
  from sift_jax import data  # pylint: disable=import-outside-toplevel
  return data


class _Preemption:
  """SIGTERM sets a flag; the loop saves and stops at the next step boundary.

  Installed for the whole of :func:`train_and_evaluate`, setup included, so a
  SIGTERM while the data, the model or the checkpoint are still loading stops
  the run cleanly before its first step. ``already`` reports a SIGTERM the
  caller caught before (the command line installs its own handler first).
  """

  def __init__(self, already: Optional[Callable[[], bool]] = None):
    self._already = already
    self._flag = False
    self._previous: Callable[[int, Optional[types.FrameType]], Any] | int | None = None

  @property
  def requested(self) -> bool:
    return self._flag or (self._already is not None and bool(self._already()))

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    self._flag = True
    _log.warning("sift_jax: SIGTERM received; saving a checkpoint at the next step boundary")

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


class _Cleanup:
  """Releases a run's resources in reverse order without masking the error that stopped it.

  While an error propagates (a full disk, a non-finite loss...), a resource
  that fails to close too (an orbax write that hit the same full disk) is
  reported in one warning line and the original error is what the caller
  sees. After a clean run, the first cleanup failure is raised.
  """

  def __init__(self):
    self._actions: list[tuple[str, Callable[[], Any]]] = []

  def push(self, what: str, action: Callable[[], Any]) -> None:
    self._actions.append((what, action))

  def run(self, *, failing: bool) -> None:
    first = None
    while self._actions:
      what, action = self._actions.pop()
      try:
        action()
      except Exception as e:  # pylint: disable=broad-except
        if failing or first is not None:
          _log.warning("sift_jax: %s failed as well: %s: %s", what, type(e).__name__,
                       (str(e).strip().splitlines() or [""])[0][:300])
        else:
          first = e
    if first is not None:
      raise first


def make_eval_dataset(config: ml_collections.ConfigDict, batch_sharding: NamedSharding) -> Any:
  """The eval split's iterator (one pass, in order, last batch partial), built once per run.

  Each process reads the block of every batch its devices hold (see
  :func:`_batch_block`); :func:`evaluate` rewinds it before each eval.
  """
  data = _make_datasets_module()
  bs = int(config.training.eval_batch_size)
  block, num_blocks = _process_block(batch_sharding, bs)
  return data.make_dataset(config.dataset.name, split=config.dataset.eval_split, batch_size=bs, seed=0,
                           shuffle=False, num_epochs=1, drop_remainder=False, process_index=block,
                           process_count=num_blocks, **_dataset_kwargs(config))


def evaluate(funcs: RunFunctions, state: Any, config: ml_collections.ConfigDict, *,
             dataset: Any = None) -> dict[str, float]:
  """Loss and accuracy (and perplexity for language models) on the eval split.

  Every example of the split counts once: the last, partial batch is padded
  to the fixed batch shape with zero-weight examples.

  Args:
    funcs: The run's compiled functions.
    state: The train state to evaluate.
    config: The run's config.
    dataset: The iterator of :func:`make_eval_dataset`, reused (rewound to
      its start) so the split is prepared once per run; None builds one.
  """
  bs = int(config.training.eval_batch_size)
  it = make_eval_dataset(config, funcs.batch_sharding) if dataset is None else dataset
  if dataset is not None:
    it.set_state(_rewound(it))
  local_bs = it.local_batch_size
  sums = []
  with it:
    for local in it:
      n = len(next(iter(local.values())))
      padded = {k: np.concatenate([v, np.zeros((local_bs - n, *v.shape[1:]), v.dtype)])
                for k, v in local.items()}
      padded["weight"] = (np.arange(local_bs) < n).astype(np.float32)
      sums.append(funcs.eval_step(state, _global_batch(padded, funcs, bs)))
  sums = jax.device_get(sums)
  total = {k: float(sum(np.float64(s[k]) for s in sums)) for k in ("loss_sum", "correct_sum", "count")}
  if total["count"] == 0:
    raise ValueError(f"eval split {config.dataset.eval_split!r} of {config.dataset.name!r} is empty")
  loss = total["loss_sum"] / total["count"]
  out = {"loss": loss, "accuracy": total["correct_sum"] / total["count"], "count": total["count"]}
  if it.info.task == "lm":
    out["perplexity"] = math.exp(min(loss, 700.0))
  return out


def _rewound(it: Any) -> dict[str, Any]:
  state = dict(it.get_state())
  state["next_batch"] = 0
  return state


@jax.jit
def _count_nonzero(masks: Any) -> Any:
  return jax.tree.map(lambda m: jnp.sum(m, dtype=jnp.int32), masks)


def _mask_densities(masks: Any) -> Any:
  """Per-leaf ``nnz / size`` as Python floats (works for sharded, multi-host masks)."""
  counts = _count_nonzero(masks)
  return jax.tree.map(lambda c, m: int(c) / int(np.prod(m.shape)), jax.device_get(counts), masks)


def _flops_report(funcs: RunFunctions, state: Any, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Training FLOPs of the run and of the untransformed dense baseline (docs/method.md, section 5).

  FLOPs = 2 x MACs; forward costs are per example from
  :func:`sift_jax.flops.model_report` with the run's final masks. The run's
  cost follows its sparse method (RigL's dense-gradient steps included); the
  baseline is the untransformed model trained dense for the same steps and
  batch size.
  """
  from sift_jax import flops as flops_lib  # pylint: disable=import-outside-toplevel
  masks = _masks_or_none(state.opt_state)
  densities = None if masks is None else _mask_densities(masks)
  abstract = funcs.abstract_state
  variables = {"params": abstract.params, **abstract.model_state}
  x = jax.ShapeDtypeStruct((1, *funcs.spec.input_shape), funcs.spec.input_dtype)
  macs = flops_lib.count_macs(funcs.spec.module, variables, x, train=False)
  report = flops_lib.flops_report(macs, abstract.params, densities=densities,
                                  base_dense_macs=getattr(funcs.spec, "base_dense_macs", None),
                                  solved_sparsity=getattr(funcs.spec, "solved_sparsity", None))
  method = config.sparse.method if masks is not None else "dense"
  common = dict(total_steps=funcs.total_steps, batch_size=int(config.training.batch_size))
  run = flops_lib.training_flops(2.0 * report.sparse_macs, 2.0 * report.dense_macs, method=method,
                                 update_every=int(config.sparse.update_every),
                                 end_fraction=float(config.sparse.end_fraction),
                                 start_step=int(config.sparse.start_step), **common)
  base_macs = report.base_dense_macs if report.base_dense_macs else report.dense_macs
  dense = flops_lib.training_flops(2.0 * base_macs, 2.0 * base_macs, method="dense", **common)
  return {"train_flops": run.total, "dense_train_flops": dense.total,
          "train_flops_ratio": run.total / dense.total,
          "sparse_macs": report.sparse_macs, "dense_macs": report.dense_macs,
          "base_dense_macs": base_macs, "forward_flops_ratio": report.sparse_macs / base_macs,
          "params": report.params, "nonzero_params": report.nonzero_params,
          "nominal_sparsity": float(config.model.sparsity),
          "solved_sparsity": report.solved_sparsity, "sparse_method": method}


def _masks_or_none(opt_state: Any) -> Any:
  try:
    return sparse_lib.get_masks(opt_state)
  except ValueError:
    return None


def _run_fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return {"model": config.model.name, "family": config.model.family,
          "sparsity": float(config.model.sparsity), "sparse_method":
          config.sparse.method if optimizers.is_sparse_run(config) else "none",
          "optimizer": config.optimizer.name, "dataset": config.dataset.name}


class _SpectralLog:
  """The loop's spectral logging: layer-mean metrics of the masks every ``every`` steps.

  Records have the format of :func:`sift_jax.spectral.spectral_record` (that of
  :class:`sift_jax.spectral.SpectralLogger`) and go through the run's
  :class:`~sift_jax.training.metrics.MetricsWriter`; :meth:`plot` draws the
  whole trajectory, a resumed run's earlier points included.
  """

  def __init__(self, every: int, writer: metrics_lib.MetricsWriter, *, is_main: bool,
               earlier: Sequence[Mapping[str, Any]] = ()):
    self.every = int(every)
    self._writer = writer
    self._is_main = is_main
    self.records: list[dict[str, Any]] = [dict(r) for r in earlier]

  def maybe_log(self, step: int, state: Any) -> None:
    if step % self.every:
      return
    tree = (state.params, sparse_lib.get_masks(state.opt_state))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      tree = multihost_utils.process_allgather(tree, tiled=True)
    if not self._is_main:
      return
    params, masks = jax.device_get(tree)
    record = spectral_lib.spectral_record(spectral_lib.model_metrics(params, masks)["summary"])
    self._writer.write(step, "spectral", record)
    self.records.append({"step": int(step), "split": "spectral", **record})

  def plot(self, workdir: str) -> None:
    if self.records and self._is_main:
      spectral_lib.trajectory_plot({os.path.basename(os.path.normpath(workdir)): self.records},
                                   os.path.join(workdir, "spectral_trajectory.png"))


def _lock_workdir(workdir: str) -> workdir_lib.WorkdirLock:
  """Process 0 takes the workdir's lock for the whole job; every process learns the outcome."""
  lock = workdir_lib.WorkdirLock(workdir)
  error = None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except (workdir_lib.WorkdirLockedError, OSError) as e:
      error = e
  if jax.process_count() > 1 and _any_process(error is not None) and error is None:
    raise workdir_lib.WorkdirLockedError(f"process 0 could not lock workdir {workdir}; see its error",
                                         holder={})
  if error is not None:
    raise error
  return lock


def _check_batch_sizes(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  t = config.training
  dp = mesh.shape["data"]
  if t.batch_size % (dp * t.grad_accum_steps):
    raise ValueError(
        f"config.training.batch_size={t.batch_size} is not divisible by the data-parallel size "
        f"{dp}" + (f" x grad_accum_steps {t.grad_accum_steps}" if t.grad_accum_steps > 1 else ""))
  if t.eval_batch_size % dp:
    raise ValueError(f"config.training.eval_batch_size={t.eval_batch_size} is not divisible by the "
                     f"data-parallel size {dp}")


def _every(step: int, interval: int) -> bool:
  return interval > 0 and step % interval == 0


def _log_train(step: int, window: metrics_lib.TrainWindow, guard: checkpointing.VerifiedCheckpointer,
               writer: metrics_lib.MetricsWriter, progress: Any) -> None:
  """Writes the window's train record at ``step`` (after checking its losses)."""
  if not len(window):
    return
  guard.check()
  mean = window.mean()
  writer.write(step, "train", mean)
  if progress is not None:
    progress.set_postfix(loss=f"{mean['loss']:.4f}", acc=f"{mean['accuracy']:.3f}", refresh=False)


def _evaluate_and_log(step: int, funcs: RunFunctions, state: Any, config: ml_collections.ConfigDict,
                      eval_iter: Any, guard: checkpointing.VerifiedCheckpointer,
                      writer: metrics_lib.MetricsWriter, loop_state: dict[str, Any]) -> dict:
  """Evaluates at ``step``, writes the record and updates the best-so-far values in ``loop_state``."""
  guard.check()  # no eval of a run already known to have diverged
  result = evaluate(funcs, state, config, dataset=eval_iter)
  guard.check_eval(step, result["loss"])
  writer.write(step, "eval", result)
  best = loop_state["best_eval_accuracy"]
  loop_state["best_eval_accuracy"] = result["accuracy"] if best is None else max(best, result["accuracy"])
  best_loss = loop_state["best_eval_loss"]
  loop_state["best_eval_loss"] = result["loss"] if best_loss is None else min(best_loss, result["loss"])
  loop_state["last_eval"] = {"step": int(step), **result}
  return result


def _save(step: int, state: Any, *, guard: checkpointing.VerifiedCheckpointer, train_iter: Any,
          loop_state: dict[str, Any], window: metrics_lib.TrainWindow,
          writer: metrics_lib.MetricsWriter, wall_seconds: float) -> None:
  """Checkpoints ``step``: state, data position, and what the next records depend on."""
  loop_state["wall_seconds"] = wall_seconds
  loop_state["train_window"] = window.state()  # the unlogged steps' metrics
  writer.flush()  # the records of steps <= step reach the OS before the checkpoint exists
  guard.save(step, state, {"train_iterator": train_iter.get_state(), "loop": dict(loop_state)})


def _stop_requested(step: int, preemption: _Preemption, ckpt: checkpointing.Checkpointer,
                    check_every: int) -> bool:
  """Whether to save and stop after ``step``; the same answer on every process."""
  if jax.process_count() == 1:
    return preemption.requested
  # Every process must stop at the same step: the JAX preemption service (TPU
  # pods) syncs each step; a local SIGTERM is shared at check steps.
  if ckpt.reached_preemption(step):
    return True
  return _every(step, check_every) and _any_process(preemption.requested)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       hooks: Sequence[Callable[[int, Any], None]] = (),
                       get_model: Optional[Callable[..., Any]] = None,
                       stop_requested: Optional[Callable[[], bool]] = None) -> dict[str, Any]:
  """Trains and evaluates one run; resumes from ``workdir`` if it holds a checkpoint.

  Args:
    config: A config from :func:`sift_jax.training.default_config` (validated
      here). A resumed run must pass the config it started with; only the
      operational keys of
      :data:`sift_jax.training.config.RESUME_OPERATIONAL_KEYS` (logging, eval,
      checkpoint and spectral intervals, ``keep_checkpoints``, the progress
      bar, ``eval_batch_size``, where the data lives and how fast it is read,
      the mesh layout) may differ.
    workdir: Run directory: ``checkpoints/``, ``metrics.jsonl``,
      ``tensorboard/``, ``summary.json`` and the lock file ``.lock``.
    hooks: Called as ``hook(step, state)`` after each step (``step`` = steps
      done); for tests and custom monitoring. The state's buffers are donated
      to the next step: keep a copy (``jax.device_get``), not the arrays.
    get_model: Model factory (default :func:`sift_jax.models.get_model`).
    stop_requested: ``() -> bool``, True once the caller caught a SIGTERM
      before this function installed its own handler (the command line
      does); the run then stops as if preempted.

  Returns:
    The summary dict (also written to ``workdir/summary.json`` when training
    completed); ``"preempted": True`` if SIGTERM stopped it early, with
    ``"checkpoint_step"`` the step it can resume from (None: none saved).

  Raises:
    ValueError: for a bad config (unknown key, batch size not divisible by
      the data-parallel size...).
    FileNotFoundError: a dataset that is not prepared.
    WorkdirLockedError: another live process runs in ``workdir``.
    IncompatibleCheckpointError: ``workdir`` holds another run's checkpoint,
      or this run's checkpoint with a changed (non-operational) config.
    NonFiniteLossError: the loss became NaN/inf; the checkpoints holding that
      state are deleted and the last good one (its loss verified finite) is
      kept.
    OSError: the workdir cannot be written (full, read-only, a file...); the
      checkpoints already written are kept.
  """
  t_start = time.time()
  config_lib.validate_config(config)
  workdir = os.path.abspath(os.fspath(workdir))
  mesh = _make_mesh(config)
  _check_batch_sizes(config, mesh)
  cleanup = _Cleanup()
  with _Preemption(stop_requested) as preemption:
    try:
      summary = _train(config, workdir, mesh=mesh, hooks=tuple(hooks), get_model=get_model,
                       preemption=preemption, cleanup=cleanup, t_start=t_start)
    except BaseException:
      cleanup.run(failing=True)
      raise
    cleanup.run(failing=False)
  return summary


def _train(config: ml_collections.ConfigDict, workdir: str, *, mesh: jax.sharding.Mesh,
           hooks: tuple, get_model: Optional[Callable[..., Any]], preemption: _Preemption,
           cleanup: _Cleanup, t_start: float) -> dict[str, Any]:
  """The body of :func:`train_and_evaluate`; every resource it opens is closed by ``cleanup``."""
  t = config.training
  data = _make_datasets_module()
  batch_sharding = NamedSharding(mesh, P("data"))
  block, num_blocks = _process_block(batch_sharding, int(t.batch_size))
  train_iter = data.make_dataset(config.dataset.name, split=config.dataset.train_split,
                                 batch_size=int(t.batch_size), seed=int(config.seed),
                                 process_index=block, process_count=num_blocks,
                                 **_dataset_kwargs(config))
  cleanup.push("closing the training data", train_iter.close)
  info = train_iter.info
  # Built once (fails early, e.g. a dataset that is not prepared) and reused by every eval.
  eval_iter = make_eval_dataset(config, batch_sharding)
  cleanup.push("closing the eval data", eval_iter.close)
  steps_per_epoch, total_steps = training_length(config, info)
  funcs = build_run(config, mesh=mesh, train_info=info, total_steps=total_steps,
                    steps_per_epoch=steps_per_epoch, get_model=get_model)
  is_main = jax.process_index() == 0

  # Nothing in the workdir is touched before the config, data and model are known good.
  cleanup.push("releasing the workdir lock", _lock_workdir(workdir).release)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    keep=int(t.keep_checkpoints), run_fingerprint=_run_fingerprint(config),
                                    run_config=config_lib.resume_config(config))
  cleanup.push("closing the checkpointer", ckpt.close)
  guard = checkpointing.VerifiedCheckpointer(ckpt)
  state, start_step, loop_state, resumed = _restore_or_init(ckpt, funcs, config, train_iter, workdir)
  last_eval: Optional[dict] = None
  saved_eval = loop_state.get("last_eval")
  if resumed and isinstance(saved_eval, Mapping) and saved_eval.get("step") == start_step:
    # The eval at the restored step was finite: its checkpoint is good. For a run that
    # had completed it is the final eval, not repeated (nor its record duplicated).
    ckpt.mark_verified(start_step)
    last_eval = {k: v for k, v in saved_eval.items() if k != "step"}

  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main,
                                     resume_step=start_step if resumed else -1)
  cleanup.push("closing the metrics files", writer.close)
  window = metrics_lib.TrainWindow.from_state(loop_state.get("train_window"))
  spectral = None
  if int(t.spectral_every_steps) and optimizers.is_sparse_run(config):
    # A resumed run's trajectory continues the points logged before (the writer has
    # already dropped those past the resumed step).
    earlier = (metrics_lib.read_metrics(workdir, split="spectral")
               if resumed and is_main else ())
    spectral = _SpectralLog(int(t.spectral_every_steps), writer, is_main=is_main, earlier=earlier)
    if not resumed:
      spectral.maybe_log(0, state)  # the initial masks: where every trajectory starts
  progress = None
  if t.progress_bar and is_main:
    import tqdm  # pylint: disable=import-outside-toplevel
    progress = tqdm.tqdm(total=total_steps, initial=start_step, desc=os.path.basename(workdir),
                         dynamic_ncols=True, leave=False)
    cleanup.push("closing the progress bar", progress.close)

  wall_before = float(loop_state["wall_seconds"])
  wall = lambda: wall_before + (time.time() - t_start)  # noqa: E731
  save = functools.partial(_save, guard=guard, train_iter=train_iter, loop_state=loop_state,
                           window=window, writer=writer)
  # Losses are checked on the host at least this often (one sync per interval).
  check_every = int(t.log_every_steps) or 100
  last_saved = start_step if resumed else None
  step = start_step
  # A SIGTERM during setup: stop before the first step (the state is the checkpoint's or
  # the initial one, so there is nothing new to save).
  preempted = step < total_steps and (
      _any_process(preemption.requested) if jax.process_count() > 1 else preemption.requested)
  while not preempted and step < total_steps:
    batch = _global_batch(next(train_iter), funcs, int(t.batch_size))
    state, metrics = funcs.train_step(state, batch)
    window.add(step, metrics)
    guard.record(step, metrics["loss"])
    step += 1
    for hook in hooks:
      hook(step, state)
    if spectral is not None:
      spectral.maybe_log(step, state)
    if progress is not None:
      progress.update(1)
    if _every(step, t.log_every_steps):
      _log_train(step, window, guard, writer, progress)
    elif _every(step, check_every):
      guard.check()
    if step == total_steps:
      break  # the final record, eval and checkpoint follow
    if _every(step, t.eval_every_steps):
      last_eval = _evaluate_and_log(step, funcs, state, config, eval_iter, guard, writer, loop_state)
    stop = _stop_requested(step, preemption, ckpt, check_every)
    if _every(step, t.checkpoint_every_steps) or stop:
      save(step, state, wall_seconds=wall())
      last_saved = step
    preempted = stop

  if not preempted:
    _log_train(step, window, guard, writer, progress)  # the steps since the last log step
    # _evaluate_and_log records its step in loop_state, so does a restored finished run.
    if (loop_state.get("last_eval") or {}).get("step") != step:
      last_eval = _evaluate_and_log(step, funcs, state, config, eval_iter, guard, writer, loop_state)
    if last_saved != step:
      save(step, state, wall_seconds=wall())
      last_saved = step
  ckpt.wait()  # a failed write (a full disk) is an error of this run, before any summary

  summary: dict[str, Any] = {"steps": int(step), "total_steps": total_steps, "preempted": preempted,
                             "wall_seconds": wall(), "workdir": workdir}
  if preempted:
    summary["checkpoint_step"] = last_saved
    return summary
  if spectral is not None:
    spectral.plot(workdir)
  assert last_eval is not None  # this step was evaluated, in this run or before a restart
  summary.update(_final_results(funcs, state, config, info, last_eval, loop_state))
  if is_main:
    tmp = os.path.join(workdir, "summary.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2, sort_keys=True, default=_json_default)
    os.replace(tmp, os.path.join(workdir, "summary.json"))
  writer.write(step, "summary", {k: v for k, v in summary.items()
                                 if isinstance(v, (int, float)) and not isinstance(v, bool)})
  return summary


def _restore_or_init(ckpt: checkpointing.Checkpointer, funcs: RunFunctions,
                     config: ml_collections.ConfigDict, train_iter: Any,
                     workdir: str) -> tuple[Any, int, dict[str, Any], bool]:
  """``(state, start_step, loop_state, resumed)`` from the newest intact checkpoint, else a fresh init."""
  loop_state: dict[str, Any] = {"best_eval_accuracy": None, "best_eval_loss": None,
                                "wall_seconds": 0.0, "last_eval": None, "train_window": None}
  restored = ckpt.restore_newest(funcs.abstract_state, agree=_any_process_agrees)
  if restored is None:
    return funcs.init(np.int32(config.seed)), 0, loop_state, False
  state, saved, start_step = restored
  try:
    train_iter.set_state(saved["train_iterator"])
  except ValueError as e:
    raise checkpointing.IncompatibleCheckpointError(
        f"{ckpt.directory} step {start_step}: the saved data-iterator state does not fit this "
        f"run's data configuration ({e}); use another --workdir") from e
  loop_state.update(saved.get("loop", {}))
  if int(jax.device_get(state.step)) != start_step:
    raise checkpointing.IncompatibleCheckpointError(
        f"{ckpt.directory}: checkpoint directory step {start_step} holds state.step "
        f"{int(jax.device_get(state.step))}")
  _log.info("sift_jax: resumed %s at step %d", workdir, start_step)
  return state, start_step, loop_state, True


def _final_results(funcs: RunFunctions, state: Any, config: ml_collections.ConfigDict, info: Any,
                   last_eval: Mapping[str, Any], loop_state: Mapping[str, Any]) -> dict[str, Any]:
  """The summary's eval results, FLOP accounting and config of a completed run."""
  out: dict[str, Any] = {"final_eval_loss": last_eval["loss"], "best_eval_loss": loop_state["best_eval_loss"]}
  if info.task == "lm":
    out["final_eval_perplexity"] = last_eval["perplexity"]
    out["best_eval_perplexity"] = math.exp(min(loop_state["best_eval_loss"], 700.0))
  # Top-1 accuracy; per token for language models.
  out["final_eval_accuracy"] = last_eval["accuracy"]
  out["best_eval_accuracy"] = loop_state["best_eval_accuracy"]
  out.update(_flops_report(funcs, state, config))
  out["config"] = config.to_dict()
  return out


def _json_default(value: Any) -> Any:
  if isinstance(value, (np.integer, np.floating)):
    return value.item()
  if isinstance(value, tuple):
    return list(value)
  return repr(value)


def _any_process(flag: bool) -> bool:
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  flags = multihost_utils.process_allgather(np.asarray([flag], np.int32))
  return bool(np.any(flags))


def _any_process_agrees(flag: bool) -> bool:
  """``flag`` of any process (the flag itself in a single-process run)."""
  return _any_process(flag) if jax.process_count() > 1 else bool(flag)
