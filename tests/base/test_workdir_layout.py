"""The workdir's layout: a trained workdir holds exactly what workdir_layout names, and no other
module spells one of those names."""

import ast
import glob
import os
import re

import pytest

from helpers import ROOT

from monoformer_jax.base import workdir_layout
from monoformer_jax.base.workdir_layout import Workdir
from monoformer_jax.evaluation import default_eval
from monoformer_jax.training import checkpoint, metrics_log

PACKAGE = os.path.join(ROOT, 'monoformer_jax')
# Modules whose owner is moving them onto workdir_layout: the names each still spells.
NOT_YET_MOVED = {}


@pytest.mark.slow
def test_a_trained_workdir_holds_what_the_layout_names(trained):
  entries = set(os.listdir(trained))
  events = {e for e in entries if e.startswith(workdir_layout.EVENTS_PREFIX)}
  assert len(events) == 1  # TensorBoard's, in the workdir itself
  assert entries - events == {workdir_layout.TOKENIZER_MODEL, workdir_layout.CHECKPOINTS,
                              workdir_layout.METRICS}  # no lock left, no evaluation asked for
  paths = Workdir(trained)
  assert os.path.isdir(paths.checkpoint_step(2))
  assert checkpoint.Checkpointer(trained, create=False).directory == paths.checkpoints
  assert [r['step'] for r in metrics_log.read_rows(paths.metrics)] == [1, 2]
  assert paths.tensorboard == trained
  default_eval.merge_saved(trained, {'step': 2})
  assert os.path.isfile(paths.eval_json)


def test_paths_keep_a_bucket_workdir_in_its_bucket():
  paths = Workdir('gs://bucket/runs/a')
  assert paths.checkpoints == 'gs://bucket/runs/a/checkpoints'
  assert paths.checkpoint_step(12) == 'gs://bucket/runs/a/checkpoints/12'
  assert paths.metrics == 'gs://bucket/runs/a/metrics.jsonl'
  assert paths.lock == 'gs://bucket/runs/a/train.lock'
  assert paths.fid_json(50000) == 'gs://bucket/runs/a/fid50000.json'
  assert paths.events_file('17', 'host') == 'gs://bucket/runs/a/events.out.tfevents.17.host'
  assert workdir_layout.generation_record('gs://b/out') == 'gs://b/out/generation.json'


def _docstrings(tree: ast.AST) -> set[int]:
  """The ids of the docstring constants of a module, its classes and functions."""
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      body = node.body
      if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        out.add(id(body[0].value))
  return out


def _spelled(path: str) -> set[str]:
  """The layout's names that a module's path strings spell.

  A path string is a string constant without whitespace (a name, a relative path, or a piece
  of an f-string that builds one); it spells a name where one of its '/'-separated parts is
  that name (or, for TensorBoard's events, starts with its prefix). Docstrings and messages
  (strings with spaces) are prose, free to mention a file. The tokenizer's names count
  everywhere, not only under a workdir: converted LLM, HF and official directories use the same
  ones, which the layout names as the shared convention. Names of other directories' own files
  (model.json, config.json, params) are not the layout's and are not looked for."""
  tree = ast.parse(open(path).read())
  skip = _docstrings(tree)
  found = set()
  for node in ast.walk(tree):
    if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
        and not re.search(r'\s', node.value)):
      for part in node.value.split('/'):
        found |= {n for n in workdir_layout.NAMES
                  if part == n or (n == workdir_layout.EVENTS_PREFIX and part.startswith(n))}
  return found


def test_only_the_layout_spells_a_workdir_name():
  owner = os.path.join(PACKAGE, 'base', 'workdir_layout.py')
  spelled, moved = {}, {}
  for path in glob.glob(os.path.join(PACKAGE, '**', '*.py'), recursive=True):
    name = os.path.relpath(path, PACKAGE)
    names, waiting = _spelled(path), NOT_YET_MOVED.get(name, set())
    if path != owner and names - waiting:
      spelled[name] = sorted(names - waiting)
    if waiting - names:
      moved[name] = sorted(waiting - names)
  assert not spelled, f'ask base.workdir_layout instead of spelling: {spelled}'
  assert not moved, f'drop from NOT_YET_MOVED what these modules no longer spell: {moved}'


def test_the_scan_finds_a_spelled_name(tmp_path):
  """The scan sees names in joins and f-strings, and leaves prose alone (the test can fail)."""
  module = tmp_path / 'module.py'
  module.write_text('"""Writes WORKDIR/eval.json."""\nimport os\n'
                    'a = os.path.join(w, "checkpoints", "0")\n'
                    'b = f"{w}/events.out.tfevents.{t}"\n'
                    'c = "see metrics.jsonl for the rows"\n')
  assert _spelled(str(module)) == {'checkpoints', 'events.out.tfevents.'}
