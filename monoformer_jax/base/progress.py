"""Progress lines for the phases of a command that take more than a moment (sampling, the digit FD,
multiple-choice scoring, FID), printed by process 0 so a user sees what runs.

A phase prints `NAME ...` when it starts and its duration when it ends; a phase that counts units
(images, requests) adds a line with the count and the time left every `UPDATE_SECONDS`.
"""

import contextlib
import time
from typing import Iterable, Iterator, Optional, TypeVar

import jax


UPDATE_SECONDS = 10.0
T = TypeVar('T')


def _say(text: str, end: str = '\n') -> None:
  if jax.process_index() == 0:
    print(text, end=end, flush=True)


def _duration(seconds: float) -> str:
  return f'{seconds:.1f} s' if seconds < 90 else f'{seconds / 60:.1f} min'


class Phase:
  """One phase's start, updates and end (use through `phase`)."""

  def __init__(self, name: str, total: Optional[int], unit: str):
    self.name, self.total, self.unit = name, total, unit
    self.start = self.last = time.monotonic()
    self.done, self.updated = 0, False

  def advance(self, count: int) -> None:
    """`count` more units are done."""
    self.done += count
    now = time.monotonic()
    if now - self.last < UPDATE_SECONDS:
      return
    self.last = now
    of = f'/{self.total}' if self.total else ''
    left = ''
    if self.total and self.done:
      left = f', about {_duration((now - self.start) * (self.total - self.done) / self.done)} left'
    _say(('\n' if not self.updated else '') + f'  {self.name}: {self.done}{of} {self.unit}{left}')
    self.updated = True


@contextlib.contextmanager
def phase(name: str, total: Optional[int] = None, unit: str = '') -> Iterator[Phase]:
  """Announces a phase, yields it for `advance` calls, and reports its duration."""
  _say(f'{name} ...', end='')
  p = Phase(name, total, unit)
  try:
    yield p
  except BaseException:
    _say('' if not p.updated else f'{name}: stopped')
    raise
  took = _duration(time.monotonic() - p.start)
  _say(f'{name}: done in {took}' if p.updated else f' {took}')


def counted(items: Iterable[T], p: Phase, size=len) -> Iterator[T]:
  """The items, each advancing the phase by size(item) once it has been consumed."""
  for item in items:
    yield item
    p.advance(size(item))
