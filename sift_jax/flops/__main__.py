"""``python -m sift_jax.flops``: the per-layer FLOP table of a registry model.

A package ``__main__`` (rather than running the module itself) so that the
command does not re-execute a module that ``import sift_jax`` already loaded.
"""

import sys

from sift_jax.flops._cli import main

sys.exit(main())
