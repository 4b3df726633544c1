"""The Flax SD-VAE against diffusers' AutoencoderKL on a tiny random configuration."""

import json

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE

from monoformer_jax.base.errors import UserError
from monoformer_jax.convert import commands, vae as vae_convert
from monoformer_jax.nn.vae import LATENT_SCALE, load_vae


@pytest.fixture(scope='module')
def vaes(tmp_path_factory):
  torch.manual_seed(0)
  reference = DiffusersVAE(block_out_channels=(32, 64, 64), down_block_types=('DownEncoderBlock2D',) * 3,
                           up_block_types=('UpDecoderBlock2D',) * 3, layers_per_block=2,
                           norm_num_groups=8, latent_channels=4).eval()
  src = tmp_path_factory.mktemp('diffusers_vae')
  reference.save_pretrained(src, safe_serialization=True)
  dst = tmp_path_factory.mktemp('converted') / 'vae'
  commands.run('vae', str(src), str(dst))
  model, params = load_vae(str(dst))
  return reference, model, params, src


def nhwc(x):
  return x.numpy().transpose(0, 2, 3, 1)


def test_encode_matches_diffusers(vaes):
  reference, model, params, _ = vaes
  images = torch.rand(2, 3, 24, 16) * 2 - 1
  with torch.no_grad():
    posterior = reference.encode(images).latent_dist
  mean, std = model.apply({'params': params}, nhwc(images), method=model.moments)
  np.testing.assert_allclose(mean, nhwc(posterior.mean), atol=1e-4)
  np.testing.assert_allclose(std, nhwc(posterior.std), atol=1e-4)
  scaled = model.apply({'params': params}, nhwc(images), method=model.encode)
  np.testing.assert_allclose(scaled, nhwc(posterior.mean) * LATENT_SCALE, atol=1e-4)
  sampled = model.apply({'params': params}, nhwc(images), jax.random.key(0), method=model.encode)
  noise = (np.asarray(sampled) / LATENT_SCALE - nhwc(posterior.mean)) / nhwc(posterior.std)
  assert 0.5 < noise.std() < 1.5  # a real posterior sample, not the mean


def test_decode_matches_diffusers(vaes):
  reference, model, params, _ = vaes
  latents = torch.randn(2, 4, 6, 4)
  with torch.no_grad():
    want = reference.decode(latents).sample
  got = model.apply({'params': params}, nhwc(latents) * LATENT_SCALE, method=model.decode)
  np.testing.assert_allclose(got, nhwc(want), atol=1e-4)


def test_bad_vae_directories(vaes, tmp_path):
  _, _, _, src = vaes
  other = tmp_path / 'unet'
  other.mkdir()
  config = json.loads((src / 'config.json').read_text())
  (other / 'config.json').write_text(json.dumps(dict(config, _class_name='UNet2DModel')))
  with pytest.raises(UserError, match='UNet2DModel; only AutoencoderKL'):
    commands.run('vae', str(other), str(tmp_path / 'out1'))
  wider = tmp_path / 'wider'
  wider.mkdir()
  (wider / 'config.json').write_text(json.dumps(dict(config, block_out_channels=[32, 64, 128])))
  (wider / 'diffusion_pytorch_model.safetensors').write_bytes(
      (src / 'diffusion_pytorch_model.safetensors').read_bytes())
  with pytest.raises(UserError, match=r"lacks the tensor for parameter \['decoder'\]"):
    commands.run('vae', str(wider), str(tmp_path / 'out2'))
  assert not (tmp_path / 'out1').exists() and not (tmp_path / 'out2').exists()


@pytest.mark.slow
def test_sd_vae_ft_mse_architecture(tmp_path):
  """The full sd-vae-ft-mse configuration (random weights) converts and agrees."""
  torch.manual_seed(1)
  reference = DiffusersVAE(block_out_channels=(128, 256, 512, 512),
                           down_block_types=('DownEncoderBlock2D',) * 4,
                           up_block_types=('UpDecoderBlock2D',) * 4, layers_per_block=2,
                           latent_channels=4, norm_num_groups=32, sample_size=256).eval()
  reference.save_pretrained(tmp_path / 'src', safe_serialization=True)
  commands.run('vae', str(tmp_path / 'src'), str(tmp_path / 'dst'))
  model, params = load_vae(str(tmp_path / 'dst'))
  assert model.cfg.block_out_channels == (128, 256, 512, 512) and model.cfg.norm_groups == 32
  images = torch.rand(1, 3, 32, 32) * 2 - 1
  with torch.no_grad():
    mean = reference.encode(images).latent_dist.mean
    decoded = reference.decode(mean).sample
  got = model.apply({'params': params}, nhwc(images), method=model.encode)
  np.testing.assert_allclose(got, nhwc(mean) * LATENT_SCALE, atol=1e-4)
  assert got.shape == (1, 4, 4, 4)
  np.testing.assert_allclose(model.apply({'params': params}, got, method=model.decode), nhwc(decoded),
                             atol=1e-4)


def test_tensor_names_round_trip(vaes):
  reference, _, params, _ = vaes
  tensors = dict(vae_convert.tensors_from_params(params))
  state = reference.state_dict()
  assert set(tensors) == set(state)
  for name, value in state.items():
    np.testing.assert_array_equal(tensors[name], value.numpy())
