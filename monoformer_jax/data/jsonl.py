"""Reading JSONL record files: chat conversations and text-to-image pairs.

A line that cannot be used is an error naming the file and line, unless
data.skip_bad_records is set: then it is skipped and counted.
"""

import enum
import json
import os
from typing import Any

from absl import logging

from monoformer_jax.base import files as files_lib
from monoformer_jax.base.errors import UserError
from monoformer_jax.data import common


class RecordKind(enum.Enum):
  CHAT = 'chat'  # {"messages": [{"role": "user" | "assistant", "content": str}, ...]}
  T2I = 't2i'  # {"image": path absolute, gs://, or relative to the file, "prompt": str}


ROLES = ('user', 'assistant')


def _problem(record: Any, kind: RecordKind) -> str:
  """'' when record is a usable line of the kind, else what is wrong."""
  if not isinstance(record, dict):
    return 'not a JSON object'
  if kind == RecordKind.T2I:
    for key in ('image', 'prompt'):
      if not isinstance(record.get(key), str):
        return f'no "{key}" string'
    return ''
  messages = record.get('messages')
  if not isinstance(messages, list) or not messages:
    return 'no "messages" list'
  for m in messages:
    if not isinstance(m, dict) or m.get('role') not in ROLES or not isinstance(m.get('content'), str):
      return 'a message without a "role" of user or assistant and a "content" string'
  if not any(m['role'] == 'assistant' for m in messages):
    return 'no assistant message to learn from'
  return ''


def read(paths: list[str], kind: RecordKind, skip_bad: bool) -> list[dict]:
  """The usable records of the files, each with 'where' ('FILE, line N') added."""
  records, skipped = [], 0
  for path in paths:
    with common.text_file(path) as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          record = None
        problem = 'not valid JSON' if record is None else _problem(record, kind)
        if problem:
          if not skip_bad:
            raise UserError(f'{path}, line {number}: {problem} (set data.skip_bad_records to '
                            'skip such lines).')
          skipped += 1
          continue
        record['where'] = f'{path}, line {number}'
        if kind == RecordKind.T2I and not files_lib.is_remote(record['image']):
          # Relative to the file's directory (a bucket's too); join keeps an absolute path.
          record['image'] = os.path.join(os.path.dirname(files_lib.absolute(path)), record['image'])
        records.append(record)
  if skipped:
    logging.warning('skipped %d bad lines of %s', skipped, ', '.join(paths))
  if not records:
    raise UserError(f'{", ".join(paths)} hold no usable {kind.value} records.')
  return records


def files(pattern: str, key: str) -> list[str]:
  """The files matching config key `key`'s glob; an error if there are none."""
  paths = files_lib.glob(pattern) if pattern else []
  if not paths:
    raise UserError(f'config key {key} ({pattern!r}) matches no file.')
  return paths
