"""Packaging: what `import sift_jax` pulls in, one version, license and typing marker."""

import os
import re
import subprocess
import sys
import tomllib

import sift_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Dependencies of the [train] / [notebooks] extras: the core must not need them.
EXTRAS_ONLY = ("orbax", "grain", "tensorflow_datasets", "tensorflow", "ml_collections", "mnist1d",
               "sklearn", "mlxtend", "matplotlib", "tqdm", "tensorboardX", "nbformat", "nbclient")


def test_core_import_needs_only_the_core_dependencies():
  code = ("import sys, sift_jax, sift_jax.optim, sift_jax.flops, sift_jax.transformations, "
          "sift_jax.models, sift_jax.masks, sift_jax.spectral\n"
          "print(sorted({m.split('.')[0] for m in sys.modules}))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT, timeout=300).stdout
  loaded = set(eval(out.strip().splitlines()[-1]))  # pylint: disable=eval-used
  assert {"jax", "flax", "optax", "numpy"} <= loaded
  assert not loaded & set(EXTRAS_ONLY), sorted(loaded & set(EXTRAS_ONLY))


def test_core_dependencies_are_declared_and_extras_hold_the_rest():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  core = {re.split(r"[<>=!~ ]", d)[0] for d in project["dependencies"]}
  assert core == {"jax", "flax", "optax", "numpy", "scipy"}
  extras = project["optional-dependencies"]
  assert {"train", "notebooks", "test"} <= set(extras)
  train = {re.split(r"[<>=!~ ]", d)[0] for d in extras["train"]}
  assert {"orbax-checkpoint", "grain", "tensorflow-datasets", "ml_collections"} <= train
  with open(os.path.join(ROOT, "tasks.py")) as f:
    assert "[train,notebooks,test]" in f.read()


def test_one_version_license_and_typing_marker():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    pyproject = tomllib.load(f)
  assert "version" not in pyproject["project"] and pyproject["project"]["dynamic"] == ["version"]
  assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "sift_jax.__version__"}
  assert re.fullmatch(r"\d+\.\d+\.\d+", sift_jax.__version__)
  assert os.path.exists(os.path.join(ROOT, "sift_jax", "py.typed"))
  assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["sift_jax"]
  with open(os.path.join(ROOT, "LICENSE")) as f:
    text = f.read()
  assert "Apache License" in text and "Version 2.0, January 2004" in text
  assert "END OF TERMS AND CONDITIONS" in text


def _top_level_imports(path):
  import ast  # pylint: disable=g-import-not-at-top
  with open(path) as f:
    tree = ast.parse(f.read())
  names = set()
  for node in tree.body:  # module level only: imports inside functions are lazy
    if isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{a.name}" for a in node.names)
    elif isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
  return names


def test_flops_core_does_not_import_models_or_transformations():
  # flops <- transformations <- models: the FLOP counter itself sits below both
  # (only its CLI, loaded lazily, sits above them).
  flops_dir = os.path.join(ROOT, "sift_jax", "flops")
  for name in ("__init__.py", "_count.py", "_report.py", "_training.py"):
    imports = _top_level_imports(os.path.join(flops_dir, name))
    assert not {i for i in imports if i.startswith(("sift_jax.models", "sift_jax.transformations"))
                or i in ("sift_jax.models", "sift_jax.transformations")}, (name, imports)
  with open(os.path.join(flops_dir, "__init__.py")) as f:
    body = f.read()
  assert "def " not in body.replace("def __getattr__", ""), "flops/__init__.py only re-exports"
