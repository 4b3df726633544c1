"""Sharded runs against the 1-device run: meshes on 8 forced CPU devices, two processes."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import ROOT, TESTS, tiny_config

from monoformer_jax.base import sharding




def _env(devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  return env


@pytest.fixture(scope='module')
def report(workdir_factory):
  result = subprocess.run([sys.executable, os.path.join(TESTS, 'sharded_check.py'), workdir_factory()],
                          capture_output=True, text=True, env=_env(8), timeout=900, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def workdir_factory(tmp_path_factory, tokenizer_file):
  def make():
    path = tmp_path_factory.mktemp('work')
    shutil.copy(tokenizer_file, path / 'tokenizer.model')
    return str(path)
  return make


@pytest.mark.slow
@pytest.mark.parametrize('mesh', ['data2_fsdp2_tensor2', 'fsdp8', 'data2_fsdp4_joint'])
def test_mesh_matches_one_device(report, mesh):
  r = report['meshes'][mesh]
  assert r['loss'] <= 1e-5 and r['params'][0] <= 1e-5 and r['ema'][0] <= 1e-5, r


@pytest.mark.slow
def test_params_are_sharded_as_the_rules_say(report):
  m = report['meshes']
  # embedding [vocab, embed] -> ('tensor', 'fsdp'); q_proj [layers, embed, heads, head_dim].
  assert m['fsdp8']['embed_spec'] == ['tensor', 'fsdp']
  assert m['fsdp8']['embed_shard'] == [m['fsdp8']['full_embed'][0], m['fsdp8']['full_embed'][1] // 8]
  assert m['fsdp8']['mu_shard'] == m['fsdp8']['embed_shard']  # Adam moments follow the params
  t = m['data2_fsdp2_tensor2']  # split by tensor and fsdp, replicated along data
  assert t['embed_shard'] == [t['full_embed'][0] // 2, t['full_embed'][1] // 2]
  assert t['q_spec'] == ['None', 'fsdp', 'tensor', 'None']
  full = t['full_q']
  assert t['q_shard'] == [full[0], full[1] // 2, full[2] // 2, full[3]]


@pytest.mark.slow
def test_checkpoint_moves_between_meshes(report):
  assert report['restore']['steps'] == 6 and report['restore']['loss'] <= 1e-5, report['restore']


@pytest.mark.slow
def test_samplers_run_under_a_mesh(report):
  assert report['samplers']['images'] <= 1e-5 and report['samplers']['same_text'], report['samplers']


@pytest.mark.multiprocess
def test_two_processes_match_one(workdir_factory):
  """launch/local_multiprocess.sh: 2 processes x 2 devices against 1 process x 1 device."""
  flags = ['train', '--config=configs/digits.py', '--config.model.size=tiny',
           '--config.data.image_batch_size=8', '--config.data.text_batch_size=8',
           '--config.data.text_seq_len=32', '--config.train.num_steps=3',
           '--config.train.log_every=1', '--config.train.eval_at_end=false',
           '--config.train.checkpoint_every=3']
  single, multi = workdir_factory(), workdir_factory()
  one = subprocess.run([sys.executable, '-m', 'monoformer_jax', *flags, f'--workdir={single}'],
                       capture_output=True, text=True, env=_env(1), timeout=600, cwd=ROOT)
  assert one.returncode == 0, one.stderr[-3000:]
  env = _env(1)
  env['DEVICES_PER_PROCESS'] = '2'
  two = subprocess.run(['bash', os.path.join(ROOT, 'launch', 'local_multiprocess.sh'), '2', *flags,
                        f'--workdir={multi}'], capture_output=True, text=True, env=env,
                       timeout=600, cwd=ROOT)
  assert two.returncode == 0, two.stderr[-3000:]
  rows = [[json.loads(l) for l in open(os.path.join(w, 'metrics.jsonl'))] for w in (single, multi)]
  assert [r['step'] for r in rows[1]] == [1, 2, 3]
  for a, b in zip(*rows):
    assert a['kind'] == b['kind'] and abs(a['loss'] - b['loss']) <= 1e-5 * abs(a['loss']), (a, b)
  assert os.path.isdir(os.path.join(multi, 'checkpoints', '3'))


def test_mesh_sizes_are_checked():
  config = tiny_config()
  config.mesh.update(dict(data=3, fsdp=1, tensor=1))
  with pytest.raises(Exception, match=r'need 3 devices per slice; 1 are present'):
    sharding.make_mesh(config.mesh)
  config.mesh.update(dict(data=-1, fsdp=-1))
  with pytest.raises(Exception, match='at most one may be -1'):
    sharding.make_mesh(config.mesh)
