"""What stops a run cleanly: SIGTERM and Ctrl-C save at a step boundary and resume
bit-identically, and the divergence guard skips non-finite steps and stops a diverging run."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import (ROOT, TRAIN_FLAGS, cli, devices_env, final_state, metrics_rows, saved_arrays,
                     start_process, step_config, tiny_config, wait_for_rows, wait_for_step)

from monoformer_jax import train
from monoformer_jax.base import files
from monoformer_jax.base.errors import UserError
from monoformer_jax.run import workdir as workdir_lib
from monoformer_jax.training import checkpoint, guards, steps


def _stop_with(signum, workdir, flags, rows):
  """Starts `train`, sends signum once `rows` steps are logged; (the step it saved, stdout,
  stderr)."""
  run = start_process([sys.executable, '-m', 'monoformer_jax', 'train', *flags, f'--workdir={workdir}'])
  wait_for_rows(workdir, rows, run)
  run.send_signal(signum)
  out, err = run.communicate(timeout=300)
  assert run.returncode == 75, err[-3000:]
  assert 'Traceback' not in err and 'KeyboardInterrupt' not in err, err[-3000:]
  step = int(err.split('preempted: checkpoint step ')[1].split()[0])
  assert max(map(int, os.listdir(os.path.join(workdir, 'checkpoints')))) == step
  return step, out, err


@pytest.mark.slow
def test_ctrl_c_and_sigterm_save_and_a_restart_matches_the_uninterrupted_run(tmp_path):
  flags = [*TRAIN_FLAGS, '--config.train.num_steps=80', '--config.train.checkpoint_every=1000']
  straight, stopped = str(tmp_path / 'straight'), str(tmp_path / 'stopped')
  assert cli('train', *flags, f'--workdir={straight}').returncode == 0
  first, _, err = _stop_with(signal.SIGINT, stopped, flags, 10)
  assert 10 <= first < 80 and 'interrupted: saving at the end of this step' in err
  second, out, _ = _stop_with(signal.SIGTERM, stopped, flags, first + 10)
  assert f'resuming from checkpoint step {first}' in out and first < second < 80
  result = cli('train', *flags, f'--workdir={stopped}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'resuming from checkpoint step {second}' in result.stdout
  assert metrics_rows(stopped) == metrics_rows(straight)
  a, b = saved_arrays(straight), saved_arrays(stopped)
  assert len(jax.tree.leaves(a)) == len(jax.tree.leaves(b)) > 20
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_a_second_ctrl_c_stops_at_once():
  """The first SIGINT asks for a save at the step boundary; the second raises at once."""
  before = signal.getsignal(signal.SIGINT)  # Python's, or SIG_IGN in a background job
  notice = guards.PreemptionNotice()
  try:
    os.kill(os.getpid(), signal.SIGINT)
    assert notice.reached(1)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)  # the handler runs at the next bytecode; never this long
  finally:
    notice.close()
  assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.multiprocess
def test_two_processes_match_one_and_stop_together_on_sigterm_to_one(tmp_path, bucket):
  """launch/local_multiprocess.sh, 2 processes x 2 devices on a workdir in a bucket: the losses
  of 1 process x 1 device on a local disk step by step; SIGTERM to the second process alone
  stops both at one step, saved by both."""
  flags = [*TRAIN_FLAGS, '--config.data.text_batch_size=8', '--config.optim.cosine_decay=false',
           '--config.train.checkpoint_every=5000']  # a schedule that does not see num_steps
  single, multi = str(tmp_path / 'single'), f'{bucket}/multi'
  one = cli('train', *flags, '--config.train.num_steps=3', f'--workdir={single}',
            env=devices_env())
  assert one.returncode == 0, one.stderr[-3000:]
  run = start_process(['bash', os.path.join(ROOT, 'launch', 'local_multiprocess.sh'), '2', 'train',
                       *flags, '--config.train.num_steps=2000', f'--workdir={multi}'],
                      env=devices_env(DEVICES_PER_PROCESS='2'))
  wait_for_step(run, 10)
  children = subprocess.run(['pgrep', '-f', 'process_id=1'], capture_output=True, text=True)
  pids = [int(p) for p in children.stdout.split() if int(p) != os.getpid()]
  assert pids, 'process 1 not found'
  os.kill(pids[0], signal.SIGTERM)  # only the second process hears it
  _, err = run.communicate(timeout=300)
  assert run.returncode == 75, err[-3000:]
  stops = {int(line.split('checkpoint step ')[1].split()[0])
           for line in err.splitlines() if line.startswith('preempted:')}
  assert len(stops) == 1 and err.count('preempted:') == 2, err[-3000:]
  assert files.listdir(f'{multi}/checkpoints') == [str(stops.pop())]
  for a, b in zip(metrics_rows(single), metrics_rows(multi)[:3]):
    assert a['kind'] == b['kind'] and abs(a['loss'] - b['loss']) <= 1e-5 * abs(a['loss']), (a, b)


def _nan_from(index, dataset_fn):
  """pipeline.image_dataset whose batches from `index` on hold NaN images."""
  def make(*args, **kwargs):
    ds = dataset_fn(*args, **kwargs)
    return ds.map_with_index(lambda i, b: dict(b, image=np.full_like(b['image'], np.nan))
                             if index(i) else b)
  return make


@pytest.mark.slow
def test_a_non_finite_step_is_skipped_and_the_run_goes_on(workdir, monkeypatch):
  monkeypatch.setattr(train.pipeline, 'image_dataset',
                      _nan_from(lambda i: i == 2, train.pipeline.image_dataset))
  train.train_and_evaluate(tiny_config(num_steps=5, ar_weight=0.0), workdir)
  rows = metrics_rows(workdir)
  assert [r['skipped'] for r in rows] == [0, 0, 1, 0, 0]
  assert [r['skipped_steps'] for r in rows] == [0, 0, 1, 1, 1]
  assert all(np.isfinite(r['learning_rate']) and r['learning_rate'] > 0 for r in rows)
  assert np.isnan(rows[2]['loss']) and np.isfinite(rows[3]['loss'])
  _, state = final_state(workdir, tiny_config(num_steps=5, ar_weight=0.0))
  assert int(state.step) == 4  # four updates applied, one skipped
  assert bool(checkpoint.all_finite((state.params, state.ema_params)))


@pytest.mark.slow
def test_consecutive_non_finite_steps_stop_the_run(workdir, monkeypatch):
  monkeypatch.setattr(train.pipeline, 'image_dataset',
                      _nan_from(lambda i: i >= 3, train.pipeline.image_dataset))
  config = tiny_config(num_steps=50, ar_weight=0.0, checkpoint_every=2, max_skipped_steps=3,
                       keep_checkpoints=10)
  with pytest.raises(UserError, match=r'not finite at 3 diffusion steps in a row up to step 6 '
                                      r'.* The last good checkpoint is step 2'):
    train.train_and_evaluate(config, workdir)
  ckpt = checkpoint.Checkpointer(workdir, create=False)
  assert ckpt.all_steps() == [2]  # step 4's save came inside the streak: held back
  ckpt.close()
  assert bool(checkpoint.all_finite(final_state(workdir, config)[1].params))


@pytest.mark.slow
def test_a_diverged_alternating_run_stops_and_keeps_the_good_checkpoint(workdir):
  """A real blow-up (learning rate 1e4 after 10 good steps): every diffusion step overflows
  while the ar steps between them stay finite (the model predicts uniformly), so a streak
  over all steps never reaches the limit; the streak of each kind does, no checkpoint is
  written during it, and the good one survives keep_checkpoints=2."""
  train.train_and_evaluate(tiny_config(num_steps=10, checkpoint_every=5), workdir)
  config = tiny_config(num_steps=60, checkpoint_every=4)
  config.optim.learning_rate, config.optim.warmup_steps = 1e4, 0
  with pytest.raises(UserError, match=r'not finite at 10 diffusion steps in a row up to step '
                                      r'\d+ .* The last good checkpoint is step 10 in '):
    train.train_and_evaluate(config, workdir)
  ckpt = checkpoint.Checkpointer(workdir, create=False)
  assert ckpt.all_steps() == [10, 5]
  ckpt.close()
  after = [r for r in metrics_rows(workdir) if r['step'] > 10]
  assert any(r['kind'] == 'ar' and not r['skipped'] for r in after[:-1])
  assert sum(r['skipped'] for r in after) >= 9  # the 10th is the step the error names


def test_the_step_itself_leaves_the_state_alone_on_nan(workdir):
  config = tiny_config()
  setup = workdir_lib.for_training(config, workdir)
  state = steps.init_state(setup.model, setup.tx, setup.layout, jax.random.key(0))
  batch = dict(tokens=np.ones((8, 12), np.int32), valid=np.ones((8, 12), bool),
               image=np.full((8, 8, 8, 1), np.nan, np.float32))
  cfg = step_config(config, setup.tok.im_end_id)
  before = jax.tree.map(np.asarray, state)
  after, metrics = jax.jit(lambda s, b, k: steps.diffusion_step(
      s, b, k, model=setup.model, tx=setup.tx, cfg=cfg))(state, batch, jax.random.key(1))
  assert float(metrics['skipped']) == 1.0
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, after), before)
