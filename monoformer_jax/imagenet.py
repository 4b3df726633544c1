"""ImageNet through TFDS `imagenet2012`, class-conditional through prompts.

Images: ADM's center crop (halve with a box filter while the short side is at
least twice the target, bicubic to the target, crop the center), a random
horizontal flip, scaled to [-1, 1]. Labels: the readable class name (the
official code's `imagenet_labels.json` "label" field, in TFDS label order) put
into one of the config's templates, or no prompt at data.cfg_dropout for
classifier-free guidance.
Dimension letters: R resolution (R x R x 3 pixels), P prompt length.
"""

import os
from typing import Any

import grain
import ml_collections
import numpy as np
from PIL import Image

from monoformer_jax import tokenizer as tokenizer_lib
from monoformer_jax.errors import UserError

CLASSES_FILE = os.path.join(os.path.dirname(__file__), 'imagenet_classes.tsv')
# The official ImageNet templates ("an photo" is the official spelling).
TEMPLATES = ('{name}', 'an image of {name}.', 'an photo of {name}.',
             'Please generate an image of {name}.')
SAMPLING_TEMPLATE = 'Please generate an image of {name}.'  # what the official sampler asks


def class_names() -> list[str]:
  """The 1,000 readable names, index = TFDS label."""
  with open(CLASSES_FILE, encoding='utf-8') as f:
    return [line.rstrip('\n').split('\t')[1] for line in f]


def center_crop(image: np.ndarray, resolution: int) -> np.ndarray:
  """ADM's center crop of a uint8 [H, W, 3] image to [R, R, 3] uint8."""
  pil = Image.fromarray(image)
  while min(pil.size) >= 2 * resolution:
    pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.Resampling.BOX)
  scale = resolution / min(pil.size)
  pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.Resampling.BICUBIC)
  array = np.asarray(pil.convert('RGB'))
  top = (array.shape[0] - resolution) // 2
  left = (array.shape[1] - resolution) // 2
  return array[top:top + resolution, left:left + resolution]


def data_source(config: ml_collections.ConfigDict):
  """The prepared `imagenet2012` train split as a random-access source.

  Prepares it first (from the archives in data.imagenet_manual_dir) when
  data.tfds_data_dir does not hold it yet.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder('imagenet2012', data_dir=config.data.tfds_data_dir or None,
                         file_format='array_record')
  if not builder.is_prepared():
    manual_dir = config.data.imagenet_manual_dir
    if not manual_dir or not os.path.isdir(manual_dir):
      raise UserError(f'imagenet2012 is not prepared in {builder.data_dir} and config key '
                      f'data.imagenet_manual_dir ({manual_dir!r}) is not a directory; expected '
                      'the one holding ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar.')
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder.as_data_source(split='train')


class PromptedImageNet(grain.transforms.RandomMap):
  """TFDS record -> {'tokens' [P], 'valid' [P], 'image' [R, R, 3] float32, 'label'}."""

  def __init__(self, prompts: tokenizer_lib.PromptTable, cfg_dropout: float, resolution: int,
               flip: bool):
    self.prompts, self.cfg_dropout = prompts, cfg_dropout
    self.resolution, self.flip = resolution, flip

  def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    label = int(record['label'])
    image = center_crop(np.asarray(record['image']), self.resolution)
    if self.flip and rng.random() < 0.5:
      image = image[:, ::-1]
    tokens, valid = self.prompts.pick(rng, label, self.cfg_dropout)
    pixels = image.astype(np.float32) / 127.5 - 1.0
    return dict(tokens=tokens, valid=valid, image=pixels, label=np.int32(label))


def prompt_table(tok: tokenizer_lib.Tokenizer, config: ml_collections.ConfigDict):
  """Every (class, template) prompt of the config's templates and ImageNet's class names."""
  return tokenizer_lib.PromptTable.build(tok, class_names(), config.data.templates,
                                         config.data.prompt_len)


def examples(config: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer,
             source=None) -> grain.MapDataset:
  """Infinite shuffled prompted examples (not yet batched); source defaults to data_source."""
  source = data_source(config) if source is None else source
  transform = PromptedImageNet(prompt_table(tok, config), config.data.cfg_dropout,
                               config.data.image_resolution, config.data.random_flip)
  ds = grain.MapDataset.source(source).shuffle(seed=config.seed).repeat()
  return ds.random_map(transform, seed=config.seed)
