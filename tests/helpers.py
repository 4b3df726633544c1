"""What many tests build: the tiny config, a tiny model with parameters that carry signal,
this host's data iterators, JSONL picture fixtures, the command line, and what tests read
back from a workdir (metrics rows, checkpointed states)."""

import json
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import time

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image

from monoformer_jax.base import files, sharding
from monoformer_jax.base.workdir_layout import Workdir
from monoformer_jax.config import schema
from monoformer_jax.data import common, pipeline
from monoformer_jax.nn import model as model_lib
from monoformer_jax.run import settings
from monoformer_jax.training import checkpoint, steps


# The tests' programs are tiny, so compiling them is most of the suite's time: LLVM's
# optimizations (vectorizing, inlining) are left out. XLA's own passes, which decide what is
# computed and in what order, run as always; conftest sets this for every process.
COMPILE_FLAGS = ('--xla_backend_optimization_level=0',)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, 'tests')  # helpers and the scripts tests run as processes


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


def reading_digits(c):
  """The config c also trains questions on digits it reads (configs/digits_vqa.py's source)."""
  c.model.vision_encoder, c.data.understanding_source = 'vae', 'digits'
  c.data.understanding_batch_size, c.data.understanding_seq_len = 4, 64
  c.train.understanding_weight = 2.0 if c.train.objective == 'alternate' else 0.0
  return c


def step_config(config, im_end_id: int):
  """The StepConfig of the config, its objective parsed as training parses it."""
  checked = settings.validate(config)
  return steps.StepConfig.from_config(config, im_end_id, checked.objective, checked.diffusion,
                                      checked.understanding)


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


VOCAB = 300  # training_inputs' LLM


def training_inputs(root):
  """Under root/inputs: a tiny HF LLaMA (its config says 256 positions) with a sentencepiece
  model in hf/, converted in llm/, a text file, four pictures and their SD-VAE-style latents;
  the converted VAE under root/vae."""
  # Imported here: torch, transformers and diffusers take seconds to import.
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from diffusers import AutoencoderKL as DiffusersVAE  # pylint: disable=import-outside-toplevel
  from monoformer_jax.convert import commands  # pylint: disable=import-outside-toplevel
  from monoformer_jax.tools import extract_latents  # pylint: disable=import-outside-toplevel
  inputs = root / 'inputs'
  inputs.mkdir()
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  text = '\n\n'.join(topics.topics[k] for k in sorted(topics.topics)[:40])
  (inputs / 'corpus.txt').write_text(text)
  tiny = model_lib.SIZES['tiny']
  torch.manual_seed(0)
  hf = inputs / 'hf'
  transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=tiny['width'], intermediate_size=tiny['mlp_dim'],
      num_hidden_layers=tiny['depth'], num_attention_heads=tiny['num_heads'],
      num_key_value_heads=tiny['num_kv_heads'], rms_norm_eps=1e-6,
      max_position_embeddings=256)).save_pretrained(hf, safe_serialization=True)
  spm.SentencePieceTrainer.train(input=str(inputs / 'corpus.txt'), model_prefix=str(hf / 'tokenizer'),
                                 vocab_size=VOCAB, minloglevel=2)
  commands.run('llama', str(hf), str(inputs / 'llm'))
  DiffusersVAE(block_out_channels=(32, 64), down_block_types=('DownEncoderBlock2D',) * 2,
               up_block_types=('UpDecoderBlock2D',) * 2, layers_per_block=1, norm_num_groups=8,
               latent_channels=4).save_pretrained(inputs / 'vae_hf', safe_serialization=True)
  commands.run('vae', str(inputs / 'vae_hf'), str(root / 'vae'))
  pictures = inputs / 'pictures'
  pictures.mkdir()
  config = tiny_config()
  config.data.t2i_files = picture_jsonl(pictures, [f'square {i}' for i in range(4)])
  config.data.image_resolution = 16
  extract_latents.extract(config.data, pipeline.LatentsSource.T2I_JSONL, str(root / 'vae'),
                          str(inputs / 'latents'))


def picture_jsonl(directory, prompts: list[str], shape=(16, 16, 3), seed=0) -> str:
  """PNG files i.png of random pixels and a JSONL naming them with the prompts; its path."""
  rng = np.random.default_rng(seed)
  for i in range(len(prompts)):
    Image.fromarray(rng.integers(0, 256, shape, np.uint8)).save(directory / f'{i}.png')
  path = directory / 't2i.jsonl'
  path.write_text(''.join(json.dumps({'image': f'{i}.png', 'prompt': p}) + '\n'
                          for i, p in enumerate(prompts)))
  return str(path)


# Commands run in processes forked from a server that has imported these already: a fresh
# `python -m` start costs seconds on two cores, and the suite runs about a hundred commands.
_PRELOADED = ('monoformer_jax.main', 'clu.metric_writers')  # clu's writers import TensorFlow
# Variables no module reads at import (pytest's own changes with every test); a command whose
# environment differs from the server's in any other starts a fresh interpreter.
_READ_AFTER_IMPORT = ('XLA_FLAGS', 'DEVICES_PER_PROCESS', 'PYTEST_CURRENT_TEST')
_FORKSERVER = []  # this process's fork-server context and the environment commands compare with


def _with_root_on_path(env: dict) -> dict:
  return dict(env, PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [env.get('PYTHONPATH')] if p]))


def _command(args, cwd, env, out, err) -> None:
  """In a forked process: becomes `python -m monoformer_jax ARGS`, its streams in files."""
  os.chdir(cwd)
  os.environ.clear()
  os.environ.update(env)
  for fd, path in ((1, out), (2, err)):
    handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(handle, fd)
    os.close(handle)
  import monoformer_jax  # pylint: disable=import-outside-toplevel
  sys.argv = [os.path.join(os.path.dirname(monoformer_jax.__file__), '__main__.py'), *args]
  runpy.run_module('monoformer_jax', run_name='__main__', alter_sys=True)


def _forkserver():
  if not _FORKSERVER:
    context = multiprocessing.get_context('forkserver')  # its server has this process's sys.path
    context.set_forkserver_preload(list(_PRELOADED))
    _FORKSERVER.extend([context, _with_root_on_path(os.environ)])
  return _FORKSERVER


def cli(*args, cwd=ROOT, env=None, timeout=600):
  """Runs `python -m monoformer_jax ARGS` (from any directory: the repository is on the path).

  The process is forked from multiprocessing's fork server, which has the package imported
  already, unless env differs from the server's in a variable a module may read at import (then
  a fresh interpreter starts). Either way it has its own directory, environment, streams and
  exit status.
  """
  env = _with_root_on_path(os.environ if env is None else env)
  command = [sys.executable, '-m', 'monoformer_jax', *args]
  context, server_env = _forkserver()
  if any(env.get(k) != server_env.get(k) for k in set(env) | set(server_env)
         if k not in _READ_AFTER_IMPORT):
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
  with tempfile.TemporaryDirectory() as directory:
    out, err = os.path.join(directory, 'stdout'), os.path.join(directory, 'stderr')
    process = context.Process(target=_command, args=(list(args), str(cwd), env, out, err))
    process.start()
    process.join(timeout)
    if process.exitcode is None:
      process.kill()
      process.join()
      raise subprocess.TimeoutExpired(command, timeout)
    with open(out) as stdout, open(err) as stderr:
      return subprocess.CompletedProcess(command, process.exitcode, stdout.read(), stderr.read())


def launch_two(*args, env=None, timeout=600):
  """Runs `python -m monoformer_jax ARGS` as two processes through launch/local_multiprocess.sh."""
  return subprocess.run(['bash', os.path.join(ROOT, 'launch', 'local_multiprocess.sh'), '2', *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def one_and_two_processes(flags, out_flag: str, directory, devices_per_process: int):
  """Runs the command once in one process and once in two, each writing --OUT_FLAG (one.npz,
  two.npz in directory); returns both paths."""
  env = devices_env(DEVICES_PER_PROCESS=str(devices_per_process))
  paths = [os.path.join(directory, name) for name in ('one.npz', 'two.npz')]
  one = cli(*flags, f'--{out_flag}={paths[0]}', env=env)
  assert one.returncode == 0, one.stderr[-2000:]
  two = launch_two(*flags, f'--{out_flag}={paths[1]}', env=env)
  assert two.returncode == 0, two.stderr[-3000:]
  return paths


def devices_env(devices: int | None = None, **variables) -> dict:
  """os.environ with XLA_FLAGS forcing `devices` CPU devices (XLA's default without), keeping
  the session's compile flags, and with any other variables."""
  forced = [f'--xla_force_host_platform_device_count={devices}'] if devices else []
  return dict(os.environ, XLA_FLAGS=' '.join(forced + list(COMPILE_FLAGS)), **variables)


def error_line(result) -> str:
  """The one `error:` (or absl FATAL) line a failed command printed."""
  lines = [l for l in result.stderr.splitlines() if l.startswith(('error:', 'FATAL'))]
  assert lines, result.stderr[-2000:]
  return lines[-1]


TRAIN_FLAGS = ['--config=configs/digits.py', '--config.model.size=tiny',
               '--config.train.log_every=1', '--config.train.eval_at_end=false',
               '--config.data.image_batch_size=8', '--config.data.text_batch_size=4',
               '--config.data.text_seq_len=32']  # `train` on the command line at the tiny size
WALL_CLOCK = ('steps_per_sec', 'input_wait_fraction')


def metrics_rows(workdir, kind=None):
  """metrics.jsonl (rows of one kind, or all) without the wall-clock fields, which no two runs
  share (and which must be sane where present)."""
  rows = [json.loads(line) for line in files.read_text(Workdir(workdir).metrics)
          .splitlines()]
  for row in rows:
    if 'steps_per_sec' in row:
      assert row['steps_per_sec'] > 0 and 0 <= row['input_wait_fraction'] <= 1, row
  return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in rows
          if kind is None or r['kind'] == kind]


def final_state(workdir, config):
  """(step, state) of the newest checkpoint of a workdir trained with config."""
  ckpt = checkpoint.Checkpointer(workdir, create=False)
  step = ckpt.latest_step()
  tx = steps.make_optimizer(config.optim, config.train.num_steps)
  layout = sharding.make_layout(config.mesh)
  abstract, _ = steps.abstract_state(settings.build_model(config), tx, layout)
  state, _ = ckpt.restore(step, abstract)
  ckpt.close()
  return step, state


def saved_arrays(workdir):
  """The newest checkpoint's train state as saved (host arrays, no config needed)."""
  ckpt = checkpoint.Checkpointer(workdir, create=False)
  state = ckpt.manager.restore(ckpt.latest_step(), args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore()))['state']
  ckpt.close()
  return jax.tree.map(np.asarray, state)


def start_process(args, env=None):
  """A process of its own session (so a signal reaches it alone), its output captured."""
  env = dict(os.environ if env is None else env, PYTHONPATH=ROOT)
  return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_rows(workdir, count, process, timeout=300):
  """Waits until a running `train` has logged `count` rows (fails if it ends first)."""
  path = Workdir(workdir).metrics
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if process.poll() is not None:
      raise AssertionError(process.communicate()[1][-3000:])
    if os.path.exists(path) and sum(1 for _ in open(path)) >= count:
      return
    time.sleep(0.05)
  raise AssertionError('the run logged too few steps in time')


def wait_for_step(process, step: int) -> None:
  """Reads a running `train`'s progress lines (its stdout) until step `step` is logged: what
  shows a run's progress at once, also where metrics.jsonl is flushed only now and then."""
  for line in process.stdout:
    if line.startswith(f'step {step}/'):
      return
  raise AssertionError(process.communicate()[1][-3000:])


# Texts that trip tokenizers: whitespace runs, scripts, emoji, specials spelled in text.
MIXED = ['Hello world', '  leading spaces', 'trailing   ', 'tabs\tand\nnewlines\n\n', 'digits 1234567',
         'x=3.14159; y=-2e10', 'naïve café', 'e\u0301 composed', '日本語のテキスト', 'emoji 🙂🚀 ok',
         'Ünïcödé', "it's, don't, we'll", 'CamelCaseWord', 'snake_case_word', 'a  b   c    d',
         '<im_start>', '<im_end>', 'an image<im_start> of<im_end>', '<|im_start|>user\nhi<|im_end|>',
         '<|endoftext|>', '<|begin_of_text|>x', '<pad> text', '<im_start><im_end>', '\r\n windows',
         ' ', '', 'ab' * 40, '0' * 17, 'Ωμέγα', 'привет мир', 'مرحبا', 'tab\t\ttab', 'end.',
         '!!!???', '(nested [brackets {x}])', 'mail@example.com', 'http://a.b/c?d=e', '#hash',
         '$100.00', '50%', 'line1\nline2\nline3', '   \n   ', 'über-nice', 'ﬁligature',
         'ＦＵＬＬＷＩＤＴＨ', 'a<im_start>b', '<im_end>\n', 'The quick brown fox', '3 digits: 999',
         'zero-width\u200bspace']
