"""Builds the notebooks from their percent-format sources and runs them.

Each ``notebooks/src/NN_name.py`` holds cells separated by ``# %%`` (code) and
``# %% [markdown]`` (markdown, each line starting with ``# ``). This script
writes ``notebooks/NN_name.ipynb`` and executes it in place with nbclient so
the committed notebook carries the outputs of a real run.

  python notebooks/build.py            # build and execute all
  python notebooks/build.py 01         # only those whose name starts with 01
"""

from __future__ import annotations

import glob
import os
import sys
import time

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_cells(text: str) -> list:
  cells = []
  kind, lines = None, []

  def flush():
    if kind is None:
      return
    body = "\n".join(lines).strip("\n")
    if kind == "markdown":
      body = "\n".join(l[2:] if l.startswith("# ") else l.lstrip("#") for l in body.splitlines())
      cells.append(nbformat.v4.new_markdown_cell(body))
    elif body.strip():
      cells.append(nbformat.v4.new_code_cell(body))

  for line in text.splitlines():
    if line.startswith("# %%"):
      flush()
      kind = "markdown" if "[markdown]" in line else "code"
      lines = []
    else:
      lines.append(line)
  flush()
  return cells


def build(src: str, execute: bool = True, timeout: int = 600) -> str:
  name = os.path.splitext(os.path.basename(src))[0]
  nb = nbformat.v4.new_notebook()
  nb.cells = parse_cells(open(src).read())
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  out = os.path.join(HERE, name + ".ipynb")
  if execute:
    t0 = time.time()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": HERE}}).execute()
    print(f"{name}: executed in {time.time() - t0:.1f} s")
  nbformat.write(nb, out)
  return out


if __name__ == "__main__":
  prefix = sys.argv[1] if len(sys.argv) > 1 else ""
  for src in sorted(glob.glob(os.path.join(HERE, "src", prefix + "*.py"))):
    print("wrote", build(src))
