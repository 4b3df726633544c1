"""The package's layering: no module imports one that sits later in the flow
config -> data -> model -> steps -> train -> main."""

import ast
import glob
import os

import pytest

from helpers import ROOT

PACKAGE = os.path.join(ROOT, 'monoformer_jax')
# Each module's place in the flow; a module may import only modules at its place or before.
STAGES = {
    'foundation': ['errors', 'files', 'progress'],
    'config': ['config_lib'],
    'data': ['tokenizer', 'data.*'],
    'model': ['rope', 'layers', 'splash', 'model', 'vae', 'pretrained', 'inception', 'sharding',
              'diffusion'],
    'steps': ['cross_entropy', 'objective', 'steps', 'sampling', 'mixed_modal', 'settings', 'checkpoint', 'fid', 'digit_fd',
              'mc', 'text_tasks'],
    'train': ['workdir', 'evaluate', 'fid_samples', 'fid_eval', 'guards', 'metrics_log', 'train'],
    'main': ['main', 'usage', '__main__', '__init__', 'study', 'bench', 'bench_torch', 'extract_latents', 'convert.*'],
}
ORDER = list(STAGES)


def _modules() -> dict[str, str]:
  """Dotted name under the package -> path, for every module."""
  paths = glob.glob(os.path.join(PACKAGE, '**', '*.py'), recursive=True)
  names = {os.path.relpath(p, PACKAGE)[:-3].replace(os.sep, '.'): p for p in paths}
  return {name.removesuffix('.__init__') if name != '__init__' else name: p
          for name, p in names.items()}


def _stage(name: str) -> str:
  for stage, members in STAGES.items():
    for member in members:
      if name == member or (member.endswith('.*') and
                            (name == member[:-2] or name.startswith(member[:-1]))):
        return stage
  raise AssertionError(f'monoformer_jax.{name} has no place in STAGES; give it one')


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


def test_inference_loading_does_not_import_training():
  for name in ('workdir', 'convert.commands', 'convert.official'):
    assert 'train' not in _imports(_modules()[name]), name


def test_no_module_is_too_long():
  for name, path in _modules().items():
    assert sum(1 for _ in open(path)) <= 420, name
