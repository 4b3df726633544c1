"""The package's architecture: concept packages in the order of the data flow, each importing
only from itself and earlier ones, as the layout table of docs/architecture.md (checked here)
says."""

import ast
import glob
import os
import re
import subprocess
import sys

import pytest

from helpers import ROOT

PACKAGE = os.path.join(ROOT, 'monoformer_jax')
# Packages (folders) and top-level modules, earliest first: each may import only itself and
# what comes before it.
ORDER = ['base', 'config', 'data', 'nn', 'diffusion', 'training', 'generation', 'evaluation', 'run',
         'convert', 'train', 'tools', 'cli', 'usage', 'main', '__main__', '__init__']


def _modules() -> dict[str, str]:
  """Dotted name under the package -> path, for every module."""
  paths = glob.glob(os.path.join(PACKAGE, '**', '*.py'), recursive=True)
  names = {os.path.relpath(p, PACKAGE)[:-3].replace(os.sep, '.'): p for p in paths}
  return {name.removesuffix('.__init__') if name != '__init__' else name: p
          for name, p in names.items()}


def _stage(name: str) -> str:
  """A module's package, or its own name at the top level."""
  first = name.split('.')[0]
  assert first in ORDER, f'monoformer_jax.{name}: {first} has no place in ORDER; give it one'
  return first


def _imports(path: str) -> set[str]:
  """The package modules a file imports (as dotted names under the package)."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.add(node.module)
      out |= {f'{node.module}.{a.name}' for a in node.names}
  known = _modules()
  return {m.removeprefix('monoformer_jax.') for m in out
          if m.startswith('monoformer_jax.') and m.removeprefix('monoformer_jax.') in known}


def test_every_module_has_a_stage():
  for name in _modules():
    _stage(name)


@pytest.mark.parametrize('name', sorted(_modules()))
def test_imports_follow_the_flow(name):
  here = ORDER.index(_stage(name))
  later = {m: _stage(m) for m in _imports(_modules()[name]) if ORDER.index(_stage(m)) > here}
  assert not later, f'monoformer_jax.{name} ({ORDER[here]}) imports later stages: {later}'


def test_the_check_sees_a_violation(tmp_path):
  """The parser finds a late import where one is written (the test can fail)."""
  bad = tmp_path / 'bad.py'
  bad.write_text('from monoformer_jax import train\nfrom monoformer_jax.data import pipeline\n')
  assert _imports(str(bad)) >= {'train', 'data.pipeline'}
  assert ORDER.index(_stage('train')) > ORDER.index(_stage('data.pipeline'))


def test_every_package_says_what_lives_there():
  for name in ORDER:
    init = os.path.join(PACKAGE, name, '__init__.py')
    if os.path.isdir(os.path.join(PACKAGE, name)):
      doc = ast.get_docstring(ast.parse(open(init).read())) or ''
      assert len(doc.split()) > 10, f'{name}/__init__.py needs a docstring'


def test_the_architecture_layout_table_is_the_package():
  """docs/architecture.md's layout table: one row per package and top-level module, in ORDER,
  each naming every module the package holds and nothing that is not there."""
  page = open(os.path.join(ROOT, 'docs', 'architecture.md')).read()
  section = page.split('\n## Layout\n')[1].split('\n## ')[0]
  rows = [line for line in section.splitlines() if line.startswith('| `')]
  firsts = [re.match(r'\| `([\w./]+)`', row).group(1).rstrip('/').removesuffix('.py')
            for row in rows]
  assert firsts == [n for n in ORDER if n not in ('__main__', '__init__')]
  modules = _modules()
  for first, row in zip(firsts, rows):
    named = set(re.findall(r'`([\w.]+)`', row.split('|')[2]))
    inside = {m.split('.', 1)[1] for m in modules if m.startswith(first + '.')}
    assert inside <= named, f'layout row {first} omits {sorted(inside - named)}'
    assert named <= inside, f'layout row {first} names {sorted(named - inside)}, not there'


def test_inference_loading_does_not_import_training():
  for name in ('run.workdir', 'convert.commands', 'convert.official'):
    assert 'train' not in _imports(_modules()[name]), name


def test_no_module_is_too_long():
  for name, path in _modules().items():
    assert sum(1 for _ in open(path)) <= 400, name


def test_tests_mirror_the_package():
  """tests/PACKAGE/test_MODULE.py tests monoformer_jax/PACKAGE/MODULE.py; at the top,
  test_MODULE.py a top-level module (test_layout, test_configs, test_requirements and test_docs
  test the layout, configs/, requirements.txt and the documentation pages)."""
  tests = os.path.join(ROOT, 'tests')
  modules = _modules()
  for path in glob.glob(os.path.join(tests, '**', 'test_*.py'), recursive=True):
    name = os.path.relpath(path, tests)[:-3].replace(os.sep, '.')
    package, _, module = name.rpartition('.')
    module = module.removeprefix('test_')
    if not package and module in ('layout', 'configs', 'requirements', 'docs'):
      continue
    assert f'{package}.{module}'.lstrip('.') in modules, f'tests/{name}.py mirrors no module'


def test_importing_the_package_touches_no_device():
  """Commands fork from a server that has the package imported: a backend started at import
  (a jax.random.key as a default argument, say) would be copied into every fork without its
  threads, and XLA would then wait for them forever."""
  names = [n for n in _modules() if n not in ('__main__', '__init__')]
  code = ('import importlib, sys\n'
          'from jax._src import xla_bridge\n'
          'for name in sys.argv[1:]:\n'
          '  importlib.import_module("monoformer_jax." + name)\n'
          'assert not xla_bridge._backends, list(xla_bridge._backends)\n')
  result = subprocess.run([sys.executable, '-c', code, *names], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
