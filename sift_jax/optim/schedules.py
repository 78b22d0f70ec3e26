"""When RigL/SET update masks, and what fraction of active weights they drop."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, overload

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["DROP_SCHEDULES", "MaskUpdateSchedule", "make_mask_update_schedule"]

DROP_SCHEDULES = ("cosine", "constant", "linear")


@dataclasses.dataclass(frozen=True)
class MaskUpdateSchedule:
  """Mask-update timing and drop-fraction decay (docs/method.md, section 4).

  A mask update happens at step ``t`` iff ``start_step <= t < end_step`` and
  ``(t - start_step) % update_every == 0``. The drop fraction at ``t`` is
  ``cosine``: ``f0 * (1 + cos(pi * t / end_step)) / 2`` (RigL's default),
  ``linear``: ``f0 * (1 - t / end_step)``, or ``constant``: ``f0``.
  """

  update_every: int
  start_step: int
  end_step: int
  drop_fraction: float
  drop_schedule: str

  def is_update_step(self, step: jax.Array) -> jax.Array:
    step = jnp.asarray(step, jnp.int32)
    return ((step >= self.start_step) & (step < self.end_step)
            & ((step - self.start_step) % self.update_every == 0))

  def drop_fraction_at(self, step: jax.Array) -> jax.Array:
    t = jnp.asarray(step, jnp.float32)
    f0 = jnp.float32(self.drop_fraction)
    if self.drop_schedule == "constant":
      return f0
    frac = jnp.clip(t / jnp.float32(self.end_step), 0.0, 1.0)
    if self.drop_schedule == "linear":
      return f0 * (1.0 - frac)
    return f0 * 0.5 * (1.0 + jnp.cos(jnp.float32(math.pi) * frac))

  def update_steps(self) -> range:
    """The (host-side) steps at which masks are updated."""
    return range(self.start_step, self.end_step, self.update_every)


@overload
def _as_int(value: None, name: str) -> None: ...
@overload
def _as_int(value: Any, name: str) -> int: ...
def _as_int(value: Any, name: str) -> Optional[int]:
  """``value`` as a Python int (numpy integers included); bools and floats are refused."""
  if value is None:
    return None
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an int, got {value!r}")
  return int(value)


def make_mask_update_schedule(*, update_every: int = 100, start_step: int = 0,
                              end_step: Optional[int] = None, total_steps: Optional[int] = None,
                              end_fraction: float = 0.75, drop_fraction: float = 0.3,
                              drop_schedule: str = "cosine") -> MaskUpdateSchedule:
  """Validates the options and returns a :class:`MaskUpdateSchedule`.

  ``end_step`` defaults to ``int(end_fraction * total_steps)``; one of the two
  must be given.

  Raises:
    ValueError: naming the offending option.
  """
  update_every = _as_int(update_every, "update_every")
  start_step = _as_int(start_step, "start_step")
  if update_every is None or update_every < 1:
    raise ValueError(f"update_every must be an int >= 1, got {update_every!r}")
  if start_step is None or start_step < 0:
    raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
  if drop_schedule not in DROP_SCHEDULES:
    raise ValueError(f"drop_schedule must be one of {DROP_SCHEDULES}, got {drop_schedule!r}")
  if not (0.0 <= float(drop_fraction) <= 1.0):
    raise ValueError(f"drop_fraction must be in [0, 1], got {drop_fraction!r}")
  if end_step is None:
    if total_steps is None:
      raise ValueError("give end_step or total_steps (end_step defaults to "
                       "end_fraction * total_steps)")
    total_steps = _as_int(total_steps, "total_steps")
    if total_steps is None or total_steps < 1:
      raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    if not (0.0 < float(end_fraction) <= 1.0):
      raise ValueError(f"end_fraction must be in (0, 1], got {end_fraction!r}")
    end_step = int(end_fraction * total_steps)
  end_step = _as_int(end_step, "end_step")
  if end_step is None:
    raise ValueError("end_step must be an int")
  if end_step <= start_step:
    raise ValueError(f"end_step ({end_step}) must be after start_step ({start_step})")
  return MaskUpdateSchedule(update_every=update_every, start_step=start_step, end_step=end_step,
                            drop_fraction=float(drop_fraction), drop_schedule=drop_schedule)
