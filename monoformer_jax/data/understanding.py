"""Samples that read images: conversations with `<image>` placeholders, laid out as the official
training lays out its LLaVA data, for `understanding` steps.

A conversation is LLaVA's: turns {'from': 'human' | 'gpt', 'value': text}. The official configs
read them untemplated with every token learned (use_chat_template False, train_on_source True):
a human turn is `BOS value` cut to 128 tokens, a gpt turn `value EOS` cut to 512. Each `<image>`
(one token when cut) becomes its image's 1 + M slots: a time token and M feature tokens, none
learned; the i-th placeholder reads the i-th image. The sequence is cut to
data.understanding_seq_len, ending before an image whose slots would not all fit (the official
code cuts inside the image and then misplaces it; see docs/model.md).
Dimension letters: S sequence, I images per sample.
"""

import dataclasses
import enum

import numpy as np

from monoformer_jax.base.errors import UserError
from monoformer_jax.data import tokenizer as tokenizer_lib
from monoformer_jax.data.vision_input import PictureFormat

PLACEHOLDER = '<image>'
HUMAN_MAX, GPT_MAX = 128, 512  # the official source_max_len and target_max_len
IMAGE = -1  # a placeholder among the ids, before it is expanded


class UnderstandingSource(enum.Enum):
  NONE = 'none'
  DIGITS = 'digits'  # questions on the bundled digits (digits_vqa.py)
  LLAVA_JSON = 'llava_json'  # LLaVA conversation JSON (llava.py)


@dataclasses.dataclass(frozen=True)
class Reading:
  """How samples read pictures: each takes 1 + tokens_per_image slots and is given to the vision
  encoder as `picture` of `shape` (nn.vision.VisionSpec.reading makes it from a config)."""
  tokens_per_image: int
  picture: PictureFormat
  shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Layout:
  """One sample's arrays, each [S]: tokens, valid, loss_mask, and per slot which image (slot:
  1 + i, 0 at text) and where in it (offset: 0 at the time token, 1 + m at feature m)."""
  tokens: np.ndarray
  valid: np.ndarray
  loss_mask: np.ndarray
  slot: np.ndarray
  offset: np.ndarray
  images_placed: int

  def as_dict(self) -> dict:
    return dict(tokens=self.tokens, valid=self.valid, loss_mask=self.loss_mask, slot=self.slot,
                offset=self.offset)

  def left_aligned(self) -> dict:
    """The arrays moved to the end of their length (a left-padded prompt)."""
    shift = len(self.tokens) - int(self.valid.sum())
    return {k: np.roll(v, shift) for k, v in self.as_dict().items()}


def count_placeholders(turns: list[dict]) -> int:
  return sum(t['value'].count(PLACEHOLDER) for t in turns)


def turn_ids(text: str, tok: tokenizer_lib.Tokenizer) -> list[int]:
  """The ids of text with IMAGE for each placeholder (the pieces between encoded apart, as a
  HF tokenizer splits text at an added token)."""
  ids = []
  for i, piece in enumerate(text.split(PLACEHOLDER)):
    if i:
      ids.append(IMAGE)
    if piece:
      ids += tok.encode(piece)
  return ids


def conversation_ids(turns: list[dict], tok: tokenizer_lib.Tokenizer,
                     learn_questions: bool = True) -> tuple[list[int], list[bool]]:
  """The whole conversation's ids, turns cut as the official tokenization cuts them, and
  whether each is learned (the human turns' only with learn_questions)."""
  ids, learned = [], []
  for turn in turns:
    if turn['from'] == 'human':
      piece = (tok.bos + turn_ids(turn['value'], tok))[:HUMAN_MAX]
    else:
      piece = (turn_ids(turn['value'], tok) + [tok.eos_id])[:GPT_MAX]
    ids += piece
    learned += [learn_questions or turn['from'] == 'gpt'] * len(piece)
  return ids, learned


def lay_out(ids: tuple[list[int], list[bool]], tok: tokenizer_lib.Tokenizer,
            tokens_per_image: int, length: int) -> Layout:
  """ids (with IMAGE placeholders) and their learned flags, expanded and right-padded to
  `length`."""
  tokens = np.full(length, tok.pad_id, np.int32)
  learn = np.zeros(length, bool)
  slot = np.zeros(length, np.int32)
  offset = np.zeros(length, np.int32)
  at, image = 0, 0
  for token, learned in zip(*ids):
    size = tokens_per_image + 1 if token == IMAGE else 1
    if at + size > length:
      break
    if token == IMAGE:
      image += 1
      tokens[at:at + size] = tok.pad_id
      slot[at:at + size] = image
      offset[at:at + size] = np.arange(size)
    else:
      tokens[at], learn[at] = token, learned
    at += size
  valid = np.arange(length) < at
  return Layout(tokens, valid, learn, slot, offset, image)


def sample(turns: list[dict], images: np.ndarray, tok: tokenizer_lib.Tokenizer,
           tokens_per_image: int, length: int, learn_questions: bool = True) -> dict:
  """{'tokens', 'valid', 'loss_mask', 'slot', 'offset', 'images'} of one conversation, whose
  placeholders read images [I, ...] in order (rows past its pictures: zeros)."""
  layout = lay_out(conversation_ids(turns, tok, learn_questions), tok, tokens_per_image, length)
  return dict(layout.as_dict(), images=images)


def padded(pictures: list[np.ndarray], most: int, shape: tuple[int, ...]) -> np.ndarray:
  """[most, *shape] float32: the pictures, then zeros."""
  out = np.zeros((most, *shape), np.float32)
  for i, picture in enumerate(pictures):
    out[i] = picture
  return out


def placeholder_problem(turns: list[dict], num_images: int, most: int) -> str:
  """'' when the conversation has one placeholder per image and at most `most` images, else
  what is wrong."""
  found = count_placeholders(turns)
  if found != num_images:
    return (f'has {found} {PLACEHOLDER} placeholder(s) for {num_images} image(s); expected one '
            'per image')
  if num_images > most:
    return f'has {num_images} images; config key data.images_per_sample allows {most}'
  return ''


def check_placeholders(turns: list[dict], num_images: int, most: int, where: str) -> None:
  problem = placeholder_problem(turns, num_images, most)
  if problem:
    raise UserError(f'{where} {problem}.')


def turns_problem(turns) -> str:
  """'' for LLaVA's conversation shape (a list of {'from': 'human' | 'gpt', 'value': str}),
  else what is wrong."""
  if not isinstance(turns, list) or not turns or not all(
      isinstance(t, dict) and t.get('from') in ('human', 'gpt') and isinstance(t.get('value'), str)
      for t in turns):
    return ('"conversations" must be a non-empty list of {"from": "human" or "gpt", "value": '
            'text}')
  return ''
