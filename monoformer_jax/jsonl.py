"""JSONL sources: chat text (UltraChat style) for `ar` steps, text-to-image pairs
(JourneyDB style) for `diffusion` steps.

Chat lines are {"messages": [{"role": "user" | "assistant", "content": str}, ...]},
tokenized with the official template (`BOS ### Human: ...` for the user,
`### Assistant: ... EOS` for the assistant); only assistant tokens are
predicted. Text-to-image lines are {"image": path, "prompt": str}, the path
absolute or relative to the JSONL file. A line that cannot be used is an error
naming the file and line, unless data.skip_bad_records is set: then it is
skipped and counted (an unreadable image is replaced by the next readable one).
Dimension letters: S text length, P prompt length, R resolution.
"""

import glob
import json
import os
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from monoformer_jax import imagenet
from monoformer_jax import tokenizer as tokenizer_lib
from monoformer_jax.errors import UserError

ROLES = ('user', 'assistant')


def _problem(record: Any, kind: str) -> str:
  """'' when record is a usable line of the kind ('chat' or 't2i'), else what is wrong."""
  if not isinstance(record, dict):
    return 'not a JSON object'
  if kind == 't2i':
    for key in ('image', 'prompt'):
      if not isinstance(record.get(key), str):
        return f'no "{key}" string'
    return ''
  messages = record.get('messages')
  if not isinstance(messages, list) or not messages:
    return 'no "messages" list'
  for m in messages:
    if not isinstance(m, dict) or m.get('role') not in ROLES or not isinstance(m.get('content'), str):
      return 'a message without a "role" of user or assistant and a "content" string'
  if not any(m['role'] == 'assistant' for m in messages):
    return 'no assistant message to learn from'
  return ''


def read(paths: list[str], kind: str, skip_bad: bool) -> list[dict]:
  """The usable records of the files, each with 'where' ('FILE, line N') added."""
  records, skipped = [], 0
  for path in paths:
    with open(path, encoding='utf-8') as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          record = None
        problem = 'not valid JSON' if record is None else _problem(record, kind)
        if problem:
          if not skip_bad:
            raise UserError(f'{path}, line {number}: {problem} (set data.skip_bad_records to '
                            'skip such lines).')
          skipped += 1
          continue
        record['where'] = f'{path}, line {number}'
        if kind == 't2i' and not os.path.isabs(record['image']):
          record['image'] = os.path.join(os.path.dirname(os.path.abspath(path)), record['image'])
        records.append(record)
  if skipped:
    logging.warning('skipped %d bad lines of %s', skipped, ', '.join(paths))
  if not records:
    raise UserError(f'{", ".join(paths)} hold no usable {kind} records.')
  return records


def files(pattern: str, key: str) -> list[str]:
  paths = sorted(glob.glob(pattern)) if pattern else []
  if not paths:
    raise UserError(f'config key {key} ({pattern!r}) matches no file.')
  return paths


def chat_tokens(messages: list[dict], tok: tokenizer_lib.Tokenizer, length: int):
  """tokens [S] int32 (right-padded, truncated), valid [S] bool, loss_mask [S] bool."""
  ids, learn = [], []
  for m in messages:
    if m['role'] == 'user':
      piece = [tok.bos_id] + tok.encode('### Human: ' + m['content'].strip())
    else:
      piece = tok.encode('### Assistant: ' + m['content']) + [tok.eos_id]
    ids += piece
    learn += [m['role'] == 'assistant'] * len(piece)
  n = min(len(ids), length)
  tokens = np.full(length, tok.pad_id, np.int32)
  tokens[:n] = ids[:n]
  valid = np.arange(length) < n
  loss_mask = np.zeros(length, bool)
  loss_mask[:n] = learn[:n]
  return tokens, valid, loss_mask


def chat_examples(config: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer) -> grain.MapDataset:
  """Infinite shuffled {'tokens', 'valid', 'loss_mask'} conversations (not yet batched)."""
  records = read(files(config.data.chat_files, 'data.chat_files'), 'chat',
                 config.data.skip_bad_records)
  messages = [r['messages'] for r in records]

  def tokenize(index):
    tokens, valid, loss_mask = chat_tokens(messages[index], tok, config.data.text_seq_len)
    return dict(tokens=tokens, valid=valid, loss_mask=loss_mask)

  return (grain.MapDataset.range(len(messages)).shuffle(seed=config.seed + 1).repeat()
          .map(tokenize))


def read_picture(record: dict, skip_bad: bool) -> np.ndarray | None:
  """A text-to-image record's picture as uint8 [H, W, 3]; None if unreadable and skip_bad."""
  try:
    with Image.open(record['image']) as image:
      return np.asarray(image.convert('RGB'))
  except (OSError, ValueError) as e:
    if not skip_bad:
      raise UserError(f'{record["where"]}: cannot read image {record["image"]} ({e}).') from None
    return None


class PromptedPicture(grain.transforms.RandomMap):
  """Record index -> {'tokens' [P], 'valid' [P], 'image' [R, R, 3] float32 in [-1, 1]}."""

  def __init__(self, records: list[dict], tok, config: ml_collections.ConfigDict):
    self.records, self.tok = records, tok
    self.template = config.data.templates[0]
    self.prompt_len, self.resolution = config.data.prompt_len, config.data.image_resolution
    self.cfg_dropout, self.flip = config.data.cfg_dropout, config.data.random_flip
    self.skip_bad, self.skipped = config.data.skip_bad_records, 0

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
    image = imagenet.center_crop(image, self.resolution)
    if self.flip and rng.random() < 0.5:
      image = image[:, ::-1]
    prompt = '' if rng.random() < self.cfg_dropout else self.records[index]['prompt']
    text = self.template.format(name=prompt) if prompt else ''
    tokens, valid = self.tok.image_prompt(text, self.prompt_len, truncate=True)
    return dict(tokens=tokens, valid=valid, image=image.astype(np.float32) / 127.5 - 1.0)


def t2i_examples(config: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer) -> grain.MapDataset:
  """Infinite shuffled prompted pictures (not yet batched)."""
  records = read(files(config.data.t2i_files, 'data.t2i_files'), 't2i', config.data.skip_bad_records)
  transform = PromptedPicture(records, tok, config)
  ds = grain.MapDataset.range(len(records)).shuffle(seed=config.seed).repeat()
  return ds.random_map(transform, seed=config.seed)
