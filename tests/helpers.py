"""What many tests build: the tiny config, a tiny model with parameters that carry signal,
this host's data iterators, JSONL picture fixtures, and the command line."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
from PIL import Image

from monoformer_jax.config import schema
from monoformer_jax.data import common, pipeline
from monoformer_jax.nn import model as model_lib
from monoformer_jax.run import settings
from monoformer_jax.training import steps


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**train_overrides):
  """The embedded default shrunk to seconds: tiny model, small batches."""
  config = schema.base_config()
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


def step_config(config, im_end_id: int):
  """The StepConfig of the config, its objective parsed as training parses it."""
  return steps.StepConfig.from_config(config, im_end_id, settings.validate(config).objective)


def image_batches(config, tok):
  """This host's iterator of diffusion batches for the config."""
  typed = settings.validate(config)
  shape = (*config.model.image_size, config.model.image_channels)
  return common.iterator(pipeline.image_dataset(config.data, typed.image_source, tok, config.seed,
                                                shape))


def text_batches(config, tok):
  """This host's iterator of `ar` batches for the config."""
  typed = settings.validate(config)
  return common.iterator(pipeline.text_dataset(config.data, typed.text_source, tok, config.seed,
                                               typed.chat_format))


def signal_params(model, key=0, noise=0.1, qk_gain=3.0, length=4):
  """Parameters of `model` that a wrong implementation cannot match by accident.

  The fresh initialization plus N(0, noise) on every leaf: zero-initialized modules
  (patch embedding, time-token projector) carry signal and RMSNorm scales sit near
  1 but not at it; q and k kernels are multiplied by qk_gain so that attention is
  far from uniform (a missing RoPE or a wrong mask changes the output).
  """
  init = jax.jit(lambda k: model.init(k, *model_lib.example_inputs(model, 1, length),
                                      method=model.init_all)['params'])
  params = nn.unbox(init(jax.random.key(key)))
  leaves, tree = jax.tree.flatten_with_path(params)
  keys = jax.random.split(jax.random.key(key + 1), len(leaves))
  out = []
  for (path, x), k in zip(leaves, keys):
    x = x + noise * jax.random.normal(k, x.shape, x.dtype)
    if any(getattr(p, 'key', None) in ('q_proj', 'k_proj') for p in path):
      x = x * qk_gain
    out.append(x)
  return jax.tree.unflatten(tree, out)


def picture_jsonl(directory, prompts: list[str], shape=(16, 16, 3), seed=0) -> str:
  """PNG files i.png of random pixels and a JSONL naming them with the prompts; its path."""
  rng = np.random.default_rng(seed)
  for i in range(len(prompts)):
    Image.fromarray(rng.integers(0, 256, shape, np.uint8)).save(directory / f'{i}.png')
  path = directory / 't2i.jsonl'
  path.write_text(''.join(json.dumps({'image': f'{i}.png', 'prompt': p}) + '\n'
                          for i, p in enumerate(prompts)))
  return str(path)


def cli(*args, cwd=ROOT, env=None, timeout=600):
  """Runs `python -m monoformer_jax ARGS` (from any directory: the repository is on the path)."""
  env = dict(os.environ if env is None else env)
  env['PYTHONPATH'] = os.pathsep.join([ROOT] + [p for p in [env.get('PYTHONPATH')] if p])
  return subprocess.run([sys.executable, '-m', 'monoformer_jax', *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


def launch_two(*args, env=None, timeout=600):
  """Runs `python -m monoformer_jax ARGS` as two processes through launch/local_multiprocess.sh."""
  return subprocess.run(['bash', os.path.join(ROOT, 'launch', 'local_multiprocess.sh'), '2', *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def one_and_two_processes(flags, out_flag: str, directory, devices_per_process: int):
  """Runs the command once in one process and once in two, each writing --OUT_FLAG (one.npz,
  two.npz in directory); returns both paths."""
  env = dict(os.environ, XLA_FLAGS='', DEVICES_PER_PROCESS=str(devices_per_process))
  paths = [os.path.join(directory, name) for name in ('one.npz', 'two.npz')]
  one = cli(*flags, f'--{out_flag}={paths[0]}', env=env)
  assert one.returncode == 0, one.stderr[-2000:]
  two = launch_two(*flags, f'--{out_flag}={paths[1]}', env=env)
  assert two.returncode == 0, two.stderr[-3000:]
  return paths


def error_line(result) -> str:
  """The one `error:` (or absl FATAL) line a failed command printed."""
  lines = [l for l in result.stderr.splitlines() if l.startswith(('error:', 'FATAL'))]
  assert lines, result.stderr[-2000:]
  return lines[-1]

