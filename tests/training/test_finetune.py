"""train.finetune: LoRA adapters (qwix) and the frozen backbone, on a small converted LLM."""

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import metrics_rows, tiny_config

from monoformer_jax import train
from monoformer_jax.base.errors import UserError
from monoformer_jax.convert import commands
from monoformer_jax.nn import model as model_lib
from monoformer_jax.nn.layers import MaskType
from monoformer_jax.run import backbone, settings, workdir as workdir_lib
from monoformer_jax.training import finetune, steps


def finetune_config(llm: str, mode: str, **train_overrides):
  config = tiny_config(**train_overrides)
  config.model.size, config.model.init_from = 'auto', llm
  config.data.prompt_len = 32  # the LLM's small tokenizer spells the prompts in many pieces
  config.train.finetune, config.train.eval_at_end = mode, False
  return backbone.resolve_auto(config)


def _flat(tree) -> dict:
  return flax.traverse_util.flatten_dict(jax.device_get(tree), sep='/')


def _outputs(model, params):
  """Text logits and an image prediction: every path through the backbone."""
  tokens = jnp.array([[3, 17, 42, 99, 7, 250]])
  valid = jnp.ones(tokens.shape, bool)
  text = model.apply({'params': params}, tokens, valid, mask_type=MaskType.CAUSAL).logits
  image = jax.random.normal(jax.random.key(1), (1, *model.image.grid, 1)).repeat(2, 1).repeat(2, 2)
  pred = model.apply({'params': params}, tokens, valid, mask_type=MaskType.HYBRID, image=image,
                     t=jnp.array([500])).image
  return np.asarray(text), np.asarray(pred)


def test_adapters_start_at_the_base_and_merge_into_it(tiny_llm):
  config = finetune_config(tiny_llm, 'lora')
  spec = settings.validate(config).finetune
  adapted = settings.build_model(config)
  params = nn.unbox(model_lib.init_params(adapted, jax.random.key(0)))
  trainable, frozen = spec.split(params)
  assert {p.split('/')[-1] for p in _flat(trainable) if p.startswith('decoder')} == {
      'kernel_lora_a', 'kernel_lora_b'}
  assert not any('lora' in p for p in _flat(frozen))
  plain = model_lib.build(config.model, True)  # the same network without adapters
  base = finetune.merged_adapters(params, spec)  # B starts at zero: nothing to fold in
  for ours, theirs in zip(_outputs(adapted, params), _outputs(plain, base)):
    np.testing.assert_array_equal(ours, theirs)

  # Trained adapters (drawn here): the merged kernels compute what the adapters do.
  key = iter(jax.random.split(jax.random.key(2), 64))
  moved = jax.tree_util.tree_map_with_path(
      lambda p, v: 0.05 * jax.random.normal(next(key), v.shape) if 'lora_b' in str(p) else v,
      params)
  ours, merged = _outputs(adapted, moved), _outputs(plain, finetune.merged_adapters(moved, spec))
  assert np.abs(ours[0] - _outputs(plain, base)[0]).max() > 1e-2  # the adapters matter
  for got, want in zip(merged, ours):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['lora', 'frozen_text'])
def test_only_what_trains_moves_has_optimizer_state_and_resumes(tiny_llm, tmp_path, mode):
  config = finetune_config(tiny_llm, mode, num_steps=2)
  workdir, resumed = str(tmp_path / 'work'), str(tmp_path / 'resumed')
  train.train_and_evaluate(config, workdir)
  train.train_and_evaluate(finetune_config(tiny_llm, mode, num_steps=1), resumed)
  train.train_and_evaluate(config, resumed)  # from step 1, the frozen backbone read again
  assert metrics_rows(resumed) == metrics_rows(workdir)
  jax.tree.map(np.testing.assert_array_equal,
               workdir_lib.for_inference(resumed, use_ema=True).params,
               workdir_lib.for_inference(workdir, use_ema=True).params)
  source = _flat(workdir_lib.for_converted_llm(tiny_llm).params)
  restored = workdir_lib.for_inference(workdir, use_ema=False)
  trained = _flat(restored.params)
  for path, value in source.items():  # the backbone: bit for bit the converted LLM's
    np.testing.assert_array_equal(trained[path], value, err_msg=path)
  assert np.abs(trained['x_embedder/kernel']).max() > 0  # MonoFormer's own modules trained
  adapters = sorted(p for p in trained if 'lora' in p)
  if mode == 'lora':
    assert len(adapters) == 14 and np.abs(trained[
        'decoder/layers/self_attn/q_proj/kernel_lora_b']).max() > 0  # B left zero
  else:
    assert not adapters

  with pytest.raises(UserError, match=rf"convert export-llama reads every parameter from the "
                                      rf"checkpoints of .*hold only what train.finetune '{mode}'"):
    commands.run('export-llama', workdir, str(tmp_path / 'exported'))
  spec, setup = restored.setup.settings.finetune, restored.setup
  tx = steps.make_optimizer(config.optim, config.train.num_steps)
  state, _ = steps.abstract_state(setup.model, tx, setup.layout, spec)
  moments = _flat(state.opt_state[1][0].mu)
  assert set(moments) == set(_flat(spec.split(restored.params)[0]))
  assert not set(moments) & set(source)  # no moment of a frozen parameter


def test_bad_finetune_settings_are_one_sentence(tiny_llm):
  cases = (
      (dict(rank=0), r'config key lora\.rank is 0; expected a positive integer\.'),
      (dict(targets='q_proj,qkv'), r"config key lora\.targets is 'q_proj,qkv'; expected a "
                                   r'comma-separated list of q_proj, k_proj'),
      (dict(alpha=0.0), r'config key lora\.alpha is 0\.0; expected a positive number\.'),
      (dict(dropout=0.1), r'config key lora\.dropout is 0\.1; dropout on the adapters is not '),
  )
  for lora, message in cases:
    config = finetune_config(tiny_llm, 'lora')
    config.lora.update(lora)
    with pytest.raises(UserError, match=message):
      settings.validate(config)
  config = tiny_config()
  config.train.finetune = 'lora'
  with pytest.raises(UserError, match=r"train\.finetune is 'lora', which freezes a pretrained "
                                      r'backbone; set model\.init_from'):
    settings.validate(config)
  config.train.finetune = 'adapters'
  with pytest.raises(UserError, match=r"train\.finetune is 'adapters'; expected one of 'full', "
                                      r"'lora', 'frozen_text'\."):
    settings.validate(config)
