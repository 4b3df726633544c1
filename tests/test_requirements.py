"""Every third-party module the package imports is named in requirements.txt itself, so that a
user who installs that file alone can run every command: read from the package's syntax trees
(imports inside functions count too), each module mapped to the distribution that provides it
in this environment. A module that requirements.txt lists as optional (a comment line
`# optional: NAME>=VERSION`) may only be imported inside a function, by the path that needs it.
"""

import ast
import functools
import importlib.metadata
import importlib.util
import os
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]*')


def _canonical(name: str) -> str:
  return re.sub(r'[-_.]+', '-', name).lower()


def declared(requirements: pathlib.Path) -> tuple[set[str], set[str]]:
  """(required, optional) distribution names of a requirements file, canonical."""
  required, optional = set(), set()
  for line in requirements.read_text().splitlines():
    line = line.strip()
    if line.startswith('# optional:'):
      optional.add(_canonical(_NAME.match(line[len('# optional:'):].strip()).group()))
      continue
    line = line.split('#', 1)[0].strip()
    assert not line.startswith('-'), f'{requirements.name} includes another file: {line}'
    if line:
      required.add(_canonical(_NAME.match(line).group()))
  return required, optional


def third_party_imports(package: pathlib.Path) -> list[tuple[str, str, bool]]:
  """(module, where, inside a function) of each import of a module outside the standard
  library and the package."""
  found = []
  for path in sorted(package.rglob('*.py')):
    tree = ast.parse(path.read_text(), str(path))
    lazy = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in ast.walk(f)}
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0:
        names = [_from_import(node.module, alias.name) for alias in node.names]
      else:
        continue
      for name in names:
        top = name.split('.')[0]
        if top not in sys.stdlib_module_names and top != package.name:
          where = f'{path.relative_to(package.parent)}:{node.lineno}'
          found.append((name, where, id(node) in lazy))
  return found


@functools.cache
def _providers(top: str) -> set[str]:
  """The installed distributions that hold a top-level module (several for a namespace)."""
  return set(_packages_distributions().get(top, []))


@functools.cache
def _packages_distributions() -> dict[str, list[str]]:
  return importlib.metadata.packages_distributions()


def _from_import(module: str, name: str) -> str:
  """What `from MODULE import NAME` imports: the submodule NAME where MODULE is a namespace
  that several distributions share (google.cloud.storage), else MODULE."""
  if len(_providers(module.split('.')[0])) < 2:
    return module
  return f'{module}.{name}' if importlib.util.find_spec(f'{module}.{name}') else module


@functools.cache
def distribution_of(module: str) -> str:
  """The installed distribution that provides a module; for a namespace shared by several
  (google.*), the one whose files hold the module itself."""
  candidates = sorted(_providers(module.split('.')[0]))
  assert candidates, f'{module} is imported by the package but is not installed here'
  if len(candidates) > 1:
    spec = importlib.util.find_spec(module)
    origin = spec.origin or next(iter(spec.submodule_search_locations))
    for name in candidates:
      dist = importlib.metadata.distribution(name)
      held = os.path.relpath(origin, pathlib.Path(dist.locate_file('')).resolve())
      if any(str(f) == held or str(f).startswith(held + '/') for f in dist.files or []):
        return _canonical(name)
  return _canonical(candidates[0])


def undeclared(package: pathlib.Path, requirements: pathlib.Path) -> list[str]:
  """Each import that requirements.txt does not cover, as 'WHERE: MODULE (DISTRIBUTION) ...'."""
  required, optional = declared(requirements)
  problems = []
  for module, where, lazy in third_party_imports(package):
    dist = distribution_of(module)
    if dist in required:
      continue
    if dist not in optional:
      problems.append(f'{where}: {module} ({dist}) is not in {requirements.name}')
    elif not lazy:
      problems.append(f'{where}: {module} ({dist}) is optional, yet imported at module level')
  return problems


def test_every_imported_module_is_declared_in_requirements_txt():
  assert undeclared(ROOT / 'monoformer_jax', ROOT / 'requirements.txt') == []


def test_an_undeclared_import_is_found_wherever_it_stands(tmp_path):
  package = tmp_path / 'monoformer_jax'
  (package / 'sub').mkdir(parents=True)
  (package / '__init__.py').write_text('import numpy\nfrom monoformer_jax import sub\n')
  (package / 'sub' / 'lazy.py').write_text(
      'def f():\n  import pytest\n  from google.cloud import storage\n  import torch\n')
  (package / 'sub' / 'eager.py').write_text('import transformers\n')
  requirements = tmp_path / 'requirements.txt'
  requirements.write_text('numpy>=1.26\ngoogle-cloud-storage>=2  # buckets\n'
                          '# optional: torch>=2.4  # one path\n# optional: transformers>=4\n')
  assert undeclared(package, requirements) == [
      'monoformer_jax/sub/eager.py:1: transformers (transformers) is optional, yet imported at '
      'module level',
      'monoformer_jax/sub/lazy.py:2: pytest (pytest) is not in requirements.txt']
