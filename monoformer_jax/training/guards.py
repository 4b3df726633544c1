"""What stops a run cleanly: a preemption notice or Ctrl-C, and steps that are not finite.

SIGTERM (what TPU maintenance, SLURM preemption and `kill` send) and SIGINT (Ctrl-C) ask the
loop to save and stop after the step in flight; a second SIGINT stops at once, unsaved. With
several processes JAX's preemption service catches SIGTERM on whichever host receives it and
picks a step at which every host stops (multihost_utils.reached_preemption_sync_point), so
Ctrl-C there is passed on as SIGTERM; a single process catches both itself.
"""

import dataclasses
import os
import signal
from typing import Optional

import jax
from jax.experimental import multihost_utils


# sysexits' EX_TEMPFAIL: saved and stopped on purpose; running the same command resumes.
PREEMPTED_EXIT_CODE = 75
INTERRUPTED_EXIT_CODE = 130  # the shell's code for a process ended by SIGINT


class Preempted(Exception):
  """Raised when the run stops on a notice, after saving step `step` (or, with `held`, after holding
  the save back because steps were being skipped; then `step` is the newest checkpoint, or None)."""

  def __init__(self, step: Optional[int], directory: str, held: str = ''):
    newest = f'checkpoint step {step}' if step is not None else 'no checkpoint'
    if held:
      what = f'stopped without saving, since {held}; {newest} is the newest in {directory}'
    else:
      what = f'{newest} is saved in {directory}'
    super().__init__(f'preempted: {what}; run the same command again to resume.')
    self.step = step


class PreemptionNotice:
  """Whether a preemption notice (or Ctrl-C) has reached every process by a given step."""

  def __init__(self):
    self.requested = False
    self.previous = {}
    signals = (signal.SIGTERM, signal.SIGINT) if jax.process_count() == 1 else (signal.SIGINT,)
    for signum in signals:
      try:
        self.previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread: no handler, as before
        pass

  def _handle(self, signum, frame) -> None:
    del frame
    if signum == signal.SIGINT:
      if self.requested:  # the second Ctrl-C: stop now
        raise KeyboardInterrupt
      # os.write: a print here could land inside another write to the same stream.
      os.write(2, b'\ninterrupted: saving at the end of this step (Ctrl-C again to stop at '
                  b'once, unsaved).\n')
    self.requested = True
    if signum == signal.SIGINT and jax.process_count() > 1:
      os.kill(os.getpid(), signal.SIGTERM)  # the preemption service picks a step for all hosts

  def reached(self, step: int) -> bool:
    """Call at every step, on every process, with the same step numbers."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def close(self) -> None:
    for signum, previous in self.previous.items():
      if previous is not None:  # None: a handler set outside Python, which cannot be put back
        signal.signal(signum, previous)
    self.previous = {}


@dataclasses.dataclass(frozen=True)
class Diverged:
  """`count` steps of one kind in a row, the last at `step`, were not finite."""
  kind: str
  step: int
  count: int


class SkipGuard:
  """Counts the steps the step functions skipped as not finite (their `skipped` metric),
  per step kind: with alternating kinds a ruined model can keep its `ar` steps finite while
  every `diffusion` step overflows, so one streak over all steps would never reach the limit.

  While any kind is in a streak of skipped steps the state is suspect (a blow-up may have
  ruined the parameters without making them infinite), so the loop holds saves back until
  the streak ends; checkpoints written then could push the last good one out.
  Each step's flag is read one step late, once the next step is queued, so the loop
  never leaves the device idle to wait for it."""

  def __init__(self, limit: int):
    self.limit, self.total = limit, 0
    self.in_row: dict[str, int] = {}
    self.pending: Optional[tuple[int, str, jax.Array]] = None

  def push(self, step: int, kind: str, skipped: jax.Array) -> Optional[Diverged]:
    """Records step's flag; returns the divergence it completes, if any."""
    previous, self.pending = self.pending, (step, kind, skipped)
    return self._count(*previous) if previous else None

  def flush(self) -> Optional[Diverged]:
    previous, self.pending = self.pending, None
    return self._count(*previous) if previous else None

  @property
  def streak(self) -> Optional[tuple[str, int]]:
    """(kind, length) of the longest streak of skipped steps in progress (flushed ones only)."""
    kind, count = max(self.in_row.items(), key=lambda kv: kv[1], default=('', 0))
    return (kind, count) if count else None

  def _count(self, step: int, kind: str, skipped: jax.Array) -> Optional[Diverged]:
    if float(jax.device_get(skipped)):
      self.total += 1
      self.in_row[kind] = self.in_row.get(kind, 0) + 1
    else:
      self.in_row[kind] = 0
    count = self.in_row[kind]
    return Diverged(kind, step, count) if count >= self.limit else None
