"""Orbax checkpoints of the train state, the data-iterator states and the config.

Orbax writes each step under a temporary name (locally) or without its commit marker (in a
bucket) and finishes it only once every item is complete, so a crash mid-save never leaves a
step that looks finished. Just before that, process 0 records the CRC32C of every file of the
step in CHECKSUMS, inside it: a finished step always carries its checksums, and a restore checks
them first, so flipped or replaced bytes are caught like a truncated file (a bucket's checksums
come from the objects' metadata, no download). A step that cannot be restored is reported in one
warning line and the previous finished step is used instead. Parameters that are not finite are
never saved, so the retention policy can only drop older finite checkpoints. Saves are
asynchronous where that helps (the loop goes on while the previous save is written; the next
save, and the end of the run, wait for it).
"""

import enum
import errno
import json
import logging
import os
import sys
import warnings
import zlib
from typing import Any, Callable, Optional, TypeVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from jax.experimental import multihost_utils

from monoformer_jax.base import files
from monoformer_jax.base.errors import UserError
from monoformer_jax.base.workdir_layout import Workdir
from monoformer_jax.config import schema
from monoformer_jax.nn.converted import get, nest


CHECKSUMS = 'checksums.json'  # in each step directory: {relative path: CRC32C}
WEIGHTS_ONLY = 'weights_only'  # in the data item of a step holding parameters alone
FROZEN_BASE = 'frozen_base'  # in the data item: the converted LLM a frozen backbone comes from
FROZEN_HELD = 'frozen_held'  # in the data item of a step whose 'frozen' item holds that backbone
T = TypeVar('T')


def _item_checksums(step_dir: str) -> dict[str, str]:
  """The files of a step's items; the step's own files (its metadata, its commit marker) are
  Orbax's to update as it commits the step."""
  return {name: crc for name, crc in files.checksums(step_dir).items() if '/' in name}


def _legacy_crc32(path: str) -> int:
  """The CRC-32 that steps saved by earlier versions recorded (as integers)."""
  return zlib.crc32(files.read_bytes(path))


class AsyncSaves(enum.Enum):
  AUTO = 'auto'  # asynchronous on accelerators; on CPU the copy to host is the whole write
  ON = 'on'
  OFF = 'off'

  def enabled(self) -> bool:
    return self == AsyncSaves.ON or (self == AsyncSaves.AUTO and jax.default_backend() != 'cpu')


_finite = jax.jit(lambda x: jnp.isfinite(x).all())


def all_finite(tree) -> bool:
  """Whether every float leaf of a pytree is finite (integer ones, as a quantized kernel's, are),
  checked leaf by leaf where it lives (so no more than one leaf's worth of flags exists at a
  time)."""
  return all(bool(np.isfinite(x).all() if isinstance(x, np.ndarray) else _finite(x))
             for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact))


def disk_full(error: BaseException) -> bool:
  """Whether an error, or one that caused it, is a full disk: an OSError from Python, or
  tensorstore's RESOURCE_EXHAUSTED (a ValueError that carries only the OS error's text)."""
  while error is not None:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return True
    if "os_error_code='28'" in str(error) or 'No space left on device' in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


class _RaisedByTheWaiter(logging.Filter):
  """Drops the error logs of Orbax's background save threads and of their asyncio tasks: the
  thread that waits for the save raises the same error, which is reported once (a full disk
  as one sentence). Also Orbax's warning that a save without OCDBT (what conversions write)
  has no per-process OCDBT files to merge: there is nothing to merge."""

  def filter(self, record: logging.LogRecord) -> bool:
    path = record.pathname.replace(os.sep, '/')
    if path.endswith('orbax/checkpoint/_src/serialization/ocdbt_utils.py') and (
        'Skipping merge of OCDBT checkpoints' in str(record.msg)):
      return False
    if record.levelno < logging.ERROR:
      return True
    if 'orbax/checkpoint/' in path and (
        path.endswith(('/futures/future.py', '/checkpointers/async_checkpointer.py'))
        or record.funcName == 'wait_until_finished'):
      return False
    return not (record.name == 'asyncio' and 'orbax/checkpoint/' in record.getMessage())


def quiet_save_threads() -> None:
  """Keeps a failed save's aftermath off the terminal, once its error is reported: Orbax's
  logs of it (_RaisedByTheWaiter), and the writes still in flight when Orbax closed the
  save's event loop, which tensorstore completes into the closed loop ('Event loop is
  closed', printed through sys.unraisablehook, one per array) or leaves unstarted."""
  loggers = (absl_logging.get_absl_logger(), logging.getLogger('asyncio'))
  if any(isinstance(f, _RaisedByTheWaiter) for f in loggers[0].filters):
    return
  for logger in loggers:
    logger.addFilter(_RaisedByTheWaiter())
  previous = sys.unraisablehook

  def hook(unraisable) -> None:
    value = unraisable.exc_value
    if not (isinstance(value, RuntimeError) and str(value) == 'Event loop is closed'):
      previous(unraisable)

  sys.unraisablehook = hook
  warnings.filterwarnings('ignore', r"coroutine '.*write_fragment' was never awaited",
                          RuntimeWarning)


class Checkpointer:
  """A CheckpointManager over WORKDIR/checkpoints."""

  def __init__(self, workdir: str, keep: int = 2, create: bool = True,
               async_saves: bool = False, bytes_in_flight_gb: Optional[float] = None):
    """bytes_in_flight_gb, when given, bounds what a save copies and writes at once (what
    conversions use, to stay near the size of what they convert)."""
    self.workdir = Workdir(files.absolute(workdir))
    self.directory = self.workdir.checkpoints
    # Always Orbax's asynchronous checkpointer, for its hook between a step's last file and its
    # commit (a synchronous save is one waited for at once).
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=create, enable_async_checkpointing=True,
        cleanup_tmp_directories=create,
        async_options=ocp.options.AsyncOptions(post_finalization_callback=self._record_checksums))
    # PyTree handlers save and restore all or part of the state, and the frozen backbone (None:
    # no bound).
    pytree = lambda: ocp.PyTreeCheckpointHandler(  # noqa: E731
        save_concurrent_gb=bytes_in_flight_gb, save_device_host_concurrent_gb=bytes_in_flight_gb)
    handlers = dict(state=pytree(), frozen=pytree(), data=ocp.JsonCheckpointHandler(),
                    config=ocp.JsonCheckpointHandler())
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self.async_saves = async_saves
    self.saving: Optional[int] = None  # the step whose save was started last
    self.full_steps: dict[int, bool] = {}  # step -> whether it holds the optimizer state

  def all_steps(self) -> list[int]:
    """The finished steps, newest first."""
    return sorted(self.manager.all_steps(), reverse=True)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def _written(self, action: Callable[[], None], step: Optional[int]) -> None:
    """Runs a save of `step` (or the wait for one, step None); a full disk, or any failure of a
    bucket's store, becomes one sentence that names the checkpoint kept."""
    try:
      action()
    except Exception as e:  # pylint: disable=broad-except
      full = disk_full(e)
      if not full and not files.is_remote(self.directory):
        raise
      finished = [s for s in self.all_steps() if s != step]
      last = f'step {finished[0]}' if finished else 'none'
      what = 'a checkpoint' if step is None else f'checkpoint step {step}'
      cause, remedy = ((f'the disk holding {self.directory} is full',
                        'free space and run the same command to resume from it') if full else
                       (f'the store failed ({files.failure(e, self.directory)})',
                        'run the same command to resume from it once the store works'))
      raise UserError(f'{cause}; {what} was not written. The last finished checkpoint is {last}; '
                      f'{remedy}.') from e

  def save(self, step: int, state, data_state: dict[str, Any],
           config: ml_collections.ConfigDict, frozen=None) -> None:
    """Saves after the previous save has finished; refuses parameters that are not finite.
    `frozen`, when given, is saved beside the state (train.checkpoint_frozen): the parameters
    that do not train, in finetune.storable() form."""
    if frozen is not None:
      data_state = dict(data_state, **{FROZEN_HELD: True})
    self._save(step, state, (state.params, state.ema_params), data_state, config, frozen)

  def save_weights(self, step: int, params, config: ml_collections.ConfigDict) -> None:
    """Saves parameters alone (any dtype; the decoder's blocks apart, under decoder/layers/{i}):
    what a conversion writes. They serve as the EMA too; training from them starts a fresh
    optimizer state."""
    layers = params['decoder']['layers']
    if not all(k.isdigit() for k in layers):  # the model's stacked layout: split it
      depth = len(jax.tree.leaves(layers)[0])
      params = dict(params, decoder={'layers': {
          str(i): jax.tree.map(lambda x, i=i: x[i], layers) for i in range(depth)}})
    self._save(step, dict(step=np.int32(step), params=params), params, {WEIGHTS_ONLY: True}, config)

  def _save(self, step: int, state, params, data_state: dict[str, Any],
            config: ml_collections.ConfigDict, frozen=None) -> None:
    if not all_finite(params):
      last = self.all_steps()
      raise UserError(f'the parameters at step {step} are not finite, so they were not saved; '
                      f'the last finite checkpoint is {f"step {last[0]}" if last else "none"} '
                      f'in {self.directory}.')
    self.wait()
    items = dict(state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state),
                 config=ocp.args.JsonSave(config.to_dict()))
    if frozen is not None:
      items['frozen'] = ocp.args.PyTreeSave(frozen)
    args = ocp.args.Composite(**items)
    self.saving = step
    self._written(lambda: self.manager.save(step, args=args), step)
    if not self.async_saves:
      self._written(self.manager.wait_until_finished, step)

  def has_optimizer_state(self, step: int) -> bool:
    """False for a step save_weights wrote (a step whose data cannot be read counts as a full
    one, for the fallback to judge)."""
    if step not in self.full_steps:
      try:
        self.full_steps[step] = not self.restore_data(step).get(WEIGHTS_ONLY)
      except UserError:
        return True
    return self.full_steps[step]

  def restore_data(self, step: int) -> dict[str, Any]:
    """The step's data item: the data iterators' states and what the run recorded beside them."""
    return self._restore(step, 'data', data=ocp.args.JsonRestore())['data']

  def wait(self) -> None:
    """Waits for an asynchronous save to be complete on disk."""
    self._written(self.manager.wait_until_finished, None)

  def _record_checksums(self) -> None:
    """Orbax's hook on process 0, once every process has written its files of the step being
    saved and before the step is committed: the checksums are written into the step."""
    step, self.saving = str(self.saving), None
    names = [n for n in files.listdir(self.directory) if n.split('.')[0] == step]
    if not names:  # a save not started by this class (tests do, as older versions did)
      return
    step_dir = os.path.join(self.directory, max(names, key=len))  # STEP.orbax-checkpoint-tmp locally
    files.write_text(os.path.join(step_dir, CHECKSUMS), json.dumps(_item_checksums(step_dir)))

  def _verify(self, step: int) -> None:
    """Raises UserError when a file of the step differs from its recorded checksum (process 0;
    a step saved before checksums were recorded passes)."""
    step_dir = self.workdir.checkpoint_step(step)
    path = os.path.join(step_dir, CHECKSUMS)
    if jax.process_index() != 0 or not files.exists(path):
      return
    recorded = files.read_json(path)
    found = _item_checksums(step_dir)
    for name, crc in recorded.items():
      if '/' not in name:  # an earlier version's record of Orbax's own files, which it updates
        continue
      if name in found and isinstance(crc, int):
        found[name] = _legacy_crc32(os.path.join(step_dir, name))
      if found.get(name) != crc:
        raise UserError(f'checkpoint step {step} in {self.directory}: {name} is '
                        f'{"missing" if name not in found else "damaged"} (its checksum differs).')

  def _restore(self, step: int, what: str, **items) -> dict[str, Any]:
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      # Orbax and tensorstore raise many kinds (a bare Exception for a truncated array file).
      first_line = (str(e).splitlines() or [''])[0][:200]
      raise UserError(f'checkpoint step {step} in {self.directory}: its {what} cannot be '
                      f'restored ({type(e).__name__}: {first_line}).') from e

  def restore(self, step: int, abstract_state) -> tuple[Any, dict[str, Any]]:
    """The state (placed as `abstract_state`'s shardings say) and the data states."""
    self._verify(step)
    restored = self._restore(step, 'train state', state=ocp.args.PyTreeRestore(
        item=abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(
            abstract_state)), data=ocp.args.JsonRestore())
    return restored['state'], restored['data']

  def restore_params(self, step: int, abstract_params, use_ema: bool):
    """Only the EMA or the raw parameters (as abstract_params' shapes, dtypes and shardings
    say): inference never reads the optimizer state, a third of a checkpoint or more."""
    self._verify(step)
    if not self.has_optimizer_state(step):  # saved by save_weights: read part by part
      flat, tree = jax.tree_util.tree_flatten_with_path(abstract_params)
      leaves = [jax.device_put(self.read_leaf(step, tuple(k.key for k in path), leaf.shape,
                                              leaf.dtype, use_ema), leaf.sharding)
                for path, leaf in flat]
      return jax.tree.unflatten(tree, leaves)
    item = {'ema_params' if use_ema else 'params': abstract_params}
    restored = self._restore(step, 'parameters', state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True))
    return next(iter(restored['state'].values()))

  def holds_frozen(self, step: int) -> bool:
    """Whether the step holds the parameters that do not train (train.checkpoint_frozen)."""
    return bool(self.restore_data(step).get(FROZEN_HELD))

  def restore_frozen(self, step: int, abstract):
    """The parameters that do not train, as `abstract` (in finetune.storable() form) says; or
    one of them, with `abstract` nested under its path, read alone. Unverified, as read_leaf
    (an export reads one leaf at a time, and each check would hash the whole step): resuming
    and inference restore the state or parameters first, which checks every file of the step,
    these included."""
    return self._restore(step, 'frozen backbone', frozen=ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True))['frozen']

  def read_leaf(self, step: int, path: tuple[str, ...], shape: tuple[int, ...], dtype,
                use_ema: bool) -> np.ndarray:
    """One parameter as a host array of `dtype` (cast from whatever the step stored): what
    streaming exports read, so that only one parameter is in memory at a time. A step
    save_weights wrote holds one set of parameters, with the decoder's blocks apart."""
    weights_only = not self.has_optimizer_state(step)
    key = 'params' if weights_only or not use_ema else 'ema_params'
    blocks = weights_only and path[:2] == ('decoder', 'layers')
    if blocks:
      part = jax.ShapeDtypeStruct(shape[1:], dtype)
      item = {key: nest(path[:2], {str(i): nest(path[2:], part) for i in range(shape[0])})}
    else:
      item = {key: nest(path, jax.ShapeDtypeStruct(shape, dtype))}
    restored = self._restore(step, 'parameters', state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True))['state'][key]
    if blocks:
      layers = get(restored, path[:2])
      return np.stack([np.asarray(get(layers[str(i)], path[2:])) for i in range(shape[0])])
    return np.asarray(get(restored, path))

  def restore_config(self, step: int) -> ml_collections.ConfigDict:
    saved = self._restore(step, 'config', config=ocp.args.JsonRestore())
    return schema.config_from_dict(saved['config'])

  def newest_restorable(self, load: Callable[[int], T]) -> tuple[int, T]:
    """(step, load(step)) for the newest step that every process restores, from newest to
    oldest; a warning line for each step passed over, an error if none restores."""
    failures = []
    for step in self.all_steps():
      try:
        result, problem = load(step), None
      except UserError as e:
        result, problem = None, str(e)
      everywhere = multihost_utils.process_allgather(np.int32(problem is None)).min()
      if everywhere:
        if failures and jax.process_index() == 0:
          more = f' ({len(failures) - 1} other newer step(s) failed too.)' if len(failures) > 1 else ''
          print(f'warning: {failures[0]}{more} Using step {step} instead.', file=sys.stderr,
                flush=True)
        return step, result
      failures.append(problem or f'checkpoint step {step} cannot be restored on another host.')
    raise UserError(f'no checkpoint in {self.directory} can be restored'
                    + (f'; the newest: {failures[0]}' if failures else '.'))

  def close(self) -> None:
    """Waits for the last save, then stops the manager's threads, also when the save failed:
    threads left running print tracebacks as the interpreter exits."""
    try:
      self.wait()
    finally:
      self.manager.close()


def open_existing(workdir: str) -> Checkpointer:
  """The checkpointer of a workdir that must hold a finished checkpoint."""
  directory = Workdir(workdir).checkpoints
  if not files.isdir(directory):
    raise UserError(f'workdir {workdir} has no checkpoint; run train with --workdir={workdir} first.')
  ckpt = Checkpointer(workdir, create=False)
  if ckpt.latest_step() is None:
    raise UserError(f'workdir {workdir} has no finished checkpoint in {directory}.')
  return ckpt
