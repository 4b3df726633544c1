"""A config checked once and its string choices parsed into their owners' types.

`validate(config)` needs nothing but the config: inference commands run it on
the config saved in a workdir, wherever that workdir now is. `check_inputs`
adds what only training reads: the files and directories the config names.
"""

import dataclasses
import os
from typing import Any

import ml_collections

from monoformer_jax import config_lib
from monoformer_jax import model as model_lib
from monoformer_jax.data.pipeline import ImageSource, LatentsSource, TextSource
from monoformer_jax.errors import UserError
from monoformer_jax.sampling import ImageSampling


@dataclasses.dataclass(frozen=True)
class Settings:
  """The typed choices of a validated config."""
  model: model_lib.MonoFormer  # its enums (mask, remat, layer loop, attention) parsed
  sampling: ImageSampling  # the config's sampler, guidance and step count
  image_source: ImageSource
  text_source: TextSource
  latents_source: LatentsSource


def _positive(config: ml_collections.ConfigDict, *keys: str) -> None:
  for key in keys:
    value: Any = config
    for part in key.split('.'):
      value = value[part]
    if not value > 0:
      raise UserError(f'config key {key} is {value!r}; expected a positive number.')


def validate(config: ml_collections.ConfigDict) -> Settings:
  """The config's Settings; a UserError naming the first key that cannot work."""
  model = model_lib.build(config.model)
  image_source = config_lib.choice(ImageSource, config.data.image_source, 'data.image_source')
  settings = Settings(
      model=model,
      sampling=ImageSampling.from_config(config.sample, config.diffusion.num_timesteps),
      image_source=image_source,
      text_source=config_lib.choice(TextSource, config.data.text_source, 'data.text_source'),
      latents_source=config_lib.choice(LatentsSource, config.data.latents_source,
                                       'data.latents_source'))
  if image_source.pixels and not config.model.vae:  # pixel-space diffusion
    pixels = (config.data.image_resolution,) * 2 + (3,)
    if tuple(config.model.image_size) + (config.model.image_channels,) != pixels:
      raise UserError(f'config keys model.image_size {tuple(config.model.image_size)} and '
                      f'model.image_channels {config.model.image_channels} do not match the '
                      f'pixels {pixels} (data.image_resolution); pixel-space diffusion needs them equal.')
  if image_source != ImageSource.DIGITS and config.train.eval_at_end:
    raise UserError('config key train.eval_at_end needs data.image_source \'digits\' (its '
                    'classifier); set it to False and measure FID on `sample` files instead.')
  if config.train.loss_chunk < 0:
    raise UserError(f'config key train.loss_chunk is {config.train.loss_chunk}; expected 0 '
                    '(no chunking) or a positive token count.')
  _positive(config, 'data.prompt_len', 'data.text_seq_len', 'data.image_batch_size',
            'data.text_batch_size', 'model.vocab_size', 'model.patch_size',
            'train.num_steps', 'train.log_every', 'train.checkpoint_every',
            'sample.steps', 'diffusion.num_timesteps', 'optim.learning_rate',
            'bench.repeats', 'bench.sample_repeats', 'bench.sample_images', 'bench.decode_batch',
            'bench.decode_tokens', 'data.image_resolution', 'data.latents_shard_size')
  if config.data.tokenizer_vocab_size > config.model.vocab_size:
    raise UserError(f'config key data.tokenizer_vocab_size ({config.data.tokenizer_vocab_size}) '
                    f'exceeds model.vocab_size ({config.model.vocab_size}).')
  height, width = config.model.image_size
  p = config.model.patch_size
  if height % p or width % p:
    raise UserError(f'config key model.image_size {tuple(config.model.image_size)} is not '
                    f'divisible by model.patch_size {p}.')
  if config.sample.steps > config.diffusion.num_timesteps:
    raise UserError(f'config key sample.steps ({config.sample.steps}) exceeds '
                    f'diffusion.num_timesteps ({config.diffusion.num_timesteps}).')
  if min(config.train.ar_weight, config.train.diffusion_weight) < 0 or (
      config.train.ar_weight + config.train.diffusion_weight <= 0):
    raise UserError('config keys train.ar_weight and train.diffusion_weight must be '
                    'non-negative with a positive sum.')
  if not 0.0 <= config.train.ema_decay < 1.0:
    raise UserError(f'config key train.ema_decay is {config.train.ema_decay}; expected [0, 1).')
  for template in config.data.templates:
    if '{name}' not in template:
      raise UserError(f'config key data.templates has {template!r}; every template needs {{name}}.')
  if config.eval.prompt_template not in config.data.templates:
    raise UserError(f'config key eval.prompt_template {config.eval.prompt_template!r} is not one '
                    'of data.templates.')
  return settings


def check_inputs(config: ml_collections.ConfigDict, settings: Settings) -> None:
  """The files and directories training reads exist (a UserError naming the first that does not)."""
  for key, value, is_there in (('data.text_file', config.data.text_file, os.path.isfile),
                               ('model.init_from', config.model.init_from, os.path.isdir),
                               ('model.vae', config.model.vae, os.path.isdir)):
    if value and not is_there(value):
      raise UserError(f'config key {key} names {value}, which does not exist.')
  if settings.image_source == ImageSource.LATENTS and not os.path.isdir(config.data.latents_dir):
    raise UserError(f'config key data.latents_dir ({config.data.latents_dir!r}) is not a '
                    'directory; expected the output of `extract_latents`.')
