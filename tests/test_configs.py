"""Every config file loads, validates and builds its model abstractly."""

import dataclasses
import glob
import importlib.util
import json
import os
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest
from helpers import ROOT, metrics_rows, step_config, tiny_config

from monoformer_jax import train
from monoformer_jax.base import sharding
from monoformer_jax.base.errors import UserError
from monoformer_jax.config import schema
from monoformer_jax.nn import clip, converted, model as model_lib
from monoformer_jax.run import settings
from monoformer_jax.tools import bench
from monoformer_jax.training import steps
from monoformer_jax.training.steps import StepKind


# Every runnable config (common.py holds shared pieces, not a config).
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                 if os.path.basename(p) != 'common.py')


def _load(path):
  spec = importlib.util.spec_from_file_location('config_module', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _with_stand_in_paths(config, tmp_path):
  """The config with its input directories (converted LLM, VAE, latents) made to exist; the
  LLM's model.json describes the backbone the config asks for."""
  for section, key in (('model', 'init_from'), ('model', 'vae'), ('data', 'latents_dir'),
                       ('model', 'clip')):
    if config[section][key]:
      config[section][key] = str(tmp_path / key)
      os.makedirs(config[section][key], exist_ok=True)
  if config.model.clip:  # ViT-L/14's shape, as `convert clip` describes it
    (tmp_path / 'clip' / clip.CLIP_JSON).write_text(json.dumps(dataclasses.asdict(
        clip.ClipConfig())))
  if config.model.init_from:
    backbone = dataclasses.replace(settings.build_model(config).backbone,
                                   vocab_size=config.data.tokenizer_vocab_size)
    (tmp_path / 'init_from' / converted.MODEL_JSON).write_text(json.dumps(dict(
        backbone=converted.config_to_json(backbone), tie_embeddings=config.model.tie_embeddings)))
  return config


@pytest.mark.parametrize('process', ['ddpm', 'flow'])
@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_config_loads(path, process, tmp_path):
  """Every config, as written and with diffusion.process 'flow' (its own sampler, no variance
  channels)."""
  module = _load(path)
  config = _with_stand_in_paths(module.get_config(), tmp_path)
  assert config.is_locked
  config.diffusion.process = process
  model = settings.build_model(config)
  checked = settings.validate(config)
  settings.check_inputs(config, checked, model)
  assert checked.sampling.sampler.process.value == process
  assert model.image.out_channels == config.model.image_channels * (
      2 if config.model.learn_sigma and process == 'ddpm' else 1)
  assert 'python -m monoformer_jax' in open(path).read()
  shapes = jax.eval_shape(lambda k: model.init(k, *model_lib.example_inputs(model),
                                               method=model.init_all), jax.random.key(0))
  assert shapes['params']['embed_tokens']['embedding'].value.shape[0] == config.model.vocab_size


REAL = [(path, platform, 'alternate') for path in CONFIGS
        for platform in getattr(_load(path), 'PLATFORMS', {})]
# The official objective with its variants, on the config that trains both kinds.
REAL.append((os.path.join(ROOT, 'configs', 't2i_chat.py'), 'h100x8', 'joint'))


@pytest.mark.slow
@pytest.mark.parametrize('path, platform, objective', REAL,
                         ids=lambda x: os.path.basename(str(x)))
def test_real_config_steps_compile_at_full_size(path, platform, objective, tmp_path):
  """Each step kind the config trains lowers and compiles with abstract full-size inputs;
  'joint' also with two microbatches and the prompts' cross-entropy."""
  config = _with_stand_in_paths(_load(path).get_config(platform), tmp_path)
  if objective == 'joint':
    config.train.objective, config.train.grad_accum, config.train.prompt_lm_loss = 'joint', 2, True
  model = settings.build_model(config)
  tx = steps.make_optimizer(config.optim, config.train.num_steps)
  layout = sharding.make_layout(config.mesh)
  abstract, shardings = steps.abstract_state(model, tx, layout)
  checked = settings.validate(config)
  fns = steps.jit_steps(model, tx, step_config(config, 1), layout, shardings)
  d, m = config.data, config.model
  batches = {
      steps.StepKind.AR: dict(tokens=((d.text_batch_size, d.text_seq_len), jnp.int32),
                              valid=((d.text_batch_size, d.text_seq_len), bool),
                              loss_mask=((d.text_batch_size, d.text_seq_len), bool)),
      steps.StepKind.DIFFUSION: dict(
          tokens=((d.image_batch_size, d.prompt_len), jnp.int32),
          valid=((d.image_batch_size, d.prompt_len), bool),
          image=((d.image_batch_size, *m.image_size, m.image_channels), jnp.float32)),
  }
  u, b, s = model.understanding, d.understanding_batch_size, d.understanding_seq_len
  batches[steps.StepKind.UNDERSTANDING] = dict(
      tokens=((b, s), jnp.int32), valid=((b, s), bool), loss_mask=((b, s), bool),
      slot=((b, s), jnp.int32), offset=((b, s), jnp.int32),
      features=((b, d.images_per_sample, u.tokens_per_image, u.features), jnp.float32))
  batches[steps.StepKind.JOINT] = dict(text=batches[steps.StepKind.AR],
                                       image=batches[steps.StepKind.DIFFUSION])
  weights = {steps.StepKind.AR: config.train.ar_weight,
             steps.StepKind.DIFFUSION: config.train.diffusion_weight, steps.StepKind.JOINT: 1.0,
             steps.StepKind.UNDERSTANDING: config.train.understanding_weight}
  key = jax.eval_shape(lambda: jax.random.key(0))
  compiled = 0
  with sharding.activate(layout):
    for kind, fn in fns.items():
      if weights[kind] == 0:
        continue
      batch = jax.tree.map(lambda v: jax.ShapeDtypeStruct(*v), batches[kind],
                           is_leaf=lambda v: isinstance(v, tuple))
      memory = fn.lower(abstract, batch, key).compile().memory_analysis()
      # The whole state is an argument: 1.1B parameters with AdamW moments and EMA in fp32.
      assert memory.argument_size_in_bytes > 16 * 1.0e9
      compiled += 1
  assert compiled == len([k for k in fns if weights[k]]) >= 1
  assert (steps.StepKind.UNDERSTANDING in fns) == (checked.understanding and objective != 'joint')


def test_unknown_key_is_refused():
  config = schema.base_config()
  with pytest.raises(AttributeError):
    config.train.num_stesp = 3


@pytest.mark.slow
def test_bench_report_has_every_field(tmp_path):
  config = tiny_config()
  config.bench.repeats, config.bench.warmup, config.bench.sample_repeats = 3, 1, 2
  config.bench.sample_images = 2
  config.bench.decode_tokens = 16
  config.bench.decode_batches = (1, 2)
  out = tmp_path / 'bench.json'
  report = bench.run(config, str(out), compare_torch=True)
  assert json.loads(out.read_text()) == report
  assert report['matmul_peak']['flops_per_s'] > 0
  assert set(report['steps']) == {'ar', 'diffusion'}
  for r in report['steps'].values():
    assert r['runs'] == 3 and r['median_ms'] > 0 and r['compile_s'] > 0 and 0 < r['mfu']
    assert r['torch_ms'] > 0 and r['xla_flops'] > 0 and r['program_bytes'] > 0
  s = report['sampling']
  for name in ('compiled', 'compiled_no_prefix_cache', 'python_loop', 'dpmpp_2m_5', 'ddim_5'):
    assert s[f'{name}_images_per_s'] > 0
  # At most the config's 5 steps (20 where the config samples in more).
  assert [(f['sampler'], f['steps']) for f in s['few_steps']] == [('dpmpp_2m', 5), ('ddim', 5)]
  assert 0 < s['mfu'] and s['model_flops_per_run'] > 0
  assert [d['batch'] for d in report['decode']] == [1, 2]
  for d in report['decode']:
    assert d['cached_tokens_per_s'] > 0 and d['recompute_tokens_per_s'] > 0
    assert d['torch_tokens_per_s'] > 0  # transformers' generate, timed beside ours
    assert d['speedup_vs_torch'] == d['cached_tokens_per_s'] / d['torch_tokens_per_s']
  assert report['memory']['host_peak_bytes'] > 2**20


def test_bench_measures_only_the_parts_asked_for():
  config = tiny_config()
  config.bench.repeats, config.bench.warmup = 1, 0
  config.bench.parts = ('joint', 'sampling')  # the joint step whatever train.objective says
  config.bench.sample_images, config.bench.sampler_baselines = 1, False
  config.sample.steps = 2
  report = bench.measure(config)
  assert set(report['steps']) == {'joint'} and 'decode' not in report
  joint, model = report['steps']['joint'], settings.build_model(config)
  tokens = sum(bench.tokens_per_step(config, model, k) for k in (StepKind.AR, StepKind.DIFFUSION))
  assert joint['tokens_per_s'] * joint['median_ms'] / 1e3 == pytest.approx(tokens)
  assert report['sampling']['compiled_images_per_s'] > 0
  assert 'python_loop_images_per_s' not in report['sampling']
  bench.print_table(report)
  # Each process's few-step samplers fit it (bench_sampler takes the process's own at the
  # config's steps first, as above).
  for process, few in bench.FEW_STEPS.items():
    assert {sampler.process for sampler, _ in few} == {process}


@pytest.mark.parametrize('key, value, expected', [
    ('parts', ('ar', 'sampler'), "bench.parts is 'sampler'"),
    ('parts', 'ar', "expected a non-empty tuple of 'ar'"),
    ('decode_batches', (1, 0), 'bench.decode_batches is (1, 0); expected a non-empty tuple'),
])
def test_bench_refuses_bad_parts_and_batches(key, value, expected):
  section = dict(tiny_config().bench) | {key: value}  # a plain dict: any type may come in
  with pytest.raises(UserError, match=re.escape(expected)):
    bench.parts_of(ml_collections.ConfigDict(section))


@pytest.mark.parametrize('kind', [StepKind.AR, StepKind.DIFFUSION])
def test_model_flops_agree_with_xla_cost_analysis(kind):
  """bench's analytic forward FLOPs against XLA's own count of the compiled forward pass.

  XLA also counts norms, softmax, RoPE and activations, which the analytic count leaves
  out; at width 256 those are a few percent, while a missing or doubled term (attention
  is a fifth of these FLOPs, the LM head a tenth) would be off by far more.
  """
  config = tiny_config()
  config.model.size, config.model.vocab_size = 'bench', 2048
  config.model.layer_loop = 'unrolled'  # XLA counts a loop body once, not once per layer
  config.data.text_seq_len = 512  # long enough that attention is a fifth of the FLOPs
  config.model.image_size, config.model.image_channels = (32, 32), 4  # 256 patches
  model = settings.build_model(config)
  params = nn.unbox(jax.eval_shape(lambda: model.init(
      jax.random.key(0), *model_lib.example_inputs(model), method=model.init_all))['params'])
  length = bench.sequence_length(config, model, kind)
  if kind == StepKind.AR:
    batch = 4
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    forward = lambda p, x: model.apply({'params': p}, x, jnp.ones(x.shape, bool),  # noqa: E731
                                       mask_type=model.image_mask).logits
    args = (params, tokens)
  else:
    batch, prompt = 4, config.data.prompt_len
    image = jax.ShapeDtypeStruct((batch, *config.model.image_size, config.model.image_channels),
                                 jnp.float32)
    forward = lambda p, x: model.apply(  # noqa: E731
        {'params': p}, jnp.ones((batch, prompt), jnp.int32), jnp.ones((batch, prompt), bool),
        mask_type=model.image_mask, image=x, t=jnp.full((batch,), 10),
        suffix=jnp.ones((batch, 1), jnp.int32)).image
    args = (params, image)
  costs = jax.jit(forward).lower(*args).compile().cost_analysis()
  costs = costs[0] if isinstance(costs, (list, tuple)) else costs
  analytic = bench.forward_flops(model, params, kind, batch, length, length)
  assert analytic == pytest.approx(float(costs['flops']), rel=0.03)


@pytest.mark.slow
def test_digits_vqa_trains_at_its_own_sizes_in_a_few_steps(tmp_path, tokenizer_file):
  """configs/digits_vqa.py as written (model, batches, questions), a few steps of each kind:
  what the full runs of docs/results.md start from, at the cost of a test (the full runs are not in the
  suite; the evaluator that asks the questions while training is tested at the tiny size)."""
  config = _load(os.path.join(ROOT, 'configs', 'digits_vqa.py')).get_config()
  config.train.num_steps, config.train.eval_at_end = 6, False
  config.train.log_every = 1
  workdir = tmp_path / 'w'
  workdir.mkdir()
  shutil.copy(tokenizer_file, workdir / 'tokenizer.model')
  train.train_and_evaluate(config, str(workdir))
  assert {r['kind'] for r in metrics_rows(str(workdir))} == {'ar', 'understanding', 'diffusion'}
