"""Sentencepiece tokenizer with MonoFormer's special tokens.

Models trained here have ids 0 <unk>, 1 <s> (BOS), 2 </s> (EOS), 3 <pad>, then
<im_start> and <im_end> as user-defined pieces. A pretrained LLM's model (no
such pieces, often no pad) gets them appended after its last piece, in the
order <im_start>, <im_end>, <pad>; text never encodes to those ids.
"""

import dataclasses
import os
import tempfile
from typing import Callable, Iterable, Sequence

import jax
import numpy as np
import sentencepiece as spm
from jax.experimental import multihost_utils

from monoformer_jax.base import files
from monoformer_jax.base.errors import UserError


IM_START, IM_END = '<im_start>', '<im_end>'
MODEL_FILE = 'tokenizer.model'
SPECIALS_FILE = 'special_tokens.json'  # optional {"im_start", "im_end", "pad"} ids beside it


class Tokenizer:
  """Encodes text to ids and builds the fixed-length model inputs."""

  def __init__(self, path: str):
    if not files.exists(path):
      raise UserError(f'tokenizer model {path} does not exist; train once to create it.')
    self.path = path
    try:  # from its bytes: sentencepiece opens local files only
      self.sp = spm.SentencePieceProcessor(model_proto=files.read_bytes(path))
    except (OSError, RuntimeError) as e:
      raise UserError(f'tokenizer model {path} is not a sentencepiece model ({e}).') from e
    self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
    if min(self.bos_id, self.eos_id) < 0:
      raise UserError(f'tokenizer model {path} has no BOS or EOS piece.')
    self.num_pieces = self.sp.get_piece_size()
    next_id = self.num_pieces

    def own_or_appended(piece_id: int) -> int:
      nonlocal next_id
      if piece_id >= 0 and piece_id != self.sp.unk_id():
        return piece_id
      next_id += 1
      return next_id - 1

    specials_path = os.path.join(os.path.dirname(path), SPECIALS_FILE)
    if files.exists(specials_path):  # ids fixed by a converted checkpoint
      ids = files.read_json(specials_path)
      self.im_start_id, self.im_end_id, self.pad_id = ids['im_start'], ids['im_end'], ids['pad']
      next_id = max(next_id, self.im_start_id + 1, self.im_end_id + 1, self.pad_id + 1)
    else:
      self.im_start_id = own_or_appended(self.sp.piece_to_id(IM_START))
      self.im_end_id = own_or_appended(self.sp.piece_to_id(IM_END))
      self.pad_id = own_or_appended(self.sp.pad_id())
    self.vocab_size = next_id

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    stop = [int(i) for i in ids]
    if self.eos_id in stop:
      stop = stop[:stop.index(self.eos_id)]
    return self.sp.decode([i for i in stop if i != self.pad_id and i < self.num_pieces])

  def image_prompt(self, prompt: str, length: int,
                   truncate: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`BOS prompt <im_start>` left-padded to `length`: ids [P] int32, valid [P] bool.

    An empty prompt gives the unconditional `BOS <im_start>` used for guidance. A
    prompt too long is an error, or with truncate keeps its first tokens."""
    ids = [self.bos_id] + (self.encode(prompt) if prompt else []) + [self.im_start_id]
    if truncate and len(ids) > length:
      ids = ids[:length - 1] + [self.im_start_id]
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
    tokens[length - len(ids):] = ids
    return tokens, np.arange(length) >= length - len(ids)


def train(texts: Iterable[str], path: str, vocab_size: int) -> Tokenizer:
  """Trains a unigram model on `texts` and writes it atomically to `path`."""
  files.makedirs(os.path.dirname(files.absolute(path)))
  with tempfile.TemporaryDirectory() as tmp:  # the trainer reads and writes local files only
    corpus = os.path.join(tmp, 'corpus.txt')
    with open(corpus, 'w', encoding='utf-8') as f:  # local: the trainer's scratch input
      f.writelines(line.strip() + '\n' for text in texts for line in text.splitlines()
                   if line.strip())
    prefix = os.path.join(tmp, 'spm')
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=prefix, vocab_size=vocab_size, model_type='unigram',
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        user_defined_symbols=[IM_START, IM_END], byte_fallback=True, num_threads=1,
        minloglevel=2, input_sentence_size=0, shuffle_input_sentence=False)
    files.write_bytes(path, files.read_bytes(prefix + '.model'))
  return Tokenizer(path)


def for_workdir(workdir: str, init_from: str, vocab_size: int,
                texts: Callable[[], list[str]]) -> Tokenizer:
  """The workdir's tokenizer, made at first use: a copy of the pretrained LLM's when the
  backbone comes from the converted directory init_from, else trained on texts()."""
  path = os.path.join(workdir, MODEL_FILE)
  if jax.process_count() > 1:  # process 0 makes it; the others wait, then read it
    if jax.process_index() == 0 and not files.exists(path):
      _make(path, init_from, vocab_size, texts)
    multihost_utils.sync_global_devices('tokenizer written')
    if not files.exists(path):
      raise UserError(f'{path} is not visible from host {jax.process_index()}; the workdir must '
                      'be shared by all hosts.')
  if files.exists(path):
    return Tokenizer(path)
  return _make(path, init_from, vocab_size, texts)


def llm_model_file(init_from: str) -> str:
  """The sentencepiece model of the converted LLM directory init_from. `convert llama` copies
  one only when its source has one (synthetic checkpoints have none), so a missing one is
  named with what to copy, rather than as a workdir tokenizer that training would create."""
  source = os.path.join(init_from, MODEL_FILE)
  if not files.exists(source):
    raise UserError(f'{init_from} (config key model.init_from) has no {MODEL_FILE}; copy the '
                    f'LLM\'s sentencepiece {MODEL_FILE} into it before training.')
  return source


def _make(path: str, init_from: str, vocab_size: int, texts: Callable[[], list[str]]) -> Tokenizer:
  if init_from:
    files.write_bytes(path, files.read_bytes(llm_model_file(init_from)))
    return Tokenizer(path)
  return train(texts(), path, vocab_size)


@dataclasses.dataclass(frozen=True)
class PromptTable:
  """Every (class, template) image prompt tokenized once, and the null prompt.

  tokens, valid: [classes, templates, P]; null: ([P], [P])."""
  tokens: np.ndarray
  valid: np.ndarray
  null: tuple[np.ndarray, np.ndarray]

  @classmethod
  def build(cls, tok: 'Tokenizer', names: Sequence[str], templates: Sequence[str],
            length: int) -> 'PromptTable':
    rows = [[tok.image_prompt(t.format(name=name), length) for t in templates] for name in names]
    return cls(np.stack([[p[0] for p in row] for row in rows]),
               np.stack([[p[1] for p in row] for row in rows]), tok.image_prompt('', length))

  def pick(self, rng: np.random.Generator, label: int, dropout: float):
    """The null prompt with probability dropout, else a random template for the label."""
    if rng.random() < dropout:
      return self.null
    k = rng.integers(self.tokens.shape[1])
    return self.tokens[label, k], self.valid[label, k]
