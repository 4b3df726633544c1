"""Writing outputs so that a crash never leaves a half-written one under the final name.

Each output is written under a temporary name beside its destination and renamed into place only
once complete; on any failure the temporary file or directory is removed.
"""

import contextlib
import os
import shutil
from typing import Iterator

from monoformer_jax.base.errors import UserError


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
  """Yields a temporary path to write; it becomes `path` when the block finishes."""
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise UserError(f'output directory {directory} does not exist.')
  tmp = path + '.tmp'
  try:
    yield tmp
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically."""
  with atomic_file(path) as tmp, open(tmp, 'w', encoding='utf-8') as f:
    f.write(text)


@contextlib.contextmanager
def atomic_directory(dst: str) -> Iterator[str]:
  """Yields a scratch directory that becomes `dst` (which must not exist) if the block finishes."""
  if os.path.exists(dst):
    raise UserError(f'destination {dst} already exists; remove it or choose another.')
  if not os.path.isdir(os.path.dirname(os.path.abspath(dst))):
    raise UserError(f'the parent directory of {dst} does not exist.')
  tmp = os.path.abspath(dst) + '.partial'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  os.rename(tmp, dst)
