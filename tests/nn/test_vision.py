"""A config's vision encoder, parsed once: what it reads, what it gives, and an encoder whose
features have that shape."""

import jax
import numpy as np
import pytest
from helpers import reading_digits, tiny_config

from monoformer_jax.base import sharding
from monoformer_jax.base.errors import UserError
from monoformer_jax.data.vision_input import PictureFormat
from monoformer_jax.nn.model import UnderstandingShape
from monoformer_jax.nn.vision import VisionEncoder, VisionSpec
from monoformer_jax.run import settings


def test_the_digits_are_read_in_the_diffusion_space():
  config = reading_digits(tiny_config())
  config.model.image_size, config.model.image_channels, config.model.patch_size = (8, 8), 1, 2
  spec = VisionSpec.from_config(config)
  assert spec.encoder == VisionEncoder.VAE and spec.reads_images
  assert spec.input_shape() == (8, 8, 1)
  assert spec.output_shape() == UnderstandingShape(16, 4)  # (8 / 2)^2 patches of 2 * 2 * 1
  reading = spec.reading()
  assert (reading.tokens_per_image, reading.picture, reading.shape) == (
      16, PictureFormat.DIFFUSION, (8, 8, 1))
  images = np.zeros((3, 2, 8, 8, 1), np.float32)  # [B, I, H, W, C]
  layout = sharding.make_layout(config.mesh)
  features = spec.feature_encoder(layout)(images, jax.random.key(0))
  assert features.shape == (3, 2, 16, 4)  # [B, I, M, E]
  assert settings.validate(config).vision == spec  # what every caller is handed
  assert settings.build_model(config).understanding == spec.output_shape()


def test_a_vae_encodes_pictures_at_the_data_resolution():
  config = tiny_config()
  config.model.vision_encoder, config.model.vae = 'vae', '/some/vae'
  config.data.image_resolution = 32
  config.model.image_size, config.model.image_channels = (4, 4), 4
  spec = VisionSpec.from_config(config)
  assert spec.input_shape() == (32, 32, 3)
  assert spec.output_shape() == UnderstandingShape(4, 16)


def test_none_reads_nothing_and_clip_needs_its_directory(tmp_path):
  config = tiny_config()
  spec = VisionSpec.from_config(config)
  assert not spec.reads_images and spec.output_shape() == UnderstandingShape()
  config.model.vision_encoder, config.model.clip = 'clip', str(tmp_path / 'nope')
  with pytest.raises(UserError, match=r"model.clip is '.*nope', which is not a converted CLIP"):
    VisionSpec.from_config(config).output_shape()
  config.model.vision_encoder = 'siglip'
  with pytest.raises(UserError, match=r"model.vision_encoder is 'siglip'; expected one of"):
    VisionSpec.from_config(config)
