"""Sharded runs against the 1-device run: meshes on 8 forced CPU devices (two processes: see
training/test_guards.py)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import ROOT, TESTS, devices_env, tiny_config

from monoformer_jax.base import sharding


@pytest.fixture(scope='module')
def report(workdir_factory):
  result = subprocess.run([sys.executable, os.path.join(TESTS, 'sharded_check.py'), workdir_factory()],
                          capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env=devices_env(8, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT))
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
@pytest.mark.parametrize('mesh', ['data2_fsdp2_tensor2', 'data2_fsdp4_joint'])
def test_mesh_matches_one_device(report, mesh):
  r = report['meshes'][mesh]
  assert r['loss'] <= 1e-5 and r['params'][0] <= 1e-5 and r['ema'][0] <= 1e-5, r


@pytest.mark.slow
def test_params_are_sharded_as_the_rules_say(report):
  m = report['meshes']
  # embedding [vocab, embed] -> ('tensor', 'fsdp'); q_proj [layers, embed, heads, head_dim].
  f = m['data2_fsdp4_joint']
  assert f['embed_spec'] == ['tensor', 'fsdp']
  assert f['embed_shard'] == [f['full_embed'][0], f['full_embed'][1] // 4]
  assert f['mu_shard'] == f['embed_shard']  # Adam moments follow the params
  t = m['data2_fsdp2_tensor2']  # split by tensor and fsdp, replicated along data
  assert t['mu_shard'] == t['embed_shard']
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


@pytest.mark.slow
def test_lora_matches_one_device_and_adapters_shard_as_their_kernels(report):
  r = report['lora']
  assert r['loss'] <= 1e-5 and r['params'][0] <= 1e-5 and r['trained'] > 0, str(r)
  # q_proj [layers, embed, heads, head_dim]: A [layers, embed, r] as its input axis, B
  # [layers, r, heads * head_dim] as its first output axis; o_proj [layers, heads, head_dim,
  # embed]: A as its first input axis, B named head_dim (docs/pretrained-llms.md), kept whole.
  assert r['specs'] == dict(q_proj_a=['None', 'fsdp', 'None'], q_proj_b=['None', 'None', 'tensor'],
                            o_proj_a=['None', 'tensor', 'None'], o_proj_b=['None', 'None', 'None']), r


def test_mesh_sizes_are_checked():
  config = tiny_config()
  config.mesh.update(dict(data=3, fsdp=1, tensor=1))
  with pytest.raises(Exception, match=r'need 3 devices per slice; 1 are present'):
    sharding.make_mesh(config.mesh)
  config.mesh.update(dict(data=-1, fsdp=-1))
  with pytest.raises(Exception, match='at most one may be -1'):
    sharding.make_mesh(config.mesh)
