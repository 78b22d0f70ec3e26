"""``python -m sift_jax.export --workdir RUN --out DIR``: see :mod:`sift_jax.inference.export`."""

import sys

from sift_jax.inference.export import main

if __name__ == "__main__":
  sys.exit(main())
