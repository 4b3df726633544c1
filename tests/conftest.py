"""Shared fixtures: a tiny config and a workdir with the default tokenizer trained once."""

import os
import shutil

import pytest

from monoformer_jax import config_lib, input_pipeline


def tiny_config(**train_overrides):
  """The embedded default shrunk to seconds: tiny model, small batches."""
  config = config_lib.base_config()
  config.model.size = 'tiny'
  config.data.image_batch_size = 8
  config.data.text_batch_size = 4
  config.data.text_seq_len = 32
  config.data.prompt_len = 12
  config.optim.learning_rate = 1e-3
  config.train.num_steps = 6
  config.train.log_every = 1
  config.train.checkpoint_every = 3
  config.train.eval_at_end = False
  config.train.ema_decay = 0.9
  config.sample.steps = 5
  config.eval.samples_per_class = 1
  config.eval.text_batches = 1
  for key, value in train_overrides.items():
    config.train[key] = value
  return config


@pytest.fixture(scope='session')
def tokenizer_file(tmp_path_factory):
  """The default tokenizer, trained once per session."""
  workdir = tmp_path_factory.mktemp('tokenizer')
  input_pipeline.get_tokenizer(tiny_config(), str(workdir))
  return os.path.join(workdir, 'tokenizer.model')


@pytest.fixture
def workdir(tmp_path, tokenizer_file):
  """A fresh workdir that already holds the trained tokenizer."""
  path = tmp_path / 'work'
  path.mkdir()
  shutil.copy(tokenizer_file, path / 'tokenizer.model')
  return str(path)
