"""Every config file loads, validates and builds its model abstractly."""

import glob
import json
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from monoformer_jax import config_lib, sharding, steps
from monoformer_jax import model as model_lib

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), '..', 'configs', '*.py')))


def test_there_are_configs():
  assert CONFIGS


def _load(path):
  spec = importlib.util.spec_from_file_location('config_module', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _with_stand_in_paths(config, tmp_path):
  """The config with its input directories (converted LLM, VAE, latents) made to exist."""
  for section, key in (('model', 'init_from'), ('model', 'vae'), ('data', 'latents_dir')):
    if config[section][key]:
      config[section][key] = str(tmp_path / key)
      os.makedirs(config[section][key], exist_ok=True)
  return config


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_config_loads(path, tmp_path):
  module = _load(path)
  config = _with_stand_in_paths(module.get_config(), tmp_path)
  assert config.is_locked
  config_lib.validate(config)
  assert 'python -m monoformer_jax' in open(path).read()
  model = model_lib.build(config.model)
  tx = steps.make_optimizer(config.optim, config.train.num_steps)
  shapes = jax.eval_shape(lambda k: model.init(k, *steps.example_inputs(model),
                                               method=model.init_all), jax.random.key(0))
  assert shapes['params']['embed_tokens']['embedding'].value.shape[0] == config.model.vocab_size
  del tx


REAL = [(path, platform) for path in CONFIGS for platform in getattr(_load(path), 'PLATFORMS', {})]


@pytest.mark.parametrize('path, platform', REAL, ids=lambda x: os.path.basename(str(x)))
def test_real_config_steps_compile_at_full_size(path, platform, tmp_path):
  """Each step kind the config trains lowers and compiles with abstract full-size inputs."""
  config = _with_stand_in_paths(_load(path).get_config(platform), tmp_path)
  config_lib.validate(config)
  model = model_lib.build(config.model)
  tx = steps.make_optimizer(config.optim, config.train.num_steps)
  layout = sharding.make_layout(config.mesh)
  abstract, shardings = steps.abstract_state(model, tx, layout)
  fns = steps.jit_steps(model, tx, steps.StepConfig.from_config(config, 1), layout, shardings)
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
  weights = {steps.StepKind.AR: config.train.ar_weight,
             steps.StepKind.DIFFUSION: config.train.diffusion_weight}
  key = jax.eval_shape(lambda: jax.random.key(0))
  compiled = 0
  with sharding.activate(layout):
    for kind, fn in fns.items():
      if weights[kind] == 0:
        continue
      batch = {k: jax.ShapeDtypeStruct(*v) for k, v in batches[kind].items()}
      memory = fn.lower(abstract, batch, key).compile().memory_analysis()
      # The whole state is an argument: 1.1B parameters with AdamW moments and EMA in fp32.
      assert memory.argument_size_in_bytes > 16 * 1.0e9
      compiled += 1
  assert compiled


def test_unknown_key_is_refused():
  config = config_lib.base_config()
  with pytest.raises(AttributeError):
    config.train.num_stesp = 3


def test_bench_report_has_every_field(tmp_path):
  from monoformer_jax import bench  # pylint: disable=g-import-not-at-top
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.bench.repeats = 5
  config.bench.sample_images = 2
  config.bench.decode_tokens = 16
  out = tmp_path / 'bench.json'
  report = bench.run(config, str(out), compare_torch=True)
  assert json.loads(out.read_text()) == report
  assert report['matmul_peak']['flops_per_s'] > 0
  assert set(report['steps']) == {'ar', 'diffusion'}
  for r in report['steps'].values():
    assert r['runs'] == 5 and r['median_ms'] > 0 and r['compile_s'] > 0
    assert r['flops_per_s'] == pytest.approx(r['model_flops'] / (r['median_ms'] / 1e3))
    assert r['mfu'] == pytest.approx(r['flops_per_s'] / report['matmul_peak']['flops_per_s'])
    assert r['torch_ms'] > 0 and r['speedup_vs_torch'] == pytest.approx(r['torch_ms'] / r['median_ms'])
    assert r['xla_flops'] > 0 and r['program_bytes'] > 0
  s = report['sampling']
  for name in ('compiled', 'compiled_no_prefix_cache', 'python_loop'):
    assert s[f'{name}_images_per_s'] > 0
  assert 0 < s['mfu'] and s['model_flops_per_run'] > 0
  assert report['decode']['cached_tokens_per_s'] > 0 and report['decode']['recompute_tokens_per_s'] > 0
  assert report['memory']['host_peak_bytes'] > 2**20


def test_step_flops_closed_form():
  """6 x matmul parameters x tokens + 12 L B T^2 D, counted by hand for the tiny shape."""
  from monoformer_jax import bench, steps  # pylint: disable=g-import-not-at-top
  from monoformer_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config()  # D 32, L 2, H 4, K 2 (E 8), F 64, V 1024, 8x8x1 images, patch 2
  params = jax.eval_shape(lambda: model_lib.build(config.model).init(
      jax.random.key(0), *steps.example_inputs(model_lib.build(config.model)),
      method=model_lib.MonoFormer.init_all))['params']
  params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), nn.unbox(params))
  decoder = 2 * (32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64)
  ar_tokens, ar_len = 4 * 32, 32
  expected_ar = 6 * (decoder + 32 * 1024) * ar_tokens + 12 * 2 * 4 * ar_len**2 * 32
  assert bench.step_flops(config, params, steps.StepKind.AR) == expected_ar
  patches, img_len = 16, 12 + 1 + 16 + 1
  per_patch = 4 * 32 + 32 * 8  # x_embedder, final linear (4 sigma+eps channels per patch)
  per_image = (256 * 32 + 32 * 32) + 2 * 32 * 32 + 32 * 64  # t_embedder, t_projector, adaLN
  expected_diffusion = (6 * (decoder * 8 * img_len + per_patch * 8 * patches + per_image * 8)
                        + 12 * 2 * 8 * img_len**2 * 32)
  assert bench.step_flops(config, params, steps.StepKind.DIFFUSION) == expected_diffusion
