"""One `train` per workdir, held by process 0 while the run lasts.

A local workdir: an exclusive flock on WORKDIR/train.lock, removed when the run ends; the kernel
drops the lock with the process, so a killed run leaves nothing stuck.

A workdir in a bucket: objects cannot be locked, so WORKDIR/train.lock is a lease. It is created
only if absent (a generation precondition, which the store checks atomically), rewritten every
quarter of LEASE_SECONDS on the same kind of precondition by a background thread, and deleted
when the run ends. It names its holder's machine and process. A `train` that finds a lease held
on its own machine looks the holder up: a process that is gone (killed, e.g. by a scheduler
that restarts the job at once) is taken over at once; a live one that renewed within the last
one and a half renewal periods is refused. A lease of another machine, or one that has stopped
being renewed, is waited for until it has gone LEASE_SECONDS without renewal (its holder most
likely crashed, e.g. a job SLURM requeued) and then taken over, again conditionally, so that of
two runs taking over one stale lease only one wins; a holder that renewed while this run waited
is alive, and this run is refused. A run whose lease was taken over (it stalled for longer than
LEASE_SECONDS) learns it at its next renewal and stops at its next checkpoint without saving.
What a lease cannot do: stop a run that stalls past its lease and then writes before its next
renewal; and it trusts the hosts' clocks to within a fraction of LEASE_SECONDS, and the machine
names (host name and boot) to tell machines apart.
"""

import fcntl  # local: the lock of a local workdir
import json
import os
import socket
import sys
import threading
import time
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from monoformer_jax.base import files
from monoformer_jax.base.errors import UserError
from monoformer_jax.base.workdir_layout import Workdir


LEASE_SECONDS = 120.0


def _holder() -> str:
  return f'pid {os.getpid()} on {socket.gethostname()}'


def _in_use(workdir: str, holder: str) -> UserError:
  return UserError(f'workdir {workdir} is in use by another `train` ({holder}); wait for it to '
                   'end or choose another --workdir.')


class FileLock:
  """The flock of a local workdir; the file is removed when the run ends."""

  def __init__(self, workdir: str):
    self.path = Workdir(workdir).lock
    while True:
      self.handle = open(self.path, 'a+', encoding='utf-8')  # local: flock
      try:
        fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # local by nature
      except OSError:
        self.handle.seek(0)
        holder = self.handle.read().strip() or 'another process'
        self.handle.close()
        raise _in_use(workdir, holder) from None
      # A run that ends removes the file while it holds the lock: a file opened before that
      # is no longer the workdir's, and its lock excludes nobody. Open the current one.
      if _same_file(self.handle, self.path):
        break
      self.handle.close()
    self.handle.truncate(0)
    self.handle.write(_holder() + '\n')
    self.handle.flush()
    self.lost = False

  def close(self) -> None:
    try:
      os.remove(self.path)  # local: still under the lock
    except FileNotFoundError:
      pass
    self.handle.close()


def _same_file(handle, path: str) -> bool:
  try:
    return os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino  # local
  except FileNotFoundError:
    return False


def _machine() -> str:
  """This machine (its name and boot): the processes of a lease's holder on the same one can be
  looked up."""
  try:
    with open('/proc/sys/kernel/random/boot_id', encoding='ascii') as f:  # local: Linux's
      boot = f.read().strip()
  except OSError:
    boot = ''
  return f'{socket.gethostname()} {boot}'


def _gone(pid: int) -> bool:
  """Whether no process `pid` runs on this machine (a zombie counts as gone)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:
    return False
  try:
    with open(f'/proc/{pid}/stat', encoding='ascii') as f:  # local: Linux's process table
      return f.read().rsplit(')', 1)[1].split()[0] == 'Z'
  except (OSError, IndexError):
    return False


class BucketLease:
  """The lease of a workdir in a bucket (see the module docstring)."""

  def __init__(self, workdir: str, seconds: float = LEASE_SECONDS):
    from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
    from google.cloud import storage  # pylint: disable=import-outside-toplevel
    self.conflict = exceptions.PreconditionFailed
    bucket, name = Workdir(files.absolute(workdir)).lock.split('://', 1)[1].split('/', 1)
    with files.remote_errors(workdir):
      self.blob = storage.Client().bucket(bucket).blob(name)
      self.seconds, self.lost, self.generation = seconds, False, 0
      self._take(workdir)
    self.stop = threading.Event()
    self.thread = threading.Thread(target=self._renew, daemon=True, name='workdir lease')
    self.thread.start()

  def _write(self, generation: int) -> None:
    record = json.dumps(dict(holder=_holder(), machine=_machine(), pid=os.getpid(),
                             renewed=time.time(), seconds=self.seconds))
    self.blob.upload_from_string(record, if_generation_match=generation, timeout=30)
    self.generation = self.blob.generation

  def _take(self, workdir: str) -> None:
    try:
      self._write(0)
      return
    except self.conflict:
      pass
    current = self.blob.bucket.get_blob(self.blob.name, timeout=30)
    generation = current.generation if current else 0
    if current is not None:
      age = time.time() - current.updated.timestamp()
      record = json.loads(current.download_as_text(timeout=30) or '{}')
      holder = record.get('holder', 'unknown')
      here = record.get('machine') == _machine()
      if here and _gone(int(record.get('pid', 0))):  # killed on this machine: nothing to wait for
        print(f'taking over the lease of {workdir} from {holder}: that process is gone.',
              file=sys.stderr, flush=True)
      elif here and age < self.seconds * 3 / 8:  # alive, and renewing
        raise _in_use(workdir, f'{holder}, its lease renewed {age:.0f} s ago')
      else:  # another machine's (alive or not), or a stalled run: its lease must run out
        if age < self.seconds:
          print(f'waiting {self.seconds - age:.0f} s for the lease of {workdir} ({holder}, '
                f'renewed {age:.0f} s ago) to run out.', file=sys.stderr, flush=True)
          time.sleep(self.seconds - age)
          latest = self.blob.bucket.get_blob(self.blob.name, timeout=30)
          if latest is not None and latest.generation != generation:
            raise _in_use(workdir, f'{holder}, which renewed its lease while this run waited')
          generation = latest.generation if latest else 0
        print(f'warning: taking over the lease of {workdir} from {holder}, not renewed for '
              f'{max(age, self.seconds):.0f} s.', file=sys.stderr, flush=True)
    try:
      self._write(generation)
    except self.conflict:
      raise _in_use(workdir, 'a run that took the lease just now') from None

  def _renew(self) -> None:
    while not self.stop.wait(self.seconds / 4):
      try:
        self._write(self.generation)
      except self.conflict:
        self.lost = True
        print(f'warning: the lease gs://{self.blob.bucket.name}/{self.blob.name} was taken over '
              'by another `train`; this run stops at its next checkpoint without saving.',
              file=sys.stderr, flush=True)
        return
      except Exception:  # pylint: disable=broad-except
        pass  # a transient failure: the next renewal tries again, well within the lease

  def close(self) -> None:
    self.stop.set()
    self.thread.join()
    if not self.lost:
      try:
        self.blob.delete(if_generation_match=self.generation, timeout=30)
      except Exception:  # pylint: disable=broad-except
        pass  # left to expire


def take(workdir: str) -> Optional[FileLock | BucketLease]:
  """Process 0's hold on the workdir (other processes share process 0's run)."""
  if jax.process_index() != 0:
    return None
  return BucketLease(workdir) if files.is_remote(workdir) else FileLock(workdir)


def check_held(lock: Optional[FileLock | BucketLease], workdir: str) -> None:
  """Raises UserError on every process when process 0's lease was taken over."""
  lost = multihost_utils.broadcast_one_to_all(np.int32(bool(lock and lock.lost)))
  if lost:
    raise UserError(f'another `train` took over the lease of workdir {workdir} (this run stalled '
                    f'for over {LEASE_SECONDS:.0f} s); this run stopped without saving.')
