"""train.finetune: LoRA adapters (qwix) and the frozen backbone, on a small converted LLM."""

import dataclasses
import functools
import os
import shutil

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from helpers import metrics_rows, tiny_config
from transformers import AutoModelForCausalLM

from monoformer_jax import train
from monoformer_jax.base import sharding
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
  config.lora.block_size = 8  # nf4 blocks the tiny shape's inputs (32, 8, 64) divide into
  return backbone.resolve_auto(config)


def _flat(tree) -> dict:
  return flax.traverse_util.flatten_dict(jax.device_get(tree), sep='/')


def _init(model) -> dict:
  """The model's parameters from key 0, compiled (an eager init of the scanned blocks is slower)."""
  return nn.unbox(jax.jit(model_lib.init_params, static_argnums=0)(model, jax.random.key(0)))


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
  with sharding.activate(sharding.make_layout(config.mesh)):  # as the evaluation's ceiling does
    inside = jax.eval_shape(functools.partial(model_lib.init_params, adapted), jax.random.key(0))
  params = _init(adapted)
  assert jax.tree.map(lambda a: a.shape, nn.unbox(inside)) == jax.tree.map(np.shape, params)
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

  # lora.dropout: only the train steps' model drops the adapters' inputs, by its 'dropout' key.
  config.lora.dropout = 0.5
  for got, want in zip(_outputs(settings.build_model(config), moved), ours):
    np.testing.assert_array_equal(got, want)
  dropping = settings.build_model(config, training=True)
  tokens = jnp.array([[3, 17, 42, 99, 7, 250]])
  dropped = lambda seed: np.asarray(dropping.apply(  # noqa: E731
      {'params': moved}, tokens, jnp.ones(tokens.shape, bool), mask_type=MaskType.CAUSAL,
      rngs={'dropout': jax.random.key(seed)}).logits)
  np.testing.assert_array_equal(dropped(0), dropped(0))
  assert np.abs(dropped(0) - dropped(1)).max() > 1e-3 * np.abs(ours[0]).max()
  assert np.abs(dropped(0) - ours[0]).max() > 1e-3 * np.abs(ours[0]).max()


def test_adapters_keep_the_compute_dtype(tiny_llm):
  """qwix adds its float32 adapters' product in float32; a bfloat16 model stays bfloat16 (the
  scanned blocks' carry must keep its dtype; qlora's projections cast at the same line)."""
  config = finetune_config(tiny_llm, 'lora')
  config.model.dtype = 'bfloat16'
  model = settings.build_model(config)
  params = _init(model)
  text, image = _outputs(model, params)
  assert text.dtype == np.float32 and np.isfinite(text).all() and np.isfinite(image).all()


def test_remat_recomputes_the_adapters_up_projections(tiny_llm):
  """Under remat 'dots' the adapters' [tokens, r] x [r, out] products are recomputed, not kept
  ([tokens, out] float32 each): the same gradients, that much less memory."""
  config = finetune_config(tiny_llm, 'lora')
  config.model.remat = 'dots'
  model = settings.build_model(config)
  keeping = model.clone(backbone=dataclasses.replace(model.backbone, adapter_rank=0))
  params = _init(model)
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.1 if 'lora_b' in jax.tree_util.keystr(p) else v, params)
  tokens = jnp.arange(512).reshape(2, 256) % 500

  def grads_and_temporaries(m):
    f = lambda p: m.apply({'params': p}, tokens, jnp.ones(tokens.shape, bool),  # noqa: E731
                          mask_type=MaskType.CAUSAL).logits.sum()
    grad = jax.jit(jax.grad(f))
    return grad(params), grad.lower(params).compile().memory_analysis().temp_size_in_bytes

  (ours, ours_bytes), (theirs, theirs_bytes) = map(grads_and_temporaries, (model, keeping))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ours, theirs)
  outputs = sum(b.shape[0] * b.shape[-1]  # L x out of every adapted projection
                for p, b in _flat(params).items() if p.endswith('lora_b'))
  assert theirs_bytes - ours_bytes >= 0.5 * tokens.size * outputs * 4, (theirs_bytes, ours_bytes)


def test_a_bfloat16_frozen_backbone_computes_as_its_rounded_weights(tiny_llm):
  config = finetune_config(tiny_llm, 'lora')
  config.train.frozen_dtype = 'bfloat16'
  setup = workdir_lib.Setup(config, settings.validate(config), settings.build_model(config),
                            None, sharding.make_layout(config.mesh))
  spec, setup = setup.settings.finetune, workdir_lib.with_frozen_backbone(setup)
  assert {v.dtype for v in jax.tree.leaves(setup.frozen)} == {jnp.dtype(jnp.bfloat16)}
  trainable = spec.split(_init(setup.model))[0]
  rounded = jax.tree.map(lambda v: v.astype(jnp.bfloat16).astype(jnp.float32), setup.frozen)
  for got, want in zip(_outputs(setup.model, setup.whole(trainable)),
                       _outputs(setup.model, finetune.merge(trainable, rounded))):
    np.testing.assert_array_equal(got, want)
  config.train.frozen_dtype = 'int8'
  with pytest.raises(UserError, match=r"train\.frozen_dtype is 'int8'; expected one of "
                                      r"'float32', 'bfloat16'\."):
    settings.validate(config)


@pytest.mark.parametrize('quantize,block', [('nf4', 8), ('int8', 0)])
def test_qlora_computes_with_the_dequantized_base(tiny_llm, quantize, block):
  config = finetune_config(tiny_llm, 'qlora')
  config.lora.update(quantize=quantize, block_size=block)
  setup = workdir_lib.Setup(config, settings.validate(config), settings.build_model(config),
                            None, sharding.make_layout(config.mesh))
  spec, setup = setup.settings.finetune, workdir_lib.with_frozen_backbone(setup)
  stored = _flat(setup.frozen)
  assert {np.dtype(v.array.qvalue.dtype).itemsize for k, v in stored.items()
          if finetune.is_quantized(v)} == {1}  # int8, or 4-bit values (a byte each on CPU)
  key = iter(jax.random.split(jax.random.key(3), 64))
  trained = jax.tree.map(  # adapters as training leaves them: B no longer zero
      lambda v: v + 0.05 * jax.random.normal(next(key), v.shape),
      spec.split(_init(setup.model))[0])
  dequantized = {k: finetune.dequantized(v) if finetune.is_quantized(v) else v
                 for k, v in stored.items()}
  float_model = settings.build_model(config, spec.unquantized())
  float_params = finetune.merge(trained, flax.traverse_util.unflatten_dict(
      {tuple(k.split('/')): v for k, v in dequantized.items()}))
  source = _flat(workdir_lib.for_converted_llm(tiny_llm).params)
  for k in (k for k in dequantized if 'proj' in k):  # the kernels really are stored quantized
    assert np.abs(dequantized[k] - source[k]).max() > 1e-3 * np.abs(source[k]).max(), k
  for got, want in zip(_outputs(setup.model, setup.whole(trained)),
                       _outputs(float_model, float_params)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['lora', 'qlora', 'frozen_text'])
def test_only_what_trains_moves_has_optimizer_state_and_resumes(tiny_llm, tmp_path, mode):
  llm = str(tmp_path / 'llm')  # a copy, changed at the end
  shutil.copytree(tiny_llm, llm)
  # qlora's checkpoints hold the (nf4) frozen backbone (train.checkpoint_frozen); the others'
  # read it from the LLM at every start.
  held = mode == 'qlora'
  config, first = (finetune_config(llm, mode, num_steps=n, checkpoint_frozen=held) for n in (2, 1))
  config.lora.dropout = first.lora.dropout = 0.5  # the adapters' draws resume as they went on
  workdir, resumed = str(tmp_path / 'work'), str(tmp_path / 'resumed')
  train.train_and_evaluate(config, workdir)
  train.train_and_evaluate(first, resumed)
  if held:  # the LLM's weights gone: the checkpoint's are read
    shutil.rmtree(os.path.join(llm, 'params'))
  train.train_and_evaluate(config, resumed)  # from step 1, the frozen backbone read again
  assert metrics_rows(resumed) == metrics_rows(workdir)
  if held:  # sampling and every export need none of the LLM
    shutil.rmtree(llm)
  jax.tree.map(np.testing.assert_array_equal,
               workdir_lib.for_inference(resumed, use_ema=True).params,
               workdir_lib.for_inference(workdir, use_ema=True).params)
  source = _flat(workdir_lib.for_converted_llm(tiny_llm).params)
  restored = workdir_lib.for_inference(workdir, use_ema=False)
  trained = _flat(restored.params)
  for path, value in source.items():  # the backbone: bit for bit the converted LLM's
    if finetune.is_quantized(trained[path]):  # qlora: as quantized from it
      value = finetune.quantized_like(value, trained[path])
    jax.tree.map(lambda got, want: np.testing.assert_array_equal(
        np.asarray(got, np.float32), np.asarray(want, np.float32), err_msg=path),
        trained[path], value)
  assert np.abs(trained['x_embedder/kernel']).max() > 0  # MonoFormer's own modules trained
  adapters = sorted(p for p in trained if 'lora' in p)
  if mode != 'frozen_text':
    assert len(adapters) == 14 and np.abs(trained[
        'decoder/layers/self_attn/q_proj/kernel_lora_b']).max() > 0  # B left zero
  else:
    assert not adapters

  _check_exports(tiny_llm, workdir, restored, mode, tmp_path)
  spec, setup = restored.setup.settings.finetune, restored.setup
  tx = steps.make_optimizer(config.optim, config.train.num_steps)
  state, _ = steps.abstract_state(setup.model, tx, setup.layout, spec)
  moments = _flat(state.opt_state[1][0].mu)
  assert set(moments) == set(_flat(spec.split(restored.params)[0]))
  assert not set(moments) & set(source)  # no moment of a frozen parameter

  if mode != 'frozen_text':  # the check below is the modes' shared code: once is enough
    return
  # The converted LLM the backbone is read from, converted again from a changed model: refused.
  hf = os.path.join(os.path.dirname(tiny_llm), 'hf')
  changed = AutoModelForCausalLM.from_pretrained(hf)
  with torch.no_grad():
    changed.model.norm.weight.mul_(1.5)
  changed.save_pretrained(tmp_path / 'changed')
  for name in set(os.listdir(hf)) - set(os.listdir(tmp_path / 'changed')):  # its tokenizer
    shutil.copy(os.path.join(hf, name), tmp_path / 'changed')
  shutil.rmtree(llm)
  commands.run('hf', str(tmp_path / 'changed'), llm)
  message = rf'the converted LLM {llm} has changed since the checkpoints of {workdir} were trained'
  for run in (lambda: workdir_lib.for_inference(workdir, use_ema=True),
              lambda: train.train_and_evaluate(finetune_config(llm, mode, num_steps=3), workdir),
              lambda: commands.run('export-llama', workdir, str(tmp_path / 'again'))):
    with pytest.raises(UserError, match=message):
      run()


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def _check_exports(llm: str, workdir: str, restored, mode: str, tmp_path) -> None:
  """export-llama writes the merged weights (transformers computes our text logits from them);
  export-peft writes the adapters, which peft adds to the HF LLM the run started from."""
  tokens = np.array([[1, 17, 42, 99, 7, 250, 311, 5]])
  ours = np.asarray(restored.setup.model.apply(
      {'params': restored.params}, tokens, np.ones(tokens.shape, bool),
      mask_type=MaskType.CAUSAL).logits)
  close = lambda got, want: np.testing.assert_allclose(  # noqa: E731
      got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  merged = str(tmp_path / 'merged')
  commands.run('export-llama', workdir, merged, ema=False)
  close(_hf_logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32), tokens), ours)

  adapters = str(tmp_path / 'adapters')
  hf_base = os.path.join(os.path.dirname(llm), 'hf')  # the tiny_llm fixture's HF source
  if mode == 'frozen_text':
    with pytest.raises(UserError, match=r"has none \(it was trained with train.finetune "
                                        r"'frozen_text', not 'lora' or 'qlora'\)"):
      commands.run('export-peft', workdir, adapters, ema=False)
    assert not os.path.exists(adapters)
    return
  commands.run('export-peft', workdir, adapters, ema=False)
  base = AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
  plain = _hf_logits(base, tokens)
  adapted = _hf_logits(peft.PeftModel.from_pretrained(base, adapters), tokens)
  assert np.abs(adapted - plain).max() > 1e-3 * np.abs(plain).max()  # the adapters matter
  if mode == 'lora':  # (qlora's were trained on the quantized kernels, not on these)
    close(adapted, ours[..., :plain.shape[-1]])  # the LLM's rows: MonoFormer's come after


def test_bad_finetune_settings_are_one_sentence(tiny_llm):
  cases = (
      (dict(rank=0), r'config key lora\.rank is 0; expected a positive integer\.'),
      (dict(targets='q_proj,qkv'), r"config key lora\.targets is 'q_proj,qkv'; expected a "
                                   r'comma-separated list of q_proj, k_proj'),
      (dict(alpha=0.0), r'config key lora\.alpha is 0\.0; expected a positive number\.'),
      (dict(dropout=1.0), r'config key lora\.dropout is 1\.0; expected a rate in \[0, 1\)\.'),
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
  config.train.finetune, config.train.checkpoint_frozen = 'full', True
  with pytest.raises(UserError, match=r"train\.checkpoint_frozen is True, but train\.finetune "
                                      r"'full' freezes nothing"):
    settings.validate(config)
  config.train.checkpoint_frozen = False
  config.train.finetune = 'adapters'
  with pytest.raises(UserError, match=r"train\.finetune is 'adapters'; expected one of 'full', "
                                      r"'lora', 'qlora', 'frozen_text'\."):
    settings.validate(config)
  # qlora: a storage qwix has no name for; a base whose kernels do not split into the blocks.
  config = finetune_config(tiny_llm, 'qlora')
  config.lora.quantize = 'fp3'
  with pytest.raises(UserError, match=r"config key lora\.quantize is 'fp3'; expected one of "
                                      r"'nf4', 'int4', 'int8'\."):
    settings.validate(config)
  config.lora.quantize, config.lora.block_size = 'nf4', 48
  with pytest.raises(UserError, match=r"lora\.block_size is 48, but the q_proj kernels read the "
                                      r"model's width of 32 inputs, .*the base cannot be "
                                      r'quantized so'):
    settings.build_model(config)
