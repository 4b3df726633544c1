"""Inference needs only the workdir: a run whose training inputs (converted LLM, text file,
latents) are gone samples, generates and exports, from another directory; one `train` at a
time holds a workdir."""

import json
import os
import shutil
import sys

import numpy as np
import pytest
import transformers
from helpers import (TRAIN_FLAGS, VOCAB, cli, error_line, metrics_rows, start_process,
                     tiny_config, training_inputs, wait_for_rows)

from monoformer_jax import train
from monoformer_jax.base.workdir_layout import Workdir
from monoformer_jax.convert import commands
from monoformer_jax.run import workdir_lock


@pytest.mark.slow
def test_inference_after_the_training_inputs_are_gone(tmp_path, monkeypatch):
  project, elsewhere = tmp_path / 'project', tmp_path / 'elsewhere'
  project.mkdir()
  elsewhere.mkdir()
  training_inputs(project)
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
  workdir_lock.take(workdir).close()  # ... leaves no stale lock, and a run that ends no file
  assert not os.path.exists(Workdir(workdir).lock)
  assert [r['step'] for r in metrics_rows(workdir)][:2] == [1, 2]  # the first run's rows are intact
