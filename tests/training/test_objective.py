"""The objectives (alternate, joint), the prompt cross-entropy and gradient accumulation.

Updates are compared after one SGD step of learning rate 0.5 on parameters with signal in
every leaf, so a gradient that differs moves the parameters visibly (AdamW's first step
would be nearly the gradient's sign, which hides most differences).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (image_batches, reading_digits, signal_params, step_config, text_batches,
                     tiny_config)

from monoformer_jax.data import pipeline
from monoformer_jax.data.understanding import Reading, UnderstandingSource
from monoformer_jax.data.vision_input import PictureFormat
from monoformer_jax.nn.layers import MaskType
from monoformer_jax.run import workdir as workdir_lib
from monoformer_jax.training import objective, steps
from monoformer_jax.training.steps import StepKind


TX = optax.chain(optax.clip_by_global_norm(1e6), optax.sgd(0.5))
STEPS = {StepKind.AR: steps.ar_step, StepKind.DIFFUSION: steps.diffusion_step,
         StepKind.JOINT: steps.joint_step, StepKind.UNDERSTANDING: steps.ar_step}


@pytest.fixture(scope='module')
def setting(tmp_path_factory, tokenizer_file):
  """(config, tokenizer, model, params, batches {kind: batch}) on the default's data."""
  workdir = tmp_path_factory.mktemp('objective')
  (workdir / 'tokenizer.model').write_bytes(open(tokenizer_file, 'rb').read())
  config = reading_digits(tiny_config())  # the model also reads digits (an im_embedder)
  config.train.lm_loss_weight, config.train.diffusion_loss_weight = 0.5, 1.0
  setup = workdir_lib.for_training(config, str(workdir))
  setup.lock.close()
  text = {k: np.array(v) for k, v in next(text_batches(config, setup.tok)).items()}
  text['loss_mask'][0, :20] = False  # rows with unequal token counts: pooling matters
  text['loss_mask'][3, :5] = False
  image = next(image_batches(config, setup.tok))
  image.pop('label')
  u = setup.model.understanding
  reads = dict(pipeline.understanding_dataset(
      config.data, UnderstandingSource.DIGITS, setup.tok, 0,
      Reading(u.tokens_per_image, PictureFormat.DIFFUSION, (8, 8, 1)))[0])
  reads['features'] = setup.settings.vision.feature_encoder(setup.layout)(reads.pop('images'),
                                                                         None)
  params = signal_params(setup.model, key=3)
  batches = {StepKind.AR: text, StepKind.DIFFUSION: image, StepKind.UNDERSTANDING: reads,
             StepKind.JOINT: dict(text=text, image=image)}
  return config, setup.tok, setup.model, params, batches


_RUNS = {}  # tests that share a step variant share its result (and its compilation)


def _run(setting, kind, **overrides):
  """(params after one update, metrics) of one step of `kind` with the loss overrides."""
  key = (id(setting), kind, tuple(sorted(overrides.items())))
  if key not in _RUNS:
    _RUNS[key] = _uncached_run(setting, kind, **overrides)
  return _RUNS[key]


def _uncached_run(setting, kind, **overrides):
  config, tok, model, params, batches = setting
  cfg = step_config(config, tok.im_end_id)
  cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, **overrides))
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=TX.init(params), ema_params=params)
  fn = jax.jit(functools.partial(STEPS[kind], model=model, tx=TX, cfg=cfg))
  state, metrics = fn(state, batches[kind], jax.random.key(11))
  return state.params, jax.device_get(metrics)


def _assert_same_params(a, b, initial, rtol):
  """Each leaf of a within rtol of b (relative norms), and b moved well away from initial."""
  moved = []
  for (path, x), y, p in zip(jax.tree.flatten_with_path(a)[0], jax.tree.leaves(b),
                             jax.tree.leaves(initial)):
    x, y, p = np.asarray(x, np.float64), np.asarray(y, np.float64), np.asarray(p, np.float64)
    assert np.linalg.norm(x - y) <= rtol * np.linalg.norm(y), jax.tree_util.keystr(path)
    moved.append(np.linalg.norm(y - p) / np.linalg.norm(p))
  assert max(moved) > 1e-2  # the update itself is far above the tolerance


def test_joint_without_the_lm_term_is_a_diffusion_step(setting):
  joint, metrics = _run(setting, StepKind.JOINT, lm_loss_weight=0.0)
  diffusion, reference = _run(setting, StepKind.DIFFUSION)
  _assert_same_params(joint, diffusion, setting[3], 1e-6)
  assert metrics['diffusion'] == pytest.approx(reference['loss'], rel=1e-6)
  assert metrics['loss'] == pytest.approx(reference['loss'], rel=1e-6)  # weight 1


def test_joint_without_the_diffusion_term_is_an_ar_step(setting):
  joint, metrics = _run(setting, StepKind.JOINT, diffusion_loss_weight=0.0)
  ar, reference = _run(setting, StepKind.AR)
  _assert_same_params(joint, ar, setting[3], 1e-6)
  assert metrics['ce'] == pytest.approx(reference['loss'], rel=1e-6)


@pytest.mark.parametrize('kind', list(StepKind), ids=lambda k: k.value)
def test_two_microbatches_update_as_the_whole_batch(setting, kind):
  whole, metrics = _run(setting, kind, prompt_lm_loss=True)
  accumulated, accumulated_metrics = _run(setting, kind, prompt_lm_loss=True, grad_accum=2)
  _assert_same_params(accumulated, whole, setting[3], 1e-6)
  for name, value in metrics.items():
    assert accumulated_metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name


def test_prompt_cross_entropy_matches_a_hand_computation(setting):
  """The prompts' cross-entropy from the image pass equals log-softmax of a separate text pass
  over the prompts alone (the image mask is causal there), <im_start> included as a target."""
  config, tok, model, params, batches = setting
  image = batches[StepKind.DIFFUSION]
  cfg = step_config(config, tok.im_end_id).loss
  cfg = dataclasses.replace(cfg, prompt_lm_loss=True)
  inputs = objective.image_inputs(jax.tree.map(jnp.asarray, image), jax.random.key(2), cfg)
  _, got = jax.jit(lambda p, x: objective.image_pass(model, p, x, cfg))(params, inputs)

  tokens, valid = image['tokens'], image['valid']
  logits = np.asarray(model.apply({'params': params}, tokens, valid,
                                  mask_type=MaskType.CAUSAL).logits, np.float64)
  log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
      -1, keepdims=True)) - logits.max(-1, keepdims=True)
  want, count = 0.0, 0
  for b in range(tokens.shape[0]):
    real = np.flatnonzero(valid[b])
    assert tokens[b, real[-1]] == tok.im_start_id
    for s, s_next in zip(real[:-1], real[1:]):
      want -= log_probs[b, s, tokens[b, s_next]]
      count += 1
  assert count == int(np.asarray(inputs['weights']).sum())
  assert float(got) == pytest.approx(want, rel=1e-5)


def test_prompt_loss_changes_only_what_it_should(setting):
  """prompt_lm_loss adds a gradient (the update moves differently) but the diffusion
  terms of the same forward pass stay the same."""
  with_prompt, metrics = _run(setting, StepKind.DIFFUSION, prompt_lm_loss=True)
  without, reference = _run(setting, StepKind.DIFFUSION)
  assert metrics['loss'] == pytest.approx(reference['loss'], rel=1e-6)
  assert metrics['ce'] > 0 and 'ce' not in reference
  head = np.asarray(with_prompt['lm_head']['kernel']) - np.asarray(without['lm_head']['kernel'])
  assert np.abs(head).max() > 1e-4


def test_schedule_and_config_choices(setting):
  assert {steps.step_kind(0, s, 1.0, 1.0, joint=True) for s in range(10)} == {StepKind.JOINT}
  config = tiny_config()
  config.train.objective = 'joint'
  assert step_config(config, 2).kinds == (StepKind.JOINT,)
