"""The frozen vision encoder of a config (model.vision_encoder): which one, parsed once into a
VisionSpec that gives what it reads, what it gives and the encoder itself; images to understand
-> features, on the devices, outside the differentiated step.

Dimension letters: B batch, I images per sample, M feature tokens, E features, R resolution.
"""

import dataclasses
import enum
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections

from monoformer_jax.base import files, sharding
from monoformer_jax.base.errors import UserError
from monoformer_jax.config import schema
from monoformer_jax.data.understanding import Reading
from monoformer_jax.data.vision_input import PictureFormat
from monoformer_jax.nn import clip, vae
from monoformer_jax.nn.model import UnderstandingShape, patchify


class VisionEncoder(enum.Enum):
  NONE = 'none'
  # The image in the diffusion space (SD-VAE latents, a posterior sample x 0.18215, or the pixels
  # of a pixel-space model), patchified as the generation input is: p * p * C features.
  VAE = 'vae'
  CLIP = 'clip'  # a converted CLIP tower (model.clip): its second-to-last block's patch tokens


@dataclasses.dataclass(frozen=True)
class VisionSpec:
  """A config's vision encoder and what the config says of it; callers pass this alone."""
  encoder: VisionEncoder
  clip_dir: str  # model.clip: the converted CLIP tower of 'clip'
  vae_dir: str  # model.vae: 'vae' encodes pixels to its latents; '' where the diffusion is pixels
  resolution: int  # data.image_resolution: the R x R pixels a VAE encodes
  image_shape: tuple[int, int, int]  # the diffusion space [H, W, C]
  patch_size: int
  dtype: str  # model.dtype: the CLIP tower computes in it

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'VisionSpec':
    m = config.model
    return cls(schema.choice(VisionEncoder, m.vision_encoder, 'model.vision_encoder'), m.clip,
               m.vae, config.data.image_resolution, (*m.image_size, m.image_channels),
               m.patch_size, m.dtype)

  @property
  def reads_images(self) -> bool:
    return self.encoder != VisionEncoder.NONE

  def input_shape(self) -> tuple[int, ...]:
    """What one image to understand is, as the data gives it: CLIP's normalized R x R pixels;
    for 'vae', pixels at data.image_resolution when a VAE encodes them, else the diffusion
    space's own [H, W, C]."""
    if self.encoder == VisionEncoder.CLIP:
      size = clip.load_config(self.clip_dir).image_size
      return (size, size, 3)
    if self.vae_dir:
      return (self.resolution,) * 2 + (3,)
    return self.image_shape

  def output_shape(self) -> UnderstandingShape:
    """M feature tokens per image of E features each (none for 'none')."""
    if self.encoder == VisionEncoder.VAE:
      (height, width, channels), p = self.image_shape, self.patch_size
      return UnderstandingShape((height // p) * (width // p), p * p * channels)
    if self.encoder == VisionEncoder.CLIP:
      if not (self.clip_dir and files.isfile(clip.meta_path(self.clip_dir))):
        raise UserError(f'config key model.clip is {self.clip_dir!r}, which is not a converted '
                        'CLIP directory; model.vision_encoder \'clip\' needs one (`python -m '
                        'monoformer_jax convert clip --src=HF_CLIP_DIR --dst=DIR`).')
      return UnderstandingShape(*clip.feature_shape(self.clip_dir))
    return UnderstandingShape()

  def reading(self) -> Reading:
    """How the config's samples read pictures: the slots of the encoder's output, its input."""
    picture = PictureFormat.CLIP if self.encoder == VisionEncoder.CLIP else PictureFormat.DIFFUSION
    return Reading(self.output_shape().tokens_per_image, picture, self.input_shape())

  def feature_encoder(self, layout: sharding.Layout, latents: Optional[Callable] = None
                      ) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """fn(images [B, I, ...] as input_shape says, key) -> features [B, I, M, E] float32.
    latents: the VAE's pixel encoder when the caller holds one already (else it is loaded)."""
    p = self.patch_size
    if self.encoder == VisionEncoder.CLIP:
      tower = clip.encoder(self.clip_dir, layout, self.dtype)
      per_image = lambda x, key: tower(x)  # noqa: E731
    elif self.vae_dir:  # the official VAE encoder: a posterior sample x 0.18215, patchified
      latents = latents or vae.pixel_encoder(self.vae_dir, layout, self.resolution,
                                             self.image_shape)
      to_patches = jax.jit(lambda z: patchify(z, p))
      per_image = lambda x, key: to_patches(latents(x, key))  # noqa: E731
    else:
      per_image = jax.jit(lambda x, key: patchify(x, p))

    def encode(images: jax.Array, key: jax.Array) -> jax.Array:
      b, i = images.shape[:2]
      features = per_image(images.reshape(b * i, *images.shape[2:]), key)
      return jnp.reshape(features, (b, i, *features.shape[1:]))

    return encode
