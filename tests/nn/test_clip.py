"""The Flax CLIP vision tower against transformers' CLIPVisionModel (converted by `convert clip`
from a CLIPModel directory), and the tensors' names both ways."""

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from monoformer_jax.base.errors import UserError
from monoformer_jax.convert import clip as clip_convert, commands, torch_bin
from monoformer_jax.data import vision_input
from monoformer_jax.nn import clip


def _sharpen(model: torch.nn.Module) -> None:
  """Weights that make every part matter: norms near 1 with spread, q/k scaled up, position
  embeddings and biases large enough to move the attention."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'layer_norm' in name or 'layrnorm' in name or 'layernorm' in name:
        p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith('weight') else 0.2 * torch.randn_like(p))
      elif 'q_proj.weight' in name or 'k_proj.weight' in name:
        p.mul_(4.0)
      elif 'embedding' in name or name.endswith('bias'):
        p.copy_(0.5 * torch.randn_like(p))


@pytest.fixture(scope='module')
def towers(tmp_path_factory):
  """(transformers' vision model, our converted tower and params, the CLIPModel directory):
  odd sizes (width 48, 3 heads, 20 px images of 4 px patches, 3 blocks)."""
  torch.manual_seed(0)
  config = transformers.CLIPConfig(
      vision_config=dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                         num_attention_heads=3, image_size=20, patch_size=4),
      text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, vocab_size=99), projection_dim=16)
  full = transformers.CLIPModel(config).eval()
  _sharpen(full.vision_model)
  src = tmp_path_factory.mktemp('clip_hf')
  full.save_pretrained(src, safe_serialization=True)
  dst = str(tmp_path_factory.mktemp('clip') / 'converted')
  commands.run('clip', str(src), dst)
  reference = transformers.CLIPVisionModel.from_pretrained(src).eval()
  tower, params = clip.load(dst)
  return reference, tower, params, src


def test_features_match_the_second_to_last_layer(towers):
  reference, tower, params, _ = towers
  pixels = torch.randn(3, 3, 20, 20)
  with torch.no_grad():
    out = reference(pixels, output_hidden_states=True)
  ours = tower.apply({'params': params}, pixels.numpy().transpose(0, 2, 3, 1),
                     method=clip.VisionTower.features)
  want = out.hidden_states[-2][:, 1:].numpy()
  assert ours.shape == (3, 25, 48)
  np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  # the whole tower (last block and post-norm) through the pooled output
  pooled = tower.apply({'params': params}, pixels.numpy().transpose(0, 2, 3, 1))
  np.testing.assert_allclose(pooled, out.pooler_output.numpy(), rtol=1e-5, atol=1e-5)


def test_tensor_names_round_trip(towers):
  _, _, params, src = towers
  source = torch_bin.open_weights(str(src))
  tensors = dict(clip_convert.tensors_from_params(params))
  vision = {k for k in source.keys() if k.startswith('vision_model.')
            and not k.endswith('position_ids')}
  assert set(tensors) == vision
  for name in vision:
    np.testing.assert_array_equal(tensors[name], np.asarray(source[name], np.float32))


def test_a_directory_of_another_model_is_refused(tmp_path):
  (tmp_path / 'llama').mkdir()
  (tmp_path / 'llama' / 'config.json').write_text(json.dumps({'model_type': 'llama'}))
  with pytest.raises(UserError, match="describes a 'llama' model; expected a CLIP"):
    commands.run('clip', str(tmp_path / 'llama'), str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('size', [(37, 23), (20, 31), (64, 64)])
def test_pictures_are_prepared_as_clip_image_processor_prepares_them(size):
  rng = np.random.default_rng(0)
  picture = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
  # the PIL processor: what CLIPImageProcessor was when the official code was written (newer
  # transformers default to a torchvision one that rounds a few pixels differently)
  processor = transformers.CLIPImageProcessorPil(size={'shortest_edge': 20},
                                                 crop_size={'height': 20, 'width': 20})
  want = processor(picture, return_tensors='np')['pixel_values'][0].transpose(1, 2, 0)
  got = vision_input.clip_pixels(picture, 20)
  assert got.shape == want.shape == (20, 20, 3)
  np.testing.assert_allclose(got, want, atol=1e-5)
