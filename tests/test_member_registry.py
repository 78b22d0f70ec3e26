"""The members table: a fifth member registered from outside the package, and unknown names.

Files a new member must touch: **none of the library's**. Everything below is
defined in this test file: a Linen layer (``GatedParallel``), its size rule
(``gated_branches``), its layer factory, and one
``sift_jax.transformations.register_member(Member(...))`` call. ``transform``,
``get_model(family=...)``, the FLOP counter, the iso-FLOP solve, ``fold`` and the
training config then accept the member by name, because every one of them reads
the table in ``sift_jax/transformations/members.py`` (the one library file to
edit to make a member *built in*, plus ``sizes.FAMILIES`` for its name).

The second half checks that every name a table does not know (family, sparse
method, optimizer, schedule, mask distribution, drop schedule, scope, dataset,
model, solve method, member options) raises a ``ValueError`` naming the value.
"""

from __future__ import annotations

import math
import types
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sift_jax
from sift_jax import flops, inference, masks, models, training
from sift_jax.training import loop, optimizers, sweep
from sift_jax.transformations import (ISO_FLOP_TOLERANCE, FamilyConfig, Member, get_member,
                                      member_names, register_member, solve_sparsity, transform,
                                      unregister_member)
from sift_jax.transformations import sizes

NAME = "sparse_gated_parallel"


# ----------------------------------------------------------------------------- the toy member


def gated_branches(sparsity: float) -> int:
  """The member's size rule: ``ceil(1/d)`` branches (Sparse Parallel rounds ``1/d``)."""
  return max(1, math.ceil(1.0 / (1.0 - sparsity) - 1e-9))


class GatedParallel(nn.Module):
  """``sum_i g_i W_i x``: ``n = ceil(1/d)`` sparse copies of the layer with learned scalar gates."""

  layer: Any
  sparsity: float

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n = gated_branches(self.sparsity)
    gates = self.param("gates", nn.initializers.constant(1.0 / n), (n,))
    out = None
    for i in range(n):
      y = gates[i] * self.layer.copy(name=f"branch_{i}")(x)
      out = y if out is None else out + y
    return out


def gated_layer(config: FamilyConfig, template: Any, *, use_running_average: Optional[bool],
                **module_kwargs: Any) -> nn.Module:
  return GatedParallel(template, sparsity=config.sparsity, **module_kwargs)


@pytest.fixture(scope="module")
def gated():
  member = register_member(Member(name=NAME, title="Sparse Gated Parallel", layer=gated_layer))
  yield member
  unregister_member(NAME)


class UserMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(24)(x))
    x = nn.relu(nn.Dense(24)(x))
    x = nn.relu(nn.Dense(24)(x))
    return nn.Dense(5)(x)


# s = 0.7: ceil(1/0.3) = 4 branches, so iso-FLOP needs density 1/4 on them: s' = 0.75.
S, BRANCHES, SOLVED = 0.7, 4, 0.75


def test_the_table_knows_the_member(gated):
  assert get_member(NAME) is gated and member_names()[-1] == NAME
  assert member_names()[:5] == sizes.FAMILIES
  assert sizes.check_family(NAME) == NAME and FamilyConfig(family=NAME).member is gated
  assert gated.solve_method() == "closed_form" and gated.dense_regexes() == ()
  with pytest.raises(ValueError, match=f"a member named '{NAME}' is registered already"):
    register_member(Member(name=NAME, layer=gated_layer))
  with pytest.raises(ValueError, match="'sparse_doped' is a built-in member"):
    register_member(Member(name="sparse_doped", layer=gated_layer))
  with pytest.raises(ValueError, match="'dense' is a built-in member"):
    unregister_member("dense")
  with pytest.raises(ValueError, match="solve must be one of .*got 'bisect'"):
    Member(name="sparse_x", solve="bisect")
  with pytest.raises(ValueError, match="layer must be callable or None, got 3"):
    Member(name="sparse_x", layer=3)
  with pytest.raises(ValueError, match="must be an identifier .*got 'sparse x'"):
    Member(name="sparse x")
  with pytest.raises(ValueError, match="expects a sift_jax.transformations.Member, got str"):
    register_member(NAME)


def test_transform_builds_and_solves_the_member(gated):
  policy = sift_jax.SparsityPolicy(dense=("^Dense_0/", "^Dense_3/"))
  model = transform(UserMLP(), family=NAME, sparsity=S, policy=policy)
  x = jax.random.normal(jax.random.key(0), (3, 10))
  variables = model.init(jax.random.key(1), x)
  params = variables["params"]
  for layer in ("Dense_1", "Dense_2"):
    assert sorted(params[layer]) == [f"branch_{i}" for i in range(BRANCHES)] + ["gates"]
    assert params[layer]["branch_0"]["kernel"].shape == (24, 24)
  assert sorted(params["Dense_0"]) == ["bias", "kernel"]  # dense by the policy: untransformed
  assert model.apply(variables, x).shape == UserMLP().apply(UserMLP().init(
      jax.random.key(1), x), x).shape
  # The gates alone: the layer is the gated sum of its branches.
  p1 = params["Dense_1"]
  h = jax.random.normal(jax.random.key(2), (3, 24))
  want = sum(p1["gates"][i] * (h @ p1[f"branch_{i}"]["kernel"] + p1[f"branch_{i}"]["bias"])
             for i in range(BRANCHES))
  got = GatedParallel(nn.Dense(24), sparsity=S).apply({"params": p1}, h)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  sol = model.solve(x[:1])
  assert sol.method == "closed_form" and sol.within_tolerance
  # Dense MACs: 10*24 + 24*5 outside; 2 layers of 4 x 24*24 inside, masked at s'.
  assert sol.base_dense_macs == 10 * 24 + 2 * 24 * 24 + 24 * 5
  assert sol.sparse_part_macs == 2 * BRANCHES * 24 * 24
  assert sol.solved_sparsity == pytest.approx(SOLVED, abs=2e-3)


def test_registry_model_flops_and_fold_accept_the_member(gated):
  spec = models.get_model("mlp_mnist1d", family=NAME, sparsity=S, hidden=(32, 32, 32))
  assert spec.family == NAME and spec.solve_method == "closed_form"
  assert spec.info["branches"] == {"fc_0": BRANCHES, "fc_1": BRANCHES}
  assert abs(spec.info["iso_flop_ratio"] - 1.0) <= ISO_FLOP_TOLERANCE
  assert spec.solved_sparsity == pytest.approx(SOLVED, abs=2e-3)
  # FLOP counting: the member's MAC rows, and the sparse cost at the solved densities.
  params = spec.abstract_variables()["params"]
  macs = spec.mac_count()
  rows = {r.param: r.macs for r in macs.rows if r.param is not None}
  assert rows["fc_0/branch_3/kernel"] == 32 * 32 and rows["stem/kernel"] == 40 * 32
  report = flops.flops_report(macs, params, densities=spec.layer_densities(params))
  assert report.sparse_macs == pytest.approx(spec.base_dense_macs, rel=ISO_FLOP_TOLERANCE)
  assert spec.base_dense_macs == 40 * 32 + 2 * 32 * 32 + 32 * 10
  # The solve on the same counts, called directly.
  sol = solve_sparsity(macs, params, spec.policy, base_dense_macs=spec.base_dense_macs,
                       nominal_sparsity=S)
  assert sol.solved_sparsity == spec.solved_sparsity
  # fold: the member registered no fold rule, so it says it cannot fold, naming it.
  variables = spec.init(jax.random.key(0))
  with pytest.raises(inference.FoldError,
                     match=r"Sparse Gated Parallel cannot fold: .*no fold rule.*compress"):
    inference.fold(spec, variables)


def test_training_config_builds_the_member_run(gated):
  config = training.apply_overrides(training.default_config(), {
      "model.name": "mlp_mnist1d", "model.family": NAME, "model.sparsity": S,
      "model.kwargs.hidden": (16, 16, 16), "training.batch_size": 8,
      "sparse.method": "rigl", "sparse.update_every": 1})
  training.validate_config(config)
  assert [r.name for r in sweep.family_grid(members=(NAME,), static_members=(),
                                            sparsities=(S,), include_dense=False)] == [
      f"{NAME}-0.7-rigl"]
  info = types.SimpleNamespace(task="classification", num_classes=10, input_shape=(40,),
                               input_dtype=np.float32, vocab_size=None)
  mesh = sift_jax.sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  funcs = loop.build_run(config, mesh=mesh, train_info=info, total_steps=4, steps_per_epoch=4)
  assert funcs.spec.family == NAME and funcs.spec.solved_sparsity == pytest.approx(SOLVED, abs=0.01)
  state = funcs.init(np.int32(0))
  # The masks of the branches hold the solved density; the gates (scalars) are not masked.
  mask_tree = sift_jax.get_masks(state.opt_state)
  kernel_mask = np.asarray(mask_tree["fc_0"]["branch_2"]["kernel"])
  assert int(kernel_mask.sum()) == round((1 - funcs.spec.solved_sparsity) * 16 * 16)
  assert mask_tree["fc_0"]["gates"] is None or bool(np.all(mask_tree["fc_0"]["gates"]))
  assert not np.asarray(state.params["fc_0"]["branch_2"]["kernel"])[~kernel_mask].any()
  # The run's training step is generic (the member only shapes the model and its policy);
  # compiling it here would cost the whole budget of this file.
  assert funcs.abstract_state.params["fc_0"]["gates"].shape == (BRANCHES,)


def test_an_unregistered_member_is_unknown_everywhere():
  bad = "sparse_gated_parallel_2"
  for call in (lambda: FamilyConfig(family=bad), lambda: get_member(bad),
               lambda: models.get_model("mlp_mnist1d", family=bad, sparsity=0.5),
               lambda: transform(UserMLP(), family=bad, sparsity=0.5),
               lambda: sweep.family_grid(members=(bad,))):
    with pytest.raises(ValueError, match=f"unknown Sparse-IFT family '{bad}'; expected one of "
                                         r"\('dense', 'sparse_wide'"):
      call()
  config = training.apply_overrides(training.default_config(),
                                    {"model.family": bad, "model.sparsity": 0.5})
  with pytest.raises(ValueError, match=f"config.model.family='{bad}': must be one of"):
    training.validate_config(config)
  with pytest.raises(ValueError, match=f"unknown Sparse-IFT family '{bad}'"):
    unregister_member(bad)


# ----------------------------------------------------------------------------- unknown names


def _config(**overrides: Any) -> Any:
  return training.apply_overrides(training.default_config(), overrides)


def _params() -> dict:
  return {"a": {"kernel": jnp.zeros((4, 4))}}


def _rigl(**kwargs: Any) -> Any:
  return sift_jax.rigl(optax.sgd(0.1), sparsity=0.5, total_steps=10, **kwargs)


def _dense_macs() -> Any:
  layer = nn.Dense(4, use_bias=False)
  x = jnp.zeros((1, 4))
  return flops.count_macs(layer, layer.init(jax.random.key(0), x), x)


def _unchecked(**values: Any) -> Any:
  """A config with ``values`` set past validation, as a builder sees it when called directly."""
  config = training.default_config()
  for key, value in values.items():
    section, leaf = key.split("__")
    with config.unlocked():
      config[section][leaf] = value
  return config


#: ``(what, bad value, call raising for it)``: each must raise a ValueError naming the value.
UNKNOWN_NAMES: list[tuple[str, str, Callable[[str], Any]]] = [
    ("family", "sparse_wider", lambda v: FamilyConfig(family=v)),
    ("family", "sparse_wider", lambda v: models.get_model("mlp_mnist1d", family=v, sparsity=0.5)),
    ("family", "sparse_wider", lambda v: training.validate_config(
        _config(**{"model.family": v, "model.sparsity": 0.5}))),
    ("method", "snip", lambda v: training.validate_config(_config(**{"sparse.method": v}))),
    ("method", "snip", lambda v: optimizers.make_optimizer(
        _unchecked(sparse__method=v, model__sparsity=0.5), total_steps=10, steps_per_epoch=5)),
    ("method", "snip", lambda v: flops.training_flops(1.0, 2.0, method=v, total_steps=10)),
    ("method", "snip", lambda v: sweep.family_grid(method=v)),
    ("optimizer", "adam", lambda v: training.validate_config(_config(**{"optimizer.name": v}))),
    ("optimizer", "adam", lambda v: optimizers.make_inner_optimizer(
        _unchecked(optimizer__name=v), lambda step: 0.1)),
    ("schedule", "linear", lambda v: training.validate_config(_config(**{"schedule.name": v}))),
    ("schedule", "linear", lambda v: optimizers.make_schedule(
        _unchecked(schedule__name=v), total_steps=10, steps_per_epoch=5)),
    ("distribution", "erdos", lambda v: masks.layer_densities(_params(), 0.5, distribution=v)),
    ("distribution", "erdos", lambda v: training.validate_config(
        _config(**{"sparse.distribution": v}))),
    ("distribution", "erdos", lambda v: _rigl(distribution=v).init(_params())),
    ("drop schedule", "exp", lambda v: _rigl(drop_schedule=v).init(_params())),
    ("drop schedule", "exp", lambda v: training.validate_config(
        _config(**{"sparse.drop_schedule": v}))),
    ("scope", "blockwise", lambda v: training.validate_config(_config(**{"sparse.scope": v}))),
    ("dataset", "mnist2d", lambda v: sift_jax.data.make_dataset(v, split="train", batch_size=8)),
    ("model", "resnet19", lambda v: models.get_model(v)),
    ("solve method", "bisect", lambda v: solve_sparsity(
        _dense_macs(), {"kernel": jnp.zeros((4, 4))}, None, base_dense_macs=16,
        nominal_sparsity=0.5, method=v)),
    ("factorized_mid", "relu", lambda v: FamilyConfig(factorized_mid=v)),
    ("member norm", "group", lambda v: FamilyConfig(norm=v)),
    ("doped_low_rank_init", "lora", lambda v: FamilyConfig(doped_low_rank_init=v)),
]


@pytest.mark.parametrize("what,value,call", UNKNOWN_NAMES,
                         ids=[f"{w}-{i}" for i, (w, _, _) in enumerate(UNKNOWN_NAMES)])
def test_unknown_names_raise_naming_the_value(what, value, call):
  with pytest.raises(ValueError, match=f"'{value}'"):
    call(value)
