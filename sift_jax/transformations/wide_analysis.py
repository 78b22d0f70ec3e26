"""Which layers Sparse Wide may widen, found from the model itself.

Sparse Wide grows a layer's output features by ``k_sw = sqrt(1/d)``; the next
layer's kernel follows, because Flax creates kernels (and norm scales) from
the input shape (docs/method.md, section 2). What cannot follow is anything
of a fixed size: the model's output, a residual stream (``x + f(x)``, where
``x`` keeps its width), a parameter the user creates with a fixed shape (a
position embedding, a tied embedding table), a reshape to a fixed size, a
weight-shared layer whose calls would see different widths, or the other
operand of a product (attention's queries and keys must widen together).

This module decides, by *probing*: the model is traced abstractly
(``jax.eval_shape``, no array is computed) with one candidate set of layers
widened and every other layer kept, and a candidate is accepted when that
trace builds and gives the original output shapes. The probe is the very
transformation :func:`sift_jax.transform` then applies, so an accepted plan
always builds. The candidates are, in call order:

1. every layer on its own (the MLP hidden layer, attention's value
   projection, a stem that is not followed by a residual add);
2. for the layers that fail on their own, pairs of sibling layers (same
   parent module), then all the remaining failing siblings together: the
   query and key projections of an attention, the two halves of a gated MLP.
   A group is not tried if one member reads, through other layers only, what
   another member writes (:func:`stream_links`): that pair shares a residual
   stream and could only widen by widening the stream.

Layers in no accepted group keep their output width: the residual-stream
writers (attention output, MLP output, a patch embedding), the layers that
write the model output, and layers whose output meets a fixed-size
operation. Groups spanning several parent modules (e.g. all the writers of a
residual stream, which could widen only all together) are not searched: the
residual stream keeps its width, as in the paper's transformers.

Finally the union of the accepted groups is probed. Should it fail (groups
that widen on their own but not together), the groups are added greedily, in
call order and in reverse call order; if both orders give the same plan, it is
used, otherwise the analysis cannot decide and raises
:class:`WideAnalysisError` listing the exact ``output_layers=`` of each
choice. A model in which no layer can widen raises it too, with the reason of
every layer.

References:
  Thangarasa et al., "Sparse-IFT: Sparse Iso-FLOP Transformations for
  Maximizing Training Efficiency", ICML 2024 (arXiv:2303.11525), Section 3.
"""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple, Optional, Sequence

from jax.extend import core as jax_core

__all__ = ["WideAnalysisError", "WidePlan", "plan_sparse_wide", "exact_output_layers",
           "stream_links", "MARKER_NAME"]

#: A probe: the layer paths to widen (every other layer keeps its width) ->
#: None if the model builds with its original output shapes, else why not.
Probe = Callable[[frozenset], Optional[str]]


class WideAnalysisError(ValueError):
  """The Sparse Wide analysis cannot decide which layers to widen.

  The message lists the exact ``output_layers=(...)`` to pass to
  :func:`sift_jax.transform` (or says why no layer can widen).
  """


class WidePlan(NamedTuple):
  """Which layers Sparse Wide widens, as decided by :func:`plan_sparse_wide`.

  Attributes:
    widened: Paths of the layers whose output features grow, in call order.
    kept: Paths of the layers that keep their output width, in call order.
    groups: The accepted groups (layers that widen together), in call order.
    reasons: ``(path, why)`` for every kept layer: why widening it on its
      own failed.
    output_layers: The ``output_layers=`` regexes that give this plan
      (exactly the kept layers).
  """

  widened: tuple[str, ...]
  kept: tuple[str, ...]
  groups: tuple[tuple[str, ...], ...]
  reasons: tuple[tuple[str, str], ...]
  output_layers: tuple[str, ...]


def exact_output_layers(paths: Sequence[str]) -> tuple[str, ...]:
  """Regexes matching exactly ``paths`` (``output_layers=`` matches with ``re.search``)."""
  return tuple("^" + re.escape(p) + "$" for p in paths)


def _parent(path: str) -> str:
  return path.rsplit("/", 1)[0] if "/" in path else ""


def _short(why: str, limit: int = 300) -> str:
  line = " ".join(str(why).split())
  return line if len(line) <= limit else line[:limit - 3] + "..."


def _suggestion(paths: Sequence[str], widened: Sequence[str]) -> str:
  kept = [p for p in paths if p not in set(widened)]
  return f"output_layers={exact_output_layers(kept)!r} (widens {list(widened)})"


#: Name of the identity the dependency trace wraps layer inputs and outputs in.
MARKER_NAME = "_sift_wide_marker"


def stream_links(jaxpr: Any, events: Sequence[tuple[str, str]]) -> frozenset:
  """Pairs ``(a, b)`` where layer ``b``'s input depends on layer ``a``'s output only via layers.

  ``jaxpr`` is a ``ClosedJaxpr`` of the model in which every top-level layer
  call's input and output went through a ``jax.jit`` identity named
  :data:`MARKER_NAME`; ``events`` lists those calls in order, as
  ``("in" | "out", path)``. A width flows from ``a`` to ``b`` without a layer
  in between (``b`` follows ``a``'s width, as a weight-shared layer after a
  stem does) or only through other layers (``a`` writes a stream that those
  layers read and whose result ``b`` writes back: a residual stream). The
  second kind is returned: such a pair may widen together only by widening
  the stream, which the plan never does.
  """
  eqns = list(jaxpr.jaxpr.eqns)
  markers = [e for e in eqns if e.primitive.name in ("jit", "pjit")
             and e.params.get("name") == MARKER_NAME]
  if len(markers) != len(events):  # layers inside nested transforms: no links known
    return frozenset()
  marker_event = {id(e): ev for e, ev in zip(markers, events)}
  consumers: dict[Any, list[Any]] = {}
  for e in eqns:
    for v in e.invars:
      if isinstance(v, jax_core.Var):  # not a Literal
        consumers.setdefault(v, []).append(e)

  def reached(start: Any, stop_at_inputs: bool) -> set[str]:
    """Layer paths whose input is reached from the output marker ``start``."""
    seen, found, stack = {id(start)}, set(), [start]
    while stack:
      e = stack.pop()
      for v in e.outvars:
        for c in consumers.get(v, ()):
          if id(c) in seen:
            continue
          seen.add(id(c))
          ev = marker_event.get(id(c))
          if ev is not None and ev[0] == "in":
            found.add(ev[1])
            if stop_at_inputs:
              continue
          stack.append(c)
    return found

  links = set()
  for e, (kind, path) in zip(markers, events):
    if kind != "out":
      continue
    direct = reached(e, True)
    for other in reached(e, False) - direct - {path}:
      links.add((path, other))
  return frozenset(links)


def plan_sparse_wide(paths: Sequence[str], probe: Probe, *, what: str = "the model",
                     links: frozenset = frozenset()) -> WidePlan:
  """Decides which of ``paths`` Sparse Wide widens, by probing (see the module docstring).

  Args:
    paths: The candidate layer paths, in call order (duplicates are ignored).
    probe: Builds the model abstractly with the given paths widened and every
      other layer kept; returns None on success, else the reason.
    what: The model, for error messages.
    links: Pairs ``(a, b)`` of :func:`stream_links`: a group holding both is
      not accepted (it would widen a residual stream).

  Returns:
    A :class:`WidePlan` whose union of groups has been probed successfully.

  Raises:
    WideAnalysisError: if no layer can widen, or if accepted groups conflict
      and the greedy orders disagree; the message lists the exact
      ``output_layers=`` to pass.
  """
  paths = list(dict.fromkeys(paths))
  streams = lambda group: any((a, b) in links for a in group for b in group)
  groups: list[tuple[str, ...]] = []
  reasons: dict[str, str] = {}
  for p in paths:
    why = probe(frozenset((p,)))
    if why is None:
      groups.append((p,))
    else:
      reasons[p] = _short(why)
  by_parent: dict[str, list[str]] = {}
  for p in reasons:
    by_parent.setdefault(_parent(p), []).append(p)
  for siblings in by_parent.values():
    left = list(siblings)
    i = 0
    while i < len(left):
      paired = False
      for j in range(i + 1, len(left)):
        pair = (left[i], left[j])
        if not streams(pair) and probe(frozenset(pair)) is None:
          groups.append(pair)
          left = [q for q in left if q not in pair]
          paired = True
          break
      if not paired:
        i += 1
    if len(left) >= 3 and not streams(left) and probe(frozenset(left)) is None:
      groups.append(tuple(left))
  order = {p: n for n, p in enumerate(paths)}
  groups.sort(key=lambda g: min(order[p] for p in g))
  grouped = {p for g in groups for p in g}
  if not groups:
    listed = "; ".join(f"{p!r}: {why}" for p, why in reasons.items())
    raise WideAnalysisError(
        f"transform(): Sparse Wide cannot widen any layer of {what}: widening each layer on its "
        f"own, or with its sibling layers, fails ({listed}). Pass output_layers= with the layers "
        f"whose width must be kept and layers= with those to widen; keeping all of them, "
        f"output_layers={exact_output_layers(paths)!r}, widens nothing")

  def greedy(seq: Sequence[tuple[str, ...]]) -> frozenset:
    chosen: frozenset = frozenset()
    for g in seq:
      if probe(chosen | frozenset(g)) is None:
        chosen = chosen | frozenset(g)
    return chosen

  union = frozenset(grouped)
  if probe(union) is not None:
    forward, backward = greedy(groups), greedy(groups[::-1])
    if forward != backward:
      fw = [p for p in paths if p in forward]
      bw = [p for p in paths if p in backward]
      raise WideAnalysisError(
          f"transform(): Sparse Wide cannot decide which layers of {what} to widen: the groups "
          f"{[list(g) for g in groups]} widen on their own but not all together; pass "
          f"{_suggestion(paths, fw)} or {_suggestion(paths, bw)}")
    union = forward
    groups = [g for g in groups if set(g) <= forward]
  widened = tuple(p for p in paths if p in union)
  kept = tuple(p for p in paths if p not in union)
  for p in kept:
    reasons.setdefault(p, "conflicts with the other widened groups")
  return WidePlan(widened=widened, kept=kept, groups=tuple(groups),
                  reasons=tuple((p, reasons[p]) for p in kept),
                  output_layers=exact_output_layers(kept))
