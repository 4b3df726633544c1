"""Chat conversations (UltraChat style) for `ar` steps, from data.chat_files.

Tokenized with the official template (`BOS ### Human: ...` for the user,
`### Assistant: ... EOS` for the assistant), right-padded or truncated to
data.text_seq_len; only assistant tokens are predicted.
Dimension letters: S text length.
"""

import grain
import ml_collections
import numpy as np

from monoformer_jax import tokenizer as tokenizer_lib
from monoformer_jax.data import jsonl


def chat_tokens(messages: list[dict], tok: tokenizer_lib.Tokenizer, length: int):
  """tokens [S] int32 (right-padded, truncated), valid [S] bool, loss_mask [S] bool."""
  ids, learn = [], []
  for m in messages:
    if m['role'] == 'user':
      piece = [tok.bos_id] + tok.encode('### Human: ' + m['content'].strip())
    else:
      piece = tok.encode('### Assistant: ' + m['content']) + [tok.eos_id]
    ids += piece
    learn += [m['role'] == 'assistant'] * len(piece)
  n = min(len(ids), length)
  tokens = np.full(length, tok.pad_id, np.int32)
  tokens[:n] = ids[:n]
  valid = np.arange(length) < n
  loss_mask = np.zeros(length, bool)
  loss_mask[:n] = learn[:n]
  return tokens, valid, loss_mask


def examples(data: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer,
             seed: int) -> grain.MapDataset:
  """Infinite shuffled {'tokens', 'valid', 'loss_mask'} conversations (not yet batched)."""
  records = jsonl.read(jsonl.files(data.chat_files, 'data.chat_files'), jsonl.RecordKind.CHAT,
                       data.skip_bad_records)
  messages = [r['messages'] for r in records]

  def tokenize(index):
    tokens, valid, loss_mask = chat_tokens(messages[index], tok, data.text_seq_len)
    return dict(tokens=tokens, valid=valid, loss_mask=loss_mask)

  return grain.MapDataset.range(len(messages)).shuffle(seed=seed + 1).repeat().map(tokenize)
