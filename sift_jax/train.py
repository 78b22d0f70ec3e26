r"""Command-line training: one run from an ml_collections config file.

Usage::

  python -m sift_jax.train --config experiments/configs/NAME.py --workdir DIR \
      [--config.KEY=VALUE ...]

Overriding a key the config does not have is an error listing the known keys
of its section, except in the free-form sections ``model.kwargs`` and
``dataset.options``, whose keys depend on the model and the dataset:
``--config.dataset.options.num_samples=1000`` or
``--config.model.kwargs.hidden='(64, 64)'`` may add a key (the value is read
as a Python literal, else as a string). The parsed config is then locked. A
workdir that holds a checkpoint of the same run is resumed (only operational
keys such as logging, eval and checkpoint intervals may change, see
``sift_jax.training.config.RESUME_OPERATIONAL_KEYS``); one that holds another
run's checkpoint is refused. Multi-host (TPU pods, or CPU processes with
``--coordinator_address``): every process runs the same command; see
``--jax_distributed``.

Exit status: 0 when training completed or was preempted (SIGTERM; a checkpoint
was saved), 1 on a training error (non-finite loss, incompatible checkpoint,
dataset not prepared, bad config value), 2 on a bad command line.
"""

from __future__ import annotations

import logging
import re
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

# Unlocked while parsing so that the free-form sections accept new keys; every other
# override is checked against the known keys (_check_override_keys) and the config is
# locked after parsing.
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (a Python file with get_config()).", lock_config=False,
    accept_new_attributes=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, summary).")
_JAX_DISTRIBUTED = flags.DEFINE_bool(
    "jax_distributed", False,
    "Call jax.distributed.initialize() (arguments auto-detected on TPU pods, SLURM...).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for jax.distributed.initialize.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_CPU_COLLECTIVES = flags.DEFINE_string(
    "cpu_collectives", None, "jax_cpu_collectives_implementation for multi-process CPU runs (gloo).")

flags.mark_flags_as_required(["config", "workdir"])


_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")


def override_keys(argv: list[str]) -> list[str]:
  """The dotted config keys that ``--config.KEY=VALUE`` (or ``--[no]config.KEY``) arguments set."""
  out = []
  for arg in argv:
    match = _OVERRIDE.match(arg)
    if match:
      out.append(match.group(1))
  return out


def _check_override_keys(argv: list[str]) -> None:
  """Raises ``ValueError`` for an override of a key outside the free-form sections that
  :func:`sift_jax.training.default_config` does not have (naming the section's known keys)."""
  from sift_jax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  for key in override_keys(argv):
    config_lib.check_key(key)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl parsing; unknown or mistyped config overrides become one clear line."""
  try:
    _check_override_keys(argv[1:])
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}\nPass --helpfull to see the flags.", file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections nests the KeyError's repr in the message: unwrap it.
    message = str(e)
    while len(message) > 1 and message[0] == message[-1] and message[0] in "'\"":
      message = message[1:-1]
    message = message.replace("\\'", "'").replace("\\n", " ").replace("\n", " ")
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    print(f"error: bad config override among {bad}: {message}", file=sys.stderr)
    sys.exit(2)
  try:
    _CONFIG.value.lock()  # the free-form sections took their new keys: no more
  except OSError as e:  # ml_collections defers a config file that failed to load to here
    print(f"error: --config: {e}", file=sys.stderr)
    sys.exit(2)
  return rest


def _maybe_initialize_distributed() -> None:
  import jax  # pylint: disable=import-outside-toplevel
  if _CPU_COLLECTIVES.value:
    jax.config.update("jax_cpu_collectives_implementation", _CPU_COLLECTIVES.value)
  if _COORDINATOR.value is not None:
    jax.distributed.initialize(_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif _JAX_DISTRIBUTED.value:
    jax.distributed.initialize()


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    return 2
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
  logging.getLogger("sift_jax").setLevel(logging.INFO)
  _maybe_initialize_distributed()
  # pylint: disable=import-outside-toplevel
  from sift_jax.training import checkpointing, loop
  try:
    summary = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, FloatingPointError,
          checkpointing.IncompatibleCheckpointError) as e:
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    return 1
  if summary["preempted"]:
    print(f"preempted at step {summary['steps']}; checkpoint saved in {summary['workdir']}")
    return 0
  keys = ("final_eval_accuracy", "best_eval_accuracy", "final_eval_loss", "final_eval_perplexity",
          "train_flops", "dense_train_flops", "steps", "wall_seconds")
  print(" ".join(f"{k}={summary[k]:.6g}" if isinstance(summary[k], float) else f"{k}={summary[k]}"
                 for k in keys if k in summary))
  return 0


def run() -> None:
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
