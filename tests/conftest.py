"""Shared fixtures (a workdir with the default tokenizer trained once) and the markers.

`slow` marks tests of more than a few seconds and `multiprocess` those that start
several processes; `pytest -m "not slow"` is the quick inner loop, `.ci/run` runs all.
"""

import os
import shutil

import pytest
from helpers import tiny_config

from monoformer_jax import train
from monoformer_jax.data import pipeline, tokenizer as tokenizer_lib
from monoformer_jax.tools import bench_torch


def pytest_configure(config):
  bench_torch.make_torchvision_importable()  # before transformers or diffusers look for it
  config.addinivalue_line('markers', 'slow: takes more than a few seconds (left out by -m "not slow")')
  config.addinivalue_line('markers', 'multiprocess: starts several JAX processes (and is slow)')


def pytest_collection_modifyitems(items):
  for item in items:
    if item.get_closest_marker('multiprocess'):
      item.add_marker(pytest.mark.slow)


@pytest.fixture(scope='session')
def tokenizer_file(tmp_path_factory):
  """The default tokenizer, trained once per session."""
  workdir = tmp_path_factory.mktemp('tokenizer')
  config = tiny_config()
  tokenizer_lib.for_workdir(str(workdir), '', config.data.tokenizer_vocab_size,
                            lambda: pipeline.tokenizer_texts(config.data))
  return os.path.join(workdir, 'tokenizer.model')


@pytest.fixture(scope='module')
def trained(tmp_path_factory, tokenizer_file):
  """A workdir trained two steps of the tiny config, shared by a test file's tests."""
  path = str(tmp_path_factory.mktemp('trained'))
  os.link(tokenizer_file, os.path.join(path, 'tokenizer.model'))
  train.train_and_evaluate(tiny_config(num_steps=2), path)
  return path


@pytest.fixture
def workdir(tmp_path, tokenizer_file):
  """A fresh workdir that already holds the trained tokenizer."""
  path = tmp_path / 'work'
  path.mkdir()
  shutil.copy(tokenizer_file, path / 'tokenizer.model')
  return str(path)
