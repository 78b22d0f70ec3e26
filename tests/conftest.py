"""Test configuration, set before jax is imported: eight virtual CPU devices, one XLA cache.

The persistent compilation cache is shared by the whole run: pytest's workers and every
process a test starts (training CLIs, notebook kernels, fault-injection workers) inherit
its directory through the environment, so an executable compiled once is loaded, not
recompiled, by the next process or test that lowers the same program. Entries are keyed
on the HLO, the compile options, the devices and the jax/XLA versions, so a hit is the
same executable a compile would produce. The directory is new for each run (a stale
cache can neither speed up nor fail a run) and removed at its end. Setting
JAX_COMPILATION_CACHE_DIR beforehand (an empty value disables the cache) takes
precedence.
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  # The first process to get here (pytest's controller) makes the directory; its workers
  # inherit the variable.
  _xla_cache = tempfile.mkdtemp(prefix="sift_jax_tests_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _xla_cache
  # Compiles of a tenth of a second and up: below that, writing the entry costs about
  # what it saves.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
  atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)
