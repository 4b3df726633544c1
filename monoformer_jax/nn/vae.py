"""AutoencoderKL (the SD-VAE, e.g. sd-vae-ft-mse) in Flax, NHWC.

The architecture of diffusers' AutoencoderKL with DownEncoderBlock2D / UpDecoderBlock2D blocks:
ResNet blocks with GroupNorm and SiLU, a mid block with one single-head self-attention, stride-2
downsampling with (0, 1) padding, nearest-neighbour upsampling. Submodules are named after
diffusers' state-dict paths ('down_blocks_0_resnets_1/conv1'), which keeps conversion mechanical.
Images are in [-1, 1]; `LATENT_SCALE` is applied in encode/decode only. A converted VAE directory
(`convert vae`) holds params/ (Orbax) and vae.json.
Dimension letters: B batch, H/W spatial, R resolution, C channels, h/w latent grid,
Z latent channels.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from monoformer_jax.base import sharding
from monoformer_jax.base.errors import UserError
from monoformer_jax.nn import converted


VAE_JSON = 'vae.json'
LATENT_SCALE = 0.18215  # SD-VAE latents are multiplied by this before diffusion


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  in_channels: int = 3
  latent_channels: int = 4
  norm_groups: int = 32


def _conv(features: int, kernel: int = 3, name: str = None, stride: int = 1,
          padding=None) -> nn.Conv:
  pad = kernel // 2 if padding is None else padding
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=pad if isinstance(pad, tuple) else ((pad, pad), (pad, pad)), name=name)


def _norm(cfg: VAEConfig, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=cfg.norm_groups, epsilon=1e-6, name=name)


class ResnetBlock(nn.Module):
  cfg: VAEConfig
  features: int

  @nn.compact
  def __call__(self, x):
    h = _conv(self.features, name='conv1')(nn.silu(_norm(self.cfg, 'norm1')(x)))
    h = _conv(self.features, name='conv2')(nn.silu(_norm(self.cfg, 'norm2')(h)))
    if x.shape[-1] != self.features:
      x = _conv(self.features, 1, name='conv_shortcut')(x)
    return x + h


class SpatialAttention(nn.Module):
  """Single-head self-attention over all H*W positions, with a residual."""
  cfg: VAEConfig

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    seq = _norm(self.cfg, 'group_norm')(x).reshape(b, h * w, c)
    q, k, v = (nn.Dense(c, name=n)(seq) for n in ('to_q', 'to_k', 'to_v'))
    weights = jax.nn.softmax(jnp.einsum('bqc,bkc->bqk', q, k) / jnp.sqrt(c).astype(q.dtype), -1)
    out = nn.Dense(c, name='to_out_0')(jnp.einsum('bqk,bkc->bqc', weights, v))
    return x + out.reshape(b, h, w, c)


class MidBlock(nn.Module):
  cfg: VAEConfig

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = ResnetBlock(self.cfg, c, name='resnets_0')(x)
    x = SpatialAttention(self.cfg, name='attentions_0')(x)
    return ResnetBlock(self.cfg, c, name='resnets_1')(x)


class Encoder(nn.Module):
  """[B, H, W, 3] -> [B, H/f, W/f, 2Z] (mean and log variance), f = 2^(blocks-1)."""
  cfg: VAEConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    x = _conv(cfg.block_out_channels[0], name='conv_in')(x)
    for i, features in enumerate(cfg.block_out_channels):
      for j in range(cfg.layers_per_block):
        x = ResnetBlock(cfg, features, name=f'down_blocks_{i}_resnets_{j}')(x)
      if i < len(cfg.block_out_channels) - 1:
        x = _conv(features, 3, name=f'down_blocks_{i}_downsamplers_0_conv', stride=2,
                  padding=((0, 1), (0, 1)))(x)
    x = MidBlock(cfg, name='mid_block')(x)
    x = nn.silu(_norm(cfg, 'conv_norm_out')(x))
    return _conv(2 * cfg.latent_channels, name='conv_out')(x)


class Decoder(nn.Module):
  """[B, h, w, Z] -> [B, h*f, w*f, 3]."""
  cfg: VAEConfig

  @nn.compact
  def __call__(self, z):
    cfg = self.cfg
    channels = tuple(reversed(cfg.block_out_channels))
    x = _conv(channels[0], name='conv_in')(z)
    x = MidBlock(cfg, name='mid_block')(x)
    for i, features in enumerate(channels):
      for j in range(cfg.layers_per_block + 1):
        x = ResnetBlock(cfg, features, name=f'up_blocks_{i}_resnets_{j}')(x)
      if i < len(channels) - 1:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        x = _conv(features, name=f'up_blocks_{i}_upsamplers_0_conv')(x)
    x = nn.silu(_norm(cfg, 'conv_norm_out')(x))
    return _conv(cfg.in_channels, name='conv_out')(x)


class AutoencoderKL(nn.Module):
  cfg: VAEConfig

  def setup(self):
    self.encoder = Encoder(self.cfg)
    self.quant_conv = _conv(2 * self.cfg.latent_channels, 1)
    self.post_quant_conv = _conv(self.cfg.latent_channels, 1)
    self.decoder = Decoder(self.cfg)

  def moments(self, images):
    """Posterior mean and std [B, h, w, Z] of images in [-1, 1] (unscaled latents)."""
    mean, logvar = jnp.split(self.quant_conv(self.encoder(images)), 2, axis=-1)
    return mean, jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))

  def encode(self, images, key=None):
    """Scaled latents: the posterior mean, or a posterior sample when a key is given."""
    mean, std = self.moments(images)
    z = mean if key is None else mean + std * jax.random.normal(key, mean.shape, mean.dtype)
    return z * LATENT_SCALE

  def decode(self, latents):
    """Scaled latents -> images in roughly [-1, 1]."""
    return self.decoder(self.post_quant_conv(latents / LATENT_SCALE))

  def __call__(self, images):
    return self.decode(self.encode(images))


def load_vae(path: str) -> tuple[AutoencoderKL, dict]:
  """(module, params as host arrays) of a converted VAE directory."""
  d, params = converted.read_converted(path, VAE_JSON, 'vae')
  cfg = VAEConfig(**dict(d, block_out_channels=tuple(d['block_out_channels'])))
  return AutoencoderKL(cfg), params


def pixel_decoder(path: str, layout: sharding.Layout):
  """Jitted fn(scaled latents [B, h, w, Z]) -> images [B, H, W, 3], the VAE replicated on
  the layout's mesh (the batch keeps its sharding)."""
  model, params = load_vae(path)
  params = jax.device_put(params, sharding.replicated(layout))
  return jax.jit(lambda z: model.apply({'params': params}, z, method=AutoencoderKL.decode))


def pixel_encoder(path: str, layout: sharding.Layout, resolution: int,
                  latent_shape: tuple[int, ...]):
  """fn(pixels [B, R, R, 3] global array, key) -> scaled posterior samples [B, h, w, Z] on
  the devices of the train mesh (the official on-the-fly path samples the posterior too).
  The VAE must turn R x R pixels into latent_shape [h, w, Z], the model's image."""
  model, params = load_vae(path)
  params = jax.device_put(params, sharding.replicated(layout))
  shape = jax.eval_shape(lambda p, x: model.apply({'params': p}, x, method=AutoencoderKL.moments)[0],
                         params, jax.ShapeDtypeStruct((1, resolution, resolution, 3),
                                                      np.float32)).shape[1:]
  if shape != tuple(latent_shape):
    raise UserError(f'the VAE in {path} turns {resolution} x {resolution} pixels into latents of '
                    f'shape {shape}; config keys model.image_size and model.image_channels expect '
                    f'{tuple(latent_shape)}.')
  rows, replicated = sharding.batch_sharding(layout), sharding.replicated(layout)
  encode = jax.jit(lambda p, x, key: model.apply({'params': p}, x, key, method=AutoencoderKL.encode),
                   in_shardings=(replicated, rows, replicated), out_shardings=rows)
  return lambda pixels, key: encode(params, pixels, key)
