"""extract_latents on mock ImageNet records with a tiny VAE; the grain source that reads them."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from helpers import ROOT, devices_env, image_batches, picture_jsonl, tiny_config

from monoformer_jax import train
from monoformer_jax.base.errors import UserError
from monoformer_jax.base.workdir_layout import Workdir
from monoformer_jax.convert import commands
from monoformer_jax.data import common, imagenet, latents, tokenizer as tokenizer_lib
from monoformer_jax.data.pipeline import LatentsSource
from monoformer_jax.nn.vae import LATENT_SCALE
from monoformer_jax.tools import extract_latents


@pytest.fixture(scope='module')
def extracted(tmp_path_factory):
  """(diffusers VAE, config, source records, latents dir) after one extraction."""
  torch.manual_seed(0)
  reference = DiffusersVAE(block_out_channels=(32, 64), down_block_types=('DownEncoderBlock2D',) * 2,
                           up_block_types=('UpDecoderBlock2D',) * 2, layers_per_block=1,
                           norm_num_groups=8, latent_channels=4).eval()
  root = tmp_path_factory.mktemp('latents')
  reference.save_pretrained(root / 'diffusers', safe_serialization=True)
  commands.run('vae', str(root / 'diffusers'), str(root / 'vae'))
  config = tiny_config()
  config.data.image_resolution = 16
  config.data.latents_shard_size = 4
  config.data.tfds_data_dir = str(root / 'tfds')
  config.data.imagenet_manual_dir = str(root)
  with tfds.testing.mock_data(num_examples=10):
    source = imagenet.data_source(config.data)
    records = [source[i] for i in range(10)]
  info = extract_latents.extract(config.data, LatentsSource.IMAGENET, str(root / 'vae'),
                                 str(root / 'out'), source=records, batch_size=3)
  return reference, config, records, str(root / 'out'), str(root / 'vae'), info


def test_shards_hold_the_posterior_of_each_cropped_image(extracted):
  reference, _, records, out, _, info = extracted
  assert info['source_records'] == 10 and info['num_shards'] == 3 and info['latent_shape'] == [8, 8, 4]
  assert sorted(os.listdir(out)) == ['latents-00000-of-00003.array_record',
                                     'latents-00001-of-00003.array_record',
                                     'latents-00002-of-00003.array_record', 'latents.json']
  for index in (0, 5, 9):
    shard, row = divmod(index, 4)
    got = latents.read_record(latents.shard_path(out, shard, 3), row)
    image = common.center_crop(np.asarray(records[index]['image']), 16)
    pixels = torch.from_numpy(image.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    with torch.no_grad():
      posterior = reference.encode(pixels).latent_dist
    np.testing.assert_allclose(got['mean'], posterior.mean[0].permute(1, 2, 0).numpy(), atol=2e-4)
    np.testing.assert_allclose(got['std'], posterior.std[0].permute(1, 2, 0).numpy(), rtol=1e-3)
    assert got['label'] == records[index]['label']


def test_rerun_redoes_only_missing_shards(extracted):
  _, config, records, out, vae, _ = extracted
  kept = latents.shard_path(out, 0, 3)
  redone = latents.shard_path(out, 1, 3)
  before = latents.read_record(redone, 2)
  kept_mtime = os.stat(kept).st_mtime_ns
  os.remove(redone)
  with open(redone + '.tmp', 'wb') as f:  # a crash mid-shard leaves a temporary file
    f.write(b'partial')
  extract_latents.extract(config.data, LatentsSource.IMAGENET, vae, out, source=records,
                          batch_size=3)
  assert os.stat(kept).st_mtime_ns == kept_mtime and not os.path.exists(redone + '.tmp')
  after = latents.read_record(redone, 2)
  np.testing.assert_array_equal(after['mean'], before['mean'])


def latents_config(latents_dir: str):
  """The tiny config training on the extracted ImageNet-labelled latents (8 x 8 x 4)."""
  config = tiny_config()
  config.data.image_source = 'latents'
  config.data.latents_dir = latents_dir
  config.data.prompt_len = 64
  config.data.templates = imagenet.TEMPLATES
  config.eval.prompt_template = imagenet.SAMPLING_TEMPLATE
  config.model.image_size, config.model.image_channels = (8, 8), 4
  config.train.eval_at_end = False
  return config


def test_grain_source_samples_the_posterior(extracted, tokenizer_file):
  _, _, records, out, _, _ = extracted
  tok = tokenizer_lib.SentencePiece(tokenizer_file)
  config = latents_config(out)
  batch = next(image_batches(config, tok))
  assert batch['image'].shape == (8, 8, 8, 4) and batch['tokens'].shape == (8, 64)

  record = latents.open_source(config.data, (8, 8, 4))[0][0]
  stored = latents.decode(record)
  table = imagenet.prompt_table(tok, config.data)
  config.data.cfg_dropout = 0.0
  config.data.latents_from_posterior = False
  mean_only = latents.PromptedLatent(table, tok, config.data, LATENT_SCALE)
  np.testing.assert_array_equal(mean_only.random_map(record, np.random.default_rng(0))['image'],
                                (stored['mean'] * LATENT_SCALE).astype(np.float32))
  config.data.latents_from_posterior = True
  sampler = latents.PromptedLatent(table, tok, config.data, LATENT_SCALE)
  rng = np.random.default_rng(1)
  draws = np.stack([sampler.random_map(record, rng)['image'] for _ in range(2000)]) / LATENT_SCALE
  np.testing.assert_allclose(draws.mean(0), stored['mean'], atol=4 * stored['std'].max() / np.sqrt(2000))
  np.testing.assert_allclose(draws.std(0), stored['std'], rtol=0.1)


def test_bad_latent_directories(extracted, tmp_path):
  _, _, _, out, _, _ = extracted
  config = tiny_config()
  config.data.latents_dir = str(tmp_path)
  with pytest.raises(UserError, match='has no latents.json'):
    latents.open_source(config.data, (8, 8, 4))
  config.data.latents_dir = out
  with pytest.raises(UserError, match=r'latents of shape \[8, 8, 4\]; .* expect \[4, 4, 4\]'):
    latents.open_source(config.data, (4, 4, 4))


def test_restored_iterator_yields_the_same_next_batch(extracted, tokenizer_file):
  _, _, _, out, _, _ = extracted
  tok = tokenizer_lib.SentencePiece(tokenizer_file)
  config = latents_config(out)
  config.data.image_batch_size = 4
  it = image_batches(config, tok)
  for _ in range(3):  # into the second pass over the 10 records
    next(it)
  state = it.get_state()
  expected = next(it)
  restored = image_batches(config, tok)
  restored.set_state(state)
  got = next(restored)
  for key in expected:
    np.testing.assert_array_equal(got[key], expected[key])


def test_text_to_image_latents_carry_their_prompts(extracted, tmp_path, tokenizer_file):
  _, _, _, _, vae, _ = extracted
  t2i_file = picture_jsonl(tmp_path, [f'a red square {i}' for i in range(3)], (24, 20, 3))
  (tmp_path / '1.png').write_text('broken')
  config = tiny_config()
  config.data.latents_source = 't2i_jsonl'
  config.data.t2i_files = t2i_file
  config.data.image_resolution = 16
  with pytest.raises(UserError, match=r't2i.jsonl, line 2: cannot read image'):
    extract_latents.extract(config.data, LatentsSource.T2I_JSONL, vae, str(tmp_path / 'strict'))
  assert not list((tmp_path / 'strict').iterdir())  # the partial shard was removed
  config.data.skip_bad_records = True
  info = extract_latents.extract(config.data, LatentsSource.T2I_JSONL, vae, str(tmp_path / 'out'))
  assert info['source_records'] == 3
  config.data.image_source = 'latents'
  config.data.latents_dir = str(tmp_path / 'out')
  config.model.image_size, config.model.image_channels = (8, 8), 4
  config.data.templates = ('Please generate an image of {name}',)
  config.eval.prompt_template = config.data.templates[0]
  config.data.cfg_dropout = 0.0
  source, info = latents.open_source(config.data, (8, 8, 4))
  assert len(source) == 2  # the unreadable picture has no record
  assert [latents.decode(source[i])['prompt'] for i in range(2)] == [
      'a red square 0', 'a red square 2']
  tok = tokenizer_lib.SentencePiece(tokenizer_file)
  out = latents.PromptedLatent(None, tok, config.data, info['latent_scale']).random_map(
      source[1], np.random.default_rng(0))
  np.testing.assert_array_equal(out['tokens'], tok.image_prompt(
      'Please generate an image of a red square 2', config.data.prompt_len, truncate=True)[0])


@pytest.mark.slow
def test_training_on_pixels_encodes_them_on_the_fly(extracted, tmp_path, workdir):
  _, _, _, _, vae, _ = extracted
  t2i_file = picture_jsonl(tmp_path, [f'noise {i}' for i in range(4)], (18, 22, 3))
  config = tiny_config(num_steps=2, ar_weight=0.0)
  config.data.image_source = 't2i_jsonl'
  config.data.t2i_files = t2i_file
  config.data.image_resolution = 16
  config.data.templates = ('Please generate an image of {name}',)
  config.eval.prompt_template = config.data.templates[0]
  config.model.vae = vae
  config.model.image_size, config.model.image_channels = (4, 4), 4
  with pytest.raises(UserError, match=r'latents of shape \(8, 8, 4\); .* expect \(4, 4, 4\)'):
    train.train_and_evaluate(config, workdir)
  assert not os.path.exists(os.path.join(workdir, 'checkpoints'))
  config.model.image_size = (8, 8)
  train.train_and_evaluate(config, workdir)
  with open(Workdir(workdir).metrics) as f:
    rows = [json.loads(line) for line in f]
  assert [r['kind'] for r in rows] == ['diffusion', 'diffusion'] and np.isfinite(rows[-1]['loss'])


@pytest.mark.multiprocess
def test_two_processes_write_the_shards_one_process_writes(extracted, tmp_path):
  """launch/local_multiprocess.sh: shard s comes from process s mod 2; the records are the same."""
  _, _, _, _, vae, _ = extracted
  t2i_file = picture_jsonl(tmp_path, [f'p{i}' for i in range(5)], seed=1)
  root = ROOT
  flags = ['extract_latents', '--config=configs/digits.py', f'--vae={vae}',
           '--config.data.latents_source=t2i_jsonl', f'--config.data.t2i_files={t2i_file}',
           '--config.data.image_resolution=16', '--config.data.latents_shard_size=2']
  env = devices_env(PYTHONPATH=root)
  runs = {'one': [sys.executable, '-m', 'monoformer_jax'],
          'two': ['bash', os.path.join(root, 'launch', 'local_multiprocess.sh'), '2']}
  for name, command in runs.items():
    result = subprocess.run([*command, *flags, f'--dst={tmp_path / name}'], cwd=root, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
  for shard in range(3):
    for row in range(2 if shard < 2 else 1):
      a = latents.read_record(latents.shard_path(str(tmp_path / 'one'), shard, 3), row)
      b = latents.read_record(latents.shard_path(str(tmp_path / 'two'), shard, 3), row)
      assert a['prompt'] == b['prompt'] == f'p{2 * shard + row}'
      np.testing.assert_allclose(a['mean'], b['mean'], atol=1e-5)
  assert json.load(open(tmp_path / 'two' / 'latents.json'))['source_records'] == 5
