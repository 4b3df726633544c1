"""LLaVA conversation JSON (what the official LLaVAFinetuneDataset reads) for understanding
steps: each file a JSON list of {"image": path (or a list of paths), "conversations": [{"from":
"human" | "gpt", "value": text with <image> placeholders}, ...]}; a record without "image" is a
text conversation. Paths are relative to data.llava_image_dir, or to the JSON file's directory.

The i-th placeholder stands for the i-th picture. In a human turn it is read (the official code
reads every LLaVA picture, and only one, as an image to understand); a placeholder in a gpt turn
(this project's extension; at most one per record, as the official model draws at most one per
sample) is drawn: such records are interleaved samples for `diffusion` steps
(data.image_source 'llava_json'), which read the pictures before it in their prompt and learn to
draw it; the others are `understanding` samples. A record whose placeholders are not one per
picture, or with more pictures than data.images_per_sample, or not of this shape, is an error
naming its file and record, as is an unreadable picture (the official reader puts a black
square in its place); with data.skip_bad_records such records are skipped and counted.
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
from monoformer_jax.data import common, jsonl, understanding, vision_input


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
  problem = understanding.turns_problem(turns)
  if problem:
    return problem
  drawn = _drawn(turns)
  if len(drawn) > 1:
    return f'draws {len(drawn)} images (placeholders in gpt turns); at most one can be drawn'
  # the drawn picture is not read: data.images_per_sample bounds the others
  return understanding.placeholder_problem(turns, len(pictures), most + len(drawn))


def _drawn(turns: list[dict]) -> list[int]:
  """The indexes (among all placeholders) of those in gpt turns: the pictures to draw."""
  out, seen = [], 0
  for turn in turns:
    count = turn['value'].count(understanding.PLACEHOLDER)
    if turn['from'] == 'gpt':
      out += range(seen, seen + count)
    seen += count
  return out


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
      drawn = _drawn(record['conversations'])
      out.append(dict(conversations=record['conversations'], where=where,
                      draws=drawn[0] if drawn else None,
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
               reading: understanding.Reading):
    self.records, self.tok, self.data, self.reading = listed, tok, data, reading
    self.skipped = 0

  def pictures_of(self, record: dict) -> list[np.ndarray] | None:
    """The record's pictures as the encoder takes them; None for an unreadable one when bad
    records may be skipped (then counted)."""
    r = self.reading
    try:
      return [vision_input.encoder_input(vision_input.read_picture(p), r.picture, r.shape)
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
      pictures = self.pictures_of(record)
      if pictures is not None:
        images = understanding.padded(pictures, self.data.images_per_sample, self.reading.shape)
        return understanding.sample(record['conversations'], images, self.tok,
                                    self.reading.tokens_per_image,
                                    self.data.understanding_seq_len, self.data.learn_questions)
    raise UserError('no picture of the LLaVA records can be read.')


def _of_kind(data: ml_collections.ConfigDict, drawing: bool) -> list[dict]:
  listed = [r for r in records(data) if (r['draws'] is not None) == drawing]
  if not listed:
    wanted = 'draws a picture (a placeholder in a gpt turn)' if drawing else 'only reads'
    raise UserError(f'{data.llava_files} (data.llava_files) holds no LLaVA record that '
                    f'{wanted}.')
  return listed


def examples(data: ml_collections.ConfigDict, tok, seed: int,
             reading: understanding.Reading) -> grain.MapDataset:
  """Infinite shuffled conversations that only read (not yet batched)."""
  listed = _of_kind(data, drawing=False)
  transform = Conversation(listed, tok, data, reading)
  return grain.MapDataset.range(len(listed)).shuffle(seed=seed + 2).repeat().map(transform)


class Drawing(grain.transforms.RandomMap):
  """Record index -> an interleaved image sample: the prompt (the conversation up to the drawn
  placeholder, then <im_start>, left-padded to data.prompt_len) with the pictures it reads in
  its slots, and the drawn picture as the target ('image', center-cropped to
  data.image_resolution as the text-to-image pictures). At data.cfg_dropout the prompt is the
  unconditional `BOS <im_start>` and reads nothing."""

  def __init__(self, listed: list[dict], reader: Conversation):
    self.records, self.reader = listed, reader

  def _prompt(self, record: dict) -> understanding.Layout:
    tok, data = self.reader.tok, self.reader.data
    turns, draws = record['conversations'], record['draws']
    m = self.reader.reading.tokens_per_image
    seen, ids = 0, []
    for k, turn in enumerate(turns):
      count = turn['value'].count(understanding.PLACEHOLDER)
      if seen + count > draws:  # the drawing turn: its text up to the placeholder
        before = understanding.PLACEHOLDER.join(
            turn['value'].split(understanding.PLACEHOLDER)[:draws - seen + 1])
        ids = understanding.conversation_ids(turns[:k], tok)[0]
        ids += understanding.turn_ids(before, tok) + [tok.im_start_id]
        break
      seen += count
    layout = understanding.lay_out((ids, [True] * len(ids)), tok, m, data.prompt_len)
    if layout.valid.sum() < len(ids) + layout.images_placed * m:
      raise UserError(f'{record["where"]}: its prompt does not fit in data.prompt_len '
                      f'({data.prompt_len} tokens, each read picture taking {m + 1}).')
    return layout

  def random_map(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
    reader, data = self.reader, self.reader.data
    for offset in range(len(self.records)):
      record = self.records[(int(index) + offset) % len(self.records)]
      pictures = reader.pictures_of(dict(record, pictures=record['pictures'][:record['draws']]))
      if pictures is None:
        continue
      try:
        target = vision_input.read_picture(record['pictures'][record['draws']])
        layout = self._prompt(record)
      except UserError:
        if not data.skip_bad_records:
          raise
        reader.skipped += 1
        continue
      image = common.to_unit_range(common.center_crop(np.asarray(target),
                                                      data.image_resolution))
      if rng.random() < data.cfg_dropout:
        tokens, valid = reader.tok.image_prompt('', data.prompt_len)
        zeros = np.zeros(data.prompt_len, np.int32)
        prompt, pictures = dict(tokens=tokens, valid=valid, slot=zeros, offset=zeros), []
      else:
        prompt = layout.left_aligned()
        del prompt['loss_mask']
      images = understanding.padded(pictures, data.images_per_sample, reader.reading.shape)
      return dict(prompt, images=images, image=image)
    raise UserError('no LLaVA record that draws a picture can be read.')


def drawing_examples(data: ml_collections.ConfigDict, tok, seed: int,
                     reading: understanding.Reading) -> grain.MapDataset:
  """Infinite shuffled interleaved samples (not yet batched)."""
  listed = _of_kind(data, drawing=True)
  transform = Drawing(listed, Conversation(listed, tok, data, reading))
  return grain.MapDataset.range(len(listed)).shuffle(seed=seed).repeat().random_map(
      transform, seed=seed)
