"""An exclusive lock on a run's workdir.

Two runs writing one workdir interleave their ``metrics.jsonl``, overwrite each
other's checkpoints and ``summary.json`` and can deadlock in orbax. The
training loop therefore holds :class:`WorkdirLock` for its whole run: an
``flock(LOCK_EX)`` on ``WORKDIR/.lock``, with the holder's pid, host and start
time written in the file so that a second run fails at once with an error
naming them.

A run killed by any means (``kill -9`` included) loses the lock with its
process: the kernel releases ``flock`` locks when their file is closed. The
next run takes the lock and, finding the dead holder's line still in the file
(a run that ends normally empties it), logs that it took the lock over.

Across hosts: ``flock`` is exclusive between processes of one host on every
local file system, and between hosts only where the shared file system
implements it (NFSv4 and Linux NFS clients map it to byte-range locks; many
FUSE and object-store mounts do not). A lock file naming another host is
therefore taken over with a warning saying so, which is what a preempted VM
resumed on a new host needs. In a multi-process run (``jax.distributed``)
process 0 alone takes the lock, on behalf of the whole job; the others learn
the outcome from it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from typing import Any, Optional

__all__ = ["WorkdirLock", "WorkdirLockedError", "LOCK_FILE"]

LOCK_FILE = ".lock"
_log = logging.getLogger("sift_jax")


class WorkdirLockedError(RuntimeError):
  """Another live process holds the workdir's lock.

  Attributes:
    holder: ``{"pid", "host", "started"}`` read from the lock file (empty if
      the holder had not written it yet).
  """

  def __init__(self, message: str, *, holder: dict[str, Any]):
    super().__init__(message)
    self.holder = holder


def _describe(holder: dict[str, Any]) -> str:
  if not holder:
    return "a process that has not written its pid yet"
  started = holder.get("started")
  since = (f", running since {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(started))}"
           if isinstance(started, (int, float)) else "")
  return f"pid {holder.get('pid')} on host {holder.get('host')!r}{since}"


def _read_holder(fd: int) -> dict[str, Any]:
  os.lseek(fd, 0, os.SEEK_SET)
  raw = os.read(fd, 4096)
  try:
    holder = json.loads(raw.decode("utf-8")) if raw.strip() else {}
  except (UnicodeDecodeError, ValueError):
    return {}
  return holder if isinstance(holder, dict) else {}


class WorkdirLock:
  """Exclusive, process-lifetime lock on ``WORKDIR/.lock`` (see the module docstring).

  Use as a context manager or call :meth:`acquire` / :meth:`release`.

  Args:
    workdir: The run directory (created if missing).
  """

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(os.fspath(workdir))
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self._fd: Optional[int] = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def acquire(self) -> None:
    """Takes the lock or raises :class:`WorkdirLockedError` naming its holder.

    Raises:
      WorkdirLockedError: another live process holds it.
      OSError: the workdir cannot be created or written (a file, read-only...).
    """
    if self._fd is not None:
      return
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          raise
        holder = _read_holder(fd)
        raise WorkdirLockedError(
            f"workdir {self.workdir} is in use by another run: {_describe(holder)} holds "
            f"{self.path}. Wait for it to end (or stop it) and run again, or use another --workdir",
            holder=holder) from None
      previous = _read_holder(fd)
      me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
      if previous:
        other_host = previous.get("host") != me["host"]
        _log.warning(
            "sift_jax: took over the lock of %s left by %s, which %s", self.workdir,
            _describe(previous),
            "ran on another host: flock cannot tell whether it still runs unless the file "
            "system shares locks between hosts" if other_host else "is gone")
      os.ftruncate(fd, 0)
      os.lseek(fd, 0, os.SEEK_SET)
      os.write(fd, json.dumps(me).encode("utf-8"))
      os.fsync(fd)
    except BaseException:
      os.close(fd)
      raise
    self._fd = fd

  def release(self) -> None:
    """Empties the lock file (a clean end) and releases the lock."""
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      os.ftruncate(fd, 0)
    finally:
      os.close(fd)  # releases the flock

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
