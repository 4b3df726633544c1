"""What the command line says about itself, all read from the registry in cli.py: `--help`
(the commands, or one command's flags), docs/cli.md, and one sentence for a flag a command does
not take (instead of ignoring it) or one that does not exist.
"""

import difflib
import os
import re

from monoformer_jax import cli
from monoformer_jax.base.command_spec import Flag
from monoformer_jax.base.errors import UserError
from monoformer_jax.cli import COMMANDS


ENTRY = 'python -m monoformer_jax'


def command_line_error(argv: list[str]) -> str:
  """'' when argv names one command (and, for a command with kinds, one kind), else what is
  wrong."""
  command, rest = (argv[1], argv[2:]) if len(argv) > 1 else ('', [])
  if command not in COMMANDS:
    return (f'expected a command out of {", ".join(COMMANDS)}; got '
            f'{command or "none"} (`python -m monoformer_jax --help` describes them).')
  kinds = COMMANDS[command].kinds
  if kinds and len(rest) != 1:
    return (f'{command} takes one kind out of {", ".join(kinds)}; got '
            f'{" ".join(rest) or "none"}.')
  if kinds and rest[0] not in kinds:
    return f'{command} kind {rest[0]!r} is unknown; expected one of {", ".join(kinds)}.'
  if not kinds and rest:
    return f'{command} takes flags only; got {" ".join(rest)} besides them.'
  return ''


def config_file_problem(argv: list[str]) -> str:
  """A sentence when the --config file named in argv does not exist, else ''."""
  for i, arg in enumerate(argv):
    path = arg[len('--config='):] if arg.startswith('--config=') else (
        argv[i + 1] if arg == '--config' and i + 1 < len(argv) else None)
    if path is not None and not os.path.isfile(path.split(':')[0]):  # local: a Python module
      return (f'--config file {path.split(":")[0]} does not exist; expected a config file such as '
              'configs/digits.py.')
  return ''


def overview() -> str:
  """What `--help` without a command prints."""
  width = max(map(len, COMMANDS))
  return '\n'.join([f'{ENTRY} COMMAND [FLAGS]; {ENTRY} COMMAND --help lists its flags.', 'commands:']
                   + [f'  {name:{width}s}  {c.summary}' for name, c in COMMANDS.items()])


def _default(flag: Flag) -> str:
  if not flag.show_default or flag.default in (None, '', []):
    return ''
  value = str(flag.default).lower() if isinstance(flag.default, bool) else flag.default
  return f" (default: '{value}')"


def command_help(name: str) -> str:
  """A command's `--help`: usage, summary, its kinds if it has any, and each of its flags with
  help and default."""
  command = COMMANDS[name]
  lines = [f'{ENTRY} {name} {command.usage}', f'  {command.summary}']
  if command.kinds:
    width = max(map(len, command.kinds))
    lines += ['kinds:'] + [f'  {kind:{width}s}  {k.summary}' for kind, k in command.kinds.items()]
  lines.append('flags:')
  lines += [f'  --{f.name}: {f.described()}{_default(f)}' for f in command.all_flags()]
  return '\n'.join(lines)


def check_flags(name: str, given: set[str], kind: str = '') -> None:
  """A flag given on the command line that the command (or its kind) does not read is an
  error, not ignored."""
  command = COMMANDS[name]
  reads = command.kinds[kind].flags + command.flags if kind else command.all_flags()
  wrong = sorted(given - {f.name for f in reads}, key=list(cli.declared_flags()).index)
  if wrong:
    what = f'`{name} {kind}`' if kind else f'`{name}`'
    raise UserError(f'{", ".join("--" + f for f in wrong)} is not a flag of {what}; '
                    f'`{ENTRY} {name} --help` lists the ones it takes.')


def flag_error(message: str, command: str) -> str:
  """absl's message for a bad flag as one sentence with the likely intended flag."""
  unknown = re.match(r"Unknown command line flag '([^']+)'", message)
  if not unknown:
    return ' '.join(message.split()).rstrip('.') + '.'
  name = unknown.group(1)
  known = ([f.name for f in COMMANDS[command].all_flags()] if command in COMMANDS
           else sorted(cli.declared_flags()))
  close = difflib.get_close_matches(name, known, n=2)
  hint = f' did you mean {" or ".join("--" + c for c in close)}?' if close else ''
  where = f'`{command}`' if command in COMMANDS else 'any command'
  return (f'--{name} is not a flag of {where};{hint} `{ENTRY} {command or "COMMAND"} --help` '
          'lists them.')


def markdown() -> str:
  """docs/cli.md: every command with its usage, kinds and flags (`python -m monoformer_jax.usage
  > docs/cli.md` writes it; a test checks the page is what this returns)."""
  lines = ['# Command line', '',
           f'Every command is `{ENTRY} COMMAND [FLAGS]`; `{ENTRY} COMMAND --help` prints the same '
           'as its section here. This page is generated from the command registry '
           '(`monoformer_jax/cli.py`) by `python -m monoformer_jax.usage > docs/cli.md`; a test '
           'checks it is up to date.', '']
  lines += [f'- [`{name}`](#{name}): {c.summary}' for name, c in COMMANDS.items()]
  for name, command in COMMANDS.items():
    lines += ['', f'## {name}', '', f'`{ENTRY} {name} {command.usage}`', '', command.summary + '.']
    if command.kinds:
      lines += ['', '| kind | what it converts | flags |', '| --- | --- | --- |']
      lines += [f'| `{kind}` | {k.summary} | {", ".join("`--" + f.name + "`" for f in k.flags)} |'
                for kind, k in command.kinds.items()]
    lines += ['', '| flag | meaning | default |', '| --- | --- | --- |']
    lines += [f'| `--{f.name}` | {f.described().replace("|", "&#124;")} | '
              f'{_default(f)[len(" (default: "):-1].replace(chr(39), "`")} |'
              for f in command.all_flags()]
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  print(markdown(), end='')
