"""docs/config.md: every config key with its default and help, and the named model sizes.

A key's help is the comment written next to it in `config.schema.base_config()`: the comment block
directly above its assignment (full-line comments, no blank line between), then its trailing
comment, joined by a space. A block belongs to the one key below it, never to a group. A
section's trailing comment (`c.data = ml_collections.ConfigDict()  # ...`) describes the section.
`python -m monoformer_jax.tools.config_reference > docs/config.md` writes the page; a test checks
that the page is what `markdown()` returns and that every key has help.
"""

import ast
import inspect
import io
import tokenize

import ml_collections

from monoformer_jax.config import schema
from monoformer_jax.nn import model as model_lib

COMMAND = 'python -m monoformer_jax.tools.config_reference > docs/config.md'


def _comments(source: str) -> tuple[dict[int, str], dict[int, str]]:
  """(line -> a full-line comment's text, line -> a trailing comment's text) of source."""
  full, trailing = {}, {}
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT:
      line, column = token.start
      alone = not token.line[:column].strip()
      (full if alone else trailing)[line] = token.string.lstrip('#').strip()
  return full, trailing


def _dotted(target: ast.expr, root: str) -> str:
  """'data.text_file' for the target `c.data.text_file` (root 'c'); '' for any other target."""
  names = []
  while isinstance(target, ast.Attribute):
    names.append(target.attr)
    target = target.value
  return '.'.join(reversed(names)) if isinstance(target, ast.Name) and target.id == root else ''


def key_help(source: str, function: str = 'base_config', root: str = 'c') -> dict[str, str]:
  """Dotted key or section -> its help ('' where nothing is written), for every `root.X = ...`
  assignment in the body of `function` in source, by the rule in this module's docstring."""
  full, trailing = _comments(source)
  body = next(node for node in ast.walk(ast.parse(source))
              if isinstance(node, ast.FunctionDef) and node.name == function).body
  found = {}
  for node in body:
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
      continue
    key = _dotted(node.targets[0], root)
    if not key:
      continue
    block, line = [], node.lineno - 1
    while line in full:
      block.insert(0, full[line])
      line -= 1
    own = [trailing[n] for n in range(node.lineno, node.end_lineno + 1) if n in trailing]
    found[key] = ' '.join(block + own)
  return found


def _entries(config: ml_collections.ConfigDict, order: dict[str, int], prefix: str = ''):
  """(section path, {key path: default}) for the config and each section in it, depth first,
  keys and sections by their place in `order` (the schema's; others last); the top level is ''."""
  items = sorted(config.items(), key=lambda kv: order.get(prefix + kv[0], len(order)))
  leaves = {prefix + k: v for k, v in items if not isinstance(v, ml_collections.ConfigDict)}
  yield prefix.rstrip('.'), leaves
  for k, v in items:
    if isinstance(v, ml_collections.ConfigDict):
      yield from _entries(v, order, f'{prefix}{k}.')


def _places(helps: dict[str, str]) -> dict[str, int]:
  return {key: place for place, key in enumerate(helps)}


def undocumented(source: str | None = None,
                 config: ml_collections.ConfigDict | None = None) -> list[str]:
  """The keys of config (default: base_config()) without help in source (default: schema.py)."""
  source = inspect.getsource(schema) if source is None else source
  config = schema.base_config() if config is None else config
  helps = key_help(source)
  return [key for _, leaves in _entries(config, _places(helps)) for key in leaves
          if not helps.get(key)]


def _cell(text: str) -> str:
  """Text for a table cell: '|' escaped, and '<' outside code spans, so that `<im_start>`
  shows instead of being read as HTML."""
  parts = text.replace('|', '\\|').split('`')
  return '`'.join(p if i % 2 else p.replace('<', '&lt;') for i, p in enumerate(parts))


def _code(value) -> str:
  """A default as a code span in a table cell: its repr, '|' escaped."""
  return '`' + repr(value).replace('|', '\\|') + '`'


def _sizes_table() -> list[str]:
  fields = list(dict.fromkeys(f for shape in model_lib.SIZES.values() for f in shape))
  lines = ['| name | ' + ' | '.join(fields) + ' |', '| --- |' + ' --- |' * len(fields)]
  return lines + [f'| `{name}` | ' + ' | '.join(str(shape.get(f, '')) for f in fields) + ' |'
                  for name, shape in model_lib.SIZES.items()]


def markdown() -> str:
  """docs/config.md: a table of keys per section, then the named model sizes."""
  helps = key_help(inspect.getsource(schema))
  lines = ['# Config reference', '',
           'Every key a config file may set, with its default and what it means. A config file '
           'in `configs/` starts from `base_config()` (`monoformer_jax/config/schema.py`) and sets '
           'what it needs; the command line overrides any key with `--config.KEY=VALUE`, such as '
           '`--config.train.num_steps=100`. The config is locked: an unknown key, in a file or in '
           'an override, is refused. This page is generated from the comments beside each key '
           'in schema.py (a key\'s help is the comment block directly above it and its trailing '
           f'comment) by `{COMMAND}`; a test checks that it is up to date and that every key has '
           'help.', '']
  sections = [(s, leaves) for s, leaves in _entries(schema.base_config(), _places(helps)) if leaves]
  lines += [f'{"  " * section.count(".")}- [{section or "Top level"}]'
            f'(#{section.replace(".", "") or "top-level"})' for section, _ in sections]
  lines.append('- [Named model sizes](#named-model-sizes)')
  for section, leaves in sections:
    level = '#' * (2 + section.count('.')) if section else '##'
    lines += ['', f'{level} {section or "Top level"}', '']
    if helps.get(section):
      lines += [_cell(helps[section][0].upper() + helps[section][1:]) + '.', '']
    lines += ['| key | default | meaning |', '| --- | --- | --- |']
    lines += [f'| `{key}` | {_code(value)} | {_cell(helps.get(key, "").removesuffix("."))} |'
              for key, value in leaves.items()]
  lines += ['', '## Named model sizes', '',
            '`model.size` names one of these shapes (`monoformer_jax/nn/model.py` `SIZES`); '
            "`'custom'` takes the shape from `model.width` to `model.head_dim` instead, and "
            "`'auto'` from the converted LLM of `model.init_from`. Each head is width / num_heads "
            'wide.', '']
  return '\n'.join(lines + _sizes_table()) + '\n'


if __name__ == '__main__':
  print(markdown(), end='')
