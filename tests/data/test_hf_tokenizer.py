"""tokenizer.json sources: special tokens read from the files beside it, MonoFormer's tokens
appended, and tokenizers that cannot be read as the project needs refused by name."""

import json

import pytest
from tokenizers import processors

from monoformer_jax.base.errors import UserError
from monoformer_jax.convert.synthetic_tokenizer import TokenizerFamily, train_bpe
from monoformer_jax.data import tokenizer as tokenizer_lib
from monoformer_jax.data.hf_tokenizer import HuggingFace


def _write(path, family, tokenizer_config=None, generation=None, post_processor=None):
  tk, config = train_bpe(family, 300)
  if post_processor is not None:
    tk.post_processor = post_processor(tk)
  path.mkdir(exist_ok=True)
  (path / 'tokenizer.json').write_text(tk.to_str())
  (path / 'tokenizer_config.json').write_text(json.dumps(dict(config, **(tokenizer_config or {}))))
  if generation is not None:
    (path / 'generation_config.json').write_text(json.dumps(generation))
  return tk


def test_special_tokens_come_from_the_tokenizer_files(tmp_path):
  tk = _write(tmp_path / 'qwen', TokenizerFamily.QWEN2, generation=dict(bos_token_id=3))
  tok = tokenizer_lib.load(str(tmp_path / 'qwen'))
  assert isinstance(tok, HuggingFace)
  # Qwen2's tokenizer_config sets bos_token to null: no BOS, whatever generation_config says.
  assert tok.bos_id is None and tok.bos == []
  assert (tok.eos_id, tok.pad_id) == (tk.token_to_id('<|im_end|>'), tk.token_to_id('<|endoftext|>'))
  assert (tok.num_pieces, tok.im_start_id, tok.im_end_id, tok.vocab_size) == (300, 300, 301, 302)
  assert tok.decode(tok.encode('a cat') + [tok.im_start_id, tok.eos_id, 5]) == 'a cat'

  # Without bos/eos in the tokenizer files, generation_config.json's ids (the first of a list).
  _write(tmp_path / 'llama', TokenizerFamily.LLAMA3, generation=dict(eos_token_id=[7, 8]))
  config = json.loads((tmp_path / 'llama' / 'tokenizer_config.json').read_text())
  del config['bos_token'], config['eos_token']
  (tmp_path / 'llama' / 'tokenizer_config.json').write_text(json.dumps(config))
  tok = tokenizer_lib.load(str(tmp_path / 'llama'))
  assert tok.eos_id == 7 and tok.bos == [tok.tk.token_to_id('<|begin_of_text|>')]
  # Llama-3 has no pad: MonoFormer's is appended after <im_start> and <im_end>.
  assert (tok.pad_id, tok.vocab_size) == (302, 303)


def test_unreadable_tokenizers_are_one_sentence(tmp_path):
  _write(tmp_path / 'suffix', TokenizerFamily.QWEN2, post_processor=lambda tk: (
      processors.TemplateProcessing(single='$A <|endoftext|>', special_tokens=[
          ('<|endoftext|>', tk.token_to_id('<|endoftext|>'))])))
  _write(tmp_path / 'unknown_eos', TokenizerFamily.QWEN2, dict(eos_token='<|eot|>'))
  _write(tmp_path / 'no_eos', TokenizerFamily.QWEN2, dict(eos_token=None))
  (tmp_path / 'empty').mkdir()
  cases = [('suffix', r'adds tokens after a text \(its post_processor\); expected at most a prefix'),
           ('unknown_eos', r"names '<\|eot\|>' as its eos token, which tokenizer\.json does not hold"),
           ('no_eos', r'names no EOS token'),
           ('empty', r'has no tokenizer\.model or tokenizer\.json')]
  for name, message in cases:
    with pytest.raises(UserError, match=message):
      tokenizer_lib.load(str(tmp_path / name))
