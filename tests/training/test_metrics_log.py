"""What a run reports: metrics.jsonl that survives crashes, TensorBoard where TensorFlow is,
and steady-state speed in the progress line."""

import json
import os
import sys
import time

import pytest
from helpers import (metrics_rows, tiny_config)

from monoformer_jax import train
from monoformer_jax.base.workdir_layout import Workdir
from monoformer_jax.training import checkpoint, metrics_log


@pytest.mark.slow
def test_time_based_checkpoints_and_a_torn_metrics_line(workdir, capsys):
  config = tiny_config(num_steps=3, checkpoint_every=1000, keep_checkpoints=5, ar_weight=0.0)
  config.train.checkpoint_minutes = 1e-6
  train.train_and_evaluate(config, workdir)
  ckpt = checkpoint.Checkpointer(workdir, create=False)
  assert ckpt.all_steps() == [3, 2, 1]
  ckpt.close()
  with open(Workdir(workdir).metrics, 'a') as f:
    f.write('{"step": 4, "kind": "ar", "lo')  # a crash mid-write
  config.train.num_steps = 5
  train.train_and_evaluate(config, workdir)
  assert 'dropped 1 unreadable line' in capsys.readouterr().err
  assert [r['step'] for r in metrics_rows(workdir)] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize('has_tensorflow', [True, False])
def test_metrics_are_written_with_and_without_tensorflow(tmp_path, monkeypatch, capsys,
                                                         has_tensorflow):
  """A machine without TensorFlow (a bare GPU image) still gets metrics.jsonl and the progress
  line; only the TensorBoard events are skipped, with one warning."""
  if not has_tensorflow:
    monkeypatch.setitem(sys.modules, 'clu', None)  # as if not installed
  log = metrics_log.MetricsLog(str(tmp_path), start_step=0, num_steps=2)
  log.write(1, 'ar', {'loss': 2.5, 'learning_rate': 1e-3}, skipped_steps=0)
  log.close()
  assert [(r['step'], r['loss']) for r in metrics_rows(str(tmp_path))] == [(1, 2.5)]
  out, err = capsys.readouterr()
  assert 'step 1/2' in out
  events = [f for f in os.listdir(tmp_path) if f.startswith('events.out.tfevents')]
  assert bool(events) == has_tensorflow
  assert err.count('warning: no TensorBoard events') == (0 if has_tensorflow else 1)


def test_speed_and_eta_leave_compilation_out(tmp_path, capsys):
  """A step kind's first call (its compilation, here a real second of waiting) is not
  counted in steps/s and the ETA, and the progress line says how long it took."""
  log = metrics_log.MetricsLog(str(tmp_path), start_step=0, num_steps=10_000)
  for i in range(10):
    with log.compiling('ar'):
      if i == 0:
        time.sleep(1.0)
  log.write(10, 'ar', {'loss': 2.5, 'learning_rate': 1e-3}, skipped_steps=0)
  with log.compiling('ar'):
    pass
  log.write(11, 'ar', {'loss': 2.5, 'learning_rate': 1e-3}, skipped_steps=0)
  log.close()
  with open(Workdir(str(tmp_path)).metrics) as f:
    rates = [json.loads(line)['steps_per_sec'] for line in f]
  assert rates[0] > 50  # with the second in it, 10 steps would be under 10 steps/s
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].endswith('compiled ar in 1 s') and 'compiled' not in lines[1]
  eta_minutes = float(lines[0].split('ETA ')[1].split(' min')[0])
  assert eta_minutes < 10_000 / 50 / 60  # counting the second: over 16 minutes
