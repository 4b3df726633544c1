"""How a command of the command line is declared: its flags (name, type, default, help), what it
is for, and the function that runs it. The declarations live with the commands (`cli.py`, and
`convert/commands.py` for the conversion kinds); `--help`, the flag checks, the dispatch and
docs/cli.md are all read from them.
"""

import dataclasses
import enum
from typing import Any, Callable, Mapping, Optional


class FlagType(enum.Enum):
  STRING = 'string'
  INTEGER = 'integer'
  FLOAT = 'float'
  BOOL = 'bool'
  MULTI_STRING = 'multi_string'  # repeatable
  ENUM = 'enum'  # an enum.Enum class, its values case-insensitive
  CONFIG_FILE = 'config_file'  # ml_collections: --config=FILE.py and --config.KEY=VALUE


@dataclasses.dataclass(frozen=True)
class Flag:
  """One flag as a command reads it. A flag of several commands is one absl flag: its type and
  default are the same everywhere; its help may say what it means to each (`means`).
  `show_default` False leaves the default out of --help (it does not apply to the command)."""
  name: str
  type: FlagType
  default: Any
  help: str
  enum_class: Optional[type] = None
  show_default: bool = True

  def means(self, help: str, show_default: bool = True) -> 'Flag':  # pylint: disable=redefined-builtin
    return dataclasses.replace(self, help=help, show_default=show_default)

  def described(self) -> str:
    """The help as --help prints it: enum flags first list their values."""
    if self.type != FlagType.ENUM:
      return self.help
    return f'<{"|".join(m.value for m in self.enum_class)}>: {self.help}'


def string(name: str, default: Optional[str], help: str) -> Flag:  # pylint: disable=redefined-builtin
  return Flag(name, FlagType.STRING, default, help)


def integer(name: str, default: Optional[int], help: str) -> Flag:  # pylint: disable=redefined-builtin
  return Flag(name, FlagType.INTEGER, default, help)


def real(name: str, default: Optional[float], help: str) -> Flag:  # pylint: disable=redefined-builtin
  return Flag(name, FlagType.FLOAT, default, help)


def boolean(name: str, default: bool, help: str) -> Flag:  # pylint: disable=redefined-builtin
  return Flag(name, FlagType.BOOL, default, help)


def repeated(name: str, help: str) -> Flag:  # pylint: disable=redefined-builtin
  return Flag(name, FlagType.MULTI_STRING, [], help)


def choice(name: str, enum_class: type, help: str) -> Flag:  # pylint: disable=redefined-builtin
  """An enum flag whose default (None) means 'what the config says'."""
  return Flag(name, FlagType.ENUM, None, help, enum_class)


class Args:
  """A command's flag values by name (`args.num`), and whether the user gave one
  (`args.given('num')`); `values` maps a name to its value, `given` holds the names given."""

  def __init__(self, values: Mapping[str, Any], given: frozenset[str] = frozenset()):
    self._values, self._given = dict(values), given

  def __getattr__(self, name: str) -> Any:
    try:
      return self._values[name]
    except KeyError:
      raise AttributeError(f'no flag --{name} was declared for this command') from None

  def given(self, name: str) -> bool:
    return name in self._given

  def has(self, name: str) -> bool:
    """Whether the command reads the flag at all."""
    return name in self._values


Action = Callable[[Args], Optional[str]]  # what a command does; returns what it prints at the end


@dataclasses.dataclass(frozen=True)
class Kind:
  """What a command's one positional word (convert's KIND) selects: its line in --help, the
  flags it reads, and what it runs."""
  summary: str
  flags: tuple[Flag, ...]
  run: Action


@dataclasses.dataclass(frozen=True)
class Command:
  """A command: its usage line and summary for --help, the flags it reads, the ones it cannot
  do without (with the sentence that says so, {command} its name), and what it runs. With
  `kinds`, the command takes one of them as a word and reads the flags of all of them."""
  usage: str
  summary: str
  flags: tuple[Flag, ...]
  run: Action
  required: Mapping[str, str] = dataclasses.field(default_factory=dict)
  kinds: Mapping[str, Kind] = dataclasses.field(default_factory=dict)

  def all_flags(self) -> tuple[Flag, ...]:
    """The command's flags, then those its kinds add, each name once."""
    seen, out = set(), []
    for flag in self.flags + tuple(f for k in self.kinds.values() for f in k.flags):
      if flag.name not in seen:
        seen.add(flag.name)
        out.append(flag)
    return tuple(out)
