"""Tokenizers with MonoFormer's special tokens: sentencepiece, or HF tokenizer.json (hf_tokenizer).

Which one a directory (a converted LLM, a workdir) holds is read from its files: tokenizer.model
(sentencepiece, as TinyLlama and the models trained here have) before tokenizer.json (byte-level
BPE, as SmolLM2, Llama-3 and Qwen2 have). Models trained here have ids 0 <unk>, 1 <s> (BOS),
2 </s> (EOS), 3 <pad>, then <im_start> and <im_end> as user-defined pieces. A pretrained LLM's
tokenizer without them (and often without a pad) gets them appended after its last entry, in the
order <im_start>, <im_end>, <pad>.
"""

import abc
import dataclasses
import os
import tempfile
from typing import Callable, Iterable, Optional, Sequence

import jax
import numpy as np
import sentencepiece as spm
from jax.experimental import multihost_utils

from monoformer_jax.base import files
from monoformer_jax.base.errors import UserError
from monoformer_jax.base.workdir_layout import (HF_TOKENIZER_FILES, SPECIAL_TOKENS,
                                                TOKENIZER_JSON, TOKENIZER_MODEL, Workdir)


IM_START, IM_END = '<im_start>', '<im_end>'


class Tokenizer(abc.ABC):
  """Encodes text to ids and builds the fixed-length model inputs.

  bos: the ids the source's tokenizer puts before a text ([BOS], or [] as for Qwen2);
  num_pieces: the source's entries; vocab_size: with MonoFormer's tokens appended."""
  path: str
  bos: list[int]
  bos_id: Optional[int]
  eos_id: int
  pad_id: int
  im_start_id: int
  im_end_id: int
  num_pieces: int
  vocab_size: int

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """The ids of text, without BOS or EOS."""

  @abc.abstractmethod
  def decode_pieces(self, ids: list[int]) -> str:
    """Text of ids that are all the source's own entries."""

  def chat_template(self) -> Optional[str]:
    """The source's Jinja chat template, where it has one."""
    return None

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """The ids that end a generated turn: EOS, and any other end-of-turn ids the source names."""
    return (self.eos_id,)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of ids up to the first that ends a turn (stop_ids)."""
    kept = []
    for i in map(int, ids):
      if i in self.stop_ids:
        break
      kept.append(i)
    return self.decode_pieces([i for i in kept if i != self.pad_id and i < self.num_pieces])

  def image_prompt(self, prompt: str, length: int,
                   truncate: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`BOS prompt <im_start>` left-padded to `length`: ids [P] int32, valid [P] bool.

    An empty prompt gives the unconditional `BOS <im_start>` used for guidance. A
    prompt too long is an error, or with truncate keeps its first tokens."""
    ids = self.bos + (self.encode(prompt) if prompt else []) + [self.im_start_id]
    if truncate and len(ids) > length:
      ids = ids[:length - 1] + [self.im_start_id]
    if len(ids) > length:
      raise UserError(f'prompt {prompt!r} is {len(ids)} tokens with BOS and {IM_START}; '
                      f'expected at most data.prompt_len = {length}.')
    return self.left_pad(ids, length)

  def text_prompt(self, prompt: str, length: int) -> tuple[np.ndarray, np.ndarray]:
    """`BOS prompt` left-padded to `length` for generation."""
    ids = self.bos + self.encode(prompt)
    if len(ids) > length:
      raise UserError(f'prompt {prompt!r} is {len(ids)} tokens with BOS; expected at most {length}.')
    return self.left_pad(ids, length)

  def left_pad(self, ids: Sequence[int], length: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.full((length,), self.pad_id, np.int32)
    tokens[length - len(ids):] = ids
    return tokens, np.arange(length) >= length - len(ids)


class SentencePiece(Tokenizer):
  """A sentencepiece model; text that spells a special piece is plain text."""

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
    self.bos = [self.bos_id]
    self.num_pieces = self.sp.get_piece_size()
    next_id = self.num_pieces

    def own_or_appended(piece_id: int) -> int:
      nonlocal next_id
      if piece_id >= 0 and piece_id != self.sp.unk_id():
        return piece_id
      next_id += 1
      return next_id - 1

    specials_path = os.path.join(os.path.dirname(path), SPECIAL_TOKENS)
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

  def decode_pieces(self, ids: list[int]) -> str:
    return self.sp.decode(ids)


def kind_file(directory: str) -> Optional[str]:
  """The file that says which tokenizer `directory` holds, or None."""
  for name in (TOKENIZER_MODEL, TOKENIZER_JSON):
    if files.exists(os.path.join(directory, name)):
      return name
  return None


def load(directory: str, what: str = '') -> Tokenizer:
  """The tokenizer a directory holds; `what` names the directory in the error for none."""
  name = kind_file(directory)
  if name == TOKENIZER_MODEL:
    return SentencePiece(os.path.join(directory, TOKENIZER_MODEL))
  if name == TOKENIZER_JSON:
    from monoformer_jax.data import hf_tokenizer  # pylint: disable=g-import-not-at-top
    return hf_tokenizer.HuggingFace(directory)
  raise UserError(f'{what or directory} has no {TOKENIZER_MODEL} or {TOKENIZER_JSON}; copy the '
                  'LLM\'s tokenizer files into it.')


def copy_files(src: str, dst: str) -> None:
  """The tokenizer files of directory src into dst (the one that marks the kind last)."""
  name = kind_file(src)
  names = [TOKENIZER_MODEL, SPECIAL_TOKENS] if name == TOKENIZER_MODEL else HF_TOKENIZER_FILES
  for n in sorted(names, key=lambda n: n == name):
    if files.exists(os.path.join(src, n)):
      files.copy(os.path.join(src, n), os.path.join(dst, n))


def train(texts: Iterable[str], path: str, vocab_size: int) -> SentencePiece:
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
  return SentencePiece(path)


def for_workdir(workdir: str, init_from: str, vocab_size: int,
                texts: Callable[[], list[str]]) -> Tokenizer:
  """The workdir's tokenizer, made at first use: a copy of the pretrained LLM's when the
  backbone comes from the converted directory init_from, else a sentencepiece model trained
  on texts()."""
  if jax.process_count() > 1:  # process 0 makes it; the others wait, then read it
    if jax.process_index() == 0 and not kind_file(workdir):
      _make(workdir, init_from, vocab_size, texts)
    multihost_utils.sync_global_devices('tokenizer written')
    if not kind_file(workdir):
      raise UserError(f'the tokenizer in {workdir} is not visible from host '
                      f'{jax.process_index()}; the workdir must be shared by all hosts.')
  if kind_file(workdir):
    return load(workdir)
  return _make(workdir, init_from, vocab_size, texts)


def of_llm(init_from: str) -> Tokenizer:
  """The tokenizer of the converted LLM directory init_from, named as a config key when absent
  (rather than as a workdir tokenizer that training would create)."""
  return load(init_from, f'{init_from} (config key model.init_from)')


def _make(workdir: str, init_from: str, vocab_size: int,
          texts: Callable[[], list[str]]) -> Tokenizer:
  if init_from:
    of_llm(init_from)  # readable before anything is copied
    copy_files(init_from, workdir)
    return load(workdir)
  return train(texts(), Workdir(workdir).tokenizer_model, vocab_size)


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
