"""Inference needs only the workdir: a run whose training inputs (converted LLM, text file,
latents) are gone samples, generates and exports, from another directory; one `train` at a
time holds a workdir."""

import json
import shutil
import sys

import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers
from diffusers import AutoencoderKL as DiffusersVAE
from helpers import (TRAIN_FLAGS, cli, error_line, metrics_rows, picture_jsonl, start_process,
                     tiny_config, wait_for_rows)

from monoformer_jax import train
from monoformer_jax.convert import commands
from monoformer_jax.data.pipeline import LatentsSource
from monoformer_jax.nn.model import SIZES
from monoformer_jax.run import workdir as workdir_lib
from monoformer_jax.tools import extract_latents


VOCAB = 300


def _inputs(root):
  """Under root/inputs: a converted tiny LLM (its HF config says 256 positions), a text
  file, SD-VAE-style latents of four pictures; the converted VAE under root/vae."""
  inputs = root / 'inputs'
  inputs.mkdir()
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  text = '\n\n'.join(topics.topics[k] for k in sorted(topics.topics)[:40])
  (inputs / 'corpus.txt').write_text(text)
  tiny = SIZES['tiny']
  torch.manual_seed(0)
  hf = inputs / 'hf'
  transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=tiny['width'], intermediate_size=tiny['mlp_dim'],
      num_hidden_layers=tiny['depth'], num_attention_heads=tiny['num_heads'],
      num_key_value_heads=tiny['num_kv_heads'], rms_norm_eps=1e-6,
      max_position_embeddings=256)).save_pretrained(hf, safe_serialization=True)
  spm.SentencePieceTrainer.train(input=str(inputs / 'corpus.txt'), model_prefix=str(hf / 'tokenizer'),
                                 vocab_size=VOCAB, minloglevel=2)
  commands.run('llama', str(hf), str(inputs / 'llm'), use_ema=True)
  DiffusersVAE(block_out_channels=(32, 64), down_block_types=('DownEncoderBlock2D',) * 2,
               up_block_types=('UpDecoderBlock2D',) * 2, layers_per_block=1, norm_num_groups=8,
               latent_channels=4).save_pretrained(inputs / 'vae_hf', safe_serialization=True)
  commands.run('vae', str(inputs / 'vae_hf'), str(root / 'vae'), use_ema=True)
  pictures = inputs / 'pictures'
  pictures.mkdir()
  config = tiny_config()
  config.data.t2i_files = picture_jsonl(pictures, [f'square {i}' for i in range(4)])
  config.data.image_resolution = 16
  extract_latents.extract(config.data, LatentsSource.T2I_JSONL, str(root / 'vae'),
                          str(inputs / 'latents'))


@pytest.mark.slow
def test_inference_after_the_training_inputs_are_gone(tmp_path, monkeypatch):
  project, elsewhere = tmp_path / 'project', tmp_path / 'elsewhere'
  project.mkdir()
  elsewhere.mkdir()
  _inputs(project)
  monkeypatch.chdir(project)  # the config names its inputs relative to here, as the paper's do
  config = tiny_config(num_steps=2)
  config.model.init_from, config.data.text_file = 'inputs/llm', 'inputs/corpus.txt'
  config.model.vocab_size, config.data.tokenizer_vocab_size = VOCAB + 5, VOCAB
  config.data.image_source, config.data.latents_dir = 'latents', 'inputs/latents'
  config.model.vae, config.model.image_size, config.model.image_channels = 'vae', (8, 8), 4
  config.data.templates = ('Please generate an image of {name}',)
  config.eval.prompt_template = config.data.templates[0]
  config.data.prompt_len = 40
  train.train_and_evaluate(config, 'work')
  shutil.rmtree(project / 'inputs')
  shutil.move(project / 'vae', tmp_path / 'moved_vae')
  workdir = str(project / 'work')

  prompt = '--prompt=Please generate an image of square 1'
  out = elsewhere / 'x.png'
  result = cli('sample', f'--workdir={workdir}', prompt, '--num=2', '--steps=2', f'--out={out}',
               cwd=elsewhere)
  assert result.returncode != 0 and '--vae=DIR' in error_line(result)  # decoding needs the VAE
  assert not out.exists()
  result = cli('sample', f'--workdir={workdir}', prompt, '--num=2', '--steps=2', f'--out={out}',
               f'--vae={tmp_path / "moved_vae"}', cwd=elsewhere)
  assert result.returncode == 0, result.stderr[-2000:]
  assert np.load(elsewhere / 'x.npz')['images'].shape == (2, 16, 16, 3)

  result = cli('generate', f'--workdir={workdir}', '--prompt=The', '--max_tokens=4', cwd=elsewhere)
  assert result.returncode == 0 and result.stdout.startswith('The'), result.stderr[-2000:]

  result = cli('convert', 'export-llama', f'--src={workdir}', f'--dst={elsewhere / "hf"}',
               cwd=elsewhere)
  assert result.returncode == 0, result.stderr[-2000:]
  exported = json.loads((elsewhere / 'hf' / 'config.json').read_text())
  assert exported['max_position_embeddings'] == 256  # the source's, not a default
  assert exported['vocab_size'] == VOCAB + 5
  model = transformers.LlamaForCausalLM.from_pretrained(elsewhere / 'hf')
  assert model.config.pad_token_id == VOCAB + 2  # the pad piece appended to the LLM's vocabulary


def test_convert_help_lists_the_kinds():
  result = cli('convert', '--help')
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  for kind in commands.KINDS:
    assert any(line.split()[:1] == [kind] for line in lines), (kind, result.stdout)


@pytest.mark.slow
def test_a_second_train_on_a_workdir_in_use_is_refused(tmp_path):
  workdir = str(tmp_path / 'w')
  first = start_process([sys.executable, '-m', 'monoformer_jax', 'train', *TRAIN_FLAGS,
                  '--config.train.num_steps=100000', f'--workdir={workdir}'])
  try:
    wait_for_rows(workdir, 2, first)
    result = cli('train', *TRAIN_FLAGS, '--config.train.num_steps=2', f'--workdir={workdir}')
    assert result.returncode == 2 and 'is in use by another `train` (pid' in error_line(result)
  finally:
    first.kill()  # kill -9 ...
    first.communicate()
  handle = workdir_lib._lock(workdir)  # ... leaves no stale lock  pylint: disable=protected-access
  handle.close()
  assert [r['step'] for r in metrics_rows(workdir)][:2] == [1, 2]  # the first run's rows are intact
