"""Export a finished training run for inference: fold or compress, orbax + ``jax.export``.

``python -m sift_jax.export --workdir RUN --out DIR`` (or :func:`export_run`)
reads the newest checkpoint of a run made by
:func:`sift_jax.training.train_and_evaluate`, rebuilds its model from the
config stored in the checkpoint, folds it back into the dense architecture
(:func:`sift_jax.inference.fold`) or, for members that do not fold (Sparse
Wide, nonlinear or LayerNorm members), stores its sparse kernels
(:func:`sift_jax.inference.compress`), and writes to ``DIR``:

* ``variables/``: an orbax checkpoint of the inference variables;
* ``model.jax_export``: the serialized ``jax.export`` artifact (StableHLO) of
  ``f(variables, x) -> logits`` with a symbolic batch dimension;
* ``export.json``: what was exported (model, member, fold or compress, input
  shape and dtype, parameter count, bytes).

A plain JAX program reloads it without ``sift_jax``::

  import jax, orbax.checkpoint as ocp
  exported = jax.export.deserialize(open(f"{DIR}/model.jax_export", "rb").read())
  (target, _), _ = jax.tree.unflatten(exported.in_tree, [
      jax.ShapeDtypeStruct(a.shape, a.dtype) for a in exported.in_avals])
  variables = ocp.StandardCheckpointer().restore(f"{DIR}/variables", target)
  logits = exported.call(variables, x)

(``target`` holds the batch dimension of ``x`` as a symbol; the variables
have none, so every leaf of it is concrete.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sift_jax.inference.compress import FORMAT_CHOICES, compress, variable_bytes
from sift_jax.inference.fold import FoldError, fold

__all__ = ["export_run", "export_model", "load_run", "ExportResult", "MODES", "main"]

#: How :func:`export_model` turns a trained model into an inference model.
MODES = ("auto", "fold", "compress")


@dataclasses.dataclass(frozen=True)
class ExportResult:
  """What :func:`export_model` wrote.

  Attributes:
    out_dir: Absolute output directory.
    how: ``"fold"``, ``"compress"`` or ``"dense"`` (a dense run, exported as it is).
    apply: The inference function ``apply(variables, x)`` that was exported.
    variables: The inference variables (what ``variables/`` holds).
    info: The contents of ``export.json``.
  """

  out_dir: str
  how: str
  apply: Callable[[Any, Any], Any]
  variables: Any
  info: dict


def _inference_model(spec: Any, variables: Any, masks: Any, mode: str, fmt: str
                     ) -> tuple[str, Callable[[Any, Any], Any], Any, str]:
  """``(how, apply, variables, why)`` for a ModelSpec's trained variables."""
  if mode not in MODES:
    raise ValueError(f"export: unknown mode {mode!r}; expected one of {MODES}")
  why = ""
  if spec.family == "dense" and mode != "compress":
    module, out = fold(spec, variables, masks)
    return "dense", lambda v, x: module.apply(v, x, train=False), out, why
  if mode in ("auto", "fold"):
    try:
      module, out = fold(spec, variables, masks)
      return "fold", lambda v, x: module.apply(v, x, train=False), out, why
    except FoldError as e:
      if mode == "fold":
        raise
      why = str(e)
  small = compress(spec, variables, masks, format=fmt)
  return "compress", small.apply, small.variables, why


def export_model(spec: Any, variables: Any, out_dir: str, *, masks: Any = None, mode: str = "auto",
                 format: str = "auto", extra_info: Optional[dict] = None) -> ExportResult:
  """Folds or compresses a registry model's trained variables and writes the artifacts.

  Args:
    spec: The run's :class:`sift_jax.ModelSpec`.
    variables: Trained variables (``params`` and ``batch_stats``).
    out_dir: Output directory (made absolute; must not hold an export yet).
    masks: Optional masks (else the zeros of the weights).
    mode: ``"auto"`` (fold where the member folds, else compress), ``"fold"``
      (raise where it does not) or ``"compress"``.
    format: How to compress: ``"auto"`` (per layer by density) or a
      :data:`sift_jax.inference.FORMATS` key.
    extra_info: More entries for ``export.json``.

  Returns:
    An :class:`ExportResult`.

  Raises:
    FileExistsError: if ``out_dir`` already holds an export.
    ValueError / FoldError: as :func:`sift_jax.inference.fold` and
      :func:`sift_jax.inference.compress`.
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  out_dir = os.path.abspath(os.fspath(out_dir))
  artifact = os.path.join(out_dir, "model.jax_export")
  if os.path.exists(artifact) or os.path.exists(os.path.join(out_dir, "variables")):
    raise FileExistsError(f"export: {out_dir} already holds an export; choose another --out")
  how, apply, inference_vars, why = _inference_model(spec, variables, masks, mode, format)
  inference_vars = jax.tree.map(jnp.asarray, inference_vars)
  batch = jax.export.symbolic_shape("batch")[0]
  x_spec = jax.ShapeDtypeStruct((batch,) + tuple(spec.input_shape), spec.input_dtype)
  v_spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), inference_vars)
  exported = jax.export.export(jax.jit(apply))(v_spec, x_spec)
  os.makedirs(out_dir, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(out_dir, "variables"), inference_vars)
  checkpointer.wait_until_finished()
  checkpointer.close()
  with open(artifact, "wb") as f:
    f.write(exported.serialize())
  info = {
      "model": spec.name, "family": spec.family, "nominal_sparsity": spec.nominal_sparsity,
      "how": how, "why_not_folded": why or None,
      "input_shape": ["batch"] + list(spec.input_shape), "input_dtype": str(np.dtype(spec.input_dtype)),
      "output": [str(a) for a in exported.out_avals],
      "parameters": int(sum(np.size(l) for l in jax.tree.leaves(inference_vars.get("params", {})))),
      "bytes": variable_bytes(inference_vars),
      "platforms": list(exported.platforms), **(extra_info or {}),
  }
  with open(os.path.join(out_dir, "export.json"), "w", encoding="utf-8") as f:
    json.dump(info, f, indent=2, sort_keys=True)
  return ExportResult(out_dir, how, apply, inference_vars, info)


def load_run(workdir: str, step: Optional[int] = None) -> tuple[Any, dict, Any, int]:
  """``(spec, variables, masks, step)`` of a training run's checkpoint (default: the newest).

  The model is rebuilt from the config stored in the checkpoint; the state is
  restored into the run's abstract state (on one device).

  Raises:
    FileNotFoundError: no checkpoint under ``workdir/checkpoints``.
    ValueError: a checkpoint without a stored config (written by an older
      sift_jax), or one that is not a sift_jax training checkpoint.
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from sift_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from sift_jax import optim  # pylint: disable=import-outside-toplevel
  from sift_jax import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  from sift_jax import training  # pylint: disable=import-outside-toplevel
  from sift_jax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  from sift_jax.training import loop  # pylint: disable=import-outside-toplevel

  ckpt_dir = os.path.join(os.path.abspath(os.fspath(workdir)), "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"export: no checkpoints in {ckpt_dir} (is --workdir a training run?)")
  manager = ocp.CheckpointManager(ckpt_dir, item_names=("state", "data", "meta"))
  try:
    step = manager.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f"export: no checkpoint in {ckpt_dir}")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  finally:
    manager.close()
  if not isinstance(meta, dict) or "config" not in meta:
    raise ValueError(f"export: {ckpt_dir} step {step} stores no run config (format "
                     f"{meta.get('format') if isinstance(meta, dict) else None!r}); cannot rebuild "
                     "its model")
  config = training.apply_overrides(training.default_config(), meta["config"])
  options = dict(config.dataset.options)
  if config.dataset.data_dir:
    options["data_dir"] = config.dataset.data_dir
  info = data_lib.get_dataset_info(config.dataset.name, split=config.dataset.train_split, **options)
  steps_per_epoch, total_steps = loop.training_length(config, info)
  mesh = sharding_lib.make_mesh(1, 1, devices=jax.devices()[:1])
  single = training.apply_overrides(config, {"mesh.data": 1, "mesh.model": 1})
  funcs = training.build_run(single, mesh=mesh, train_info=info, total_steps=total_steps,
                             steps_per_epoch=steps_per_epoch)
  checkpointer = training.Checkpointer(ckpt_dir, keep=1 << 30, run_fingerprint={},
                                       run_config=config_lib.resume_config(config))
  try:
    state, _, step = checkpointer.restore(funcs.abstract_state, step)
  finally:
    checkpointer.close()
  variables = {"params": jax.device_get(state.params), **jax.device_get(state.model_state)}
  try:
    masks = jax.device_get(optim.get_masks(state.opt_state))
  except ValueError:
    masks = None  # a dense run
  return funcs.spec, variables, masks, int(step)


def export_run(workdir: str, out_dir: str, *, mode: str = "auto", format: str = "auto",
               step: Optional[int] = None) -> ExportResult:
  """Exports a finished training run (see the module docstring)."""
  spec, variables, masks, step = load_run(workdir, step)
  return export_model(spec, variables, out_dir, masks=masks, mode=mode, format=format,
                      extra_info={"workdir": os.path.abspath(os.fspath(workdir)), "step": step})


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m sift_jax.export",
      description="Fold or compress a finished sift_jax training run and write an orbax "
                  "checkpoint of its inference variables and a jax.export artifact.")
  parser.add_argument("--workdir", required=True, help="the training run's directory")
  parser.add_argument("--out", required=True, help="output directory (new)")
  parser.add_argument("--mode", default="auto", choices=MODES,
                      help="fold where the member folds (auto), only fold, or compress")
  parser.add_argument("--format", default="auto", choices=FORMAT_CHOICES,
                      help="sparse format of compressed kernels (auto: per layer by density)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  args = parser.parse_args(argv)
  try:
    result = export_run(args.workdir, args.out, mode=args.mode, format=args.format, step=args.step)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(result.info, indent=2, sort_keys=True))
  return 0
