"""The embedded default's images: scikit-learn's bundled 8x8 digits, prompted by text.

Images are scaled to [-1, 1] ([1797, 8, 8, 1]); each training example takes a
random template of data.templates with the digit's name, or no prompt at
data.cfg_dropout for classifier-free guidance. A fixed split holds out
data.heldout_fraction of the digits, which the evaluator's classifier is fitted on.
"""

from typing import Any

import grain
import ml_collections
import numpy as np

from monoformer_jax.data import common, tokenizer as tokenizer_lib


CLASS_NAMES = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')


def load() -> tuple[np.ndarray, np.ndarray]:
  """Images [1797, 8, 8, 1] float32 in [-1, 1] and labels [1797] int32."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = digits.images.astype(np.float32)[..., None] / 16.0 * 2.0 - 1.0
  return images, digits.target.astype(np.int32)


def subset(heldout_fraction: float, heldout: bool) -> tuple[np.ndarray, np.ndarray]:
  """The training digits, or the held-out ones (never trained on): images [n, 8, 8, 1] and
  labels [n]."""
  images, labels = load()
  keep = common.split(len(images), heldout_fraction)[int(heldout)]
  return images[keep], labels[keep]


def prompts(data: ml_collections.ConfigDict) -> list[str]:
  """Every templated prompt, for training the tokenizer."""
  return [t.format(name=name) for name in CLASS_NAMES for t in data.templates]


class PromptedDigit(grain.transforms.RandomMap):
  """Index -> {'tokens', 'valid', 'image', 'label'} with a random template or no prompt."""

  def __init__(self, images, labels, prompt_table: tokenizer_lib.PromptTable, cfg_dropout: float):
    self.images, self.labels = images, labels
    self.prompts, self.cfg_dropout = prompt_table, cfg_dropout

  def random_map(self, index, rng: np.random.Generator) -> dict[str, Any]:
    label = self.labels[index]
    tokens, valid = self.prompts.pick(rng, label, self.cfg_dropout)
    return dict(tokens=tokens, valid=valid, image=self.images[index], label=label)


def examples(data: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer,
             seed: int) -> grain.MapDataset:
  """Infinite shuffled prompted training digits (not yet batched)."""
  images, labels = subset(data.heldout_fraction, heldout=False)
  table = tokenizer_lib.PromptTable.build(tok, CLASS_NAMES, data.templates, data.prompt_len)
  transform = PromptedDigit(images, labels, table, data.cfg_dropout)
  ds = grain.MapDataset.range(len(images)).shuffle(seed=seed).repeat()
  return ds.random_map(transform, seed=seed)
