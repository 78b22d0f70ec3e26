"""Packaging: what `import sift_jax` pulls in, one version, license and typing marker."""

import importlib.util
import os
import re
import subprocess
import sys
import tomllib
import types

import pytest

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


def _load_tasks():
  spec = importlib.util.spec_from_file_location("_sift_jax_tasks", os.path.join(ROOT, "tasks.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_tasks_test_runs_mypy_with_the_project_config_before_pytest():
  tasks = _load_tasks()
  mypy = [tasks.PYTHON, "-m", "mypy", "--config-file", os.path.join(ROOT, "pyproject.toml")]
  assert tasks.commands("test", ["-k", "rigl"]) == [
      mypy, [tasks.PYTHON, "-m", "pytest", "-p", "no:cacheprovider", "-k", "rigl"]]
  assert tasks.commands("typecheck", []) == [mypy]
  assert tasks.commands("typecheck", ["sift_jax/masks"]) == [mypy + ["sift_jax/masks"]]
  with pytest.raises(ValueError, match="'lint'"):
    tasks.commands("lint", [])


def test_tasks_test_stops_when_mypy_fails_and_reports_one_line_when_it_passes(monkeypatch, capsys):
  tasks = _load_tasks()
  mypy_result = {}
  called = []

  def run(cmd, **kwargs):
    assert cmd[1:3] == ["-m", "mypy"] and kwargs["cwd"] == ROOT
    return subprocess.CompletedProcess(cmd, mypy_result["rc"], stdout=mypy_result["out"], stderr="")

  def call(cmd, **kwargs):
    called.append(cmd[1:3])
    return 0

  monkeypatch.setattr(tasks, "ensure_venv", lambda: None)
  monkeypatch.setattr(tasks, "subprocess", types.SimpleNamespace(run=run, call=call))
  mypy_result.update(rc=1, out="sift_jax/x.py:3: error: bad  [arg-type]\n"
                                "Found 1 error in 1 file (checked 56 source files)\n")
  assert tasks.main(["test"]) == 1
  assert called == []  # pytest never started
  out = capsys.readouterr().out
  assert "sift_jax/x.py:3: error: bad" in out and "[tasks] mypy: failed (exit status 1)" in out
  mypy_result.update(rc=0, out="Success: no issues found in 56 source files\n")
  assert tasks.main(["test", "-x"]) == 0
  assert called == [["-m", "pytest"]]
  assert capsys.readouterr().out.splitlines() == ["[tasks] mypy: ok (56 files)"]
  assert tasks.main(["typecheck"]) == 0 and called == [["-m", "pytest"]]


def test_mypy_config_checks_the_package_and_names_each_untyped_dependency():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    pyproject = tomllib.load(f)
  mypy = pyproject["tool"]["mypy"]
  assert mypy["files"] == ["sift_jax"] and mypy["python_version"] == "3.11"
  assert mypy["check_untyped_defs"] is True and "ignore_missing_imports" not in mypy
  (override,) = mypy["overrides"]
  assert override["ignore_missing_imports"] is True
  assert "*" not in override["module"] and "optax" in override["module"]
  assert not any(m.startswith(("jax", "flax", "numpy", "scipy")) for m in override["module"])
  test_extra = {re.split(r"[<>=!~ ]", d)[0] for d in pyproject["project"]["optional-dependencies"]["test"]}
  assert {"mypy", "scipy-stubs", "types-tqdm"} <= test_extra
  with open(os.path.join(ROOT, "requirements-test.txt")) as f:
    assert {"mypy", "scipy-stubs", "types-tqdm"} <= {re.split(r"[<>=!~ ]", l.strip())[0] for l in f}


def test_no_unexplained_type_ignores():
  # Every `type: ignore` names its error code and says why on the line above it.
  for dirpath, _, names in os.walk(os.path.join(ROOT, "sift_jax")):
    for name in (n for n in names if n.endswith(".py")):
      with open(os.path.join(dirpath, name)) as f:
        lines = f.read().splitlines()
      for i, line in enumerate(lines):
        if "type: ignore" in line:
          where = f"{os.path.relpath(os.path.join(dirpath, name), ROOT)}:{i + 1}"
          assert re.search(r"type: ignore\[[a-z-]+(, ?[a-z-]+)*\]", line), where
          assert lines[i - 1].strip().startswith("#"), where
