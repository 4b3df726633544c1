"""A config checked once and its string choices parsed, each by its owner's enum, once.

`validate(config)` needs nothing but the config: inference commands run it on
the config saved in a workdir, wherever that workdir now is. It builds no network (the
model section is parsed by `nn.model.build`, where a Setup is made). `check_inputs` adds
what only training reads: the files and directories the config names.
"""

import dataclasses
from typing import Optional

import ml_collections

from monoformer_jax import diffusion
from monoformer_jax.base import files
from monoformer_jax.base.errors import UserError
from monoformer_jax.config import schema
from monoformer_jax.data.chat import ChatFormat
from monoformer_jax.data.pipeline import ImageSource, LatentsSource, TextSource
from monoformer_jax.data.understanding import UnderstandingSource
from monoformer_jax.evaluation import text_tasks
from monoformer_jax.generation.sampling import ImageSampling, check_fits
from monoformer_jax.nn import model as model_lib
from monoformer_jax.nn.model import ImageSequence
from monoformer_jax.nn.vision import VisionEncoder, VisionSpec
from monoformer_jax.run import backbone
from monoformer_jax.training.checkpoint import AsyncSaves
from monoformer_jax.training.finetune import FinetuneSpec
from monoformer_jax.training.objective import Objective


@dataclasses.dataclass(frozen=True)
class Settings:
  """The typed choices of a validated config (the model section's are nn.model.build's)."""
  sampling: ImageSampling  # the config's sampler, guidance and step count
  diffusion: diffusion.Training  # the process and how training draws its times
  image_source: ImageSource
  text_source: TextSource
  latents_source: LatentsSource
  async_saves: AsyncSaves
  objective: Objective
  chat_format: ChatFormat
  understanding_source: UnderstandingSource
  vision: VisionSpec
  finetune: FinetuneSpec  # what trains

  @property
  def understanding(self) -> bool:
    """Whether samples that read images are trained."""
    return self.understanding_source != UnderstandingSource.NONE


# Numeric keys and what each must be; a value outside fails with the key named.
_RANGES = (
    (lambda v: v > 0, 'a positive number', (
        'data.prompt_len', 'data.text_seq_len', 'data.image_batch_size', 'data.text_batch_size',
        'data.tokenizer_vocab_size', 'data.image_resolution', 'data.latents_shard_size',
        'model.vocab_size', 'model.patch_size', 'model.image_channels', 'model.rope_theta',
        'model.norm_eps', 'model.context_length', 'diffusion.num_timesteps',
        'optim.learning_rate', 'optim.grad_clip', 'train.num_steps', 'train.log_every',
        'train.checkpoint_every', 'train.keep_checkpoints', 'train.max_skipped_steps',
        'sample.steps', 'eval.samples_per_class', 'train.grad_accum', 'eval.fid_batch',
        'train.fid_num', 'bench.repeats', 'bench.sample_repeats', 'bench.sample_images',
        'bench.decode_tokens')),
    (lambda v: v >= 0, 'zero or more', (
        'seed', 'optim.warmup_steps', 'optim.weight_decay', 'train.ar_weight',
        'train.diffusion_weight', 'train.lm_loss_weight', 'train.diffusion_loss_weight',
        'train.loss_chunk', 'train.checkpoint_minutes', 'train.eval_every', 'train.fid_every',
        'train.text_eval_every', 'eval.task_limit', 'train.profile_start', 'train.profile_steps',
        'sample.cfg_scale', 'eval.text_batches', 'eval.text_questions', 'bench.warmup',
        'train.understanding_weight', 'train.understanding_eval_every')),
    (lambda v: 0 <= v < 1, 'a fraction in [0, 1)', (
        'data.cfg_dropout', 'optim.b1', 'optim.b2', 'train.ema_decay')),
    (lambda v: 0 < v < 1, 'a fraction in (0, 1)', ('data.heldout_fraction',)),
)


def validate(config: ml_collections.ConfigDict) -> Settings:
  """The config's Settings; a UserError naming the first key that cannot work."""
  for within, expected, keys in _RANGES:
    for key in keys:
      if not within(config[key]):  # a dotted key reads through its section
        raise UserError(f'config key {key} is {config[key]!r}; expected {expected}.')
  if len(config.model.image_size) != 2 or min(config.model.image_size) < 1:
    raise UserError(f'config key model.image_size is {tuple(config.model.image_size)}; expected '
                    '(height, width), both positive.')
  image_source = schema.choice(ImageSource, config.data.image_source, 'data.image_source')
  process = diffusion.Training(
      _process(config), config.diffusion.num_timesteps,
      schema.choice(diffusion.FlowTime, config.diffusion.flow_time, 'diffusion.flow_time'))
  settings = Settings(
      sampling=ImageSampling.from_config(config.sample, process),
      diffusion=process,
      image_source=image_source,
      text_source=schema.choice(TextSource, config.data.text_source, 'data.text_source'),
      latents_source=schema.choice(LatentsSource, config.data.latents_source,
                               'data.latents_source'),
      async_saves=schema.choice(AsyncSaves, config.train.async_checkpoints,
                            'train.async_checkpoints'),
      objective=schema.choice(Objective, config.train.objective, 'train.objective'),
      chat_format=schema.choice(ChatFormat, config.data.chat_format, 'data.chat_format'),
      understanding_source=schema.choice(UnderstandingSource, config.data.understanding_source,
                                         'data.understanding_source'),
      vision=VisionSpec.from_config(config),
      finetune=FinetuneSpec.from_config(config))
  _check_understanding(config, settings)
  if image_source.pixels and not config.model.vae:  # pixel-space diffusion
    pixels = (config.data.image_resolution,) * 2 + (3,)
    if tuple(config.model.image_size) + (config.model.image_channels,) != pixels:
      raise UserError(f'config keys model.image_size {tuple(config.model.image_size)} and '
                      f'model.image_channels {config.model.image_channels} do not match the '
                      f'pixels {pixels} (data.image_resolution); pixel-space diffusion needs them equal.')
  if image_source != ImageSource.DIGITS and config.train.eval_at_end:
    raise UserError('config key train.eval_at_end needs data.image_source \'digits\' (its '
                    'classifier); set it to False and measure FID on `sample` files instead.')
  if config.train.eval_every and (image_source != ImageSource.DIGITS or
                                  settings.text_source != TextSource.CORPUS):
    raise UserError('config key train.eval_every needs held-out data, which data.image_source '
                    '\'digits\' and data.text_source \'corpus\' have; set it to 0.')
  if config.train.text_eval_every:
    names = text_tasks.parse(config.eval.tasks, 'config key eval.tasks')
    if 'next_line' in names and (settings.text_source != TextSource.CORPUS or
                                 not config.eval.text_questions):
      raise UserError('config key eval.tasks has next_line, which needs held-out text: '
                      'data.text_source \'corpus\' and eval.text_questions > 0.')
  if (config.train.understanding_eval_every
      and settings.understanding_source != UnderstandingSource.DIGITS):
    raise UserError('config key train.understanding_eval_every asks the held-out digit '
                    'questions, which data.understanding_source \'digits\' has; set it to 0.')
  if config.train.fid_every and image_source == ImageSource.T2I_JSONL:
    raise UserError('config key train.fid_every samples the class prompts, which data.image_source '
                    '\'t2i_jsonl\' lacks; set it to 0 and run evaluate --fid_ref --prompt_file.')
  if config.train.fid_every and not (config.eval.inception and config.eval.fid_ref):
    raise UserError('config key train.fid_every needs eval.inception (a converted Inception) and '
                    'eval.fid_ref (the reference .npz); set them, or set train.fid_every to 0.')
  if config.data.tokenizer_vocab_size > config.model.vocab_size:
    raise UserError(f'config key data.tokenizer_vocab_size ({config.data.tokenizer_vocab_size}) '
                    f'exceeds model.vocab_size ({config.model.vocab_size}).')
  height, width = config.model.image_size
  p = config.model.patch_size
  if height % p or width % p:
    raise UserError(f'config key model.image_size {tuple(config.model.image_size)} is not '
                    f'divisible by model.patch_size {p}.')
  image = ImageSequence(config.data.prompt_len, (height // p) * (width // p))
  longest = max(config.data.text_seq_len, image.length)
  if longest > config.model.context_length:
    raise UserError(f'config key model.context_length ({config.model.context_length}) is shorter '
                    f'than the training sequences ({longest} tokens: data.text_seq_len, or '
                    'data.prompt_len plus the image).')
  if config.sample.steps > config.diffusion.num_timesteps:
    raise UserError(f'config key sample.steps ({config.sample.steps}) exceeds '
                    f'diffusion.num_timesteps ({config.diffusion.num_timesteps}).')
  check_fits(settings.sampling, settings.diffusion.process,
             'config keys sample.sampler and sample.steps')
  if config.train.ar_weight + config.train.diffusion_weight <= 0:
    raise UserError('config keys train.ar_weight and train.diffusion_weight must have a '
                    'positive sum.')
  for key in ('image_batch_size', 'text_batch_size'):
    if config.data[key] % config.train.grad_accum:
      raise UserError(f'config key data.{key} ({config.data[key]}) is not divisible by '
                      f'train.grad_accum ({config.train.grad_accum}), the microbatches per update.')
  for template in config.data.templates:
    if '{name}' not in template:
      raise UserError(f'config key data.templates has {template!r}; every template needs {{name}}.')
  if config.eval.prompt_template not in config.data.templates:
    raise UserError(f'config key eval.prompt_template {config.eval.prompt_template!r} is not one '
                    'of data.templates.')
  return settings


def _check_understanding(config: ml_collections.ConfigDict, settings: Settings) -> None:
  d, t = config.data, config.train
  if settings.image_source == ImageSource.LLAVA_JSON and not settings.vision.reads_images:
    raise UserError('config key data.image_source is \'llava_json\', whose prompts read '
                    'pictures; set model.vision_encoder to \'vae\' or \'clip\'.')
  if settings.understanding and not settings.vision.reads_images:
    raise UserError(f'config key data.understanding_source is {d.understanding_source!r}, whose '
                    'images need a vision encoder; set model.vision_encoder to \'vae\' or '
                    '\'clip\'.')
  vision = settings.vision
  if settings.understanding_source == UnderstandingSource.DIGITS and (
      vision.encoder != VisionEncoder.VAE or vision.vae_dir or vision.image_shape != (8, 8, 1)):
    raise UserError('config key data.understanding_source \'digits\' reads the 8 x 8 digits '
                    'in the diffusion space: it needs model.vision_encoder \'vae\', no '
                    'model.vae, and model.image_size (8, 8) with model.image_channels 1.')
  if settings.understanding and not (t.understanding_weight > 0 or
                                     settings.objective == Objective.JOINT):
    raise UserError(f'config key data.understanding_source is {d.understanding_source!r} but '
                    'train.understanding_weight is 0, so no step would read it; give it a '
                    'positive weight (or use train.objective \'joint\').')
  if t.understanding_weight and not settings.understanding:
    raise UserError(f'config key train.understanding_weight is {t.understanding_weight!r} but '
                    'data.understanding_source is \'none\'; name a source or set the weight '
                    'to 0.')
  for key in ('images_per_sample', 'understanding_seq_len', 'understanding_batch_size'):
    if not d[key] > 0:
      raise UserError(f'config key data.{key} is {d[key]!r}; expected a positive number.')


def _process(config: ml_collections.ConfigDict) -> diffusion.Process:
  return schema.choice(diffusion.Process, config.diffusion.process, 'diffusion.process')


def build_model(config: ml_collections.ConfigDict, finetune: Optional[FinetuneSpec] = None,
                training: bool = False) -> model_lib.MonoFormer:
  """The network of a config: its model section, with variance channels only where the
  diffusion process learns a variance (flow matching learns none), an im_embedder for the
  features of its vision encoder, and LoRA adapters where train.finetune (or `finetune`, in
  its place) asks for them, whose inputs lora.dropout drops only in the train steps' model
  (`training`)."""
  learns_variance = _process(config) == diffusion.Process.DDPM
  model = model_lib.build(config.model, config.model.learn_sigma and learns_variance,
                          VisionSpec.from_config(config).output_shape())
  spec = finetune or FinetuneSpec.from_config(config)
  return (spec if training else spec.without_dropout()).wrap(model)


def check_inputs(config: ml_collections.ConfigDict, settings: Settings,
                 model: model_lib.MonoFormer) -> None:
  """The files and directories training reads exist, and a converted LLM fits the model (a
  UserError naming the first that does not)."""
  for key, value, is_there in (('data.text_file', config.data.text_file, files.isfile),
                               ('model.init_from', config.model.init_from, files.isdir),
                               ('model.vae', config.model.vae, files.isdir),
                               ('eval.inception', config.eval.inception, files.isdir),
                               ('eval.fid_ref', config.eval.fid_ref, files.isfile)):
    if value and not is_there(value):
      raise UserError(f'config key {key} names {value}, which does not exist.')
  if config.model.init_from:
    backbone.check_compatible(config.model.init_from, model.backbone, model.tie_embeddings)
  latents_dir = config.data.latents_dir
  if settings.image_source == ImageSource.LATENTS and not (latents_dir and files.isdir(latents_dir)):
    raise UserError(f'config key data.latents_dir ({latents_dir!r}) is not a '
                    'directory; expected the output of `extract_latents`.')


def draws_latents(config: ml_collections.ConfigDict, settings: Settings) -> bool:
  """Whether the model's images are VAE latents (a converted official model, a latents or
  VAE-encoded source), which only the VAE turns into pictures."""
  return (bool(config.model.vae) or settings.image_source == ImageSource.LATENTS
          or config.model.image_channels not in (1, 3))
