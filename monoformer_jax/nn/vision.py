"""The frozen vision encoder of a config (model.vision_encoder): images to understand ->
features, on the devices, outside the differentiated step.

Dimension letters: B batch, I images per sample, M feature tokens, E features, R resolution.
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections

from monoformer_jax.base import sharding
from monoformer_jax.data.understanding import Reading
from monoformer_jax.data.vision_input import PictureFormat
from monoformer_jax.nn import clip, vae
from monoformer_jax.nn.model import UnderstandingShape, patchify
from monoformer_jax.nn.understanding import VisionEncoder


def input_shape(config: ml_collections.ConfigDict, encoder: VisionEncoder) -> tuple[int, ...]:
  """What one image to understand is, as the data gives it: CLIP's normalized R x R pixels;
  for 'vae', pixels at data.image_resolution when a VAE encodes them, else the diffusion
  space's own [H, W, C]."""
  m = config.model
  if encoder == VisionEncoder.CLIP:
    size = clip.load_config(m.clip).image_size
    return (size, size, 3)
  if m.vae:
    return (config.data.image_resolution,) * 2 + (3,)
  return (*m.image_size, m.image_channels)


def reading(config: ml_collections.ConfigDict, encoder: VisionEncoder,
            shape: UnderstandingShape) -> Reading:
  """How the config's samples read pictures (the model's understanding shape, the encoder's
  input)."""
  picture = PictureFormat.CLIP if encoder == VisionEncoder.CLIP else PictureFormat.DIFFUSION
  return Reading(shape.tokens_per_image, picture, input_shape(config, encoder))


def feature_encoder(config: ml_collections.ConfigDict, encoder: VisionEncoder,
                    layout: sharding.Layout, latents: Optional[Callable] = None
                    ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """fn(images [B, I, ...] as input_shape says, key) -> features [B, I, M, E] float32.
  latents: the VAE's pixel encoder when the caller holds one already (else it is loaded)."""
  m = config.model
  if encoder == VisionEncoder.CLIP:
    tower = clip.encoder(m.clip, layout, m.dtype)
    per_image = lambda x, key: tower(x)  # noqa: E731
  elif m.vae:  # the official VAE encoder: a posterior sample x 0.18215, patchified
    latents = latents or vae.pixel_encoder(m.vae, layout, config.data.image_resolution,
                                           (*m.image_size, m.image_channels))
    to_patches = jax.jit(lambda z: patchify(z, m.patch_size))
    per_image = lambda x, key: to_patches(latents(x, key))  # noqa: E731
  else:
    per_image = jax.jit(lambda x, key: patchify(x, m.patch_size))

  def encode(images: jax.Array, key: jax.Array) -> jax.Array:
    b, i = images.shape[:2]
    features = per_image(images.reshape(b * i, *images.shape[2:]), key)
    return jnp.reshape(features, (b, i, *features.shape[1:]))

  return encode
