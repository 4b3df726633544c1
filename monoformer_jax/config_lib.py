"""The config schema: every key a config file may set, with its default.

Config files start from `base_config()` (a locked ConfigDict), so a typo in a
file or in a `--config.x.y=` override fails at once instead of being ignored.
`validate` turns the few string-valued choices into enums and checks ranges.
"""

import enum
import os
from typing import Any

import ml_collections

from monoformer_jax.errors import UserError

# Model sizes: (width D, depth L, heads H, kv heads K, mlp F).
SIZES = {
    'tiny': dict(width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64),
    'tiny-mha': dict(width=32, depth=2, num_heads=4, num_kv_heads=4, mlp_dim=64),
    'digits': dict(width=128, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=352),
    'bench': dict(width=256, depth=4, num_heads=4, num_kv_heads=4, mlp_dim=688),
    'tinyllama-1.1b': dict(width=2048, depth=22, num_heads=32, num_kv_heads=4,
                           mlp_dim=5632),
}


class ImageSource(enum.Enum):
  """Where diffusion steps get their images."""
  DIGITS = 'digits'  # scikit-learn's bundled 8x8 digits (the embedded default)
  IMAGENET = 'imagenet'  # TFDS imagenet2012, ADM center crop to data.image_resolution
  LATENTS = 'latents'  # SD-VAE latents of ImageNet from `extract_latents` (data.latents_dir)
  T2I_JSONL = 't2i_jsonl'  # {"image", "prompt"} lines of data.t2i_files


PIXEL_SOURCES = (ImageSource.IMAGENET, ImageSource.T2I_JSONL)


class LatentsSource(enum.Enum):
  """What `extract_latents` encodes."""
  IMAGENET = 'imagenet'  # TFDS imagenet2012 (labels)
  T2I_JSONL = 't2i_jsonl'  # data.t2i_files (prompts)


class TextSource(enum.Enum):
  """Where `ar` steps get their text."""
  CORPUS = 'corpus'  # data.text_file, or the English text bundled with CPython
  CHAT_JSONL = 'chat_jsonl'  # {"messages": [...]} lines of data.chat_files; assistant turns learned


class MaskType(enum.Enum):
  """Attention pattern of a forward pass."""
  CAUSAL = 'causal'
  BIDIRECTIONAL = 'bidirectional'
  HYBRID = 'hybrid'  # causal, plus full attention inside each image span


class Remat(enum.Enum):
  """What a scanned decoder block keeps for the backward pass."""
  NONE = 'none'  # keep every activation
  FULL = 'full'  # keep only the block inputs
  DOTS = 'dots'  # keep matmul outputs without batch dims
  DOTS_WITH_BATCH = 'dots_with_batch'  # keep every matmul output, attention scores included


class LayerLoop(enum.Enum):
  """How the L decoder blocks are compiled; the parameters are stacked either way."""
  SCAN = 'scan'  # one block body in a loop: compile time and code size independent of L
  UNROLLED = 'unrolled'  # L inlined copies: XLA may fuse and schedule across blocks


class AttentionImpl(enum.Enum):
  """How attention runs (jax.nn.dot_product_attention or the splash kernel)."""
  XLA = 'xla'  # any backend, any mask
  CUDNN = 'cudnn'  # NVIDIA GPUs, bf16/fp16 compute (the XLA path on other backends)
  SPLASH = 'splash'  # Pallas splash kernel on TPU for passes of 128k tokens without a cache


class Sampler(enum.Enum):
  DDPM = 'ddpm'
  DDIM = 'ddim'


class GuidanceChannels(enum.Enum):
  ALL = 'all'  # guide every eps channel
  FIRST_THREE = 'first_three'  # the official code's default, for parity


def base_config() -> ml_collections.ConfigDict:
  """Every key with a default; config files override what they need."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.text_file = ''  # '' = the English text bundled with CPython
  c.data.image_source = 'digits'
  c.data.text_source = 'corpus'
  c.data.chat_files = ''  # chat_jsonl: a glob of JSONL files
  c.data.t2i_files = ''  # t2i_jsonl: a glob of JSONL files
  c.data.skip_bad_records = False  # skip (and count) unusable JSONL lines and images
  c.data.tfds_data_dir = ''  # '' = TFDS's default (~/tensorflow_datasets)
  c.data.imagenet_manual_dir = ''  # the ILSVRC2012 tars, to prepare imagenet2012 once
  c.data.image_resolution = 256  # ImageNet pixels per side after the center crop
  c.data.random_flip = True  # ImageNet: horizontal flips
  c.data.latents_dir = ''  # latents source: the output of `extract_latents`
  c.data.latents_source = 'imagenet'  # what extract_latents encodes: 'imagenet' or 't2i_jsonl'
  c.data.latents_shard_size = 10000  # extract_latents: records per ArrayRecord shard
  c.data.latents_from_posterior = True  # sample z from N(mean, std^2); False: the mean
  c.data.tokenizer_vocab_size = 1024
  c.data.prompt_len = 16  # tokens before the time token, left-padded
  c.data.text_seq_len = 64
  c.data.image_batch_size = 64
  c.data.text_batch_size = 32
  c.data.heldout_fraction = 0.15
  c.data.cfg_dropout = 0.1
  c.data.templates = ('a handwritten digit {name}', '{name}',
                      'an image of the digit {name}.',
                      'Please draw the number {name}.')

  c.model = ml_collections.ConfigDict()
  c.model.size = 'digits'
  c.model.init_from = ''  # a converted LLM directory (convert llama) for the backbone
  c.model.vae = ''  # a converted VAE directory (convert vae); '' = diffusion in pixel space
  c.model.vocab_size = 1024
  c.model.rope_theta = 10000.0
  c.model.norm_eps = 1e-6
  c.model.tie_embeddings = False
  c.model.patch_size = 2
  c.model.image_size = (8, 8)  # (H, W) of the diffused array
  c.model.image_channels = 1
  c.model.learn_sigma = True
  c.model.use_pos_embed = True
  c.model.image_mask = 'hybrid'
  c.model.dtype = 'float32'  # compute
  c.model.param_dtype = 'float32'
  c.model.remat = 'none'
  c.model.layer_loop = 'scan'  # 'scan': one compiled block looped; 'unrolled': L copies
  c.model.attention = 'xla'  # 'cudnn' on NVIDIA GPUs (bf16/fp16); 'splash' on TPU

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.num_timesteps = 1000

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-4
  c.optim.warmup_steps = 0
  c.optim.cosine_decay = False
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.grad_clip = 2.0

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1000
  c.train.ar_weight = 1.0  # how often a step is an AR step ...
  c.train.diffusion_weight = 1.0  # ... or a diffusion step
  c.train.lm_loss_weight = 0.01
  c.train.diffusion_loss_weight = 1.0
  c.train.ema_decay = 0.9999
  c.train.log_every = 50
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 2
  c.train.eval_at_end = True
  c.train.loss_chunk = 512  # tokens per cross-entropy chunk (bounds the fp32 logits); 0 = all

  c.sample = ml_collections.ConfigDict()
  c.sample.sampler = 'ddpm'
  c.sample.steps = 250
  c.sample.cfg_scale = 1.5
  c.sample.guidance_channels = 'all'
  c.sample.use_ema = True

  c.eval = ml_collections.ConfigDict()
  c.eval.samples_per_class = 20
  c.eval.prompt_template = 'a handwritten digit {name}'  # one of data.templates
  c.eval.text_batches = 8

  c.bench = ml_collections.ConfigDict()
  c.bench.repeats = 20  # timed runs per train step (the median is reported)
  c.bench.warmup = 3
  c.bench.sample_repeats = 5  # timed runs of the sampler and of decoding
  c.bench.sample_images = 16  # DDPM with CFG, sample.steps steps
  c.bench.decode_batch = 1
  c.bench.decode_tokens = 256

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1 takes the devices the other axes leave (within a slice)
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.dcn_data = 1  # slices (multi-slice TPU): each axis is dcn_x * x devices long
  c.mesh.dcn_fsdp = 1
  c.mesh.dcn_tensor = 1
  # Logical axis -> mesh axes (a name, a tuple of names, or None for replicated).
  c.mesh.rules = (
      ('batch', ('data', 'fsdp')),
      ('length', None),
      ('embed', 'fsdp'),
      ('heads', 'tensor'),
      ('kv_heads', 'tensor'),
      ('head_dim', None),
      ('mlp', 'tensor'),
      ('vocab', 'tensor'),
      ('layers', None),
  )
  c.lock()
  return c


def _enum(kind: type[enum.Enum], value: str, key: str) -> enum.Enum:
  try:
    return kind(value)
  except ValueError:
    choices = ', '.join(repr(m.value) for m in kind)
    raise UserError(f'config key {key} is {value!r}; expected one of {choices}.') from None


def _positive(config: ml_collections.ConfigDict, *keys: str) -> None:
  for key in keys:
    value: Any = config
    for part in key.split('.'):
      value = value[part]
    if not value > 0:
      raise UserError(f'config key {key} is {value!r}; expected a positive number.')


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises UserError naming the first key that cannot work."""
  if config.data.text_file and not os.path.isfile(config.data.text_file):
    raise UserError(f'config key data.text_file names {config.data.text_file}, which does not exist.')
  if config.model.init_from and not os.path.isdir(config.model.init_from):
    raise UserError(f'config key model.init_from names {config.model.init_from}, which does not exist.')
  if config.model.vae and not os.path.isdir(config.model.vae):
    raise UserError(f'config key model.vae names {config.model.vae}, which does not exist.')
  if config.model.size not in SIZES:
    raise UserError(f'config key model.size is {config.model.size!r}; expected one of '
                    f'{", ".join(sorted(SIZES))}.')
  _enum(MaskType, config.model.image_mask, 'model.image_mask')
  source = _enum(ImageSource, config.data.image_source, 'data.image_source')
  _enum(TextSource, config.data.text_source, 'data.text_source')
  _enum(LatentsSource, config.data.latents_source, 'data.latents_source')
  if source in PIXEL_SOURCES and not config.model.vae:  # pixel-space diffusion
    pixels = (config.data.image_resolution,) * 2 + (3,)
    if tuple(config.model.image_size) + (config.model.image_channels,) != pixels:
      raise UserError(f'config keys model.image_size {tuple(config.model.image_size)} and '
                      f'model.image_channels {config.model.image_channels} do not match the '
                      f'pixels {pixels} (data.image_resolution); pixel-space diffusion needs them equal.')
  if source == ImageSource.LATENTS and not os.path.isdir(config.data.latents_dir):
    raise UserError(f'config key data.latents_dir ({config.data.latents_dir!r}) is not a '
                    'directory; expected the output of `extract_latents`.')
  if source != ImageSource.DIGITS and config.train.eval_at_end:
    raise UserError('config key train.eval_at_end needs data.image_source \'digits\' (its '
                    'classifier); set it to False and measure FID on `sample` files instead.')
  _enum(Remat, config.model.remat, 'model.remat')
  _enum(LayerLoop, config.model.layer_loop, 'model.layer_loop')
  _enum(AttentionImpl, config.model.attention, 'model.attention')
  if config.train.loss_chunk < 0:
    raise UserError(f'config key train.loss_chunk is {config.train.loss_chunk}; expected 0 '
                    '(no chunking) or a positive token count.')
  _enum(Sampler, config.sample.sampler, 'sample.sampler')
  _enum(GuidanceChannels, config.sample.guidance_channels, 'sample.guidance_channels')
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


# Mesh and kernels of the paper-scale configs. 1.1B parameters in fp32 with AdamW moments and
# EMA are 1.1e9 x 16 bytes = 18 GB of state: fully sharded over every device (fsdp = all) with
# the batch split over the same axis.
PLATFORMS = {
    'v5p-32': dict(fsdp=-1, data=1, attention='xla', remat='dots'),  # 16 TPU v5p chips
    'h100x8': dict(fsdp=-1, data=1, attention='cudnn', remat='dots'),  # 8 NVIDIA H100s
}


def paper_config(platform: str) -> ml_collections.ConfigDict:
  """The paper's shared settings: TinyLlama-1.1B backbone, SD-VAE latents 32 x 32 x 4,
  patch 2, lr 1e-4, global batch 256, clip 2.0, EMA 0.9999, lm 0.01 / diffusion 1.0,
  500k steps, bf16 compute; the platform's mesh. Config files add their data."""
  if platform not in PLATFORMS:
    raise ValueError(f'platform {platform!r}; expected one of {sorted(PLATFORMS)}')
  preset = PLATFORMS[platform]
  c = base_config()
  m = c.model
  m.size, m.vocab_size, m.norm_eps, m.rope_theta = 'tinyllama-1.1b', 32003, 1e-5, 10000.0
  m.init_from, m.vae = 'checkpoints/tinyllama-1.1b-chat', 'checkpoints/sd-vae-ft-mse'
  m.patch_size, m.image_size, m.image_channels, m.learn_sigma = 2, (32, 32), 4, True
  m.dtype, m.param_dtype, m.layer_loop = 'bfloat16', 'float32', 'scan'
  m.remat, m.attention = preset['remat'], preset['attention']
  c.data.image_source, c.data.image_resolution = 'latents', 256
  c.data.tokenizer_vocab_size = 32000  # TinyLlama's; <im_start>, <im_end>, padding appended
  c.data.image_batch_size = c.data.text_batch_size = 256  # global
  c.optim.learning_rate, c.optim.weight_decay, c.optim.grad_clip = 1e-4, 0.0, 2.0
  c.train.num_steps, c.train.ema_decay = 500_000, 0.9999
  c.train.lm_loss_weight, c.train.diffusion_loss_weight = 0.01, 1.0
  c.train.log_every, c.train.checkpoint_every, c.train.eval_at_end = 100, 50_000, False
  c.sample.sampler, c.sample.steps = 'ddpm', 250
  c.mesh.data, c.mesh.fsdp = preset['data'], preset['fsdp']
  return c
