"""The evaluations a training run makes every few steps, built from the config: each a name
(its metrics.jsonl kind and TensorBoard prefix), a period in steps and a measure of the train
state. Adding one touches this module only, never the training loop.
"""

import dataclasses
from typing import Any, Callable

import jax

from monoformer_jax.evaluation import (default_eval, fid_eval, fid_samples, text_tasks,
                                       understanding_eval)


@dataclasses.dataclass(frozen=True)
class Periodic:
  name: str
  every: int
  measure: Callable[[Any, int], dict[str, float]]  # (train state, step) -> scalars


def from_config(setup) -> list[Periodic]:
  """What train.eval_every (held-out losses), text_eval_every (the eval.tasks table),
  fid_every (FID-{train.fid_num}) and understanding_eval_every (the held-out digit questions)
  ask for; zero periods ask for nothing."""
  config, t = setup.config, setup.config.train
  found = []
  if t.eval_every:
    found.append(Periodic('heldout', t.eval_every, lambda state, step: (
        default_eval.heldout_losses(setup, setup.whole(state.params)))))
  if t.text_eval_every:
    names, limit = text_tasks.parse(config.eval.tasks), config.eval.task_limit
    found.append(Periodic('text_tasks', t.text_eval_every, lambda state, step: (
        text_tasks.metrics_of(text_tasks.score(setup, setup.whole(state.params), names,
                                               limit)))))
  if t.fid_every:
    found.append(Periodic('fid', t.fid_every, _fid(setup)))
  if t.understanding_eval_every:
    found.append(Periodic('digit_questions', t.understanding_eval_every, lambda state, step: (
        understanding_eval.digit_questions(setup, sampled_params(state, setup)))))
  return found


def sampled_params(state, setup):
  """The whole parameters samples and answers come from: the EMA's (sample.use_ema) or the raw
  ones, with the frozen ones of train.finetune."""
  return setup.whole(state.ema_params if setup.config.sample.use_ema else state.params)


def _fid(setup) -> Callable[[Any, int], dict[str, float]]:
  """FID-{train.fid_num} of the class-prompted samples of the parameters `sample` would use,
  with a key of its own for each step; the reference is encoded at the first call."""
  config = setup.config
  meter = fid_eval.FidMeter(fid_eval.FidSpec(config.eval.fid_ref, config.eval.inception,
                                             config.eval.fid_batch), setup.layout)
  key = jax.random.fold_in(jax.random.key(config.seed), 2**30 + 1)

  def measure(state, step):
    return meter.of_model(setup, sampled_params(state, setup), config.train.fid_num,
                          fid_samples.class_prompts(setup), setup.settings.sampling,
                          jax.random.fold_in(key, step), config.model.vae)
  return measure
