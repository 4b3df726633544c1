"""Opening a workdir: what training sets up in it, and what inference reads back.

Inference needs nothing but the workdir (and the VAE where latents are decoded
to pixels): the config comes from the newest checkpoint and is only validated,
never checked against the training inputs it names, which may be gone.
"""

import dataclasses
import os
from typing import Any

import ml_collections
import optax

from monoformer_jax import checkpoint, settings as settings_lib, sharding, steps
from monoformer_jax import tokenizer as tokenizer_lib
from monoformer_jax.data import pipeline
from monoformer_jax.errors import UserError
from monoformer_jax.model import MonoFormer


@dataclasses.dataclass(frozen=True)
class Setup:
  """What every command builds from a config."""
  config: ml_collections.ConfigDict
  settings: settings_lib.Settings
  tok: tokenizer_lib.Tokenizer
  tx: optax.GradientTransformation
  layout: sharding.Layout

  @property
  def model(self) -> MonoFormer:
    return self.settings.model


def _setup(config, settings, tok) -> Setup:
  if tok.vocab_size > config.model.vocab_size:
    raise UserError(f'the tokenizer {tok.path} has {tok.vocab_size} pieces; config key '
                    f'model.vocab_size is only {config.model.vocab_size}.')
  return Setup(config, settings, tok, steps.make_optimizer(config.optim, config.train.num_steps),
               sharding.make_layout(config.mesh))


def for_training(config: ml_collections.ConfigDict, workdir: str) -> Setup:
  """Checks the config and its inputs, then creates the workdir and its tokenizer."""
  settings = settings_lib.validate(config)
  settings_lib.check_inputs(config, settings)
  os.makedirs(workdir, exist_ok=True)
  tok = tokenizer_lib.for_workdir(workdir, config.model.init_from,
                                  config.data.tokenizer_vocab_size,
                                  lambda: pipeline.tokenizer_texts(config.data))
  return _setup(config, settings, tok)


@dataclasses.dataclass(frozen=True)
class Restored:
  """A workdir's newest checkpoint, ready for inference."""
  setup: Setup
  params: Any  # the EMA or the raw parameters, placed on setup.layout's mesh
  step: int


def for_inference(workdir: str, use_ema: bool) -> Restored:
  """The setup saved in the workdir's newest checkpoint, and its EMA or raw parameters."""
  ckpt, step = checkpoint.open_existing(workdir)
  config = ckpt.restore_config(step)
  tok = tokenizer_lib.Tokenizer(os.path.join(workdir, tokenizer_lib.MODEL_FILE))
  setup = _setup(config, settings_lib.validate(config), tok)
  abstract, _ = steps.abstract_state(setup.model, setup.tx, setup.layout)
  state, _ = ckpt.restore(step, abstract)
  ckpt.close()
  return Restored(setup, state.ema_params if use_ema else state.params, step)
