"""SIGTERM from the first moment of ``python -m sift_jax.train``.

Importing the package (jax, flax, orbax...) takes seconds, and a preemptible
job can be told to stop during them. The package's ``__init__`` imports this
module first (it imports nothing heavy) and, only when the process is the
training command line, installs a handler that records the signal. The
training loop then stops cleanly before its first step instead of the process
dying. Library users (notebooks, tests, other programs) get no handler.
"""

import signal
import sys
import threading

_received: list[int] = []
_CLI_MODULE = "sift_jax.train"


def _remember(signum, frame):  # pylint: disable=unused-argument
  _received.append(signum)


def install_for_training_cli() -> None:
  """Installs the recording handler if this process is ``python -m sift_jax.train``."""
  argv = list(getattr(sys, "orig_argv", ()))
  is_cli = "-m" in argv and argv[argv.index("-m") + 1:argv.index("-m") + 2] == [_CLI_MODULE]
  if is_cli and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _remember)


def received() -> bool:
  """Whether the recording handler caught a SIGTERM."""
  return bool(_received)
