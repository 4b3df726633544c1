"""Grain pipelines for the embedded default: digits with text prompts, and text.

Images: scikit-learn's bundled 8x8 digits scaled to [-1, 1], class-conditional
through prompts from the config's templates, with prompts dropped (for
classifier-free guidance) at data.cfg_dropout. Text: the English text bundled
with CPython (`pydoc_data.topics`) or a file, packed into fixed-length chunks.
Both are split into train and held-out parts by a fixed permutation; each
host reads its own slice of every batch.
"""

import os
import shutil
from typing import Any

import grain
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from monoformer_jax import imagenet, jsonl, latents
from monoformer_jax import tokenizer as tokenizer_lib
from monoformer_jax.config_lib import ImageSource, TextSource
from monoformer_jax.errors import UserError

DIGIT_NAMES = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
_SPLIT_SEED = 20240924  # fixed: the held-out split never depends on the run's seed


def load_documents(config: ml_collections.ConfigDict) -> list[str]:
  """The text corpus as documents: pydoc topics (sorted by name) or one file."""
  path = config.data.text_file
  if path:
    if not os.path.isfile(path):
      raise UserError(f'config key data.text_file names {path}, which does not exist.')
    with open(path, encoding='utf-8') as f:
      docs = [d for d in f.read().split('\n\n') if d.strip()]
    if not docs:
      raise UserError(f'data.text_file {path} holds no text.')
    return docs
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  return [topics.topics[k] for k in sorted(topics.topics)]


def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """Images [1797, 8, 8, 1] float32 in [-1, 1] and labels [1797] int32."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = digits.images.astype(np.float32)[..., None] / 16.0 * 2.0 - 1.0
  return images, digits.target.astype(np.int32)


def split(n: int, heldout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Train and held-out indices of n items."""
  order = np.random.default_rng(_SPLIT_SEED).permutation(n)
  n_held = max(1, int(round(n * heldout_fraction)))
  return np.sort(order[n_held:]), np.sort(order[:n_held])


def prompts(config: ml_collections.ConfigDict) -> list[str]:
  return [t.format(name=name) for name in DIGIT_NAMES for t in config.data.templates]


def get_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> tokenizer_lib.Tokenizer:
  """The workdir's tokenizer: the pretrained LLM's when the backbone comes from one,
  else trained on the text and the prompts at first use."""
  path = os.path.join(workdir, tokenizer_lib.MODEL_FILE)
  if jax.process_count() > 1:  # process 0 makes it; the others wait, then read it
    if jax.process_index() == 0 and not os.path.exists(path):
      _make_tokenizer(config, path)
    multihost_utils.sync_global_devices('tokenizer written')
    if not os.path.exists(path):
      raise UserError(f'{path} is not visible from host {jax.process_index()}; the workdir must '
                      'be shared by all hosts.')
  if os.path.exists(path):
    return tokenizer_lib.Tokenizer(path)
  return _make_tokenizer(config, path)


def _make_tokenizer(config: ml_collections.ConfigDict, path: str) -> tokenizer_lib.Tokenizer:
  if config.model.init_from:
    source = os.path.join(config.model.init_from, tokenizer_lib.MODEL_FILE)
    if not os.path.exists(source):
      raise UserError(f'{config.model.init_from} has no {tokenizer_lib.MODEL_FILE}; copy the LLM\'s '
                      'sentencepiece model there.')
    shutil.copy(source, path + '.tmp')
    os.replace(path + '.tmp', path)
    return tokenizer_lib.Tokenizer(path)
  texts = load_documents(config) + prompts(config) * 20
  return tokenizer_lib.train(texts, path, config.data.tokenizer_vocab_size)


def pack_text(docs: list[str], tok: tokenizer_lib.Tokenizer, length: int) -> np.ndarray:
  """`BOS doc EOS` streams cut into [num_chunks, length] int32 chunks."""
  stream = []
  for doc in docs:
    stream.extend([tok.bos_id] + tok.encode(doc) + [tok.eos_id])
  n = len(stream) // length
  if n == 0:
    raise UserError(f'the text corpus has {len(stream)} tokens; expected at least '
                    f'data.text_seq_len = {length}.')
  return np.asarray(stream[:n * length], np.int32).reshape(n, length)


class PromptedDigit(grain.transforms.RandomMap):
  """Index -> {'tokens', 'valid', 'image', 'label'} with a random template or no prompt."""

  def __init__(self, images, labels, prompts: tokenizer_lib.PromptTable, cfg_dropout: float):
    self.images, self.labels = images, labels
    self.prompts, self.cfg_dropout = prompts, cfg_dropout

  def random_map(self, index, rng: np.random.Generator) -> dict[str, Any]:
    label = self.labels[index]
    tokens, valid = self.prompts.pick(rng, label, self.cfg_dropout)
    return dict(tokens=tokens, valid=valid, image=self.images[index], label=label)


def host_batches(ds: grain.MapDataset, global_batch: int) -> grain.MapDataset:
  """This host's rows of every global batch: a contiguous block, so that the global
  batch (assembled across hosts) is the same whatever the number of hosts."""
  hosts, host = jax.process_count(), jax.process_index()
  if global_batch % hosts:
    raise UserError(f'batch size {global_batch} is not divisible by {hosts} hosts.')
  per_host = global_batch // hosts

  def element(k):
    batch, row = divmod(k, per_host)
    return ds[batch * global_batch + host * per_host + row]

  rows = grain.MapDataset.range(len(ds) // global_batch * per_host).map(element)
  return rows.batch(per_host, drop_remainder=True)


def image_dataset(config, tok: tokenizer_lib.Tokenizer) -> grain.MapDataset:
  """Infinite shuffled batches of prompted training images for this host."""
  source = ImageSource(config.data.image_source)
  if source == ImageSource.IMAGENET:
    return host_batches(imagenet.examples(config, tok), config.data.image_batch_size)
  if source == ImageSource.LATENTS:
    return host_batches(latents.examples(config, tok), config.data.image_batch_size)
  if source == ImageSource.T2I_JSONL:
    return host_batches(jsonl.t2i_examples(config, tok), config.data.image_batch_size)
  images, labels = load_digits()
  train_idx, _ = split(len(images), config.data.heldout_fraction)
  prompts = tokenizer_lib.PromptTable.build(tok, DIGIT_NAMES, config.data.templates,
                                            config.data.prompt_len)
  transform = PromptedDigit(images[train_idx], labels[train_idx], prompts, config.data.cfg_dropout)
  ds = grain.MapDataset.range(len(train_idx)).shuffle(seed=config.seed).repeat()
  ds = ds.random_map(transform, seed=config.seed)
  return host_batches(ds, config.data.image_batch_size)


def text_chunks(config, tok: tokenizer_lib.Tokenizer, heldout: bool) -> np.ndarray:
  docs = load_documents(config)
  if len(docs) < 2:
    raise UserError('the text corpus needs at least two documents (paragraphs) to hold one out.')
  train_idx, held_idx = split(len(docs), config.data.heldout_fraction)
  chosen = held_idx if heldout else train_idx
  return pack_text([docs[i] for i in chosen], tok, config.data.text_seq_len)


def text_dataset(config, tok: tokenizer_lib.Tokenizer) -> grain.MapDataset:
  """Infinite shuffled batches of {'tokens', 'valid', 'loss_mask'} training text for this host."""
  if TextSource(config.data.text_source) == TextSource.CHAT_JSONL:
    return host_batches(jsonl.chat_examples(config, tok), config.data.text_batch_size)
  chunks = text_chunks(config, tok, heldout=False)
  ds = grain.MapDataset.source(chunks).shuffle(seed=config.seed + 1).repeat()
  ds = ds.map(lambda c: dict(tokens=c, valid=np.ones(c.shape, bool), loss_mask=np.ones(c.shape, bool)))
  return host_batches(ds, config.data.text_batch_size)


def iterator(ds: grain.MapDataset) -> grain.DatasetIterator:
  """A checkpointable iterator that prefetches on background threads."""
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))
