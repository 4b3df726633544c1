"""ImageNet through TFDS (mock records): crops, flips, prompts from class names, errors."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import image_batches, tiny_config

from monoformer_jax.base.errors import UserError
from monoformer_jax.data import common, imagenet, tokenizer as tokenizer_lib
from monoformer_jax.run import settings


def imagenet_config(tmp_path, resolution=16):
  config = tiny_config()
  config.data.image_source = 'imagenet'
  config.data.image_resolution = resolution
  config.data.tfds_data_dir = str(tmp_path / 'tfds')
  config.data.imagenet_manual_dir = str(tmp_path)  # exists; preparing is a no-op under mock_data
  config.data.prompt_len = 64
  config.data.templates = imagenet.TEMPLATES
  config.eval.prompt_template = imagenet.SAMPLING_TEMPLATE
  config.model.image_size = (resolution, resolution)
  config.model.image_channels = 3
  config.train.eval_at_end = False
  return config


def test_class_names_follow_tfds_label_order():
  names = imagenet.class_names()
  assert len(names) == 1000
  assert names[:3] == ['tench', 'goldfish', 'great white shark'] and names[-1] == 'toilet tissue'


def test_center_crop_keeps_the_middle_of_a_wide_image():
  image = np.zeros((64, 192, 3), np.uint8)
  image[:, :64, 0] = 255  # red | green | blue thirds
  image[:, 64:128, 1] = 255
  image[:, 128:, 2] = 255
  crop = common.center_crop(image, 16)  # halved twice (box), then bicubic 16 / 16 = 1
  assert crop.shape == (16, 16, 3) and crop.dtype == np.uint8
  np.testing.assert_array_equal(crop[..., 1], 255)
  np.testing.assert_array_equal(crop[..., [0, 2]], 0)
  tall = common.center_crop(np.full((30, 20, 3), 7, np.uint8), 64)  # upscaled by 3.2
  assert tall.shape == (64, 64, 3) and (tall == 7).all()


def test_batches_prompts_and_dropout(tmp_path, tokenizer_file):
  tok = tokenizer_lib.SentencePiece(tokenizer_file)
  config = imagenet_config(tmp_path)
  settings.validate(config)
  with tfds.testing.mock_data(num_examples=64):
    batch = next(image_batches(config, tok))
    source = imagenet.data_source(config.data)
    records = [source[i] for i in range(64)]
  assert batch['tokens'].shape == (8, 64) and batch['tokens'].dtype == np.int32
  assert batch['valid'].dtype == bool and batch['image'].shape == (8, 16, 16, 3)
  assert batch['image'].dtype == np.float32 and -1 <= batch['image'].min() < batch['image'].max() <= 1

  table = imagenet.prompt_table(tok, config.data)  # the official templates, 64 tokens
  null = tok.image_prompt('', 64)
  transform = imagenet.PromptedImageNet(table, 0.1, 16, flip=True)
  rng = np.random.default_rng(0)
  dropped, flipped = 0, 0
  for i in range(2000):
    record = records[i % 64]
    out = transform.random_map(record, rng)
    label = int(record['label'])
    if (out['tokens'] == null[0]).all():
      dropped += 1
    else:  # one of the four official templates with this class's name
      assert any((out['tokens'] == table.tokens[label, k]).all() for k in range(4)), i
    assert out['label'] == label
    unflipped = common.center_crop(np.asarray(record['image']), 16).astype(np.float32) / 127.5 - 1
    if not np.array_equal(out['image'], unflipped):
      np.testing.assert_array_equal(out['image'], unflipped[:, ::-1])
      flipped += 1
  assert abs(dropped / 2000 - 0.1) < 0.025
  assert abs(flipped / 2000 - 0.5) < 0.05


def test_missing_manual_dir_is_named(tmp_path):
  config = imagenet_config(tmp_path)
  config.data.imagenet_manual_dir = str(tmp_path / 'no_such_dir')
  with pytest.raises(UserError, match=r'data\.imagenet_manual_dir .*no_such_dir.* is not a directory'):
    imagenet.data_source(config.data)


def test_pixel_shape_must_match_resolution(tmp_path):
  config = imagenet_config(tmp_path)
  config.model.image_size = (8, 8)
  with pytest.raises(UserError, match=r'do not match the pixels \(16, 16, 3\)'):
    settings.validate(config)
  config = imagenet_config(tmp_path)
  config.train.eval_at_end = True
  with pytest.raises(UserError, match='eval_at_end'):
    settings.validate(config)
