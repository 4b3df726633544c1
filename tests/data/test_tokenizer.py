"""The workdir's tokenizer: made once, its special tokens apart from the text, prompts laid out
as the model reads them."""

import os
import shutil

import numpy as np
import pytest

from monoformer_jax.base.errors import UserError
from monoformer_jax.base.workdir_layout import Workdir
from monoformer_jax.data import tokenizer as tokenizer_lib


def test_special_tokens_stay_apart_from_text(tokenizer_file):
  tok = tokenizer_lib.SentencePiece(tokenizer_file)
  specials = {tok.im_start_id, tok.im_end_id, tok.pad_id}
  assert len(specials) == 3 and max(specials) < tok.vocab_size
  text = 'The quick brown fox'
  assert tok.decode(tok.encode(text)) == text
  assert tok.decode(tok.encode(text) + [tok.pad_id] * 3) == text  # padding is not text


def test_prompts_are_left_padded_and_end_where_the_image_starts(tokenizer_file):
  tok = tokenizer_lib.SentencePiece(tokenizer_file)
  ids = tok.encode('a handwritten digit seven')
  tokens, valid = tok.image_prompt('a handwritten digit seven', 12)
  n = len(ids) + 2
  assert list(tokens[-n:]) == [tok.bos_id, *ids, tok.im_start_id] and valid[-n:].all()
  assert (tokens[:-n] == tok.pad_id).all() and not valid[:-n].any()
  null, null_valid = tok.image_prompt('', 12)  # the dropped prompt: BOS <im_start>
  assert list(null[null_valid]) == [tok.bos_id, tok.im_start_id]
  with pytest.raises(UserError, match='data.prompt_len = 4'):
    tok.image_prompt('a handwritten digit seven', 4)
  text, text_valid = tok.text_prompt('The', 8)
  assert list(text[text_valid]) == [tok.bos_id, *tok.encode('The')]


def test_a_workdir_makes_its_tokenizer_once(tokenizer_file, tmp_path):
  model = Workdir(str(tmp_path)).tokenizer_model
  shutil.copy(tokenizer_file, model)
  before = os.path.getmtime(model)

  def never():
    raise AssertionError('an existing tokenizer is read, not trained again')
  tok = tokenizer_lib.for_workdir(str(tmp_path), '', 1024, never)
  assert os.path.getmtime(model) == before
  np.testing.assert_array_equal(tok.encode('seven'),
                                tokenizer_lib.SentencePiece(tokenizer_file).encode('seven'))
  with pytest.raises(UserError, match=r'has no tokenizer.model or tokenizer.json; copy the LLM'):
    tokenizer_lib.for_workdir(str(tmp_path / 'new'), str(tmp_path / 'empty_llm'), 1024, never)
