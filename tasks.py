#!/usr/bin/env python3
"""Set-up and entry points that need nothing but ``python3`` and PyPI.

  python3 tasks.py main [ARGS...]       # the main job: experiments/main.py
  python3 tasks.py test [ARGS...]       # the type check (mypy), then the test suite (pytest)
  python3 tasks.py typecheck [ARGS...]  # the type check alone

Each command creates ``.venv`` next to this file on first use (or reuses it),
installs the project with all its extras (``.[train,notebooks,test]``) into
it when they changed,
and then runs inside it. Only the standard library is used here.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import venv

ROOT = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(ROOT, ".venv")
PYTHON = os.path.join(VENV, "bin", "python")
STAMP = os.path.join(VENV, ".sift_jax-install-stamp")
INPUTS = ("requirements.txt", "requirements-test.txt", "pyproject.toml")


def _digest() -> str:
  h = hashlib.sha256()
  for name in INPUTS:
    with open(os.path.join(ROOT, name), "rb") as f:
      h.update(name.encode() + b"\0" + f.read())
  return h.hexdigest()


def ensure_venv() -> None:
  """Creates or reuses .venv and installs what changed since the last install."""
  if not os.path.exists(PYTHON):
    print(f"[tasks] creating virtualenv {VENV}", flush=True)
    venv.EnvBuilder(with_pip=True).create(VENV)
  digest = _digest()
  if os.path.exists(STAMP) and open(STAMP).read().strip() == digest:
    return
  print("[tasks] installing requirements into .venv (about a minute)", flush=True)
  subprocess.check_call([PYTHON, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                         "-r", os.path.join(ROOT, "requirements-test.txt"),
                         "-e", ROOT + "[train,notebooks,test]"])
  with open(STAMP, "w") as f:
    f.write(digest + "\n")


TASKS = ("main", "test", "typecheck")
# mypy reads its settings ([tool.mypy]: which files, strictness) from pyproject.toml.
MYPY = [PYTHON, "-m", "mypy", "--config-file", os.path.join(ROOT, "pyproject.toml")]


def commands(task: str, args: list[str]) -> list[list[str]]:
  """The commands ``task`` runs, in order; each must succeed for the next to run.

  Extra arguments go to the last command (pytest for ``test``, mypy for ``typecheck``).
  """
  if task == "main":
    return [[PYTHON, os.path.join(ROOT, "experiments", "main.py"), *args]]
  if task == "test":
    return [MYPY, [PYTHON, "-m", "pytest", "-p", "no:cacheprovider", *args]]
  if task == "typecheck":
    return [MYPY + args]
  raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def _run_mypy(cmd: list[str], env: dict[str, str]) -> int:
  """Runs mypy; prints one line when it passes, its report when it does not."""
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  files = re.search(r"in (\d+) source files?", proc.stdout)
  if proc.returncode == 0:
    print(f"[tasks] mypy: ok ({files.group(1) if files else '?'} files)", flush=True)
  else:
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    print(f"[tasks] mypy: failed (exit status {proc.returncode}); fix the errors above", flush=True)
  return proc.returncode


def main(argv: list[str]) -> int:
  if len(argv) < 1 or argv[0] not in TASKS:
    print(__doc__.strip())
    return 2
  ensure_venv()
  env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
  for cmd in commands(argv[0], argv[1:]):
    rc = _run_mypy(cmd, env) if cmd[:3] == MYPY[:3] else subprocess.call(cmd, cwd=ROOT, env=env)
    if rc != 0:
      return rc
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
