"""Outputs appear whole or not at all: on any failure nothing is left under the final name."""

import os

import pytest

from monoformer_jax.base import files
from monoformer_jax.base.errors import UserError


def test_a_file_appears_whole_or_not_at_all(tmp_path):
  path = tmp_path / 'out.json'
  files.write_text(str(path), 'first')
  with pytest.raises(RuntimeError):
    with files.atomic_file(str(path)) as tmp, open(tmp, 'w') as f:
      f.write('half of the sec')
      raise RuntimeError('the writer died')
  assert path.read_text() == 'first' and os.listdir(tmp_path) == ['out.json']
  files.write_text(str(path), 'second')
  assert path.read_text() == 'second' and os.listdir(tmp_path) == ['out.json']
  with pytest.raises(UserError, match='does not exist'):
    files.write_text(str(tmp_path / 'no_such_dir' / 'x'), 'y')


def test_a_directory_appears_whole_or_not_at_all(tmp_path):
  dst = tmp_path / 'converted'
  with pytest.raises(RuntimeError):
    with files.atomic_directory(str(dst)) as tmp:
      open(os.path.join(tmp, 'part'), 'w').close()
      raise RuntimeError('the conversion died')
  assert os.listdir(tmp_path) == []
  with files.atomic_directory(str(dst)) as tmp:
    open(os.path.join(tmp, 'part'), 'w').close()
  assert os.listdir(dst) == ['part']
  with pytest.raises(UserError, match='already exists'):
    with files.atomic_directory(str(dst)):
      pass
