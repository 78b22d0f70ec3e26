#!/usr/bin/env python3
"""Set-up and entry points that need nothing but ``python3`` and PyPI.

  python3 tasks.py main [ARGS...]   # the main job: experiments/main.py
  python3 tasks.py test [ARGS...]   # the whole test suite (pytest)

Each command creates ``.venv`` next to this file on first use (or reuses it),
installs the project with all its extras (``.[train,notebooks,test]``) into
it when they changed,
and then runs inside it. Only the standard library is used here.
"""

from __future__ import annotations

import hashlib
import os
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


def main(argv: list[str]) -> int:
  if len(argv) < 1 or argv[0] not in ("main", "test"):
    print(__doc__.strip())
    return 2
  ensure_venv()
  env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
  if argv[0] == "main":
    cmd = [PYTHON, os.path.join(ROOT, "experiments", "main.py"), *argv[1:]]
  else:
    cmd = [PYTHON, "-m", "pytest", "-p", "no:cacheprovider", *argv[1:]]
  return subprocess.call(cmd, cwd=ROOT, env=env)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
