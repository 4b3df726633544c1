"""What a run reports: TensorBoard scalars and images, WORKDIR/metrics.jsonl (one JSON object
per logged step) and a progress line.

metrics.jsonl survives crashes: a resumed run drops the rows it will redo and any line a
crash or a full disk left torn (with a warning), and rewrites the file atomically.
"""

import contextlib
import json
import os
import sys
import time
import types
from typing import Iterator

import jax
import numpy as np

from monoformer_jax.base import files, images as images_lib


METRICS_FILE = 'metrics.jsonl'


def read_rows(path: str) -> list[dict]:
  """The rows of a metrics.jsonl; lines that are not JSON objects are dropped with a warning."""
  rows, torn = [], 0
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        row = None
      if isinstance(row, dict) and isinstance(row.get('step'), int):
        rows.append(row)
      elif line.strip():
        torn += 1
  if torn:
    print(f'warning: {path}: dropped {torn} unreadable line(s), e.g. one torn by a crash.',
          file=sys.stderr, flush=True)
  return rows


def _tensorboard_writer(workdir: str, leader: bool):
  # clu brings in TensorFlow; imported here so that commands that log nothing stay light.
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    if leader:
      print(f'warning: no TensorBoard events ({e}); metrics.jsonl and the progress line are '
            'still written.', file=sys.stderr, flush=True)
    # What stands in for clu's writer where TensorFlow is not installed (e.g. a bare GPU image).
    return types.SimpleNamespace(write_scalars=lambda step, scalars: None,
                                 write_images=lambda step, images: None, close=lambda: None)
  return metric_writers.create_default_writer(workdir, just_logging=not leader, asynchronous=False)


class MetricsLog:
  """TensorBoard scalars/images, one JSON line per logged step, and a progress line.

  Speed and ETA are steady-state figures: the time a step kind's first call spends compiling
  and the time periodic evaluations take are left out of them."""

  def __init__(self, workdir: str, start_step: int, num_steps: int):
    self.leader = jax.process_index() == 0
    self.path = os.path.join(workdir, METRICS_FILE)
    self.writer = _tensorboard_writer(workdir, self.leader)
    self.num_steps = num_steps
    self.last = (start_step, time.monotonic())
    self.input_wait_s = 0.0  # since the last write: waiting for input
    self.paused_s = 0.0  # since the last write: compiling or evaluating, not training
    self.compiled: dict[str, float] = {}  # step kind -> seconds its first call took
    self.compiled_now: list[str] = []  # the kinds compiled since the last write
    if self.leader and os.path.exists(self.path):  # drop rows a resumed run will redo
      rows = [r for r in read_rows(self.path) if r['step'] <= start_step]
      files.write_text(self.path, ''.join(json.dumps(r) + '\n' for r in rows))

  @contextlib.contextmanager
  def pause(self) -> Iterator[None]:
    """Time spent in the block is not training time."""
    start = time.monotonic()
    try:
      yield
    finally:
      self.paused_s += time.monotonic() - start

  @contextlib.contextmanager
  def compiling(self, kind: str) -> Iterator[None]:
    """Wraps every call of a step function; the first of each kind is paused time."""
    if kind in self.compiled:
      yield
      return
    start = time.monotonic()
    with self.pause():
      yield
    self.compiled[kind] = time.monotonic() - start
    self.compiled_now.append(kind)

  def _append(self, row: dict) -> None:
    if self.leader:
      with open(self.path, 'a', encoding='utf-8') as f:
        f.write(json.dumps(row) + '\n')

  def write(self, step: int, kind: str, metrics: dict, skipped_steps: int) -> None:
    """Logs one step's metrics (already on the host), the steps skipped so far as not
    finite, the steady-state speed and the share of the wall time since the last write
    spent waiting for input."""
    scalars = {k: float(v) for k, v in metrics.items()}
    now = time.monotonic()
    elapsed = max(now - self.last[1], 1e-9)
    rate = (step - self.last[0]) / max(elapsed - self.paused_s, 1e-9)
    input_wait = self.input_wait_s / elapsed
    compiled = ', '.join(f'{k} in {self.compiled[k]:.0f} s' for k in self.compiled_now)
    compile_note = f'  compiled {compiled}' if compiled else ''
    self.last, self.input_wait_s, self.paused_s, self.compiled_now = (step, now), 0.0, 0.0, []
    extra = {'skipped_steps': skipped_steps, 'steps_per_sec': rate,
             'input_wait_fraction': input_wait}
    self.writer.write_scalars(step, {f'{kind}/{k}': v for k, v in scalars.items()} | extra)
    self._append({'step': step, 'kind': kind, **scalars, **extra})
    if self.leader:
      left = (self.num_steps - step) / max(rate, 1e-9)  # seconds
      eta = f'{left / 3600:.1f} h' if left >= 3600 else f'{left / 60:.1f} min'
      skipped = f'  skipped {skipped_steps}' if skipped_steps else ''
      print(f'step {step}/{self.num_steps}  {kind:9s} loss {scalars["loss"]:.4f}  '
            f'lr {scalars["learning_rate"]:.3g}{skipped}  {rate:.1f} steps/s  '
            f'input wait {input_wait:.1%}  ETA {eta}{compile_note}', flush=True)

  def write_rows(self, step: int, kind: str, values: dict[str, float]) -> None:
    """Values of one kind (a periodic evaluation's): scalars under KIND/, a metrics.jsonl
    row of that kind, and a line."""
    self.writer.write_scalars(step, {f'{kind}/{k}': v for k, v in values.items()})
    self._append({'step': step, 'kind': kind, **values})
    if self.leader:
      print(f'step {step}  {kind}: ' + '  '.join(f'{k} {v:.4f}' for k, v in values.items()),
            flush=True)

  def write_eval(self, step: int, metrics: dict, images: np.ndarray, table: str) -> None:
    """The end-of-run evaluation: its numeric metrics, a grid of its samples, and its table."""
    self.writer.write_scalars(step, {k: v for k, v in metrics.items()
                                     if isinstance(v, float) and k != 'cfg_scale'})
    grid = images_lib.image_grid(images_lib.to_uint8(images), columns=len(images) // 10)
    self.writer.write_images(step, {'samples': grid[None]})
    if self.leader:
      print(f'eval at step {step}:\n{table}', flush=True)

  def close(self) -> None:
    self.writer.close()
