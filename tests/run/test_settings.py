"""A config is checked once, before anything is created: every value out of its range or
unfit for the others is one UserError naming the key (the command line turns it into one
`error:` line, as tests/test_main.py checks for one of them)."""

import pytest
from helpers import tiny_config

from monoformer_jax.base.errors import UserError
from monoformer_jax.run import settings


@pytest.mark.parametrize('key, value', [
    ('train.keep_checkpoints', 0), ('optim.warmup_steps', -1), ('eval.samples_per_class', 0),
    ('data.heldout_fraction', 1.5), ('data.cfg_dropout', 1.0), ('model.context_length', 16),
    ('train.objective', 'both'), ('data.chat_format', 'html'), ('model.image_size', (6, 7)),
])
def test_a_bad_value_names_its_key(key, value):
  config = tiny_config()
  section, name = key.split('.')
  config[section][name] = value
  with pytest.raises(UserError, match=key.replace('.', r'\.')):
    settings.validate(config)


def test_choices_are_parsed_once_into_their_owners_enums():
  config = tiny_config()
  config.train.objective, config.data.chat_format = 'joint', 'official'
  parsed = settings.validate(config)
  assert (parsed.objective.value, parsed.chat_format.value) == ('joint', 'official')
