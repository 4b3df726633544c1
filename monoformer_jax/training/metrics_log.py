"""What a run reports: TensorBoard scalars and images, WORKDIR/metrics.jsonl (one JSON object
per logged step) and a progress line.

metrics.jsonl survives crashes: a resumed run drops the rows it will redo and any line a
crash or a full disk left torn (with a warning), and rewrites the file atomically. On a local
disk rows are appended as they come. A bucket has no append: there the file (and the
TensorBoard events file) is rewritten whole, as one object, at every checkpoint save, at the
end, and at least every FLUSH_SECONDS, so it always holds the rows of the newest checkpoint.
"""

import contextlib
import io
import json
import socket
import sys
import time
import types
from typing import Iterator

from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2

import jax
import numpy as np

from monoformer_jax.base import files, images as images_lib, quiet_import
from monoformer_jax.base.workdir_layout import Workdir


FLUSH_SECONDS = 30  # a bucket's metrics.jsonl lags the run by at most this


def read_rows(path: str) -> list[dict]:
  """The rows of a metrics.jsonl; lines that are not JSON objects are dropped with a warning."""
  rows, torn = [], 0
  for line in files.read_text(path).splitlines():
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


class BucketEvents:
  """TensorBoard events of a workdir in a bucket, as one events object rewritten at each flush
  (TensorFlow's writer needs its own GCS client and appends). The file's records are
  TensorBoard's own format, so TensorBoard reads the bucket as it reads a local run."""

  def __init__(self, workdir: str):
    self.path = Workdir(files.absolute(workdir)).events_file(f'{time.time():.0f}',
                                                             socket.gethostname())
    # Imported here: tensorboard.summary takes a quarter of a second to import.
    from tensorboard.summary.writer import record_writer  # pylint: disable=import-outside-toplevel
    self.buffer = io.BytesIO()
    self.records = record_writer.RecordWriter(self.buffer)
    self._add(event_pb2.Event(file_version='brain.Event:2'))

  def _add(self, event: event_pb2.Event) -> None:
    event.wall_time = time.time()
    self.records.write(event.SerializeToString())

  def write_scalars(self, step: int, scalars: dict) -> None:
    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
    self._add(event_pb2.Event(step=step, summary=summary_pb2.Summary(value=values)))

  def write_images(self, step: int, images: dict) -> None:
    values = []
    for tag, batch in images.items():
      png = io.BytesIO()
      picture = np.asarray(batch[0])
      Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture).save(png, 'PNG')
      image = summary_pb2.Summary.Image(height=picture.shape[0], width=picture.shape[1],
                                        colorspace=picture.shape[-1],
                                        encoded_image_string=png.getvalue())
      values.append(summary_pb2.Summary.Value(tag=tag, image=image))
    self._add(event_pb2.Event(step=step, summary=summary_pb2.Summary(value=values)))

  def flush(self) -> None:
    files.write_bytes(self.path, self.buffer.getvalue())

  close = flush


def _tensorboard_writer(workdir: str, leader: bool):
  if files.is_remote(workdir):
    return BucketEvents(workdir) if leader else _NO_EVENTS
  # clu brings in TensorFlow; imported here so that commands that log nothing stay light.
  quiet_import.load_tensorflow()
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    if leader:
      print(f'warning: no TensorBoard events ({e}); metrics.jsonl and the progress line are '
            'still written.', file=sys.stderr, flush=True)
    return _NO_EVENTS
  return metric_writers.create_default_writer(Workdir(workdir).tensorboard,
                                              just_logging=not leader, asynchronous=False)


# What stands in for a writer where TensorFlow is not installed (e.g. a bare GPU image), and on
# the processes other than the first for a bucket.
_NO_EVENTS = types.SimpleNamespace(write_scalars=lambda step, scalars: None,
                                   write_images=lambda step, images: None,
                                   flush=lambda: None, close=lambda: None)


class MetricsLog:
  """TensorBoard scalars/images, one JSON line per logged step, and a progress line.

  Speed and ETA are steady-state figures: the time a step kind's first call spends compiling
  and the time periodic evaluations take are left out of them."""

  def __init__(self, workdir: str, start_step: int, num_steps: int, lock=None):
    """lock: the run's hold on its workdir (process 0's); once another run has taken it over,
    this one's rows are no longer written to the bucket."""
    self.leader = jax.process_index() == 0
    self.path = Workdir(workdir).metrics
    self.remote, self.lock = files.is_remote(workdir), lock
    self.rows: list[dict] = []  # a bucket's rows, rewritten whole at each flush
    self.flushed = time.monotonic()
    self.writer = _tensorboard_writer(workdir, self.leader)
    self.num_steps = num_steps
    self.last = (start_step, time.monotonic())
    self.input_wait_s = 0.0  # since the last write: waiting for input
    self.paused_s = 0.0  # since the last write: compiling or evaluating, not training
    self.compiled: dict[str, float] = {}  # step kind -> seconds its first call took
    self.compiled_now: list[str] = []  # the kinds compiled since the last write
    if self.leader and files.exists(self.path):  # drop rows a resumed run will redo
      self.rows = [r for r in read_rows(self.path) if r['step'] <= start_step]
      self._rewrite()
      if not self.remote:
        self.rows = []

  def _rewrite(self) -> None:
    files.write_text(self.path, ''.join(json.dumps(r) + '\n' for r in self.rows))

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
    if not self.leader:
      return
    if not self.remote:
      with open(self.path, 'a', encoding='utf-8') as f:  # local: a bucket has no append
        f.write(json.dumps(row) + '\n')
      return
    self.rows.append(row)
    if time.monotonic() - self.flushed > FLUSH_SECONDS:
      self.flush()

  def flush(self) -> None:
    """Makes every row so far readable in a bucket (on a local disk they are already)."""
    if self.leader and self.remote and not (self.lock and self.lock.lost):
      self._rewrite()
      self.writer.flush()
      self.flushed = time.monotonic()

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
    self.flush()
    self.writer.close()
