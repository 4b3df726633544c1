"""The lease that holds a workdir in a bucket (the session's GCS emulator) for one `train`; the
local lock and a second `train` refused on either storage are checked end to end in
test_workdir.py and base/test_files.py."""

import threading
import time

import pytest

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
