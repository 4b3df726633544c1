"""What a long run may rely on: preemption saves, the divergence guard, checkpoint fallback,
async saves, one run per workdir, and logs that survive crashes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import ROOT, cli, error_line, step_config, tiny_config

from monoformer_jax import train
from monoformer_jax.base import sharding
from monoformer_jax.base.errors import UserError
from monoformer_jax.nn import model as model_lib
from monoformer_jax.run import workdir as workdir_lib
from monoformer_jax.training import checkpoint, guards, metrics_log, steps
from monoformer_jax.training.metrics_log import METRICS_FILE


TINY = ['--config=configs/digits.py', '--config.model.size=tiny', '--config.train.log_every=1',
        '--config.train.eval_at_end=false', '--config.data.image_batch_size=8',
        '--config.data.text_batch_size=4', '--config.data.text_seq_len=32']


def _rows(workdir, kind=None):
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    rows = [json.loads(line) for line in f]
  wall_clock = ('steps_per_sec', 'input_wait_fraction')
  return [{k: v for k, v in r.items() if k not in wall_clock} for r in rows
          if kind is None or r['kind'] == kind]


def _final_state(workdir, config):
  """(step, state) of the newest checkpoint of a workdir trained with config."""
  ckpt = checkpoint.Checkpointer(workdir, create=False)
  step = ckpt.latest_step()
  tx = steps.make_optimizer(config.optim, config.train.num_steps)
  layout = sharding.make_layout(config.mesh)
  abstract, _ = steps.abstract_state(model_lib.build(config.model), tx, layout)
  state, _ = ckpt.restore(step, abstract)
  ckpt.close()
  return step, state


def _saved_arrays(workdir):
  """The newest checkpoint's train state as saved (host arrays, no config needed)."""
  ckpt = checkpoint.Checkpointer(workdir, create=False)
  state = ckpt.manager.restore(ckpt.latest_step(), args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore()))["state"]
  ckpt.close()
  return jax.tree.map(np.asarray, state)


def _wait_for_rows(workdir, count, process, timeout=300):
  path = os.path.join(workdir, METRICS_FILE)
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if process.poll() is not None:
      raise AssertionError(process.communicate()[1][-3000:])
    if os.path.exists(path) and sum(1 for _ in open(path)) >= count:
      return
    time.sleep(0.05)
  raise AssertionError('the run logged too few steps in time')


def _start(args, env=None):
  env = dict(os.environ if env is None else env, PYTHONPATH=ROOT)
  return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)


def _stop_with(signum, workdir, flags, rows):
  """Starts `train`, sends signum once `rows` steps are logged; (the step it saved, stdout,
  stderr)."""
  run = _start([sys.executable, '-m', 'monoformer_jax', 'train', *flags, f'--workdir={workdir}'])
  _wait_for_rows(workdir, rows, run)
  run.send_signal(signum)
  out, err = run.communicate(timeout=300)
  assert run.returncode == 75, err[-3000:]
  assert 'Traceback' not in err and 'KeyboardInterrupt' not in err, err[-3000:]
  step = int(err.split('preempted: checkpoint step ')[1].split()[0])
  assert max(map(int, os.listdir(os.path.join(workdir, 'checkpoints')))) == step
  return step, out, err


@pytest.mark.slow
def test_ctrl_c_and_sigterm_save_and_a_restart_matches_the_uninterrupted_run(tmp_path):
  flags = [*TINY, '--config.train.num_steps=200', '--config.train.checkpoint_every=1000']
  straight, stopped = str(tmp_path / 'straight'), str(tmp_path / 'stopped')
  assert cli('train', *flags, f'--workdir={straight}').returncode == 0
  first, _, err = _stop_with(signal.SIGINT, stopped, flags, 10)
  assert 10 <= first < 200 and 'interrupted: saving at the end of this step' in err
  second, out, _ = _stop_with(signal.SIGTERM, stopped, flags, first + 10)
  assert f'resuming from checkpoint step {first}' in out and first < second < 200
  result = cli('train', *flags, f'--workdir={stopped}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'resuming from checkpoint step {second}' in result.stdout
  assert _rows(stopped) == _rows(straight)
  a, b = _saved_arrays(straight), _saved_arrays(stopped)
  assert len(jax.tree.leaves(a)) == len(jax.tree.leaves(b)) > 20
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_a_second_ctrl_c_stops_at_once():
  """The first SIGINT asks for a save at the step boundary; the second raises at once."""
  notice = guards.PreemptionNotice()
  try:
    os.kill(os.getpid(), signal.SIGINT)
    assert notice.reached(1)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)  # the handler runs at the next bytecode; never this long
  finally:
    notice.close()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.multiprocess
def test_two_processes_stop_at_the_same_step_on_sigterm_to_one(tmp_path):
  workdir = str(tmp_path / 'w')
  run = _start(['bash', os.path.join(ROOT, 'launch', 'local_multiprocess.sh'), '2', 'train', *TINY,
                '--config.train.num_steps=2000', '--config.train.checkpoint_every=5000',
                f'--workdir={workdir}'], env=dict(os.environ, XLA_FLAGS=''))
  _wait_for_rows(workdir, 10, run)
  children = subprocess.run(['pgrep', '-f', 'process_id=1'], capture_output=True, text=True)
  pids = [int(p) for p in children.stdout.split() if int(p) != os.getpid()]
  assert pids, 'process 1 not found'
  os.kill(pids[0], signal.SIGTERM)  # only the second process hears it
  _, err = run.communicate(timeout=300)
  assert run.returncode == 75, err[-3000:]
  stops = {int(line.split('checkpoint step ')[1].split()[0])
           for line in err.splitlines() if line.startswith('preempted:')}
  assert len(stops) == 1 and err.count('preempted:') == 2, err[-3000:]
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == [str(stops.pop())]


@pytest.fixture(scope='module')
def trained(tmp_path_factory, tokenizer_file):
  """A workdir trained 4 steps with checkpoints at steps 2 and 4 (copy it before changing it)."""
  workdir = tmp_path_factory.mktemp('trained') / 'work'
  workdir.mkdir()
  shutil.copy(tokenizer_file, workdir / 'tokenizer.model')
  train.train_and_evaluate(tiny_config(num_steps=4, checkpoint_every=2), str(workdir))
  return str(workdir)


def _copy(trained, tmp_path) -> str:
  shutil.copytree(trained, tmp_path / 'copy')
  return str(tmp_path / 'copy')


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
  rows = _rows(workdir)
  assert [r['skipped'] for r in rows] == [0, 0, 1, 0, 0]
  assert [r['skipped_steps'] for r in rows] == [0, 0, 1, 1, 1]
  assert all(np.isfinite(r['learning_rate']) and r['learning_rate'] > 0 for r in rows)
  assert np.isnan(rows[2]['loss']) and np.isfinite(rows[3]['loss'])
  _, state = _final_state(workdir, tiny_config(num_steps=5, ar_weight=0.0))
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
  assert bool(checkpoint.all_finite(_final_state(workdir, config)[1].params))


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
  after = [r for r in _rows(workdir) if r['step'] > 10]
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


def _corrupt(workdir, step):
  """Truncates every data file of a checkpoint step's train state."""
  state_dir = os.path.join(workdir, 'checkpoints', str(step), 'state')
  for root, _, names in os.walk(state_dir):
    for name in names:
      path = os.path.join(root, name)
      if os.path.getsize(path) > 64 and 'metadata' not in name:
        with open(path, 'r+b') as f:
          f.truncate(16)


def _flip(workdir, step):
  """Flips 4 bytes in the middle of the largest file of a step's train state."""
  state_dir = os.path.join(workdir, 'checkpoints', str(step), 'state')
  path = max((os.path.join(root, name) for root, _, names in os.walk(state_dir) for name in names),
             key=os.path.getsize)
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    data = f.read(4)
    f.seek(os.path.getsize(path) // 2)
    f.write(bytes(b ^ 0xFF for b in data))


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(trained, tmp_path, capsys):
  workdir = _copy(trained, tmp_path)
  _flip(workdir, 4)  # silent damage: only the checksums can tell
  out = tmp_path / 'x.png'
  result = cli('sample', f'--workdir={workdir}', '--prompt=a handwritten digit one', '--num=1',
               '--steps=2', f'--out={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  warnings = [l for l in result.stderr.splitlines() if l.startswith('warning:')]
  assert len(warnings) == 1 and 'step 4' in warnings[0] and 'Using step 2' in warnings[0]
  assert 'damaged (its checksum differs)' in warnings[0]
  # Training resumes from step 2 too, and replaces the damaged step 4.
  train.train_and_evaluate(tiny_config(num_steps=5, checkpoint_every=2), workdir)
  assert 'Using step 2 instead' in capsys.readouterr().err
  assert [r['step'] for r in _rows(workdir)] == [1, 2, 3, 4, 5]
  for step in (5, 4, 2):
    _corrupt(workdir, step)
  result = cli('generate', f'--workdir={workdir}', '--prompt=The', '--max_tokens=2')
  assert result.returncode != 0 and 'no checkpoint in' in error_line(result)
  assert 'Traceback' not in result.stderr


@pytest.mark.slow
def test_a_second_train_on_a_workdir_in_use_is_refused(tmp_path):
  workdir = str(tmp_path / 'w')
  first = _start([sys.executable, '-m', 'monoformer_jax', 'train', *TINY,
                  '--config.train.num_steps=100000', f'--workdir={workdir}'])
  try:
    _wait_for_rows(workdir, 2, first)
    result = cli('train', *TINY, '--config.train.num_steps=2', f'--workdir={workdir}')
    assert result.returncode == 2 and 'is in use by another `train` (pid' in error_line(result)
  finally:
    first.kill()  # kill -9 ...
    first.communicate()
  handle = workdir_lib._lock(workdir)  # ... leaves no stale lock  pylint: disable=protected-access
  handle.close()
  assert [r['step'] for r in _rows(workdir)][:2] == [1, 2]  # the first run's rows are intact


@pytest.mark.slow
def test_time_based_checkpoints_and_a_torn_metrics_line(workdir, capsys):
  config = tiny_config(num_steps=3, checkpoint_every=1000, keep_checkpoints=5, ar_weight=0.0)
  config.train.checkpoint_minutes = 1e-6
  train.train_and_evaluate(config, workdir)
  ckpt = checkpoint.Checkpointer(workdir, create=False)
  assert ckpt.all_steps() == [3, 2, 1]
  ckpt.close()
  with open(os.path.join(workdir, METRICS_FILE), 'a') as f:
    f.write('{"step": 4, "kind": "ar", "lo')  # a crash mid-write
  config.train.num_steps = 5
  train.train_and_evaluate(config, workdir)
  assert 'dropped 1 unreadable line' in capsys.readouterr().err
  assert [r['step'] for r in _rows(workdir)] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_non_finite_params_are_never_saved_nor_sampled(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  config = tiny_config(num_steps=4, checkpoint_every=2)
  _, state = _final_state(workdir, config)
  broken = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
  ckpt = checkpoint.Checkpointer(workdir)
  with pytest.raises(UserError, match='at step 6 are not finite, so they were not saved; the '
                                      'last finite checkpoint is step 4'):
    ckpt.save(6, broken, {}, config)
  ckpt.manager.save(6, args=ocp.args.Composite(  # past the check, as an older version might have
      state=ocp.args.PyTreeSave(broken), data=ocp.args.JsonSave({}),
      config=ocp.args.JsonSave(config.to_dict())))
  ckpt.close()
  with pytest.raises(UserError, match='parameters of checkpoint step 6 .* are not finite'):
    workdir_lib.for_inference(workdir, use_ema=False)


_FULL_DISK = """
set -u
mount -t tmpfs -o size=64m tmpfs "$DISK"
mkdir "$DISK/w" && cp "$TOKENIZER" "$DISK/w/tokenizer.model"
python -m monoformer_jax train $FLAGS --workdir="$DISK/w" --config.train.num_steps=5 || exit 1
# Room for half a checkpoint more: the next save runs out of space.
used=$(df --output=used -k "$DISK" | tail -1)
step=$(du -sk "$DISK/w/checkpoints/5" | cut -f1)
mount -o remount,size=$((used + step / 2))k "$DISK"
python -m monoformer_jax train $FLAGS --workdir="$DISK/w" > "$OUT/full.out" 2> "$OUT/full.err"
echo $? > "$OUT/full.rc"
ls "$DISK/w/checkpoints" > "$OUT/full.ls"
mount -o remount,size=64m "$DISK"  # space returns
python -m monoformer_jax train $FLAGS --workdir="$DISK/w" > "$OUT/resumed.out" 2> "$OUT/resumed.err"
echo $? > "$OUT/resumed.rc"
ls "$DISK/w/checkpoints" > "$OUT/resumed.ls"
"""


@pytest.mark.slow
def test_a_real_full_disk_is_one_sentence_and_the_run_resumes(tmp_path, tokenizer_file):
  """On a real filesystem that fills up (a tmpfs in a private mount namespace) the save fails
  inside tensorstore's writers: one `error:` line, exit 2, nothing else on stderr; once
  space returns the same command resumes from the last finished checkpoint."""
  disk, out = tmp_path / 'disk', tmp_path / 'out'
  disk.mkdir()
  out.mkdir()
  flags = ' '.join([*TINY, '--config.train.log_every=5', '--config.train.num_steps=20',
                    '--config.train.checkpoint_every=5', '--config.train.keep_checkpoints=3'])
  env = dict(os.environ, PYTHONPATH=ROOT, DISK=str(disk), OUT=str(out), TOKENIZER=tokenizer_file,
             FLAGS=flags)
  # A user and mount namespace of its own: no privilege needed, nothing left mounted after.
  done = subprocess.run(['unshare', '--map-root-user', '--mount', 'sh', '-c', _FULL_DISK],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0 and (out / 'resumed.rc').exists(), done.stderr[-3000:]
  read = lambda name: (out / name).read_text()  # noqa: E731
  err = [line for line in read('full.err').splitlines()
         if not line.startswith(('WARNING: All log messages', 'I0000'))]  # TensorFlow's start
  assert read('full.rc').strip() == '2', read('full.err')[-3000:]
  assert len(err) == 1 and err[0].startswith('error: the disk holding '), err[:20]
  assert 'is full; checkpoint step 10 was not written. The last finished checkpoint is step 5' in err[0]
  assert read('full.ls').split() == ['10.orbax-checkpoint-tmp', '5']
  assert read('resumed.rc').strip() == '0', read('resumed.err')[-3000:]
  assert 'resuming from checkpoint step 5' in read('resumed.out')
  assert read('resumed.ls').split() == ['10', '15', '20']


@pytest.mark.slow
def test_async_save_overlaps_steps_and_matches_a_synchronous_save(workdir, tmp_path):
  config = tiny_config()
  config.model.size = 'digits'  # a state large enough that the write takes a while
  setup = workdir_lib.for_training(config, workdir)
  _, shardings = steps.abstract_state(setup.model, setup.tx, setup.layout)
  state = steps.init_state(setup.model, setup.tx, setup.layout, jax.random.key(0))
  fns = steps.jit_steps(setup.model, setup.tx, step_config(config, 2),
                        setup.layout, shardings)
  batch = dict(tokens=np.ones((4, 32), np.int32), valid=np.ones((4, 32), bool),
               loss_mask=np.ones((4, 32), bool))
  sync = checkpoint.Checkpointer(str(tmp_path / 'sync'), async_saves=False)
  sync.save(1, state, {}, config)
  sync.close()
  ckpt = checkpoint.Checkpointer(workdir, async_saves=True)
  ckpt.save(1, state, {}, config)
  overlapped = 0
  for i in range(3):  # the steps donate the saved state's buffers while it is being written
    in_progress = ckpt.manager.is_saving_in_progress()
    state, _ = fns[steps.StepKind.AR](state, batch, jax.random.key(i))
    overlapped += in_progress
  ckpt.close()
  assert overlapped >= 1
  abstract, _ = steps.abstract_state(setup.model, setup.tx, setup.layout)
  a = checkpoint.Checkpointer(workdir, create=False).restore(1, abstract)[0]
  b = checkpoint.Checkpointer(str(tmp_path / 'sync'), create=False).restore(1, abstract)[0]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_heldout_losses_and_a_profile(workdir):
  config = tiny_config(num_steps=2, eval_every=2, profile_start=1, profile_steps=1)
  train.train_and_evaluate(config, workdir)
  heldout = _rows(workdir, 'heldout')
  assert len(heldout) == 1 and heldout[0]['step'] == 2
  losses = [heldout[0][k] for k in ('text', 'diffusion_q1', 'diffusion_q2', 'diffusion_q3',
                                    'diffusion_q4')]
  assert all(np.isfinite(losses)) and heldout[0]['diffusion_q4'] < heldout[0]['diffusion_q1']
  traces = [f for _, _, names in os.walk(os.path.join(workdir, 'plugins', 'profile'))
            for f in names if f.endswith('.xplane.pb')]
  assert traces


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
  assert [(r['step'], r['loss']) for r in _rows(str(tmp_path))] == [(1, 2.5)]
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
  with open(tmp_path / METRICS_FILE) as f:
    rates = [json.loads(line)['steps_per_sec'] for line in f]
  assert rates[0] > 50  # with the second in it, 10 steps would be under 10 steps/s
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].endswith('compiled ar in 1 s') and 'compiled' not in lines[1]
  eta_minutes = float(lines[0].split('ETA ')[1].split(' min')[0])
  assert eta_minutes < 10_000 / 50 / 60  # counting the second: over 16 minutes
