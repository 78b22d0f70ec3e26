"""Parameter paths: "/"-joined strings for the leaves of any parameter pytree.

Plain dicts, Linen ``params`` (``FrozenDict`` or ``dict``) and ``nnx.State`` all
flatten to key paths; this module turns them into stable, human-readable strings
such as ``"layer1_0/conv1/kernel"`` that policies match with regular expressions.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

__all__ = ["path_str", "leaf_paths", "map_with_path_str"]


def _key_str(key: Any) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return str(key.name)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_str(key_path: tuple[Any, ...]) -> str:
  """Returns the "/"-joined string of a jax key path.

  The trailing ``.value`` attribute that ``nnx.State`` adds for each
  ``nnx.Variable`` is dropped, so ``nnx.state(model)`` and Linen ``params`` of
  the same architecture give the same paths.
  """
  keys = list(key_path)
  if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
    keys = keys[:-1]
  return "/".join(_key_str(k) for k in keys)


def leaf_paths(tree: Any) -> list[str]:
  """Returns the path strings of ``tree``'s leaves, in ``jax.tree.leaves`` order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [path_str(kp) for kp, _ in flat]


def map_with_path_str(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
  """Like ``jax.tree.map`` but ``fn`` receives the path string first."""
  return jax.tree_util.tree_map_with_path(lambda kp, *xs: fn(path_str(kp), *xs), tree, *rest)
