"""LLaVA conversation JSON (what the official LLaVAFinetuneDataset reads) for understanding
steps: each file a JSON list of {"image": path (or a list of paths), "conversations": [{"from":
"human" | "gpt", "value": text with <image> placeholders}, ...]}; a record without "image" is a
text conversation. Paths are relative to data.llava_image_dir, or to the JSON file's directory.

The i-th placeholder reads the i-th picture (the official code reads every LLaVA picture, and
only one, as an image to understand). A record whose placeholders are not one per picture, or
with more pictures than data.images_per_sample, or not of this shape, is an error naming its file
and record, as is an unreadable picture (the official reader puts a black square in its place);
with data.skip_bad_records such records are skipped and counted.
Dimension letters: I images per sample.
"""

import json
import os
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import logging

from monoformer_jax.base import files
from monoformer_jax.base.errors import UserError
from monoformer_jax.data import jsonl, understanding, vision_input


def _pictures(record: dict) -> list[str]:
  image = record.get('image')
  if image is None:
    return []
  return [image] if isinstance(image, str) else image


def _problem(record: Any, most: int) -> str:
  """'' when the record can be read, else what is wrong."""
  if not isinstance(record, dict):
    return 'not a JSON object'
  pictures = _pictures(record)
  if not isinstance(pictures, list) or not all(isinstance(p, str) for p in pictures):
    return '"image" is neither a path nor a list of paths'
  turns = record.get('conversations')
  return (understanding.turns_problem(turns)
          or understanding.placeholder_problem(turns, len(pictures), most))


def records(data: ml_collections.ConfigDict) -> list[dict]:
  """The usable records of data.llava_files, each with 'where' ('FILE, record N') and its
  pictures' full paths ('pictures')."""
  out, skipped = [], 0
  paths = jsonl.files(data.llava_files, 'data.llava_files')
  for path in paths:
    try:
      listed = json.loads(files.read_text(path))
    except (ValueError, UnicodeDecodeError) as e:
      raise UserError(f'{path} is not a JSON file ({type(e).__name__}); expected a list of '
                      'LLaVA records.') from None
    if not isinstance(listed, list):
      raise UserError(f'{path} holds a JSON {type(listed).__name__}; expected a list of LLaVA '
                      'records.')
    root = data.llava_image_dir or os.path.dirname(files.absolute(path))
    for number, record in enumerate(listed):
      where = f'{path}, record {number}'
      problem = _problem(record, data.images_per_sample)
      if problem:
        if not data.skip_bad_records:
          raise UserError(f'{where}: {problem} (set data.skip_bad_records to skip such records).')
        skipped += 1
        continue
      out.append(dict(conversations=record['conversations'], where=where,
                      pictures=[p if files.is_remote(p) else os.path.join(root, p)
                                for p in _pictures(record)]))
  if skipped:
    logging.warning('skipped %d bad records of %s', skipped, ', '.join(paths))
  if not out:
    raise UserError(f'{", ".join(paths)} hold no usable LLaVA records.')
  return out


class Conversation(grain.transforms.Map):
  """Record index -> an understanding sample; pictures made what the encoder takes."""

  def __init__(self, listed: list[dict], tok, data: ml_collections.ConfigDict,
               tokens_per_image: int, picture: vision_input.PictureFormat,
               shape: tuple[int, ...]):
    self.records, self.tok, self.data = listed, tok, data
    self.tokens_per_image, self.picture, self.shape = tokens_per_image, picture, shape
    self.skipped = 0

  def _read(self, record: dict) -> list[np.ndarray] | None:
    try:
      return [vision_input.encoder_input(vision_input.read_picture(p), self.picture, self.shape)
              for p in record['pictures']]
    except UserError as e:
      if not self.data.skip_bad_records:
        raise UserError(f'{record["where"]}: {str(e).rstrip(".")}.') from None
      self.skipped += 1
      logging.warning('%s: unreadable picture skipped (%d so far)', record['where'], self.skipped)
      return None

  def map(self, index: int) -> dict[str, Any]:
    for offset in range(len(self.records)):  # the first record from index on that reads
      record = self.records[(int(index) + offset) % len(self.records)]
      pictures = self._read(record)
      if pictures is not None:
        images = understanding.padded(pictures, self.data.images_per_sample, self.shape)
        return understanding.sample(record['conversations'], images, self.tok,
                                    self.tokens_per_image, self.data.understanding_seq_len,
                                    self.data.learn_questions)
    raise UserError('no picture of the LLaVA records can be read.')


def examples(data: ml_collections.ConfigDict, tok, seed: int, tokens_per_image: int,
             picture: vision_input.PictureFormat, shape: tuple[int, ...]) -> grain.MapDataset:
  """Infinite shuffled conversations (not yet batched)."""
  listed = records(data)
  transform = Conversation(listed, tok, data, tokens_per_image, picture, shape)
  return grain.MapDataset.range(len(listed)).shuffle(seed=seed + 2).repeat().map(transform)
