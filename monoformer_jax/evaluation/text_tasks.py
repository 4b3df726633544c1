"""Text benchmarks scored as multiple choice (multiple_choice.py): the task table that
`evaluate --tasks` and train.text_eval_every read, each task a loader of items, its metrics
(the first is the one averaged) and its chance level: the default's next-line questions and
the seven commonsense benchmarks of the paper's text table (benchmarks.py, through TFDS).
"""

import dataclasses
import math
from typing import Callable

import ml_collections
import numpy as np

from monoformer_jax.base import progress
from monoformer_jax.base.errors import UserError
from monoformer_jax.data import corpus
from monoformer_jax.evaluation import benchmarks, multiple_choice


@dataclasses.dataclass(frozen=True)
class Task:
  # (config, limit) -> items
  items: Callable[[ml_collections.ConfigDict, int], list[multiple_choice.Item]]
  chance: float
  metrics: tuple[str, ...] = ('acc', 'acc_norm')


def _next_line(config: ml_collections.ConfigDict, limit: int) -> list[multiple_choice.Item]:
  count = limit or config.eval.text_questions
  return [multiple_choice.Item.shared_context(context, choices, gold)
          for context, choices, gold in corpus.next_line_questions(config.data, count)]


def _benchmark(name: str) -> Task:
  bench = benchmarks.BENCHMARKS[name]

  def items(config: ml_collections.ConfigDict, limit: int) -> list[multiple_choice.Item]:
    return [multiple_choice.Item(*q) for q in benchmarks.questions(name, config.data, limit)]
  return Task(items, bench.chance, bench.metrics)


TASKS = {
    # The default's held-out text: every choice has the same length, so acc_norm equals acc.
    'next_line': Task(_next_line, chance=0.25, metrics=('acc',)),
    **{name: _benchmark(name) for name in benchmarks.BENCHMARKS},
}


def parse(names: str, what: str = '--tasks') -> list[str]:
  chosen = [n.strip() for n in names.split(',') if n.strip()]
  unknown = [n for n in chosen if n not in TASKS]
  if unknown or not chosen:
    raise UserError(f'{what} names {", ".join(unknown) or "nothing"}; expected a comma-separated '
                    f'list of {", ".join(TASKS)}.')
  return chosen


def score(setup, params, names: list[str], limit: int = 0) -> list[dict]:
  """One row per task and metric: {'task', 'metric', 'score', 'stderr', 'items', 'chance'}."""
  config = setup.config
  devices = setup.layout.mesh.size
  batch = devices * max(1, 32 // devices)  # splits over every device of the mesh
  rows = []
  for name in names:
    task = TASKS[name]
    items = task.items(config, limit)
    requests = sum(len(item.contexts) for item in items)
    with progress.phase(f'{name}: scoring {len(items)} questions', requests, 'requests') as p:
      scores = multiple_choice.loglikelihoods(setup.model, params, setup.tok, items, batch,
                                                           config.model.context_length, setup.layout, p.advance)
    result = multiple_choice.metrics(items, scores)
    rows += [dict(task=name, metric=m, score=result[m], stderr=result[f'{m}_stderr'],
                  items=result['items'], chance=task.chance) for m in task.metrics]
  return rows


def average(rows: list[dict]) -> float:
  """The mean over tasks of each task's first metric, as the papers' tables average."""
  return float(np.mean(list({r['task']: r['score'] for r in reversed(rows)}.values())))


def table(rows: list[dict]) -> str:
  lines = [f'{"task":<12} {"metric":<9} {"score":>7} {"stderr":>7} {"items":>6} {"chance":>7}']
  lines += [f'{r["task"]:<12} {r["metric"]:<9} {r["score"]:7.4f} {r["stderr"]:7.4f} '
            f'{r["items"]:6d} {r["chance"]:7.4f}' for r in rows]
  lines.append(f'{"average":<12} {"acc":<9} {average(rows):7.4f}')
  return '\n'.join(lines)


def metrics_of(rows: list[dict]) -> dict[str, float]:
  """Flat {'<task>/<metric>': score} for eval.json, TensorBoard and metrics.jsonl."""
  out = {f'{r["task"]}/{r["metric"]}': r['score'] for r in rows}
  if len({r['task'] for r in rows}) > 1:
    out['tasks/average'] = average(rows)
  return {k: v for k, v in out.items() if not math.isnan(v)}
