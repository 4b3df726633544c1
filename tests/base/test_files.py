"""Every file, local or in a bucket (the session's GCS emulator, a real GCS API): outputs
appear whole or not at all; a run whose workdir, data and converted LLM live in a bucket gives
the numbers of a local run across a preemption and resume, and its inference commands and exports
write there; the pod launcher's example trains in a bucket; bad bucket paths are one sentence."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import (ROOT, TRAIN_FLAGS, VOCAB, cli, devices_env, error_line, metrics_rows,
                     saved_arrays, start_process, tiny_config, training_inputs, wait_for_step)

from monoformer_jax.base import files
from monoformer_jax.base.errors import UserError


def test_a_file_appears_whole_or_not_at_all(tmp_path):
  path = tmp_path / 'out.json'
  files.write_text(str(path), 'first')
  with pytest.raises(RuntimeError):
    with files.atomic_file(str(path)) as tmp, open(tmp, 'w') as f:
      f.write('half of the sec')
      raise RuntimeError('the writer died')
  assert path.read_text() == 'first' and os.listdir(tmp_path) == ['out.json']
  files.write_text(str(path), 'second')
  assert path.read_text() == 'second' and os.listdir(tmp_path) == ['out.json']
  with pytest.raises(UserError, match='does not exist'):
    files.write_text(str(tmp_path / 'no_such_dir' / 'x'), 'y')


def test_a_directory_appears_whole_or_not_at_all(tmp_path):
  dst = tmp_path / 'converted'
  with pytest.raises(RuntimeError):
    with files.atomic_directory(str(dst), last='part') as tmp:
      open(os.path.join(tmp, 'part'), 'w').close()
      raise RuntimeError('the conversion died')
  assert os.listdir(tmp_path) == []
  with files.atomic_directory(str(dst), last='part') as tmp:
    open(os.path.join(tmp, 'part'), 'w').close()
  assert os.listdir(dst) == ['part']
  with pytest.raises(UserError, match='already exists'):
    with files.atomic_directory(str(dst), last='part'):
      pass


def test_in_a_bucket_an_output_is_one_object_and_a_directory_finishes_with_its_marker(bucket):
  assert files.absolute(f'{bucket}//run/') == f'{bucket}/run'  # one spelling, one workdir
  path = f'{bucket}/run/out.json'
  files.write_text(path, 'first')
  with pytest.raises(RuntimeError):
    with files.atomic_file(path) as tmp, open(tmp, 'w') as f:
      f.write('half of the sec')
      raise RuntimeError('the writer died')
  assert files.read_text(path) == 'first' and files.files_under(bucket) == ['run/out.json']
  with pytest.raises(RuntimeError):
    with files.atomic_directory(f'{bucket}/conv', last='model.json') as tmp:
      open(os.path.join(tmp, 'model.json'), 'w').close()
      raise RuntimeError('the conversion died')
  assert not files.exists(f'{bucket}/conv')
  with files.atomic_directory(f'{bucket}/conv', last='model.json') as tmp:
    for name in ('model.json', 'a', 'z'):
      open(os.path.join(tmp, name), 'w').close()
  from google.cloud import storage  # pylint: disable=import-outside-toplevel
  blobs = storage.Client().bucket(bucket[len('gs://'):]).list_blobs(prefix='conv/')
  order = [b.name for b in sorted(blobs, key=lambda b: b.generation)]  # the order of creation
  assert order == ['conv/a', 'conv/z', 'conv/model.json']
  with pytest.raises(UserError, match='already exists'):
    with files.atomic_directory(f'{bucket}/conv', last='model.json'):
      pass
  # The store's CRC32C of an object, and the same digest computed for a local file.
  assert files.checksums(f'{bucket}/run') == {'out.json': 'ij6hUA=='}
  with files.local_copy(path) as copy:
    assert files.checksums(os.path.dirname(copy)) == {'out.json': 'ij6hUA=='}


def _upload(local_dir, dst: str) -> None:
  for name in files.files_under(str(local_dir)):
    files.copy(os.path.join(local_dir, name), f'{dst}/{name}')


def _config_file(path, config) -> str:
  """A config file (what `--config` takes) that gives `config`."""
  path.write_text('import json\nfrom monoformer_jax.config import schema\n\n\ndef get_config():\n'
                  f'  return schema.config_from_dict(json.loads({json.dumps(config.to_json())}))\n')
  return str(path)


def _run_config(inputs: str, vae: str):
  """The tiny run from a converted LLM (model.size auto) on text and VAE latents under inputs."""
  config = tiny_config(num_steps=30, checkpoint_every=1000)
  config.model.size, config.model.init_from, config.model.vae = 'auto', f'{inputs}/llm', vae
  config.data.text_file = f'{inputs}/corpus.txt'
  config.data.image_source, config.data.latents_dir = 'latents', f'{inputs}/latents'
  config.model.image_size, config.model.image_channels = (8, 8), 4
  config.data.templates = ('Please generate an image of {name}',)
  config.eval.prompt_template = config.data.templates[0]
  config.data.prompt_len = 40
  return config


@pytest.mark.slow
def test_a_run_in_a_bucket_matches_a_local_one_across_a_preemption(tmp_path, bucket):
  training_inputs(tmp_path)
  inputs = tmp_path / 'inputs'
  for name in ('hf', 'pictures'):
    _upload(inputs / name, f'{bucket}/inputs/{name}')
  files.copy(str(inputs / 'corpus.txt'), f'{bucket}/inputs/corpus.txt')
  _upload(tmp_path / 'vae', f'{bucket}/vae')
  # The LLM converted and the pictures encoded from the bucket into the bucket.
  result = cli('convert', 'llama', f'--src={bucket}/inputs/hf', f'--dst={bucket}/inputs/llm')
  assert result.returncode == 0, result.stderr[-3000:]
  extract = tiny_config()
  extract.data.latents_source = 't2i_jsonl'
  extract.data.t2i_files, extract.data.image_resolution = f'{bucket}/inputs/pictures/t2i.jsonl', 16
  result = cli('extract_latents', f'--config={_config_file(tmp_path / "extract.py", extract)}',
               f'--vae={bucket}/vae', f'--dst={bucket}/inputs/latents')
  assert result.returncode == 0, result.stderr[-3000:]

  local = _config_file(tmp_path / 'local.py', _run_config(str(inputs), str(tmp_path / 'vae')))
  remote = _config_file(tmp_path / 'remote.py', _run_config(f'{bucket}/inputs', f'{bucket}/vae'))
  straight, workdir = str(tmp_path / 'straight'), f'{bucket}/run'
  result = cli('train', f'--config={local}', f'--workdir={straight}')
  assert result.returncode == 0, result.stderr[-3000:]

  run = start_process([sys.executable, '-m', 'monoformer_jax', 'train', f'--config={remote}',
                       f'--workdir={workdir}'])
  wait_for_step(run, 10)
  run.send_signal(signal.SIGSTOP)  # holding its lease, frozen: a second `train` is refused
  try:
    second = cli('train', f'--config={remote}', f'--workdir={workdir}')
  finally:
    run.send_signal(signal.SIGCONT)
  assert second.returncode == 2 and 'is in use by another `train` (pid' in error_line(second)
  run.send_signal(signal.SIGTERM)
  out, err = run.communicate(timeout=300)
  assert run.returncode == 75 and 'Traceback' not in err, err[-3000:]
  stopped = int(err.split('preempted: checkpoint step ')[1].split()[0])
  assert 10 <= stopped < 30 and not files.exists(f'{workdir}/train.lock')  # the lease is let go
  assert [r['step'] for r in metrics_rows(workdir)] == list(range(1, stopped + 1))

  result = cli('train', f'--config={remote}', f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'resuming from checkpoint step {stopped}' in result.stdout
  assert metrics_rows(workdir) == metrics_rows(straight)
  a, b = saved_arrays(straight), saved_arrays(workdir)
  assert len(jax.tree.leaves(a)) == len(jax.tree.leaves(b)) > 20
  jax.tree.map(np.testing.assert_array_equal, a, b)
  # TensorBoard's own reader finds every logged loss in the bucket's events objects.
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=import-outside-toplevel
  steps = set()
  for name in files.glob(f'{workdir}/events.out.tfevents.*'):
    (tmp_path / 'events').write_bytes(files.read_bytes(name))
    steps |= {e.step for e in event_file_loader.EventFileLoader(str(tmp_path / 'events')).Load()
              if any(v.tag.endswith('/loss') for v in e.summary.value)}
  assert steps == set(range(1, 31))

  # Inference and exports from the bucket workdir, writing to the bucket.
  prompt = '--prompt=Please generate an image of square 1'
  result = cli('sample', f'--workdir={workdir}', prompt, '--num=2', '--steps=2',
               f'--out={bucket}/out/x.png')
  assert result.returncode == 0, result.stderr[-3000:]
  with files.local_copy(f'{bucket}/out/x.npz') as local, np.load(local) as saved:
    assert saved['images'].shape == (2, 16, 16, 3)
  result = cli('generate', f'--workdir={workdir}', '--prompt=The', '--max_tokens=4')
  assert result.returncode == 0 and result.stdout.startswith('The'), result.stderr[-3000:]
  for kind in ('export-llama', 'export-official'):
    result = cli('convert', kind, f'--src={workdir}', f'--dst={bucket}/{kind}')
    assert result.returncode == 0, result.stderr[-3000:]
  exported = json.loads(files.read_text(f'{bucket}/export-llama/config.json'))
  assert exported['vocab_size'] == VOCAB + 3 and exported['max_position_embeddings'] == 256  # + specials
  assert files.exists(f'{bucket}/export-official/config.json')

  # A damaged newest step (an object replaced) falls back to the previous one, with a warning.
  state = f'{workdir}/checkpoints/30/state'
  name = max(files.files_under(state), key=lambda n: len(files.read_bytes(f'{state}/{n}')))
  data = bytearray(files.read_bytes(f'{state}/{name}'))
  data[len(data) // 2] ^= 0xFF
  files.write_bytes(f'{state}/{name}', bytes(data))
  result = cli('generate', f'--workdir={workdir}', '--prompt=The', '--max_tokens=2')
  assert result.returncode == 0, result.stderr[-3000:]
  warnings = [l for l in result.stderr.splitlines() if l.startswith('warning:')]
  assert len(warnings) == 1 and 'damaged (its checksum differs)' in warnings[0]
  assert f'Using step {stopped} instead' in warnings[0]


def test_bad_bucket_paths_are_one_sentence_in_seconds(bucket):
  files.write_text(f'{bucket}/hf/config.json', '{"hidden_size": 8,')  # torn
  files.write_bytes(f'{bucket}/binary.txt', bytes([0x80]) + b'not text')
  train = ('train', '--config=configs/digits.py')
  cases = [
      ((*train, '--workdir=gs://no-such-bucket-here/run'),
       'error: bucket gs://no-such-bucket-here does not exist.'),
      ((*train, f'--config.data.text_file={bucket}/missing.txt', f'--workdir={bucket}/run'),
       f'data.text_file names {bucket}/missing.txt, which does not exist'),
      ((*train, f'--config.data.text_file={bucket}/binary.txt', f'--workdir={bucket}/run'),
       f'{bucket}/binary.txt is not UTF-8 text'),
      (('convert', 'llama', f'--src={bucket}/hf', f'--dst={bucket}/llm'),
       f'{bucket}/hf/config.json is not valid JSON'),
      (('sample', f'--workdir={bucket}/nothing'), 'has no checkpoint'),
  ]
  for args, expected in cases:
    start = time.monotonic()
    result = cli(*args)
    assert result.returncode == 2 and expected in error_line(result), (args, result.stderr[-2000:])
    assert 'Traceback' not in result.stderr and time.monotonic() - start < 10, args
  assert not files.exists(f'{bucket}/run') and not files.exists(f'{bucket}/llm')




# Stands in for gcloud's `compute tpus tpu-vm ssh ... --worker=all --command CMD`: the pod's
# WORKERS workers are processes on this machine, and they find each other as JAX finds the tasks
# of a SLURM allocation (what --multihost reads on a pod is the TPU metadata server instead).
_GCLOUD = """#!/usr/bin/env bash
set -u
while [[ $# -gt 0 && $1 != --command ]]; do shift; done
pids=()
for ((i = 0; i < WORKERS; i++)); do
  SLURM_JOB_ID=$JOB SLURM_STEP_NODELIST=127.0.0.1 SLURM_NTASKS=$WORKERS SLURM_PROCID=$i \\
    SLURM_LOCALID=$i bash -c "$2" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


@pytest.mark.multiprocess
def test_the_tpu_pod_launchers_example_trains_in_a_bucket(tmp_path, bucket):
  """launch/tpu_pod.sh's example command as written (gcloud aside): every worker runs
  `train ... --multihost` on one workdir in the bucket."""
  (tmp_path / 'bin').mkdir()
  (tmp_path / 'bin' / 'gcloud').write_text(_GCLOUD)
  (tmp_path / 'bin' / 'gcloud').chmod(0o755)
  (tmp_path / 'monoformer-jax').symlink_to(ROOT)  # where the launcher's set-up copies the repo
  env = devices_env(PATH=f'{tmp_path / "bin"}{os.pathsep}{os.environ["PATH"]}', HOME=str(tmp_path),
                    SETUP='0', WORKERS='2', JOB=str(os.getpid()), JAX_PLATFORMS='cpu')
  result = subprocess.run(
      ['bash', os.path.join(ROOT, 'launch', 'tpu_pod.sh'), 'my-v5p-32', 'us-east5-a', '--',
       'train', *TRAIN_FLAGS, '--config.train.num_steps=4', f'--workdir={bucket}/run'],
      env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert files.listdir(f'{bucket}/run/checkpoints') == ['4']
  assert [r['step'] for r in metrics_rows(f'{bucket}/run')] == [1, 2, 3, 4]
