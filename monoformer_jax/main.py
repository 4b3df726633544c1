"""Command line: python -m monoformer_jax COMMAND [FLAGS]. The commands, their flags and the
function each runs are declared in cli.py; this module defines those flags for absl, parses,
checks and dispatches. Multi-host runs add --coordinator_address/--num_processes/--process_id,
or --multihost (see launch/).
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from monoformer_jax import cli, usage
from monoformer_jax.base import files
from monoformer_jax.base.command_spec import Args, Flag, FlagType
from monoformer_jax.base.errors import UserError
from monoformer_jax.config import schema
from monoformer_jax.training import checkpoint, guards


def _define(flag: Flag) -> None:
  """The absl flag of a declaration (absl's own help is never shown: usage.py writes it)."""
  if flag.type == FlagType.CONFIG_FILE:
    config_flags.DEFINE_config_file(flag.name, flag.default, flag.help, lock_config=True)
  elif flag.type == FlagType.ENUM:
    flags.DEFINE_enum_class(flag.name, flag.default, flag.enum_class, flag.help,
                            case_sensitive=False)
  else:
    define = {FlagType.STRING: flags.DEFINE_string, FlagType.INTEGER: flags.DEFINE_integer,
              FlagType.FLOAT: flags.DEFINE_float, FlagType.BOOL: flags.DEFINE_bool,
              FlagType.MULTI_STRING: flags.DEFINE_multi_string}[flag.type]
    define(flag.name, flag.default, flag.help)


for _flag in cli.declared_flags().values():
  _define(_flag)


def init_distributed(a: Args) -> None:
  """Joins the other processes of a multi-host run, before any device is touched (commands
  without the multi-host flags run in one process)."""
  if not a.has('num_processes'):
    return
  if a.num_processes > 1:
    if not a.coordinator_address or not 0 <= a.process_id < a.num_processes:
      raise UserError(f'--num_processes={a.num_processes} needs --coordinator_address and a '
                      f'--process_id in [0, {a.num_processes}).')
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # no effect off CPU
    jax.distributed.initialize(a.coordinator_address, a.num_processes, a.process_id)
  elif a.multihost:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize()


def _fail(message: str, code: int = 2) -> None:
  print(message, file=sys.stderr, flush=True)
  sys.exit(code)


def _args(argv: list[str]) -> Args:
  """The command's flag values (a bucket workdir in one spelling: one lease), its kind, and
  which flags were given; a flag it does not read, or one it needs and lacks, is an error."""
  command, kind = cli.COMMANDS[argv[1]], (argv[2] if len(argv) > 2 else '')
  given = {name for name in cli.declared_flags() if flags.FLAGS[name].present}
  usage.check_flags(argv[1], given, kind)
  values = {f.name: flags.FLAGS[f.name].value for f in command.all_flags()}
  if values.get('workdir') and files.is_remote(values['workdir']):
    values['workdir'] = files.absolute(values['workdir'])
  for name, sentence in command.required.items():
    if not values[name]:
      raise UserError(sentence.format(command=argv[1]))
  return Args(dict(values, kind=kind), frozenset(given))


def main(argv) -> None:
  problem = usage.command_line_error(argv)
  if problem:
    _fail(f'error: {problem}')
  if not flags.FLAGS['verbosity'].present:  # library INFO logs drown the progress lines
    logging.set_verbosity(logging.WARNING)
  checkpoint.quiet_save_threads()
  try:
    a = _args(argv)
    init_distributed(a)
    said = cli.COMMANDS[argv[1]].run(a)
    if said and jax.process_index() == 0:
      print(said, flush=True)
  except UserError as e:
    _fail(f'error: {e}')
  except guards.Preempted as e:
    _fail(str(e), guards.PREEMPTED_EXIT_CODE)
  except KeyboardInterrupt:  # a second Ctrl-C in training, or one anywhere else
    _fail('interrupted: stopped at once; nothing more was saved.', guards.INTERRUPTED_EXIT_CODE)
  except OSError as e:  # a full disk, a file that cannot be written or read
    _fail(f'error: {e.strerror or e}: {e.filename or "(no file named)"}.')


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with config errors (a key the config lacks, a bad value) as one sentence;
  `COMMAND --help` lists that command's flags, `--help` alone the commands."""
  command = argv[1] if len(argv) > 1 else ''
  if {'--help', '-h', '-?', '--helpshort', '--helpfull'} & set(argv):
    print(usage.command_help(command) if command in cli.COMMANDS else usage.overview())
    sys.exit(0)
  problem = usage.config_file_problem(argv) or schema.unknown_overrides(argv)
  if problem:
    _fail(f'error: {problem}')
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # an unknown flag, a value of the wrong type
    _fail(f'error: {usage.flag_error(str(e), command)}')
  except Exception as e:  # pylint: disable=broad-except
    # The config file runs at parsing: anything it raises (a syntax error, no get_config)
    # is the file's fault.
    detail = ' '.join(str(e).replace('\\n', ' ').replace("\\", '').replace("'", '').split())
    _fail(f'error: the config (file or --config.* override) is invalid: {type(e).__name__}: '
          f'{detail}.')


def run() -> None:
  app.run(main, flags_parser=_parse_flags)
