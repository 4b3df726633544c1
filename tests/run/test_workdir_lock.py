"""The lease that holds a workdir in a bucket (the session's GCS emulator) for one `train`; the
local lock and a second `train` refused on either storage are checked end to end in
test_workdir.py and base/test_files.py."""

import json
import sys
import threading
import time

import pytest
from google.cloud import storage

from helpers import start_process

from monoformer_jax.base import files
from monoformer_jax.base.errors import UserError
from monoformer_jax.run import workdir_lock


def test_a_stale_lease_is_taken_over_and_its_holder_stops_at_its_next_save(bucket, capsys):
  workdir = f'{bucket}/w'
  first = workdir_lock.BucketLease(workdir, seconds=2)
  with pytest.raises(UserError, match=r'is in use by another `train` \(pid .*, its lease renewed'):
    workdir_lock.BucketLease(workdir, seconds=2)
  first.stop.set()  # the holder stalls: two renewals missed, ...
  first.thread.join()
  time.sleep(1.0)
  start = time.monotonic()
  second = workdir_lock.BucketLease(workdir, seconds=2)  # ... so this waits for it to expire
  err = capsys.readouterr().err
  assert 's for the lease of' in err and 'warning: taking over the lease of' in err
  assert 0.5 < time.monotonic() - start < 2
  first.stop.clear()  # the holder wakes up: its next renewal finds the lease taken
  first.thread = threading.Thread(target=first._renew)  # pylint: disable=protected-access
  first.thread.start()
  time.sleep(1.0)
  assert first.lost
  with pytest.raises(UserError, match='took over the lease of workdir'):
    workdir_lock.check_held(first, workdir)
  workdir_lock.check_held(second, workdir)
  first.close()
  assert files.exists(f'{workdir}/train.lock')  # the loser leaves the winner's lease alone
  second.close()
  assert not files.exists(f'{workdir}/train.lock')


def test_a_lease_whose_holder_was_killed_on_this_machine_is_taken_over_at_once(bucket, capsys):
  """A scheduler restarts a job at once after kill -9: the lease's process is gone, so the
  restarted run takes it over without waiting for it to run out."""
  workdir = f'{bucket}/w'
  holder = start_process([sys.executable, '-c', 'from monoformer_jax.run import workdir_lock; '
                          f'workdir_lock.BucketLease({workdir!r}); print("held", flush=True); '
                          'import time; time.sleep(600)'])
  try:
    assert holder.stdout.readline() == 'held\n', holder.stderr.read()
  finally:
    holder.kill()  # kill -9
    holder.communicate()
  start = time.monotonic()
  lease = workdir_lock.BucketLease(workdir)
  assert time.monotonic() - start < 10
  err = capsys.readouterr().err
  assert f'taking over the lease of {workdir} from pid {holder.pid} on ' in err
  assert err.rstrip().endswith('that process is gone.') and 'waiting' not in err
  lease.close()


def test_a_lease_of_another_machine_is_waited_for_until_it_runs_out(bucket, capsys):
  workdir = f'{bucket}/w'
  name, path = workdir[len('gs://'):].split('/', 1)
  storage.Client().bucket(name).blob(f'{path}/train.lock').upload_from_string(json.dumps(dict(
      holder='pid 7 on elsewhere', machine='elsewhere 0', pid=7, renewed=time.time(), seconds=2)))
  start = time.monotonic()
  lease = workdir_lock.BucketLease(workdir, seconds=2)  # waits instead of refusing
  assert 1 < time.monotonic() - start < 5
  err = capsys.readouterr().err
  assert 's for the lease of' in err and '(pid 7 on elsewhere, renewed 0 s ago) to run out' in err
  assert 'warning: taking over the lease of' in err
  lease.close()
