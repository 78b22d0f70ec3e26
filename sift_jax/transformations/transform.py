"""Drop-in Sparse-IFT transformation of any Flax Linen model.

:func:`transform` wraps a user's Linen model, built from ``nn.Dense``,
``nn.DenseGeneral`` and ``nn.Conv``, in a :class:`TransformedModel` whose
``init``/``apply`` take the same arguments and return outputs of the same
shapes, with each selected layer replaced by a Sparse-IFT member. Nothing in
the user's code changes: the replacement happens through
``flax.linen.intercept_methods``, which lets the wrapper run its own
computation in place of a layer's ``__call__``, inside that layer's scope.
Parameters therefore keep the original layout, one level deeper for the
replaced layers::

    Dense_0/kernel                 (dense)
    Dense_0/U/kernel, Dense_0/V/kernel, Dense_0/V/bias      (sparse_factorized)
    Dense_0/branch_0/kernel, ..., Dense_0/branch_{n-1}/bias (sparse_parallel)
    Dense_0/S/{kernel,bias}, Dense_0/U/kernel, Dense_0/V/kernel (sparse_doped)
    Dense_0/kernel with more output columns                 (sparse_wide)

Which layers are transformed:

* ``layers`` (regexes on the layer path, e.g. ``"block/mlp"``) if given;
* otherwise, for Parallel, Factorized and Doped, every layer whose kernel the
  user's ``policy`` would make sparse (so a policy that keeps the stem and the
  classifier dense also keeps them untransformed, docs/method.md, section 3);
* for Sparse Wide, every layer: each one's output features grow by
  ``k_sw = sqrt(1/d)`` except the ``output_layers``, and inputs follow
  because Flax creates kernels from the input shape. Without
  ``output_layers`` the layers that must keep their width are found from the
  model (:mod:`sift_jax.transformations.wide_analysis`): the model is traced
  abstractly with candidate layers widened, and a layer (or a group of sibling
  layers, such as attention's query and key) is widened only if the model then
  builds with its original output shapes. Residual-stream writers, the layers
  that write the output and layers feeding a fixed-size reshape or parameter
  keep their width; :meth:`TransformedModel.wide_plan` shows the plan, and a
  model where the analysis cannot decide raises
  :class:`~sift_jax.transformations.WideAnalysisError` listing the
  ``output_layers=`` to pass. Whatever ``output_layers`` say, the transformed model's output shapes
  are checked against the original's on every trace, and a change raises a
  ValueError naming the widened layers that write the output. A layer whose
  weights are shared by several calls cannot be widened (its calls would see
  inputs of different widths); that raises a ValueError naming it.

Layers are found by their ``__call__``, whether the input is passed
positionally (``nn.Dense(8)(x)``) or by keyword (``nn.Dense(8)(inputs=x)``).
Grouped convolutions (depthwise) and ``DenseGeneral`` with ``batch_dims`` are
left as they are (a model with no other layer raises, naming them). Norms
inside the members are LayerNorms, so the wrapped model needs no new variable
collection (``batch_stats``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import threading
from typing import Any, Callable, Optional, Sequence, overload

import flax.linen as nn
from flax import errors as flax_errors
from flax import nnx
import jax
import jax.numpy as jnp

from sift_jax import flops
from sift_jax.masks import selection
from sift_jax.transformations import isoflop
from sift_jax.transformations import layers as layers_lib
from sift_jax.transformations import members as members_lib
from sift_jax.transformations import nnx_bridge
from sift_jax.transformations import wide_analysis
from sift_jax.transformations.family import FamilyConfig

__all__ = ["transform", "transform_with_config", "TransformedModel", "transformed_policy"]


class _State(threading.local):

  def __init__(self):
    self.depth = 0  # > 0 while a replacement runs: its own sub-layers are not transformed
    self.recorded: Optional[tuple[list[str], Any]] = None  # set while the Sparse Wide plan probes


_STATE = _State()


class _ModelRef:
  """Holds the user's model without letting Flax adopt it as a named submodule."""

  def __init__(self, module: nn.Module):
    self.module = module
    self.plans: dict[Any, Any] = {}  # Sparse Wide plans by input signature (TransformedModel._plan)

  def __repr__(self) -> str:
    return f"{type(self.module).__name__}"


def transformed_policy(policy: Optional[selection.SparsityPolicy], family: str,
                       reference: bool = False) -> selection.SparsityPolicy:
  """The mask policy of a transformed model, from the user's policy of the original.

  The user's rules carry over (they match the new paths as long as they do
  not anchor the end at the layer name: ``"Dense_2"`` matches
  ``"Dense_2/U/kernel"``). The member's dense parts are added
  (:meth:`sift_jax.transformations.Member.dense_regexes`): Sparse Doped keeps
  ``U`` and ``V`` dense (paper); with ``reference=True`` they are masked too,
  as in the reference code.
  """
  policy = selection.SparsityPolicy() if policy is None else policy
  dense_parts = members_lib.get_member(family).dense_regexes(reference)
  if dense_parts:
    policy = policy.with_dense(*dense_parts)
  return policy


def _kernel_struct(module: Any, x: Any) -> jax.ShapeDtypeStruct:
  kind = layers_lib.layer_kind(module)
  feats = tuple(module.features) if isinstance(module.features, (tuple, list)) else (module.features,)
  if kind == "dense":
    shape = (x.shape[-1],) + feats
  elif kind == "dense_general":
    axes = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
    shape = tuple(x.shape[a % x.ndim] for a in axes) + feats
  else:
    kernel = tuple(module.kernel_size) if isinstance(module.kernel_size, (tuple, list)) else (module.kernel_size,)
    shape = kernel + (x.shape[-1],) + feats
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def _transformable(module: Any) -> bool:
  try:
    layers_lib.layer_kind(module)
  except ValueError:
    return False
  return True


def _untransformable_reason(module: Any) -> Optional[str]:
  """Why a Dense/DenseGeneral/Conv is left as it is, or None for any other module."""
  if isinstance(module, nn.Conv) and int(module.feature_group_count) != 1:
    return (f"grouped convolution, feature_group_count={module.feature_group_count}: grouped and "
            "depthwise convolutions are not transformed")
  if isinstance(module, nn.DenseGeneral) and tuple(module.batch_dims):
    return f"DenseGeneral with batch_dims={tuple(module.batch_dims)} is not transformed"
  return None


@functools.lru_cache(maxsize=None)
def _input_name(cls: type) -> Optional[str]:
  """Name of the first argument of ``cls.__call__`` after ``self`` (``"inputs"`` in Flax)."""
  try:
    params = list(inspect.signature(cls.__call__).parameters.values())
  except (TypeError, ValueError):
    return None
  params = params[1:] if params and params[0].name == "self" else params
  if params and params[0].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                   inspect.Parameter.KEYWORD_ONLY):
    return params[0].name
  return None


def _layer_input(module: Any, args: tuple, kwargs: dict) -> Any:
  """The input of a layer call, positional (``layer(x)``) or keyword (``layer(inputs=x)``).

  Both forms are transformed alike. Returns None when the call passes no input.
  """
  if args:
    return args[0]
  cls: type = type(module)  # as `type`: mypy checks type[X] against Hashable via X's own __hash__
  name = _input_name(cls)
  return kwargs.get(name) if name is not None else None


def _rel_path(module: nn.Module, root: tuple[str, ...]) -> str:
  path = tuple(module.path)
  return "/".join(path[len(root):])


def _out_width(features: Any) -> int:
  return int(features[-1] if isinstance(features, (tuple, list)) else features)


def _unique(items: Sequence[Any]) -> list[Any]:
  return list(dict.fromkeys(items))


class _Interceptor:
  """Replaces selected layers' ``__call__`` by their Sparse-IFT member."""

  def __init__(self, owner: "TransformedModel", root: tuple[str, ...], output_layers: Sequence[str]):
    self.owner = owner
    self.config = owner.config
    self.root = root
    self.output_layers = tuple(output_layers)
    self.seen: list[str] = []
    self.transformed: list[str] = []
    self.skipped: dict[str, str] = {}  # path -> why a Dense/DenseGeneral/Conv was left as it is
    self.widened: dict[str, tuple[int, int]] = {}  # Sparse Wide: path -> (features, widened)

  def _selected(self, path: str, module: Any, x: Any) -> bool:
    if self.owner.layers is not None:
      return any(re.search(p, path) for p in self.owner.layers)
    if self.config.member.widens:
      return True
    policy = self.owner.policy if self.owner.policy is not None else selection.SparsityPolicy()
    # A layer called inside nn.scan/nn.vmap sees one slice of its stacked kernel,
    # so the stacked rules (about the stack's leading axes) do not apply here.
    policy = dataclasses.replace(policy, stacked=())
    return policy.decide(f"{path}/kernel", _kernel_struct(module, x)).sparse

  def _shape_error(self, path: str, e: Exception) -> ValueError:
    calls = self.seen.count(path)
    if calls > 1:
      shared = (f"it is called {calls} times (shared weights) and Sparse Wide gives its calls "
                "inputs of different widths")
    else:
      shared = "its parameter shape does not match its input"
    return ValueError(
        f"transform(): Sparse Wide cannot handle layer {path!r} of {self.owner.wrapped!r}: "
        f"{shared} ({e}). Name it in output_layers= so that its width is kept (its inputs must "
        "then keep their width too), or leave it out with layers=")

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if _STATE.depth or context.method_name != "__call__" or module.scope is None:
      return next_fun(*args, **kwargs)
    if not _transformable(module):
      reason = _untransformable_reason(module)
      if reason is not None:
        self.skipped[_rel_path(module, self.root)] = reason
      return next_fun(*args, **kwargs)
    x = _layer_input(module, args, kwargs)
    if x is None:
      return next_fun(*args, **kwargs)
    path = _rel_path(module, self.root)
    self.seen.append(path)
    member = self.config.member
    wide = member.widens
    keep = (not member.transforms or not self._selected(path, module, x)
            or (wide and any(re.search(p, path) for p in self.output_layers)))
    if keep:
      return self._call(path, wide, lambda: next_fun(*args, **kwargs))
    self.transformed.append(path)
    template = module.clone(parent=None)
    if wide:
      width = _out_width(module.features)
      new_width = self.config.width(width, what=f"layer {path!r} width")
      self.widened[path] = (width, new_width)
      replacement = layers_lib.widen(template, new_width, parent=module.scope)
      call = lambda: replacement(*args, **kwargs)  # the layer's own __call__: same arguments
    else:
      replacement = self.config.wrap(template, parent=module.scope)
      call = lambda: replacement(x)  # Dense/DenseGeneral/Conv take nothing but the input
    _STATE.depth += 1
    try:
      return self._call(path, wide, call)
    finally:
      _STATE.depth -= 1

  def _call(self, path: str, wide: bool, call: Callable[[], Any]) -> Any:
    """Runs a layer call; under Sparse Wide a parameter-shape clash names the layer."""
    try:
      return call()
    except flax_errors.ScopeParamShapeError as e:
      if wide:
        raise self._shape_error(path, e) from e
      raise


def _marker(t: Any) -> Any:
  return t


_marker.__name__ = wide_analysis.MARKER_NAME


def _split_static(tree: Any) -> tuple[list[Any], Any]:
  """Splits a pytree into array leaves (traced) and a rebuild function."""
  leaves, treedef = jax.tree.flatten(tree)
  is_array = [hasattr(l, "shape") and hasattr(l, "dtype") for l in leaves]
  arrays = [jax.ShapeDtypeStruct(l.shape, l.dtype) for l, a in zip(leaves, is_array) if a]

  def rebuild(traced):
    it = iter(traced)
    return jax.tree.unflatten(treedef, [next(it) if a else l for l, a in zip(leaves, is_array)])

  return arrays, rebuild


def _init_rngs() -> dict[str, jax.Array]:
  key = jax.random.key(0)
  return {"params": key, "dropout": key}


class TransformedModel(nn.Module):
  """A user's Linen model with Sparse-IFT members in place of its layers.

  Built by :func:`transform`; ``init`` and ``apply`` take the original
  model's arguments. Only ``__call__`` is transformed (other methods of the
  wrapped model are not reachable through ``apply(..., method=...)``).

  Attributes:
    wrapped: The user's (unbound) model.
    config: The :class:`FamilyConfig`.
    policy: The user's mask policy of the original model (selects layers).
    layers: Optional regexes selecting the layers to transform.
    output_layers: Sparse Wide: layers whose output width is kept; ``None``
      uses the plan of :meth:`wide_plan`.
  """

  wrapped: _ModelRef
  config: FamilyConfig
  policy: Optional[selection.SparsityPolicy] = None
  layers: Optional[tuple[str, ...]] = None
  output_layers: Optional[tuple[str, ...]] = None

  @nn.nowrap
  def _record(self, args: tuple, kwargs: dict) -> tuple[list[str], Any]:
    """Traces the original model abstractly: its layer call order and output shapes."""
    if _STATE.recorded is not None:  # a probe of the Sparse Wide plan: the caller traced it
      return _STATE.recorded
    calls: list[str] = []
    model = self.wrapped.module

    def recorder(next_fun, a, k, context):
      if context.method_name == "__call__" and _transformable(context.module) and not _STATE.depth:
        calls.append("/".join(context.module.scope.path))
      return next_fun(*a, **k)

    arrays, rebuild = _split_static((args, kwargs))

    def run(*traced):
      a, k = rebuild(traced)
      with nn.intercept_methods(recorder):
        return model.init_with_output(_init_rngs(), *a, **k)[0]

    out = jax.eval_shape(run, *arrays)
    return calls, out

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    root = tuple(self.path)
    output_layers = self.output_layers
    expected = None
    member = self.config.member
    if member.widens:
      # A widening member (Sparse Wide) is the one kind that can change a model's output shape
      # (a widened layer that writes the output): trace the original abstractly and compare.
      calls, expected = self._record(args, kwargs)
      if not calls:
        raise ValueError(f"transform(): {self.wrapped!r} calls no transformable nn.Dense, "
                         "nn.DenseGeneral or nn.Conv layer; nothing to transform")
      if output_layers is None:
        output_layers = self._plan(args, kwargs, calls, expected).output_layers
    interceptor = _Interceptor(self, root, output_layers or ())
    try:
      with nn.intercept_methods(interceptor):
        out = self.wrapped.module.clone(parent=self.scope)(*args, **kwargs)
    except TypeError as e:
      if not member.widens:
        raise
      # Typically an add of a widened branch to an unwidened residual stream.
      raise ValueError(
          f"transform(): {self.wrapped!r} failed under Sparse Wide ({e}); pass output_layers= with "
          "the layers that write the model output and any residual stream (layers widened: "
          f"{_unique(interceptor.transformed)})") from e
    if member.transforms and not interceptor.transformed:
      skipped = "".join(f"; not transformed: {p!r} ({why})"
                        for p, why in interceptor.skipped.items())
      seen = _unique(interceptor.seen) or "none (no transformable nn.Dense/nn.DenseGeneral/nn.Conv)"
      raise ValueError(
          f"transform(): no layer of {self.wrapped!r} was transformed to {self.config.family}; "
          f"layers seen: {seen}{skipped}; policy={self.policy!r}, layers={self.layers!r}")
    if expected is not None:
      self._check_output(out, expected, interceptor)
    return out

  @nn.nowrap
  def _plan(self, args: tuple, kwargs: dict, calls: list[str], expected: Any
            ) -> wide_analysis.WidePlan:
    """The Sparse Wide plan for these input shapes (cached on the wrapped model)."""
    arrays, rebuild = _split_static((args, kwargs))
    statics = [repr(l) for l in jax.tree.leaves((args, kwargs)) if not hasattr(l, "shape")]
    key = (repr(jax.tree.structure((args, kwargs))), tuple((a.shape, str(a.dtype)) for a in arrays),
           tuple(statics), self.config, repr(self.policy), self.layers)
    cache = self.wrapped.plans
    if key in cache:
      return cache[key]
    candidates = _unique(calls)
    if self.layers is not None:
      candidates = [p for p in candidates if any(re.search(r, p) for r in self.layers)]
    prober = self.clone(parent=None)

    def probe(widened: frozenset) -> Optional[str]:
      keep = wide_analysis.exact_output_layers([p for p in _unique(calls) if p not in widened])
      model = prober.clone(output_layers=keep)

      def run(*traced):
        a, k = rebuild(traced)
        return model.init_with_output(_init_rngs(), *a, **k)[0]

      outer, _STATE.recorded = _STATE.recorded, (calls, expected)
      try:
        jax.eval_shape(run, *arrays)
      except Exception as e:  # pylint: disable=broad-except
        # The original traced: whatever fails now, widening these layers made it fail.
        return f"{type(e).__name__}: {e}"
      finally:
        _STATE.recorded = outer
      return None

    plan = wide_analysis.plan_sparse_wide(candidates, probe, what=repr(self.wrapped),
                                          links=self._stream_links(arrays, rebuild))
    cache[key] = plan
    return plan

  @nn.nowrap
  def _stream_links(self, arrays: list[Any], rebuild: Callable[[Any], Any]) -> frozenset:
    """Traces the original model with its layer inputs and outputs marked; see ``stream_links``."""
    events: list[tuple[str, str]] = []
    mark = jax.jit(_marker)

    def marker(next_fun, a, k, context):
      module = context.module
      if (context.method_name != "__call__" or _STATE.depth or module.scope is None
          or not _transformable(module)):
        return next_fun(*a, **k)
      x = _layer_input(module, a, k)
      if x is None or not hasattr(x, "shape"):
        return next_fun(*a, **k)
      path = "/".join(module.scope.path)
      events.append(("in", path))
      if a:
        a = (mark(x),) + tuple(a[1:])
      else:
        cls: type = type(module)  # as `type`: see _layer_input
        k = dict(k, **{_input_name(cls) or "inputs": mark(x)})
      y = next_fun(*a, **k)
      events.append(("out", path))
      return mark(y)

    def run(*traced):
      a, k = rebuild(traced)
      with nn.intercept_methods(marker):
        return self.wrapped.module.init_with_output(_init_rngs(), *a, **k)[0]

    try:
      jaxpr = jax.make_jaxpr(run)(*arrays)
    except Exception:  # pylint: disable=broad-except
      return frozenset()  # no links known: the probes alone decide
    return wide_analysis.stream_links(jaxpr, events)

  @nn.nowrap
  def wide_plan(self, *inputs: Any, **kwargs: Any) -> wide_analysis.WidePlan:
    """Sparse Wide: which layers are widened and which keep their width, for these inputs.

    With ``output_layers=None`` this is the plan :meth:`__call__` applies
    (:func:`sift_jax.transformations.plan_sparse_wide`); with explicit
    ``output_layers`` the analysis runs all the same, for comparison.

    Raises:
      ValueError: if the family does not widen.
      WideAnalysisError: where the analysis cannot decide (the message lists
        the ``output_layers=`` to pass).
    """
    if not self.config.member.widens:
      raise ValueError(f"wide_plan(): family {self.config.family!r} does not widen layers")
    unbound = self.clone(parent=None)
    calls, expected = unbound._record(inputs, kwargs)
    if not calls:
      raise ValueError(f"transform(): {self.wrapped!r} calls no transformable nn.Dense, "
                       "nn.DenseGeneral or nn.Conv layer; nothing to transform")
    return unbound._plan(inputs, kwargs, calls, expected)

  @nn.nowrap
  def _check_output(self, out: Any, expected: Any, interceptor: _Interceptor) -> None:
    """Raises if Sparse Wide changed the model's output shapes, naming the layers that did."""
    got = jax.tree.map(lambda t: (tuple(t.shape), t.dtype), out)
    want = jax.tree.map(lambda t: (tuple(t.shape), t.dtype), expected)
    if got == want:
      return
    culprits: list[str] = []
    changes: list[tuple[int, int]] = []
    got_leaves, want_leaves = jax.tree.leaves(out), jax.tree.leaves(expected)
    if len(got_leaves) == len(want_leaves):
      for g, w in zip(got_leaves, want_leaves):
        if tuple(g.shape) != tuple(w.shape) and g.ndim == w.ndim and g.ndim:
          change = (int(w.shape[-1]), int(g.shape[-1]))
          changes.append(change)
          culprits += [p for p, widths in interceptor.widened.items() if widths == change]
    culprits = _unique(culprits)
    if culprits:
      widths = ", ".join(f"{a} -> {b}" for a, b in _unique(changes))
      which = (f"layer(s) {culprits} were widened to the changed output width ({widths} features) "
               "and likely write the output; add them to output_layers=")
    else:
      which = (f"the widened layers are {list(interceptor.widened)}; pass output_layers= with the "
               "layers that write the model output and any residual stream")
    raise ValueError(
        f"transform(): Sparse Wide changed the output of {self.wrapped!r} from {want} to {got}: "
        f"{which} (output_layers={self.output_layers!r})")

  @nn.nowrap
  def sparsity_policy(self, *example_inputs: Any, **apply_kwargs: Any) -> selection.SparsityPolicy:
    """The :class:`SparsityPolicy` of the transformed parameters (see :func:`transformed_policy`).

    The user's ``stacked=`` rules carry over. Exact paths of the original
    model's stacked leaves (``with_stacked(detect_stacked(model, x))``) do not
    name the transformed leaves (``blocks/fc/kernel`` becomes
    ``blocks/fc/U/kernel``): given example inputs, the stacked leaves of the
    transformed model are detected (:func:`sift_jax.detect_stacked`) and added.
    """
    policy = transformed_policy(self.policy, self.config.family, self.config.reference)
    if example_inputs:
      policy = policy.with_stacked(selection.detect_stacked(self, *example_inputs, **apply_kwargs))
    return policy

  @nn.nowrap
  def base_model(self) -> nn.Module:
    """The untransformed user model."""
    return self.wrapped.module

  @nn.nowrap
  def solve(self, *inputs: Any, **apply_kwargs: Any) -> isoflop.IsoFlopSolution:
    """Solves the mask sparsity that makes this model iso-FLOP with the original.

    Both models are traced abstractly on ``inputs`` (arrays or
    ``ShapeDtypeStruct``; use batch 1 for per-example MACs). With the paper
    rules the solution is exact (closed form); with ``reference=True``
    Sparse Wide uses the reference's bisection and the other members keep the
    nominal sparsity, as the reference does.

    Args:
      *inputs: Example inputs of the model.
      **apply_kwargs: Static keyword arguments of the model's ``__call__``.

    Returns:
      An :class:`sift_jax.transformations.IsoFlopSolution`; ``iso_flop_ratio``
      is the achieved ratio (exact-count masks) and ``within_tolerance`` says
      whether it is within 0.5% of 1. With the paper rules, a miss (possible
      only on tiny models, whose masks hold whole numbers of weights) also
      emits an :class:`sift_jax.transformations.IsoFlopToleranceWarning`
      naming the ratio.

    Raises:
      ValueError: if no sparsity makes the model iso-FLOP (the parts that
        stay dense alone exceed the budget, or the model is cheaper than the
        budget even with all masks one); the message names the model and the
        largest dense parts.
    """
    cfg = self.config
    base = self.base_model()
    base_macs = _macs_at_init(base, inputs, apply_kwargs)[0].total
    macs, variables = _macs_at_init(self, inputs, apply_kwargs)
    method = cfg.member.solve_method(cfg.reference)
    kwargs = {k: v for k, v in apply_kwargs.items() if k not in ("mutable", "rngs")}
    return isoflop.solve_sparsity(macs, variables["params"], self.sparsity_policy(*inputs, **kwargs),
                                  base_dense_macs=base_macs, nominal_sparsity=cfg.sparsity,
                                  method=method, what=f"transformed {self.wrapped!r}")


def _macs_at_init(module: nn.Module, inputs: Sequence[Any], kwargs: dict
                  ) -> tuple[flops.MacCount, Any]:
  kwargs = {k: v for k, v in kwargs.items() if k not in ("mutable", "rngs")}
  trace = flops.trace_macs(module, *inputs, **kwargs)
  return trace.macs, trace.variables


@overload
def transform(model: nn.Module, *, family: str, sparsity: float,
              policy: Optional[selection.SparsityPolicy] = None,
              layers: Optional[Sequence[str]] = None,
              output_layers: Optional[Sequence[str]] = None, reference: bool = False,
              round_to: int = 1, factorized_mid: str = "linear",
              parallel_norm: bool = True,
              parallel_activation: Optional[Callable[[jax.Array], jax.Array]] = None
              ) -> TransformedModel: ...


@overload
def transform(model: nnx.Module, *, family: str, sparsity: float,
              policy: Optional[selection.SparsityPolicy] = None,
              layers: Optional[Sequence[str]] = None,
              output_layers: Optional[Sequence[str]] = None, reference: bool = False,
              round_to: int = 1, factorized_mid: str = "linear",
              parallel_norm: bool = True,
              parallel_activation: Optional[Callable[[jax.Array], jax.Array]] = None
              ) -> nnx_bridge.TransformedNnxModel: ...


def transform(model: Any, *, family: str, sparsity: float,
              policy: Optional[selection.SparsityPolicy] = None,
              layers: Optional[Sequence[str]] = None,
              output_layers: Optional[Sequence[str]] = None, reference: bool = False,
              round_to: int = 1, factorized_mid: str = "linear",
              parallel_norm: bool = True,
              parallel_activation: Optional[Callable[[jax.Array], jax.Array]] = None
              ) -> Any:
  """Applies a Sparse-IFT member to a Flax Linen model without editing its code.

  Example::

    model = MyMLP()                            # any Linen model of nn.Dense/nn.Conv
    policy = sift_jax.SparsityPolicy(dense=("Dense_0", "Dense_3"))  # stem, head
    sift = sift_jax.transform(model, family="sparse_factorized", sparsity=0.75,
                              policy=policy)
    variables = sift.init(key, x)              # same arguments as model.init
    y = sift.apply(variables, x)               # same output shapes
    sol = sift.solve(x[:1])                    # iso-FLOP sparsity for the masks
    densities = sift_jax.layer_densities(variables["params"], sol.solved_sparsity,
                                         policy=sift.sparsity_policy())

  What ``reference=True`` changes here, and what it does not:

  * sizes: Factorized rank ``ceil`` and Doped rank ``floor`` of the exact
    formula, every widened Sparse Wide layer ``int(w * sqrt(round(1/d)))``,
    Parallel branches ``round(1/d)`` (ties to even); ``round_to`` is not
    applied;
  * masks: Sparse Doped's ``U`` and ``V`` are masked too
    (:meth:`TransformedModel.sparsity_policy`);
  * :meth:`TransformedModel.solve`: only Sparse Wide is re-fitted (the
    reference's bisection to 0.1%), the other members keep the nominal ``s``.

  It does not move norms or activations. The reference's Sparse Parallel
  ResNet blocks put a BatchNorm on every branch in place of the block's
  BatchNorm (and, in its ImageNet ResNets, a ReLU inside every branch); a
  drop-in transform replaces only the layer and cannot remove the user's own
  norm after it. ``parallel_norm=True`` (the default: a LayerNorm per
  branch) and ``parallel_activation=nn.relu`` build the per-branch part; the
  model's own norm and activation after the layer still apply. The registry ResNets
  (``sift_jax.models.get_model(..., reference=True)``) reproduce the
  reference's placement exactly.

  An ``nnx.Module`` is converted to Linen, transformed and wrapped back
  into NNX: the result is a
  :class:`sift_jax.transformations.TransformedNnxModel`, initialised by
  ``lazy_init(x)`` (:mod:`sift_jax.transformations.nnx_bridge`).

  Args:
    model: An unbound Linen module, or an ``nnx.Module``.
    family: ``"dense"``, ``"sparse_wide"``, ``"sparse_parallel"``,
      ``"sparse_factorized"``, ``"sparse_doped"`` or a member added with
      :func:`sift_jax.transformations.register_member`.
    sparsity: Nominal sparsity ``s`` in [0, 1) that sizes the member.
    policy: The user's :class:`sift_jax.SparsityPolicy` for the original
      model; it selects the layers to transform (unless ``layers`` is given)
      and, via :meth:`TransformedModel.sparsity_policy`, the masks.
    layers: Regexes on layer paths selecting the layers to transform.
    output_layers: Sparse Wide: regexes of layers whose output width is kept
      (model outputs, residual-stream writers). ``None``: found from the model
      (:meth:`TransformedModel.wide_plan`); given, they win over the plan.
    reference: The reference's size, masking and re-fit rules (see above).
    round_to: Widths and ranks are rounded to the nearest multiple of this,
      and to at least one multiple.
    factorized_mid: ``"linear"``, ``"norm"`` or ``"norm_relu"`` (LayerNorm).
    parallel_norm: A LayerNorm on every Parallel branch, before the sum
      (default). It breaks the symmetry of the branches: without it every
      branch receives the same gradient, RigL grows the same positions in
      all of them and they train as one matrix of the original shape.
      LayerNorm because a drop-in model need not have a ``train`` flag or a
      ``batch_stats`` collection. ``False``: the paper's plain sum.
    parallel_activation: Optional activation applied to every Parallel
      branch, after its norm and before the sum (``nn.relu``: the reference
      ImageNet blocks).

  Returns:
    A :class:`TransformedModel` (a :class:`TransformedNnxModel` for an NNX model).

  Raises:
    TypeError: if ``model`` is neither a Linen nor an NNX module
      (:class:`NotAModuleError`, also a ValueError).
    ValueError: for an unknown family, a sparsity outside [0, 1), a nonzero
      sparsity with ``family="dense"`` (nothing would use it), invalid regexes or a non-callable
      ``parallel_activation``. A model in which nothing gets transformed, or
      whose output shape Sparse Wide would change, raises when it is first
      traced (``init``/``apply``); so does
      :class:`~sift_jax.transformations.WideAnalysisError` (a ValueError) for a
      model whose Sparse Wide plan cannot be decided.
  """
  if nnx_bridge.is_nnx_module(model):  # converted to Linen, transformed, wrapped back (nnx_bridge)
    return nnx_bridge.transform_nnx(
        model, family=family, sparsity=sparsity, policy=policy, layers=layers,
        output_layers=output_layers, reference=reference, round_to=round_to,
        factorized_mid=factorized_mid, parallel_norm=parallel_norm,
        parallel_activation=parallel_activation)
  if not isinstance(model, nn.Module):
    raise nnx_bridge.NotAModuleError(f"transform() expects a flax.nnx Module or a flax.linen "
                                     f"Module, got {type(model).__name__}")
  if parallel_activation is not None and not callable(parallel_activation):
    raise ValueError(f"transform(): parallel_activation must be callable or None, got "
                     f"{parallel_activation!r}")
  untransformed = not members_lib.get_member(family).transforms  # "dense"
  if untransformed and isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool) \
      and float(sparsity) != 0.0:
    raise ValueError(f"transform(family='dense') returns the model unchanged, so sparsity has no "
                     f"meaning there; got sparsity={sparsity!r} (pass 0, or a member such as "
                     "family='sparse_wide'; sparse training of the dense model is the optimizer's "
                     "job: sift_jax.rigl / sift_jax.static_sparse)")
  config = FamilyConfig(family=family, sparsity=sparsity, reference=reference, round_to=round_to,
                        factorized_mid=factorized_mid, norm="layer", parallel_norm=parallel_norm,
                        parallel_activation=parallel_activation)
  return transform_with_config(model, config, policy=policy, layers=layers,
                               output_layers=output_layers)


def transform_with_config(model: nn.Module, config: FamilyConfig, *,
                          policy: Optional[selection.SparsityPolicy] = None,
                          layers: Optional[Sequence[str]] = None,
                          output_layers: Optional[Sequence[str]] = None) -> TransformedModel:
  """:func:`transform` of a Linen model under a ready :class:`FamilyConfig`.

  For callers that already hold the member's full configuration (the model
  registry, whose configs also set the norm and the Doped low-rank init);
  ``policy``, ``layers`` and ``output_layers`` are as in :func:`transform`.
  """
  layers = (layers,) if isinstance(layers, str) else layers
  output_layers = (output_layers,) if isinstance(output_layers, str) else output_layers
  for name, pats in (("layers", layers), ("output_layers", output_layers)):
    for p in (pats or ()):
      try:
        re.compile(p)
      except (re.error, TypeError) as e:
        raise ValueError(f"transform(): invalid regex in {name}: {p!r} ({e})") from None
  if policy is not None and not isinstance(policy, selection.SparsityPolicy):
    raise ValueError(f"policy must be a sift_jax.SparsityPolicy, got {type(policy).__name__}")
  return TransformedModel(
      wrapped=_ModelRef(model.clone(parent=None)), config=config, policy=policy,
      layers=None if layers is None else tuple(layers),
      output_layers=None if output_layers is None else tuple(output_layers))
