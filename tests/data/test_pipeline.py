"""Input pipelines: shapes, prompts, guidance dropout, splits, iterator state."""

import jax
import numpy as np
from helpers import image_batches, text_batches, tiny_config

from monoformer_jax.data import common, corpus, digits
from monoformer_jax.data.tokenizer import SentencePiece


def test_image_batches(workdir):
  config = tiny_config()
  tok = SentencePiece(f'{workdir}/tokenizer.model')
  batch = next(image_batches(config, tok))
  assert batch['tokens'].shape == (8, 12) and batch['tokens'].dtype == np.int32
  assert batch['image'].shape == (8, 8, 8, 1) and batch['image'].dtype == np.float32
  assert batch['image'].min() >= -1 and batch['image'].max() <= 1
  for tokens, valid, label in zip(batch['tokens'], batch['valid'], batch['label']):
    ids = tokens[valid].tolist()
    assert ids[0] == tok.bos_id and ids[-1] == tok.im_start_id  # left-padded, ends at <im_start>
    assert not valid[:len(tokens) - len(ids)].any()
    text = tok.decode(ids[1:-1])
    assert text == '' or digits.CLASS_NAMES[label] in text


def test_guidance_dropout_rate(workdir):
  config = tiny_config()
  config.data.cfg_dropout = 0.3
  tok = SentencePiece(f'{workdir}/tokenizer.model')
  it = image_batches(config, tok)
  lengths = np.concatenate([next(it)['valid'].sum(1) for _ in range(200)])
  assert abs(np.mean(lengths == 2) - 0.3) < 0.05  # BOS <im_start> only


def test_splits_are_disjoint_and_fixed():
  train, held = common.split(1797, 0.15)
  assert len(train) + len(held) == 1797 and not set(train) & set(held)
  assert np.array_equal(held, common.split(1797, 0.15)[1])


def test_iterator_state_restores_the_next_batch(workdir):
  config = tiny_config()
  tok = SentencePiece(f'{workdir}/tokenizer.model')
  for make in (image_batches, text_batches):
    it = make(config, tok)
    for _ in range(3):
      next(it)
    state = it.get_state()
    want = next(it)
    again = make(config, tok)
    again.set_state(state)
    jax.tree.map(np.testing.assert_array_equal, next(again), want)


def test_text_chunks_hold_out_documents(workdir):
  config = tiny_config()
  tok = SentencePiece(f'{workdir}/tokenizer.model')
  train = corpus.chunks(config.data, tok, heldout=False)
  held = corpus.chunks(config.data, tok, heldout=True)
  assert train.shape[1] == held.shape[1] == 32
  assert len(train) > 4 * len(held) > 0
  assert (train == tok.bos_id).any() and (train == tok.eos_id).any()
