"""Step kinds learn, the mixture schedule follows its weights, resuming is exact, and the loop
runs its periodic evaluations and profile."""

import os
import shutil

import jax
import numpy as np
import pytest
from helpers import (image_batches, metrics_rows, reading_digits, step_config, text_batches,
                     tiny_config)

from monoformer_jax import train
from monoformer_jax.base import sharding
from monoformer_jax.run import workdir as workdir_lib
from monoformer_jax.training import checkpoint, steps
from monoformer_jax.training.steps import StepKind


def _setup(workdir):
  config = tiny_config()
  setup = workdir_lib.for_training(config, workdir)
  model, tx, mesh = setup.model, setup.tx, setup.layout
  _, shardings = steps.abstract_state(model, tx, mesh)
  state = steps.init_state(model, tx, mesh, jax.random.key(0))
  fns = steps.jit_steps(model, tx, step_config(config, setup.tok.im_end_id), mesh,
                        shardings)
  return config, setup.tok, mesh, state, fns


@pytest.mark.parametrize('kind', [StepKind.AR, StepKind.DIFFUSION])
def test_loss_decreases(workdir, kind):
  """Repeated steps on one batch (same noise and timesteps) must fit it."""
  config, tok, mesh, state, fns = _setup(workdir)
  make = text_batches if kind == StepKind.AR else image_batches
  batch = next(make(config, tok))
  batch.pop('label', None)
  batch = sharding.global_batch(batch, mesh)
  losses = []
  with sharding.activate(mesh):
    for _ in range(40):
      state, metrics = fns[kind](state, batch, jax.random.key(7))
      losses.append(float(metrics['loss']))
  assert np.isfinite(losses).all()
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
  assert int(state.step) == 40


def test_mixture_schedule_follows_weights():
  kinds = [steps.step_kind(3, s, 1.0, 3.0) for s in range(4000)]
  assert abs(kinds.count(StepKind.AR) / 4000 - 0.25) < 0.03
  paper = [steps.step_kind(0, s, 1.0, 9.0) for s in range(20000)]  # JourneyDB : UltraChat
  assert abs(paper.count(StepKind.DIFFUSION) / 20000 - 0.9) < 0.01
  assert kinds == [steps.step_kind(3, s, 1.0, 3.0) for s in range(4000)]
  assert kinds != [steps.step_kind(4, s, 1.0, 3.0) for s in range(4000)]


def test_understanding_steps_join_the_schedule_without_moving_the_others():
  two = [steps.step_kind(3, s, 1.0, 4.0) for s in range(2000)]
  assert two == [steps.step_kind(3, s, 1.0, 4.0, understanding_weight=0.0) for s in range(2000)]
  three = [steps.step_kind(3, s, 1.0, 4.0, understanding_weight=1.5) for s in range(4000)]
  assert abs(three.count(StepKind.UNDERSTANDING) / 4000 - 1.5 / 6.5) < 0.03
  assert abs(three.count(StepKind.AR) / 4000 - 1.0 / 6.5) < 0.03


@pytest.mark.slow
# The alternate DDPM run also takes understanding steps: the two usual kinds, and a third.
@pytest.mark.parametrize('objective,process,reads', [
    ('alternate', 'ddpm', True), ('joint', 'ddpm', True), ('alternate', 'flow', False)])
def test_resume_matches_uninterrupted_run(workdir, tmp_path, tokenizer_file, objective, process,
                                          reads):
  def config(**overrides):
    c = tiny_config(**overrides, objective=objective)
    if objective == 'joint':  # with the official objective's other settings too
      c.train.grad_accum, c.train.prompt_lm_loss = 2, True
    c.diffusion.process = process
    return reading_digits(c) if reads else c

  straight = workdir
  train.train_and_evaluate(config(num_steps=6), straight)

  resumed = str(tmp_path / 'resumed')
  os.makedirs(resumed)
  os.link(tokenizer_file, os.path.join(resumed, 'tokenizer.model'))
  train.train_and_evaluate(config(num_steps=4, checkpoint_every=2), resumed)
  assert [r['step'] for r in metrics_rows(resumed)] == [1, 2, 3, 4]
  train.train_and_evaluate(config(num_steps=6, checkpoint_every=2), resumed)

  a, b = metrics_rows(straight), metrics_rows(resumed)
  assert [r['step'] for r in b] == [1, 2, 3, 4, 5, 6]
  kinds = {'ar', 'diffusion'} | ({'understanding'} if reads else set())
  assert {r['kind'] for r in a} == (kinds if objective == 'alternate' else {'joint'})
  # A flow model learns no variance: no VB term, and the velocity's MSE is the whole loss.
  diffusion_rows = [r for r in a if r['kind'] == 'diffusion']
  assert all(('vb' in r) == (process == 'ddpm') for r in diffusion_rows)
  assert a == b


@pytest.mark.slow
def test_unfinished_save_is_ignored(workdir):
  """A step directory left by a crash mid-save is not mistaken for a checkpoint."""
  train.train_and_evaluate(tiny_config(num_steps=3), workdir)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  partial = os.path.join(ckpt_dir, '9.orbax-checkpoint-tmp-1234')
  shutil.copytree(os.path.join(ckpt_dir, '3'), partial)
  os.remove(os.path.join(partial, '_CHECKPOINT_METADATA'))
  train.train_and_evaluate(tiny_config(num_steps=4), workdir)
  assert [r['step'] for r in metrics_rows(workdir)] == [1, 2, 3, 4]


def test_training_starts_from_a_weights_only_checkpoint(workdir):
  """What a conversion writes (parameters alone) trains with a fresh optimizer state."""
  config = tiny_config(num_steps=2, checkpoint_every=2)
  setup = workdir_lib.for_training(config, workdir)
  setup.lock.close()
  params = jax.device_get(steps.init_state(setup.model, setup.tx, setup.layout,
                                           jax.random.key(5)).params)
  ckpt = checkpoint.Checkpointer(workdir)
  ckpt.save_weights(0, params, config)
  ckpt.close()
  train.train_and_evaluate(config, workdir)
  reader = checkpoint.Checkpointer(workdir, create=False)
  assert reader.all_steps() == [2, 0] and reader.has_optimizer_state(2)
  assert not reader.has_optimizer_state(0)
  reader.close()
  assert [r['step'] for r in metrics_rows(workdir)] == [1, 2]


@pytest.mark.slow
def test_heldout_losses_and_a_profile(workdir):
  config = tiny_config(num_steps=2, eval_every=2, profile_start=1, profile_steps=1)
  train.train_and_evaluate(config, workdir)
  heldout = metrics_rows(workdir, 'heldout')
  assert len(heldout) == 1 and heldout[0]['step'] == 2
  losses = [heldout[0][k] for k in ('text', 'diffusion_q1', 'diffusion_q2', 'diffusion_q3',
                                    'diffusion_q4')]
  assert all(np.isfinite(losses)) and heldout[0]['diffusion_q4'] < heldout[0]['diffusion_q1']
  traces = [f for _, _, names in os.walk(os.path.join(workdir, 'plugins', 'profile'))
            for f in names if f.endswith('.xplane.pb')]
  assert traces
