"""ImageNet through TFDS `imagenet2012`, class-conditional through prompts.

Images: ADM's center crop (common.center_crop), a random horizontal flip, scaled to [-1, 1]. Labels:
the readable class name (the official code's `imagenet_labels.json` "label" field, in TFDS label
order) put into one of the config's templates, or no prompt at data.cfg_dropout for classifier-free
guidance.
Dimension letters: R resolution (R x R x 3 pixels), P prompt length.
"""

import os
from typing import Any

import grain
import ml_collections
import numpy as np

from monoformer_jax.base import files, quiet_import
from monoformer_jax.base.errors import UserError
from monoformer_jax.data import common, tokenizer as tokenizer_lib


CLASSES_FILE = os.path.join(os.path.dirname(__file__), 'imagenet_classes.tsv')
# The official ImageNet templates ("an photo" is the official spelling).
TEMPLATES = ('{name}', 'an image of {name}.', 'an photo of {name}.',
             'Please generate an image of {name}.')
SAMPLING_TEMPLATE = 'Please generate an image of {name}.'  # what the official sampler asks


def class_names() -> list[str]:
  """The 1,000 readable names, index = TFDS label."""
  with open(CLASSES_FILE, encoding='utf-8') as f:  # local: the package's own data
    return [line.rstrip('\n').split('\t')[1] for line in f]


def data_source(data: ml_collections.ConfigDict):
  """The prepared `imagenet2012` train split as a random-access source.

  Prepares it first (from the archives in data.imagenet_manual_dir) when
  data.tfds_data_dir does not hold it yet."""
  quiet_import.load_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder('imagenet2012', data_dir=data.tfds_data_dir or None,
                         file_format='array_record')
  if not builder.is_prepared():
    manual_dir = data.imagenet_manual_dir
    if not manual_dir or not files.isdir(manual_dir):
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
    image = common.center_crop(np.asarray(record['image']), self.resolution)
    if self.flip and rng.random() < 0.5:
      image = image[:, ::-1]
    tokens, valid = self.prompts.pick(rng, label, self.cfg_dropout)
    return dict(tokens=tokens, valid=valid, image=common.to_unit_range(image),
                label=np.int32(label))


def prompt_table(tok: tokenizer_lib.Tokenizer, data: ml_collections.ConfigDict):
  """Every (class, template) prompt of data.templates and ImageNet's class names."""
  return tokenizer_lib.PromptTable.build(tok, class_names(), data.templates, data.prompt_len)


def examples(data: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer, seed: int,
             source=None) -> grain.MapDataset:
  """Infinite shuffled prompted examples (not yet batched); source defaults to data_source."""
  source = data_source(data) if source is None else source
  transform = PromptedImageNet(prompt_table(tok, data), data.cfg_dropout, data.image_resolution,
                               data.random_flip)
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  return ds.random_map(transform, seed=seed)
