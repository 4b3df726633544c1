"""Checkpoints a long run may rely on: fallback from damaged steps, no non-finite parameters,
a real full disk as one sentence, asynchronous saves equal to synchronous ones."""

import json
import os
import shutil
import subprocess
import zlib

import emulator
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import (ROOT, TRAIN_FLAGS, cli, error_line, final_state, metrics_rows, step_config,
                     tiny_config)

from monoformer_jax import train
from monoformer_jax.base import files
from monoformer_jax.base.errors import UserError
from monoformer_jax.run import workdir as workdir_lib
from monoformer_jax.training import checkpoint, steps


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
  assert [r['step'] for r in metrics_rows(workdir)] == [1, 2, 3, 4, 5]
  for step in (5, 4, 2):
    _corrupt(workdir, step)
  result = cli('generate', f'--workdir={workdir}', '--prompt=The', '--max_tokens=2')
  assert result.returncode != 0 and 'no checkpoint in' in error_line(result)
  assert 'Traceback' not in result.stderr


@pytest.mark.slow
def test_non_finite_params_are_never_saved_nor_sampled(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  config = tiny_config(num_steps=4, checkpoint_every=2)
  _, state = final_state(workdir, config)
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
  flags = ' '.join([*TRAIN_FLAGS, '--config.train.log_every=5', '--config.train.num_steps=20',
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


def test_a_store_failing_inside_a_save_is_one_sentence_and_the_last_step_stays(bucket,
                                                                             monkeypatch):
  """A bucket workdir whose store fails while Orbax writes the arrays of step 2."""
  config, params = tiny_config(), {'decoder': {'layers': {'0': {'w': np.arange(6.0)}}}}
  workdir = f'{bucket}/w'
  ckpt = checkpoint.Checkpointer(workdir)
  ckpt.save_weights(1, params, config)
  url, server = emulator.other_store(bucket)
  monkeypatch.setenv('TENSORSTORE_GCS_HTTP_URL', url)
  try:
    with pytest.raises(UserError) as raised:
      ckpt.save_weights(2, params, config)
  finally:
    monkeypatch.undo()
    server.stop()
    ckpt.manager.close()
  message = str(raised.value)
  assert message.startswith(f'the store failed ({workdir}/checkpoints') and '\n' not in message
  assert 'checkpoint step 2 was not written. The last finished checkpoint is step 1' in message
  assert checkpoint.open_existing(workdir).all_steps() == [1]


def test_checksums_are_part_of_every_finished_step(tmp_path, bucket):
  """Written before Orbax commits the step, so no crash after the commit leaves one unverified."""
  config = tiny_config()
  for workdir in (str(tmp_path), f'{bucket}/w'):
    ckpt = checkpoint.Checkpointer(workdir, async_saves=True)
    params = {'decoder': {'layers': {'0': {'w': np.arange(6.0)}}}}
    ckpt.save_weights(1, params, config)
    ckpt.manager.wait_until_finished()  # Orbax's own wait: nothing of ours runs after the commit
    recorded = json.loads(files.read_text(f'{ckpt.directory}/1/{checkpoint.CHECKSUMS}'))
    ckpt.close()
    assert recorded and all('/' in name for name in recorded)
    assert {n.split('/')[0] for n in recorded} == {'state', 'data', 'config'}


def test_checksums_an_earlier_version_recorded_still_verify(trained, tmp_path):
  """Steps saved before CRC32C recorded a CRC-32 (an integer) of every file, Orbax's own
  included; they restore, and damage is still caught."""
  workdir = _copy(trained, tmp_path)
  step_dir = os.path.join(workdir, 'checkpoints', '4')
  names = [n for n in files.files_under(step_dir) if n != checkpoint.CHECKSUMS]
  files.write_text(os.path.join(step_dir, checkpoint.CHECKSUMS), json.dumps(
      {n: zlib.crc32(files.read_bytes(os.path.join(step_dir, n))) for n in names}))
  ckpt = checkpoint.Checkpointer(workdir, create=False)
  ckpt._verify(4)  # pylint: disable=protected-access
  _flip(workdir, 4)
  with pytest.raises(UserError, match='damaged'):
    ckpt._verify(4)  # pylint: disable=protected-access
  ckpt.close()
