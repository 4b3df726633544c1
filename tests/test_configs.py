"""Every config file loads, validates and builds its model abstractly."""

import glob
import json
import importlib.util
import os

import jax
import pytest

from monoformer_jax import config_lib, steps
from monoformer_jax import model as model_lib

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), '..', 'configs', '*.py')))


def test_there_are_configs():
  assert CONFIGS


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_config_loads(path):
  spec = importlib.util.spec_from_file_location('config_module', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  assert config.is_locked
  config_lib.validate(config)
  assert 'python -m monoformer_jax' in open(path).read()
  model = model_lib.build(config.model)
  tx = steps.make_optimizer(config.optim, config.train.num_steps)
  shapes = jax.eval_shape(lambda k: model.init(k, *steps.example_inputs(model),
                                               method=model.init_all), jax.random.key(0))
  assert shapes['params']['embed_tokens']['embedding'].value.shape[0] == config.model.vocab_size
  del tx


def test_unknown_key_is_refused():
  config = config_lib.base_config()
  with pytest.raises(AttributeError):
    config.train.num_stesp = 3


def test_bench_reports_both_step_kinds(tmp_path):
  from monoformer_jax import bench  # pylint: disable=g-import-not-at-top
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'bench.json'
  report = bench.run(tiny_config(), str(out))
  assert set(report['steps']) == {'ar', 'diffusion'}
  for r in report['steps'].values():
    assert r['median_ms'] > 0 and r['tokens_per_s'] > 0 and r['runs'] == 20
  assert json.loads(out.read_text()) == report
