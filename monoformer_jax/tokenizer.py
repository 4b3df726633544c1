"""Sentencepiece tokenizer with MonoFormer's special tokens.

Ids: 0 <unk>, 1 <s> (BOS), 2 </s> (EOS), 3 <pad>, then <im_start> and <im_end>
as user-defined pieces, so the image delimiters are single tokens that plain
text can never produce by accident.
"""

import os
import tempfile
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from monoformer_jax.errors import UserError

IM_START, IM_END = '<im_start>', '<im_end>'
MODEL_FILE = 'tokenizer.model'


class Tokenizer:
  """Encodes text to ids and builds the fixed-length model inputs."""

  def __init__(self, path: str):
    if not os.path.exists(path):
      raise UserError(f'tokenizer model {path} does not exist; train once to create it.')
    self.sp = spm.SentencePieceProcessor(model_file=path)
    self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
    self.im_start_id = self.sp.piece_to_id(IM_START)
    self.im_end_id = self.sp.piece_to_id(IM_END)
    if min(self.bos_id, self.eos_id, self.pad_id) < 0 or self.im_start_id == self.sp.unk_id():
      raise UserError(f'tokenizer model {path} lacks BOS/EOS/pad or the {IM_START} and {IM_END} '
                      'pieces; expected one trained by this project.')

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    stop = [int(i) for i in ids]
    if self.eos_id in stop:
      stop = stop[:stop.index(self.eos_id)]
    return self.sp.decode([i for i in stop if i != self.pad_id])

  def image_prompt(self, prompt: str, length: int) -> tuple[np.ndarray, np.ndarray]:
    """`BOS prompt <im_start>` left-padded to `length`: ids [P] int32, valid [P] bool.

    An empty prompt gives the unconditional `BOS <im_start>` used for guidance.
    """
    ids = [self.bos_id] + (self.encode(prompt) if prompt else []) + [self.im_start_id]
    if len(ids) > length:
      raise UserError(f'prompt {prompt!r} is {len(ids)} tokens with BOS and {IM_START}; '
                      f'expected at most data.prompt_len = {length}.')
    return self.left_pad(ids, length)

  def text_prompt(self, prompt: str, length: int) -> tuple[np.ndarray, np.ndarray]:
    """`BOS prompt` left-padded to `length` for generation."""
    ids = [self.bos_id] + self.encode(prompt)
    if len(ids) > length:
      raise UserError(f'prompt {prompt!r} is {len(ids)} tokens with BOS; expected at most {length}.')
    return self.left_pad(ids, length)

  def left_pad(self, ids: Sequence[int], length: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.full((length,), self.pad_id, np.int32)
    valid = np.zeros((length,), bool)
    if ids:
      tokens[-len(ids):] = ids
      valid[-len(ids):] = True
    return tokens, valid


def train(texts: Iterable[str], path: str, vocab_size: int) -> Tokenizer:
  """Trains a unigram model on `texts` and writes it atomically to `path`."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=directory) as tmp:
    corpus = os.path.join(tmp, 'corpus.txt')
    with open(corpus, 'w', encoding='utf-8') as f:
      for text in texts:
        for line in text.splitlines():
          if line.strip():
            f.write(line.strip() + '\n')
    prefix = os.path.join(tmp, 'spm')
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=prefix, vocab_size=vocab_size, model_type='unigram',
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        user_defined_symbols=[IM_START, IM_END], byte_fallback=True, num_threads=1,
        minloglevel=2, input_sentence_size=0, shuffle_input_sentence=False)
    os.replace(prefix + '.model', path)
  return Tokenizer(path)
