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

One run per workdir: a second command on a workdir in use exits at once with
an error naming the pid and host of the run holding it.

Errors end in one ``error: ...`` line on stderr, without a traceback (pass
``--traceback`` to see it): a bad config file (a syntax error, no
``get_config``, a ``get_config`` that raises), a workdir that cannot be written
(full or read-only disk, a file, permission denied), a workdir in use, a
non-finite loss, an incompatible checkpoint, a dataset not prepared. The
checkpoints already written are kept, so the same command resumes once the
cause is fixed.

SIGTERM is handled from the start of the process (see ``sift_jax._sigterm``):
during training the loop saves a checkpoint at the next step boundary; before
the first step it stops without training.

Exit status: 0 when training completed or was preempted (SIGTERM), 1 on a
training or environment error (the ones above), 2 on a bad command line or
config file.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
import traceback

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

_TRACEBACK = flags.DEFINE_bool("traceback", False,
                               "On an error, print the traceback before the error line.")

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


def _config_path(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith(("--config=", "-config=")):
      return arg.split("=", 1)[1]
  return None


def _config_file_error(e: BaseException, path: str | None) -> str | None:
  """The one-line error for a config file that does not load, or None if ``e`` is not that."""
  if path is None:
    return None
  shown = os.path.abspath(path)
  if isinstance(e, OSError) and not os.path.isfile(path):
    return f"--config {path}: {'not a file' if os.path.exists(path) else 'no such file'}"
  if isinstance(e, SyntaxError) and e.filename and os.path.abspath(e.filename) == shown:
    return f"--config {path}: syntax error at line {e.lineno}: {e.msg}"
  if isinstance(e, AttributeError) and "get_config" in str(e):
    return f"--config {path} defines no get_config() function"
  frames = traceback.extract_tb(e.__traceback__)
  if any(os.path.abspath(frame.filename) == shown for frame in frames):
    line = next(frame.lineno for frame in reversed(frames) if os.path.abspath(frame.filename) == shown)
    return f"--config {path}: get_config() raised {type(e).__name__} at line {line}: {_one_line(e)}"
  return None


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split()) or repr(e)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl parsing; a bad config file or override becomes one clear line."""
  try:
    _check_override_keys(argv[1:])
    rest = flags.FLAGS(argv)
    # ml_collections defers a file that failed to load to the first use of the config; the
    # free-form sections took their new keys: no more.
    _CONFIG.value.lock()
  except Exception as e:  # pylint: disable=broad-except
    config_error = _config_file_error(e, _config_path(argv[1:]))
    if config_error is None:
      _override_error(e, argv)
    if "--traceback" in argv:
      traceback.print_exc()
    print(f"error: {config_error}", file=sys.stderr)
    sys.exit(2)
  return rest


def _override_error(e: Exception, argv: list[str]):
  """Exits with the one-line error of a bad flag or ``--config.KEY=VALUE`` override."""
  if isinstance(e, flags.Error):
    print(f"error: {e}\nPass --helpfull to see the flags.", file=sys.stderr)
    sys.exit(2)
  if not isinstance(e, (AttributeError, KeyError, TypeError, ValueError)):
    raise e
  # ml_collections nests the KeyError's repr in the message: unwrap it.
  message = str(e)
  while len(message) > 1 and message[0] == message[-1] and message[0] in "'\"":
    message = message[1:-1]
  message = message.replace("\\'", "'").replace("\\n", " ").replace("\n", " ")
  bad = [a for a in argv[1:] if a.startswith("--config.")]
  print(f"error: bad config override among {bad}: {message}", file=sys.stderr)
  sys.exit(2)


def _maybe_initialize_distributed() -> None:
  import jax  # pylint: disable=import-outside-toplevel
  if _CPU_COLLECTIVES.value:
    jax.config.update("jax_cpu_collectives_implementation", _CPU_COLLECTIVES.value)
  if _COORDINATOR.value is not None:
    jax.distributed.initialize(_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif _JAX_DISTRIBUTED.value:
    jax.distributed.initialize()


# tensorstore (orbax's storage layer) reports a failed system call inside a ValueError.
_STORAGE_OS_ERROR = re.compile(r"os_error_code='?(\d+)")
_STORAGE_PATH = re.compile(r'"(/[^"]+)"')


def _environment_error(e: BaseException | None) -> OSError | None:
  """The failed system call behind ``e`` (an OSError in its chain, or one tensorstore reports)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError):
      return e
    code = _STORAGE_OS_ERROR.search(str(e))
    if code:
      paths = _STORAGE_PATH.findall(str(e))
      return OSError(int(code.group(1)), os.strerror(int(code.group(1))), paths[-1] if paths else None)
    e = e.__cause__ or e.__context__
  return None


def error_line(e: BaseException, workdir: str) -> str | None:
  """The one ``error:`` line of a failed run, or None for an unexpected error (a bug)."""
  # pylint: disable=import-outside-toplevel
  from sift_jax.training import checkpointing, workdir as workdir_lib
  env = None if isinstance(e, FileNotFoundError) else _environment_error(e)
  if env is not None:
    where = f" ({env.filename})" if getattr(env, "filename", None) else ""
    errno_text = f"[Errno {env.errno}] " if env.errno is not None else ""
    return (f"error: cannot write the run in workdir {workdir}: {errno_text}{env.strerror or _one_line(env)}"
            f"{where}. Checkpoints already written are kept; fix the cause (free space, permissions, "
            "the path) and run the same command to resume")
  if isinstance(e, (workdir_lib.WorkdirLockedError, checkpointing.IncompatibleCheckpointError,
                    FloatingPointError, FileNotFoundError, ValueError)):
    return f"error: {type(e).__name__}: {_one_line(e)}"
  return None


class _OneLineLogs(logging.Filter):
  """Keeps other libraries' error logs to one line each (orbax logs every failed write with a
  traceback: a full disk gave hundreds of lines); ``--traceback`` turns this off."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name != "sift_jax":
      message = record.getMessage().strip()
      if record.exc_info or record.exc_text or "\n" in message:
        record.msg = (message.splitlines() or [""])[0][:300]
        record.args, record.exc_info, record.exc_text = (), None, None
    return True


# Background threads (orbax writers) may be inside a hook when the main thread reports a failure;
# the lock makes "silenced" a point in time: a hook prints before it or not at all, so the
# error line stays last.
_BACKGROUND_OUTPUT_LOCK = threading.Lock()
_BACKGROUND_SILENCED = [False]


def _quiet_background_errors() -> None:
  """One line, not a traceback, for errors of background threads (orbax writers)."""
  def warn(text: str) -> None:
    with _BACKGROUND_OUTPUT_LOCK:
      if not _BACKGROUND_SILENCED[0]:
        print(text, file=sys.stderr, flush=True)

  def thread_hook(args):
    warn(f"warning: {args.exc_type.__name__} in thread {getattr(args.thread, 'name', '?')}: "
         f"{_one_line(args.exc_value)[:300]}")

  def unraisable_hook(args):
    warn(f"warning: {type(args.exc_value).__name__}: {_one_line(args.exc_value)[:300]}")

  threading.excepthook = thread_hook
  sys.unraisablehook = unraisable_hook


def _silence_background_errors() -> None:
  """After a failure: no more output from other libraries' threads and logs (orbax writers
  failing on the same full disk, or at interpreter shutdown), so the error line comes last."""
  with _BACKGROUND_OUTPUT_LOCK:  # waits for a hook that is printing now
    _BACKGROUND_SILENCED[0] = True
  threading.excepthook = lambda args: None
  sys.unraisablehook = lambda args: None
  logging.disable(logging.CRITICAL)


def _let_background_threads_end(timeout_s: float = 10.0) -> None:
  """Gives the writer threads of a failed run a moment to end, so that the error line comes last."""
  deadline = time.time() + timeout_s
  for thread in threading.enumerate():
    if thread is not threading.current_thread() and not thread.daemon:
      thread.join(max(0.0, deadline - time.time()))


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    return 2
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
  logging.getLogger("sift_jax").setLevel(logging.INFO)
  if not _TRACEBACK.value:
    for handler in logging.getLogger().handlers:
      handler.addFilter(_OneLineLogs())
    _quiet_background_errors()
  _maybe_initialize_distributed()
  # pylint: disable=import-outside-toplevel
  from sift_jax import _sigterm
  from sift_jax.training import loop
  assert _WORKDIR.value is not None  # a required flag (absl checked it while parsing)
  workdir = os.path.abspath(_WORKDIR.value)
  try:
    summary = loop.train_and_evaluate(_CONFIG.value, workdir, stop_requested=_sigterm.received)
  except Exception as e:  # pylint: disable=broad-except
    line = error_line(e, workdir)
    if line is None:
      raise  # not an expected failure: a bug, with its traceback
    if _TRACEBACK.value:
      traceback.print_exc()
    else:
      _silence_background_errors()  # what fails now follows from the error reported
    _let_background_threads_end()
    print(line, file=sys.stderr, flush=True)
    return 1
  if summary["preempted"]:
    saved = summary.get("checkpoint_step")
    where = (f"checkpoint of step {saved} in {summary['workdir']}" if saved is not None else
             f"no checkpoint yet in {summary['workdir']}")
    print(f"preempted at step {summary['steps']}; {where}; run the same command to resume")
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
