"""Questions on the bundled digits, the embedded default's images to understand: "<image>
Which digit is this?" -> "seven", and "<image><image> Are these the same digit?" -> "seven and
three no" (the answer names what it compares, then the verdict). The verdict follows the second
name directly: it is predicted where that name is read, so one attention hop to the first name
decides it. With a colon between ("seven and three: no") it was predicted one token later, and
the comparison was learned or not depending on the seed and the machine's rounding.

Training asks about the training digits (half one-image, half two-image questions, half of the
pairs the same digit); evaluation asks about the held-out digits, the same questions every time.
Images are the diffusion's own [8, 8, 1] in [-1, 1] (model.vision_encoder 'vae' reads them
patchified, as the generation input).
"""

from typing import Any

import grain
import ml_collections
import numpy as np

from monoformer_jax.data import digits, tokenizer as tokenizer_lib, understanding

ONE_IMAGE = ('Which digit is this?', 'What number is shown?', 'Name this digit.')
TWO_IMAGES = 'Are these the same digit?'
_EVAL_SEED = 20241013


def conversation(labels: list[int], question: str = '') -> list[dict]:
  """The turns asking about one or two digits of these labels, with their answer."""
  placeholders = understanding.PLACEHOLDER * len(labels)
  names = [digits.CLASS_NAMES[label] for label in labels]
  if len(labels) == 1:
    answer = names[0]
  else:
    answer = f'{names[0]} and {names[1]} {"yes" if labels[0] == labels[1] else "no"}'
  return [{'from': 'human', 'value': f'{placeholders}\n{question or TWO_IMAGES}'},
          {'from': 'gpt', 'value': answer}]


def _pair(rng: np.random.Generator, first: int, labels: np.ndarray) -> int:
  """Another digit's index: of the same class half the time."""
  same = rng.random() < 0.5
  pool = np.flatnonzero((labels == labels[first]) == same)
  pool = pool[pool != first]
  return int(rng.choice(pool))


class DigitQuestion(grain.transforms.RandomMap):
  """Index -> an understanding sample about that training digit (and maybe another)."""

  def __init__(self, images, labels, tok, data: ml_collections.ConfigDict, tokens_per_image: int):
    self.images, self.labels, self.tok = images, labels, tok
    self.data, self.tokens_per_image = data, tokens_per_image

  def random_map(self, index, rng: np.random.Generator) -> dict[str, Any]:
    chosen = [int(index)]
    question = ''
    if rng.random() < 0.5 or self.data.images_per_sample < 2:
      question = ONE_IMAGE[rng.integers(len(ONE_IMAGE))]
    else:
      chosen.append(_pair(rng, chosen[0], self.labels))
    turns = conversation([int(self.labels[i]) for i in chosen], question)
    images = understanding.padded([self.images[i] for i in chosen], self.data.images_per_sample,
                                  self.images.shape[1:])
    return understanding.sample(turns, images, self.tok, self.tokens_per_image,
                                self.data.understanding_seq_len, self.data.learn_questions)


def examples(data: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer, seed: int,
             tokens_per_image: int) -> grain.MapDataset:
  """Infinite shuffled questions on the training digits (not yet batched)."""
  images, labels = digits.subset(data.heldout_fraction, heldout=False)
  transform = DigitQuestion(images, labels, tok, data, tokens_per_image)
  ds = grain.MapDataset.range(len(images)).shuffle(seed=seed + 2).repeat()
  return ds.random_map(transform, seed=seed + 2)


def heldout_questions(data: ml_collections.ConfigDict, pairs: int) -> list[tuple[list, np.ndarray]]:
  """(turns, images [I, 8, 8, 1]) of the evaluation: one question per held-out digit, then
  `pairs` two-image questions on held-out digits (half of them the same digit); the answer is
  each conversation's last turn."""
  images, labels = digits.subset(data.heldout_fraction, heldout=True)
  rng = np.random.default_rng(_EVAL_SEED)
  out = []
  for i, label in enumerate(labels):
    out.append((conversation([int(label)], ONE_IMAGE[0]),
                understanding.padded([images[i]], data.images_per_sample, images.shape[1:])))
  for _ in range(pairs if data.images_per_sample >= 2 else 0):
    first = int(rng.integers(len(labels)))
    second = _pair(rng, first, labels)
    out.append((conversation([int(labels[first]), int(labels[second])]),
                understanding.padded([images[first], images[second]], data.images_per_sample,
                                     images.shape[1:])))
  return out
