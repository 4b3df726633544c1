"""What the command line says about itself comes from the registry (cli.py): docs/cli.md is the
page the registry generates, and each command's --help lists exactly its declared flags."""

import os

import pytest

from helpers import ROOT, cli
from monoformer_jax import cli as cli_lib, usage
from monoformer_jax.base import command_spec as spec


def test_docs_cli_page_is_what_the_registry_generates():
  page = open(os.path.join(ROOT, 'docs', 'cli.md')).read()
  assert page == usage.markdown(), ('docs/cli.md is out of date: run `python -m '
                                    'monoformer_jax.usage > docs/cli.md`')
  for name, command in cli_lib.COMMANDS.items():
    assert f'\n## {name}\n' in page
    assert all(f'`--{f.name}`' in page for f in command.all_flags())


def test_help_lists_the_declared_flags_with_their_defaults():
  for name in ('sample', 'convert'):
    result = cli(name, '--help')
    listed = [line.split(':')[0].strip() for line in result.stdout.splitlines()
              if line.startswith('  --')]
    assert listed == ['--' + f.name for f in cli_lib.COMMANDS[name].all_flags()]
  assert "--num: Number of images to sample. (default: '16')" in cli('sample', '--help').stdout


def test_a_flag_declared_twice_must_agree(monkeypatch):
  """Two commands sharing a flag name share one absl flag: another default is refused."""
  other = dict(cli_lib.COMMANDS)
  other['study'] = spec.Command('', '', (spec.integer('num', 17, 'Other.'),), lambda a: '')
  monkeypatch.setattr(cli_lib, 'COMMANDS', other)
  with pytest.raises(ValueError, match='--num is declared twice'):
    cli_lib.declared_flags()


def test_a_convert_kind_reads_only_its_own_flags():
  result = cli('convert', 'vae', '--src=a', '--dst=b', '--shape=smollm2-135m')
  assert result.returncode == 2
  assert ('--shape is not a flag of `convert vae`' in result.stderr
          and 'Traceback' not in result.stderr), result.stderr
