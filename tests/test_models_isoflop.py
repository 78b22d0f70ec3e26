"""Iso-FLOP guarantee over the whole grid: every model x member x s in {0.5, 0.75, 0.9}.

Only abstract evaluation: each model is traced once (``jax.make_jaxpr`` of its
``init``), no array is computed.
"""

import pytest

from sift_jax import models
from sift_jax.transformations import ISO_FLOP_TOLERANCE, MEMBERS


@pytest.mark.parametrize("name", models.list_models())
def test_every_member_is_iso_flop(name):
  dense = models.get_model(name)
  budget = dense.mac_count().total
  out = dense.abstract_output()
  for family in MEMBERS:
    for s in (0.5, 0.75, 0.9):
      spec = models.get_model(name, family=family, sparsity=s)
      where = f"{name} {family} s={s}"
      assert spec.base_dense_macs == budget, where
      assert spec.nominal_sparsity == s, where
      assert 0.0 <= spec.solved_sparsity < 1.0, where
      assert spec.solve_method == "closed_form", where
      ratio = spec.info["sparse_macs"] / budget
      assert abs(ratio - 1.0) < ISO_FLOP_TOLERANCE, (where, ratio)
      assert spec.info["iso_flop_ratio"] == pytest.approx(ratio)
      # The transformation never changes what the model outputs.
      got = spec.abstract_output()
      assert (got.shape, got.dtype) == (out.shape, out.dtype), where
      # Members that add parameters (all but Sparse Wide's dense stem/head) cost more when dense.
      assert spec.info["dense_macs"] > budget, where
