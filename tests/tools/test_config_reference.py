"""docs/config.md is what the schema's comments generate, every config key has help, and the
reader takes a key's help by the documented rule (so the check can fail)."""

import os

import ml_collections

from helpers import ROOT
from monoformer_jax.nn import model as model_lib
from monoformer_jax.tools import config_reference

PLANTED = '''
def base_config():
  c = ml_collections.ConfigDict()
  c.s = ml_collections.ConfigDict()  # a section
  c.s.trailing = 1  # its own comment
  # A block directly above,
  # on two lines.
  c.s.block = 2  # then its trailing comment
  # A block above a blank line belongs to nothing.

  c.s.bare = (3,
              4)
  c.s.wrapped = (5,
                 6)  # a comment on the last line
  return c
'''


def test_the_page_is_what_the_schema_generates():
  page = open(os.path.join(ROOT, 'docs', 'config.md'), encoding='utf-8').read()
  assert page == config_reference.markdown(), (
      f'docs/config.md is out of date: run `{config_reference.COMMAND}`')


def test_every_key_has_help():
  assert config_reference.undocumented() == [], (
      'config keys without help: write a comment beside each in monoformer_jax/config/schema.py')


def test_every_named_size_is_listed():
  page = config_reference.markdown()
  sizes = page.split('\n## Named model sizes\n')[1]
  for name, shape in model_lib.SIZES.items():
    row = f'| `{name}` | ' + ' | '.join(str(v) for v in shape.values()) + ' |'
    assert row in sizes, row


def test_the_reader_follows_the_rule_and_finds_a_key_without_help():
  assert config_reference.key_help(PLANTED) == {
      's': 'a section', 's.trailing': 'its own comment',
      's.block': 'A block directly above, on two lines. then its trailing comment',
      's.bare': '', 's.wrapped': 'a comment on the last line'}
  config = ml_collections.ConfigDict()
  config.s = ml_collections.ConfigDict(dict(trailing=1, block=2, bare=(3, 4), wrapped=(5, 6)))
  assert config_reference.undocumented(PLANTED, config) == ['s.bare']
  config.s.unwritten = 0  # a key the source does not assign has no help either
  assert config_reference.undocumented(PLANTED, config) == ['s.bare', 's.unwritten']
