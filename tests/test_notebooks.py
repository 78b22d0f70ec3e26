"""The notebooks run top to bottom, and the committed ones match their sources."""

import glob
import os
import sys
import time

import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "notebooks"))
import build  # noqa: E402  pylint: disable=g-import-not-at-top

# The RigL-dynamics notebook shows its plots: counts and accuracy, the
# spectral trajectory, and spectral metrics against accuracy.
MIN_IMAGES = {"03_rigl_dynamics_mnist1d.py": 3}

SOURCES = sorted(glob.glob(os.path.join(ROOT, "notebooks", "src", "*.py")))


def test_there_are_four_notebooks():
  assert [os.path.basename(s) for s in SOURCES] == [
      "01_mask_transforms.py", "02_sparse_ift_family.py", "03_rigl_dynamics_mnist1d.py",
      "04_fold_and_export.py"]


@pytest.mark.parametrize("src", SOURCES, ids=os.path.basename)
def test_committed_notebook_matches_source_and_has_outputs(src):
  committed = nbformat.read(src[: -len(".py")].replace(os.sep + "src" + os.sep, os.sep) + ".ipynb", 4)
  cells = build.parse_cells(open(src).read())
  assert [c.source for c in committed.cells] == [c.source for c in cells]
  code = [c for c in committed.cells if c.cell_type == "code"]
  assert all(c.get("outputs") is not None for c in code)
  assert sum(len(c.outputs) for c in code) >= len(code) // 2
  errors = [o for c in code for o in c.outputs if o.get("output_type") == "error"]
  assert not errors
  images = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
  assert images >= MIN_IMAGES.get(os.path.basename(src), 0)


@pytest.mark.parametrize("src", SOURCES, ids=os.path.basename)
def test_notebook_executes(src, tmp_path, monkeypatch):
  from nbclient import NotebookClient  # pylint: disable=g-import-not-at-top
  # Every cell runs, in the notebooks' small configuration (fewer training steps); the kernel
  # inherits the variable. The committed outputs come from the full one (notebooks/build.py).
  monkeypatch.setenv("SIFT_JAX_NOTEBOOK_QUICK", "1")
  nb = nbformat.v4.new_notebook()
  nb.cells = build.parse_cells(open(src).read())
  t0 = time.time()
  # Raises CellExecutionError (with the traceback) on the first failing cell.
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  elapsed = time.time() - t0
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert outputs and not [o for o in outputs if o.get("output_type") == "error"]
  print(f"{os.path.basename(src)} executed in {elapsed:.1f} s")
