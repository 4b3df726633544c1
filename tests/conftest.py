"""Shared fixtures (a workdir with the default tokenizer trained once, a bucket), the markers,
and one XLA compilation cache, compile flags and GCS emulator for the session.

`slow` marks tests of more than a few seconds and `multiprocess` those that start
several processes; `pytest -m "not slow"` is the quick inner loop, `.ci/run` runs all.
The tests compile the same tiny programs again and again, in both workers and in the
command-line processes they start: JAX's persistent compilation cache, in a directory made
fresh for each session and shared through the environment, compiles each once. A cached
executable is the compiled program itself, so no result depends on it. helpers.COMPILE_FLAGS
go into XLA_FLAGS here, for the workers and every process they start.
"""

import os
import shutil
import tempfile

import emulator
import jax
import pytest
import torch
from helpers import COMPILE_FLAGS, tiny_config

from monoformer_jax import train
from monoformer_jax.convert import commands
from monoformer_jax.data import pipeline, tokenizer as tokenizer_lib
from monoformer_jax.tools import bench_torch


_CACHE = 'JAX_COMPILATION_CACHE_DIR'
_MIN_TIME = 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'
_MADE = []  # the cache directory this process made, removed when the session ends
_EMULATOR = []  # the GCS emulator this process started, stopped when the session ends


def pytest_configure(config):
  if hasattr(config.option, 'loadscopereorder'):
    config.option.loadscopereorder = False  # keep LONGEST_FIRST's order
  bench_torch.make_torchvision_importable()  # before transformers or diffusers look for it
  # Each of the two workers has a core: torch's spinning OpenMP threads, waiting for a core the
  # other worker holds, made its references several times slower.
  torch.set_num_threads(1)
  if _CACHE not in os.environ:  # the first process (the xdist controller): the workers inherit it
    os.environ[_CACHE] = tempfile.mkdtemp(prefix='monoformer-jax-xla-cache-')
    _MADE.append(os.environ[_CACHE])
    _EMULATOR.append(emulator.start())  # one for the session, its address in the environment
  os.environ.setdefault(_MIN_TIME, '0')  # every program, as most compile in under a second
  jax.config.update('jax_compilation_cache_dir', os.environ[_CACHE])  # jax read the env at import
  jax.config.update('jax_persistent_cache_min_compile_time_secs', float(os.environ[_MIN_TIME]))
  flags = os.environ.get('XLA_FLAGS', '').split()  # read when the first device is asked for
  os.environ['XLA_FLAGS'] = ' '.join(flags + [f for f in COMPILE_FLAGS if f not in flags])
  config.addinivalue_line('markers', 'slow: takes more than a few seconds (left out by -m "not slow")')
  config.addinivalue_line('markers', 'multiprocess: starts several JAX processes (and is slow)')


def pytest_unconfigure(config):
  del config
  for directory in _MADE:
    shutil.rmtree(directory, ignore_errors=True)
  for server in _EMULATOR:
    server.stop()


# Files of over half a minute on the reference machine, longest first: xdist hands out whole
# files in collection order (pytest_configure turns off its reordering by test count), so the
# short files fill in at the end instead of a long one starting last.
LONGEST_FIRST = ('evaluation/test_fid.py', 'training/test_guards.py', 'test_main.py',
                 'test_configs.py', 'base/test_sharding.py', 'training/test_finetune.py',
                 'test_train.py', 'base/test_files.py', 'tools/test_gguf_to_hf.py',
                 'training/test_objective.py', 'training/test_checkpoint.py', 'run/test_workdir.py',
                 'evaluation/test_multiple_choice.py', 'convert/test_official.py',
                 'training/test_cross_entropy.py', 'run/test_backbone.py',
                 'generation/test_sampling.py', 'tools/test_sweep.py', 'nn/test_layers.py',
                 'convert/test_hf_config.py', 'nn/test_splash.py', 'generation/test_mixed_modal.py',
                 'tools/test_extract_latents.py')


def pytest_collection_modifyitems(items):
  for item in items:
    if item.get_closest_marker('multiprocess'):
      item.add_marker(pytest.mark.slow)

  def rank(item):
    path = os.path.relpath(str(item.fspath), os.path.dirname(__file__)).replace(os.sep, '/')
    return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)
  items.sort(key=rank)  # stable: every file's tests stay together and in order


@pytest.fixture(scope='session')
def tokenizer_file(tmp_path_factory):
  """The default tokenizer, trained once per session."""
  workdir = tmp_path_factory.mktemp('tokenizer')
  config = tiny_config()
  tokenizer_lib.for_workdir(str(workdir), '', config.data.tokenizer_vocab_size,
                            lambda: pipeline.tokenizer_texts(config.data))
  return os.path.join(workdir, 'tokenizer.model')


@pytest.fixture(scope='session')
def tiny_llm(tmp_path_factory):
  """A small converted LLM (random HF weights, its own sentencepiece vocabulary of 512) of the
  tiny size's shape, for the tests that start from one."""
  root = tmp_path_factory.mktemp('tiny_llm')
  commands.run('synthetic-llama', dst=str(root / 'hf'), shape='32,2,4,2,64,512')
  commands.run('hf', str(root / 'hf'), str(root / 'llm'))
  return str(root / 'llm')


@pytest.fixture(scope='module')
def trained(tmp_path_factory, tokenizer_file):
  """A workdir trained two steps of the tiny config, shared by a test file's tests."""
  path = str(tmp_path_factory.mktemp('trained'))
  os.link(tokenizer_file, os.path.join(path, 'tokenizer.model'))
  train.train_and_evaluate(tiny_config(num_steps=2), path)
  return path


@pytest.fixture
def bucket():
  """gs://NAME: an empty bucket of the session's GCS emulator, for one test."""
  return emulator.new_bucket()


@pytest.fixture
def workdir(tmp_path, tokenizer_file):
  """A fresh workdir that already holds the trained tokenizer."""
  path = tmp_path / 'work'
  path.mkdir()
  shutil.copy(tokenizer_file, path / 'tokenizer.model')
  return str(path)
