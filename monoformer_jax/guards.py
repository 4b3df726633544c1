"""What stops a run cleanly: a preemption notice, and too many steps that were not finite.

SIGTERM (what TPU maintenance, SLURM preemption and `kill` send) asks the loop to save and
stop after the step in flight. With several processes JAX's preemption service catches the
signal on whichever host receives it and picks a step at which every host stops
(multihost_utils.reached_preemption_sync_point); a single process catches it itself.
"""

import signal
from typing import Optional

import jax
from jax.experimental import multihost_utils

# sysexits' EX_TEMPFAIL: saved and stopped on purpose; running the same command resumes.
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
  """Raised after the checkpoint of `step` is saved because a preemption notice came."""

  def __init__(self, step: int, directory: str):
    super().__init__(f'preempted: checkpoint step {step} is saved in {directory}; run the same '
                     'command again to resume.')
    self.step = step


class PreemptionNotice:
  """Whether a preemption notice has reached every process by a given step."""

  def __init__(self):
    self.requested = False
    self.previous = None
    if jax.process_count() == 1:
      try:
        self.previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread: no handler, as before
        pass

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    """Call at every step, on every process, with the same step numbers."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def close(self) -> None:
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)


class SkipGuard:
  """Counts the steps the step functions skipped as not finite (their `skipped` metric).

  Each step's flag is read one step late, once the next step is queued, so the loop
  never leaves the device idle to wait for it.
  """

  def __init__(self, limit: int):
    self.limit, self.total, self.in_row = limit, 0, 0
    self.pending: Optional[tuple[int, jax.Array]] = None

  def push(self, step: int, skipped: jax.Array) -> Optional[int]:
    """Records step's flag; returns the step that completed `limit` skips in a row, if any."""
    previous, self.pending = self.pending, (step, skipped)
    return self._count(*previous) if previous else None

  def flush(self) -> Optional[int]:
    previous, self.pending = self.pending, None
    return self._count(*previous) if previous else None

  def _count(self, step: int, skipped: jax.Array) -> Optional[int]:
    if float(jax.device_get(skipped)):
      self.total += 1
      self.in_row += 1
    else:
      self.in_row = 0
    return step if self.in_row >= self.limit else None
