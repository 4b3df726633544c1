"""Chat and text-to-image JSONL sources written by the tests: tokens, masks, pictures, errors."""

import json

import numpy as np
import pytest
from helpers import image_batches, text_batches, tiny_config
from PIL import Image

from monoformer_jax.base.errors import UserError
from monoformer_jax.data import chat, jsonl, t2i, tokenizer as tokenizer_lib
from monoformer_jax.data.jsonl import RecordKind


CHATS = [
    {'messages': [{'role': 'user', 'content': ' What is a list? '},
                  {'role': 'assistant', 'content': 'An ordered sequence.'},
                  {'role': 'user', 'content': 'And a tuple?'},
                  {'role': 'assistant', 'content': 'An immutable one.'}]},
    {'messages': [{'role': 'user', 'content': 'Say hi.'}, {'role': 'assistant', 'content': 'hi'}]},
]


def _write(path, rows):
  path.write_text(''.join((r if isinstance(r, str) else json.dumps(r)) + '\n' for r in rows))
  return str(path)


@pytest.fixture
def tok(tokenizer_file):
  return tokenizer_lib.SentencePiece(tokenizer_file)


def test_chat_template_and_assistant_only_mask(tok):
  tokens, valid, mask = chat.chat_tokens(CHATS[0]['messages'], tok, 96)
  user1 = [tok.bos_id] + tok.encode('### Human: What is a list?')
  bot1 = tok.encode('### Assistant: An ordered sequence.') + [tok.eos_id]
  user2 = [tok.bos_id] + tok.encode('### Human: And a tuple?')
  bot2 = tok.encode('### Assistant: An immutable one.') + [tok.eos_id]
  ids = user1 + bot1 + user2 + bot2
  assert tokens[:len(ids)].tolist() == ids and (tokens[len(ids):] == tok.pad_id).all()
  assert valid.sum() == len(ids)
  want = [False] * len(user1) + [True] * len(bot1) + [False] * len(user2) + [True] * len(bot2)
  assert mask[:len(ids)].tolist() == want and not mask[len(ids):].any()
  short = chat.chat_tokens(CHATS[0]['messages'], tok, 10)
  assert short[0].tolist() == ids[:10] and short[1].all()


def test_chat_batches(tmp_path, tok):
  config = tiny_config()
  config.data.text_source = 'chat_jsonl'
  config.data.chat_files = _write(tmp_path / 'chat.jsonl', CHATS * 3)
  batch = next(text_batches(config, tok))
  assert batch['tokens'].shape == (4, 32) and batch['loss_mask'].dtype == bool
  assert (batch['loss_mask'] <= batch['valid']).all() and batch['loss_mask'].any()


@pytest.mark.parametrize('line, problem', [
    ('{"messages": [{"role": "user", "content": "x"}', 'not valid JSON'),
    ({'messages': [{'role': 'system', 'content': 'x'}]}, 'a message without a "role"'),
    ({'messages': [{'role': 'user', 'content': 'x'}]}, 'no assistant message'),
])
def test_bad_chat_line_is_named(tmp_path, line, problem):
  path = _write(tmp_path / 'chat.jsonl', [CHATS[0], line, CHATS[1]])
  with pytest.raises(UserError, match=f'chat.jsonl, line 2: {problem}'):
    jsonl.read([path], RecordKind.CHAT, skip_bad=False)
  assert len(jsonl.read([path], RecordKind.CHAT, skip_bad=True)) == 2


def _pictures(tmp_path, count=4):
  rng = np.random.default_rng(0)
  rows = []
  for i in range(count):
    Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), np.uint8)).save(tmp_path / f'p{i}.png')
    rows.append({'image': f'p{i}.png', 'prompt': f'picture number {i}'})
  return rows


def t2i_config(path):
  config = tiny_config()
  config.data.image_source = 't2i_jsonl'
  config.data.t2i_files = path
  config.data.image_resolution = 16
  config.data.templates = ('Please generate an image of {name}',)
  config.eval.prompt_template = 'Please generate an image of {name}'
  config.data.prompt_len = 8
  config.model.image_size, config.model.image_channels = (16, 16), 3
  config.train.eval_at_end = False
  return config


def test_text_to_image_batches_and_truncated_prompts(tmp_path, tok):
  config = t2i_config(_write(tmp_path / 't2i.jsonl', _pictures(tmp_path)))
  batch = next(image_batches(config, tok))
  assert batch['image'].shape == (8, 16, 16, 3) and batch['image'].dtype == np.float32
  assert batch['tokens'].shape == (8, 8)
  records = jsonl.read([config.data.t2i_files], RecordKind.T2I, False)
  transform = t2i.PromptedPicture(records, tok, config.data)
  out = transform.random_map(2, np.random.default_rng(3))
  prompts = [tok.image_prompt(p, 8, truncate=True)[0]
             for p in ('Please generate an image of picture number 2', '')]
  assert any((out['tokens'] == p).all() for p in prompts)
  assert out['tokens'][-1] == tok.im_start_id


def test_missing_prompt_and_unreadable_image(tmp_path, tok):
  rows = _pictures(tmp_path)
  path = _write(tmp_path / 'bad.jsonl', rows[:2] + [{'image': 'p2.png'}] + rows[2:])
  with pytest.raises(UserError, match=r'bad.jsonl, line 3: no "prompt" string'):
    jsonl.read([path], RecordKind.T2I, skip_bad=False)
  (tmp_path / 'p1.png').write_text('not a picture')
  config = t2i_config(_write(tmp_path / 'broken.jsonl', rows))
  records = jsonl.read([config.data.t2i_files], RecordKind.T2I, False)
  with pytest.raises(UserError, match=r'broken.jsonl, line 2: cannot read image .*p1.png'):
    t2i.PromptedPicture(records, tok, config.data).random_map(1, np.random.default_rng(0))
  config.data.skip_bad_records = True
  transform = t2i.PromptedPicture(records, tok, config.data)
  transform.random_map(1, np.random.default_rng(0))  # replaced by the next readable picture
  assert transform.skipped == 1


def test_no_matching_files(tmp_path):
  with pytest.raises(UserError, match=r'data.t2i_files .* matches no file'):
    jsonl.files(str(tmp_path / '*.jsonl'), 'data.t2i_files')


def test_official_chat_format_is_the_last_exchange_untemplated_every_token_learned(tok):
  tokens, valid, mask = chat.chat_tokens(CHATS[0]['messages'], tok, 96, chat.ChatFormat.OFFICIAL)
  ids = [tok.bos_id] + tok.encode('And a tuple?') + tok.encode('An immutable one.') + [tok.eos_id]
  assert tokens[:len(ids)].tolist() == ids and (tokens[len(ids):] == tok.pad_id).all()
  assert valid.sum() == len(ids) and (mask == valid).all()
