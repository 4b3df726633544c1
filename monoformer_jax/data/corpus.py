"""Plain text for `ar` steps: data.text_file, or the English text bundled with CPython.

Documents (paragraphs of the file, or the `pydoc_data.topics` entries sorted by
name) are split into train and held-out parts by the fixed split, streamed as
`BOS doc EOS` and cut into chunks of data.text_seq_len tokens.
Dimension letters: S text length.
"""

import grain
import ml_collections
import numpy as np

from monoformer_jax.base import files
from monoformer_jax.base.errors import UserError
from monoformer_jax.data import common, tokenizer as tokenizer_lib


def documents(data: ml_collections.ConfigDict) -> list[str]:
  """The text corpus as documents: pydoc topics (sorted by name) or one file's paragraphs."""
  path = data.text_file
  if path:
    if not files.isfile(path):
      raise UserError(f'config key data.text_file names {path}, which does not exist.')
    docs = [d for d in common.text_file(path).read().split('\n\n') if d.strip()]
    if not docs:
      raise UserError(f'data.text_file {path} holds no text.')
    return docs
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  return [topics.topics[k] for k in sorted(topics.topics)]


def pack(docs: list[str], tok: tokenizer_lib.Tokenizer, length: int) -> np.ndarray:
  """`BOS doc EOS` streams cut into [num_chunks, S] int32 chunks."""
  stream = [i for doc in docs for i in tok.bos + tok.encode(doc) + [tok.eos_id]]
  n = len(stream) // length
  if n == 0:
    raise UserError(f'the text corpus has {len(stream)} tokens; expected at least '
                    f'data.text_seq_len = {length}.')
  return np.asarray(stream[:n * length], np.int32).reshape(n, length)


def chunks(data: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer,
           heldout: bool) -> np.ndarray:
  """The training or held-out documents as [num_chunks, S] int32 chunks."""
  docs = documents(data)
  if len(docs) < 2:
    raise UserError('the text corpus needs at least two documents (paragraphs) to hold one out.')
  train_idx, held_idx = common.split(len(docs), data.heldout_fraction)
  return pack([docs[i] for i in (held_idx if heldout else train_idx)], tok, data.text_seq_len)


def next_line_questions(data: ml_collections.ConfigDict, count: int, choices: int = 4,
                        seed: int = 0) -> list[tuple[str, list[str], int]]:
  """(context, choices, gold) questions from the held-out documents: a line as the context,
  and its true next line among choices - 1 orderings of that line's own words, in a seeded
  order. Every choice has the same words, so only the order tells them apart."""
  docs = documents(data)
  _, held_idx = common.split(len(docs), data.heldout_fraction)
  rng = np.random.default_rng(seed)
  candidates = []
  for i in held_idx:
    lines = [l.strip() for l in docs[i].splitlines() if l.strip()]
    candidates += [(a, b) for a, b in zip(lines, lines[1:]) if len(set(b.split())) >= 4]
  questions = []
  for k in rng.permutation(len(candidates))[:count]:
    context, true_line = candidates[k]
    words = true_line.split()
    options = [' '.join(words)]  # single spaces, as the orderings have: the same length
    while len(options) < choices:
      shuffled = ' '.join(words[w] for w in rng.permutation(len(words)))
      if shuffled not in options:
        options.append(shuffled)
    order = rng.permutation(choices)
    questions.append((context, [options[o] for o in order], int(np.argmax(order == 0))))
  if not questions:
    raise UserError('the held-out text has no two consecutive lines to make next-line '
                    'questions from (the second with four different words or more).')
  return questions


def examples(data: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer,
             seed: int) -> grain.MapDataset:
  """Infinite shuffled {'tokens', 'valid', 'loss_mask'} training chunks (not yet batched)."""
  ds = grain.MapDataset.source(chunks(data, tok, heldout=False)).shuffle(seed=seed + 1).repeat()
  return ds.map(lambda c: dict(tokens=c, valid=np.ones(c.shape, bool),
                               loss_mask=np.ones(c.shape, bool)))
