"""Chat conversations (UltraChat style) for `ar` steps, from data.chat_files.

Three formats (data.chat_format), right-padded or truncated to data.text_seq_len:
- template: every turn, in the template of the official chat script
  (`BOS ### Human: ...` for the user, `### Assistant: ... EOS` for the assistant); only
  assistant tokens are predicted;
- model: the source tokenizer's own chat template (tokenizer.json sources; chat_template.py);
- official: what the official training reads (its configs set use_chat_template=False, so
  train_on_source holds): the last user turn and the assistant turn after it, untemplated,
  `BOS user assistant EOS`, every token predicted.
Dimension letters: S text length.
"""

import enum

import grain
import ml_collections
import numpy as np

from monoformer_jax.base.errors import UserError
from monoformer_jax.data import chat_template, hf_tokenizer, jsonl, tokenizer as tokenizer_lib


class ChatFormat(enum.Enum):
  TEMPLATE = 'template'
  OFFICIAL = 'official'
  MODEL = 'model'  # the source tokenizer's own chat template (chat_template.py)


def _last_exchange(messages: list[dict]) -> list[dict]:
  """The last assistant message and the last user message before it (the official reader
  keeps only these of a conversation)."""
  answer = max(i for i, m in enumerate(messages) if m['role'] == 'assistant')
  asked = [i for i, m in enumerate(messages[:answer]) if m['role'] == 'user']
  return [messages[i] for i in asked[-1:] + [answer]]


def chat_tokens(messages: list[dict], tok: tokenizer_lib.Tokenizer, length: int,
                chat_format: ChatFormat = ChatFormat.TEMPLATE):
  """tokens [S] int32 (right-padded, truncated), valid [S] bool, loss_mask [S] bool."""
  if chat_format == ChatFormat.MODEL:
    return chat_template.chat_tokens(messages, tok, length)
  ids, learn = [], []
  official = chat_format == ChatFormat.OFFICIAL
  for m in _last_exchange(messages) if official else messages:
    if official:
      piece = (tok.bos + tok.encode(m['content']) if m['role'] == 'user'
               else tok.encode(m['content']) + [tok.eos_id])
    elif m['role'] == 'user':
      piece = tok.bos + tok.encode('### Human: ' + m['content'].strip())
    else:
      piece = tok.encode('### Assistant: ' + m['content']) + [tok.eos_id]
    ids += piece
    learn += [official or m['role'] == 'assistant'] * len(piece)
  n = min(len(ids), length)
  tokens = np.full(length, tok.pad_id, np.int32)
  tokens[:n] = ids[:n]
  valid = np.arange(length) < n
  loss_mask = np.zeros(length, bool)
  loss_mask[:n] = learn[:n]
  return tokens, valid, loss_mask


def examples(data: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer, seed: int,
             chat_format: ChatFormat) -> grain.MapDataset:
  """Infinite shuffled {'tokens', 'valid', 'loss_mask'} conversations (not yet batched)."""
  if chat_format == ChatFormat.MODEL and not isinstance(tok, hf_tokenizer.HuggingFace):
    raise UserError('config key data.chat_format is \'model\', which renders chats with the '
                    'chat template of a tokenizer.json source; this workdir\'s tokenizer is '
                    f'{tok.path}: use \'template\' or \'official\'.')
  records = jsonl.read(jsonl.files(data.chat_files, 'data.chat_files'), jsonl.RecordKind.CHAT,
                       data.skip_bad_records)
  messages = [r['messages'] for r in records]

  def tokenize(index):
    tokens, valid, loss_mask = chat_tokens(messages[index], tok, data.text_seq_len, chat_format)
    return dict(tokens=tokens, valid=valid, loss_mask=loss_mask)

  return grain.MapDataset.range(len(messages)).shuffle(seed=seed + 1).repeat().map(tokenize)
