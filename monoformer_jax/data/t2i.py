"""Text-to-image pairs (JourneyDB style) from the JSONL files of data.t2i_files.

Pictures go through ADM's center crop to data.image_resolution and a random flip; prompts are put
into data.templates[0] and truncated to fit data.prompt_len, or dropped at data.cfg_dropout. An
unreadable picture is an error naming its file and line, or with data.skip_bad_records it is
replaced by the next readable one and counted.
Dimension letters: P prompt length, R resolution.
"""

import io
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from monoformer_jax.base import files
from monoformer_jax.base.errors import UserError
from monoformer_jax.data import common, jsonl, tokenizer as tokenizer_lib


def records(data: ml_collections.ConfigDict) -> list[dict]:
  return jsonl.read(jsonl.files(data.t2i_files, 'data.t2i_files'), jsonl.RecordKind.T2I,
                    data.skip_bad_records)


def read_picture(record: dict, skip_bad: bool) -> np.ndarray | None:
  """A record's picture as uint8 [H, W, 3]; None if unreadable and skip_bad."""
  try:
    with Image.open(io.BytesIO(files.read_bytes(record['image']))) as image:  # local: in memory
      return np.asarray(image.convert('RGB'))
  except (OSError, ValueError, UserError) as e:  # a UserError: a picture in a bucket
    if not skip_bad:
      raise UserError(f'{record["where"]}: cannot read image {record["image"]} '
                      f'({str(e).rstrip(".")}).') from None
    return None


class PictureFiles:
  """The records as a random-access source of {'image' uint8 [H, W, 3], 'prompt'}, or None
  for an unreadable picture when bad records may be skipped (what extract_latents reads)."""

  def __init__(self, data: ml_collections.ConfigDict):
    self.records, self.skip_bad = records(data), data.skip_bad_records

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int):
    record = self.records[index]
    pixels = read_picture(record, self.skip_bad)
    return None if pixels is None else dict(image=pixels, prompt=record['prompt'])


class PromptedPicture(grain.transforms.RandomMap):
  """Record index -> {'tokens' [P], 'valid' [P], 'image' [R, R, 3] float32 in [-1, 1]}."""

  def __init__(self, pairs: list[dict], tok, data: ml_collections.ConfigDict):
    self.records, self.tok = pairs, tok
    self.template = data.templates[0]
    self.prompt_len, self.resolution = data.prompt_len, data.image_resolution
    self.cfg_dropout, self.flip = data.cfg_dropout, data.random_flip
    self.skip_bad, self.skipped = data.skip_bad_records, 0

  def _pixels(self, index: int) -> tuple[int, np.ndarray]:
    """The first readable picture from index on (wrapping around), and its index."""
    for offset in range(len(self.records)):
      at = (index + offset) % len(self.records)
      pixels = read_picture(self.records[at], self.skip_bad)
      if pixels is not None:
        return at, pixels
      self.skipped += 1
      logging.warning('%s: unreadable image %s skipped (%d so far)', self.records[at]['where'],
                      self.records[at]['image'], self.skipped)
    raise UserError('no image of the text-to-image records can be read.')

  def random_map(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
    index, image = self._pixels(int(index))
    image = common.center_crop(image, self.resolution)
    if self.flip and rng.random() < 0.5:
      image = image[:, ::-1]
    prompt = '' if rng.random() < self.cfg_dropout else self.records[index]['prompt']
    text = self.template.format(name=prompt) if prompt else ''
    tokens, valid = self.tok.image_prompt(text, self.prompt_len, truncate=True)
    return dict(tokens=tokens, valid=valid, image=common.to_unit_range(image))


def examples(data: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer,
             seed: int) -> grain.MapDataset:
  """Infinite shuffled prompted pictures (not yet batched)."""
  pairs = records(data)
  transform = PromptedPicture(pairs, tok, data)
  ds = grain.MapDataset.range(len(pairs)).shuffle(seed=seed).repeat()
  return ds.random_map(transform, seed=seed)
