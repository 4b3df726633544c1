"""`study`: the paper's ablations in miniature (configs/ablations.py), every variant for several
seeds, evaluated, and tabulated as OUT/study.json (the source) and OUT/study.md.

The pretrained backbone goes the way a user's LLM does: a text-only run, `convert
export-llama` to a HF LLaMA directory, `convert llama` back, then `model.init_from`. Every run
shares the pretrain run's tokenizer, so only the initialization differs between scratch and
init. A finished run (its eval.json present) is not run again, so a stopped study resumes.
"""

import importlib.util
import json
import math
import os
import time
from typing import Iterable, Sequence

import numpy as np

from monoformer_jax import train
from monoformer_jax.base import files
from monoformer_jax.base.errors import UserError
from monoformer_jax.base.workdir_layout import Workdir
from monoformer_jax.convert import commands as convert_commands
from monoformer_jax.data import tokenizer as tokenizer_lib
from monoformer_jax.nn import converted as converted_lib


# What each finding compares and which way the paper found it to go.
FINDINGS = (
    dict(name='(a) LLM initialization helps image generation', better='init', worse='scratch',
         metric='fd/overall', lower_is_better=True),
    dict(name='(b) LLM initialization keeps text ability', better='init', worse='scratch',
         metric='next_line/acc', lower_is_better=False),
    dict(name='(b) ... held-out perplexity', better='init', worse='scratch',
         metric='text/perplexity', lower_is_better=True),
    dict(name='(c) bidirectional attention inside the image helps', better='scratch',
         worse='causal', metric='fd/overall', lower_is_better=True),
)
METRICS = ('fd/overall', 'accuracy/overall', 'next_line/acc', 'text/perplexity')


def config_file(name: str, *args, overrides: dict | None = None):
  """get_config(*args) of configs/NAME.py, with {'section.key': value} overrides applied."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      'configs', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'{name}_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(*args)
  for key, value in (overrides or {}).items():
    section, key_name = key.split('.')
    config[section][key_name] = value
  return config


def _variant_config(variant: str, overrides: dict):
  return config_file('ablations', variant, overrides=overrides)


def _pretrained(out: str, overrides: dict) -> str:
  """The converted text-only backbone (trained, exported and converted once)."""
  converted = os.path.join(out, 'pretrained_llm')
  if files.exists(os.path.join(converted, converted_lib.MODEL_JSON)):  # written last: finished
    return converted
  workdir = os.path.join(out, 'pretrain')
  train.train_and_evaluate(_variant_config('pretrain', overrides), workdir)
  exported = os.path.join(out, 'pretrain_hf')
  for leftover in (exported, converted):  # of an interrupted study: conversions need new paths
    files.rmtree(leftover)
  convert_commands.run('export-llama', workdir, exported, ema=True)
  convert_commands.run('llama', exported, converted)
  return converted


def run_once(workdir: str, config, tokenizer_from: str = '') -> dict:
  """The eval.json of one run: trained and evaluated unless it already finished. tokenizer_from:
  a directory whose tokenizer the run shares (copied in before the workdir is first used)."""
  done = Workdir(workdir).eval_json
  if not files.exists(done):
    if tokenizer_from:
      files.makedirs(workdir)
      tokenizer_lib.copy_files(tokenizer_from, workdir)
    start = time.monotonic()
    train.train_and_evaluate(config, workdir)
    files.write_text(Workdir(workdir).study_wall,
                     json.dumps({'seconds': time.monotonic() - start}))
  return files.read_json(done)


def _run(out: str, variant: str, seed: int, llm: str, overrides: dict) -> dict:
  config = _variant_config(variant, overrides)
  config.seed = seed
  if variant == 'init':
    config.model.init_from = llm
  return run_once(os.path.join(out, f'{variant}_seed{seed}'), config,
                  '' if variant == 'init' else llm)  # the same tokenizer as init's


def over_seeds(values: list[float]) -> dict:
  """The values over seeds, their mean and standard deviation (0 for one seed)."""
  return dict(values=values, mean=float(np.mean(values)),
              std=float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)


def mean_std(stats: dict, spec: str, std_spec: str = '', scale: float = 1.0,
             unit: str = '') -> str:
  """An over_seeds entry as 'MEAN ± STD' in the format specs (std_spec: spec's by default),
  both times scale (100 for percent), unit after the mean."""
  return f'{scale * stats["mean"]:{spec}}{unit} ± {scale * stats["std"]:{std_spec or spec}}'


def yes_no(flag: bool) -> str:
  return 'yes' if flag else 'no'


def markdown_tables(*tables: tuple[Sequence[str], Iterable[Sequence[object]]]) -> str:
  """Markdown tables, each (header cells, rows of cells, written as str() writes them), a
  blank line apart."""
  lines = []
  for header, rows in tables:
    cells = [header, ['---'] * len(header), *rows]
    lines += [''] * bool(lines) + ['| ' + ' | '.join(map(str, row)) + ' |' for row in cells]
  return '\n'.join(lines) + '\n'


def write_summary(out: str, name: str, summary: dict, table: str) -> None:
  """OUT/NAME.json (the source of every figure) and OUT/NAME.md (its table)."""
  files.write_text(os.path.join(out, f'{name}.json'), json.dumps(summary, indent=1))
  files.write_text(os.path.join(out, f'{name}.md'), table)


def check_seeds(seeds: int) -> None:
  if seeds < 1:
    raise UserError(f'--seeds is {seeds}; expected at least 1.')


def summarize(results: dict[str, list[dict]], findings: Sequence[dict] = FINDINGS,
              metrics: Sequence[str] = METRICS) -> dict:
  """{variant: {metric: {mean, std, values}}} (the metrics every run of the variant has) and each
  finding's difference and direction. A finding with `same` holds as the paper has it when the
  two are within their spread (an ability kept), else when `better` is better."""
  table = {v: {m: over_seeds([r[m] for r in runs]) for m in metrics if all(m in r for r in runs)}
           for v, runs in results.items()}
  out = []
  for f in findings:
    if f['metric'] not in table.get(f['better'], {}) or f['metric'] not in table.get(f['worse'], {}):
      continue
    better, worse = table[f['better']][f['metric']], table[f['worse']][f['metric']]
    delta = better['mean'] - worse['mean']
    spread = math.hypot(better['std'], worse['std'])
    beyond = abs(delta) > spread
    as_paper = not beyond if f.get('same') else (delta < 0 if f['lower_is_better'] else delta > 0)
    out.append(dict(f, difference=delta, spread=spread, as_paper=bool(as_paper),
                    beyond_spread=bool(beyond)))
  return dict(variants=table, findings=out)


def markdown(summary: dict, seeds: int, metrics: Sequence[str] = METRICS) -> str:
  variants = ([f'variant ({seeds} seeds: mean ± std)', *metrics],
              [[variant, *(mean_std(values[m], '.4g', '.2g') if m in values else '-'
                           for m in metrics)]
               for variant, values in summary['variants'].items()])
  findings = (['finding', 'metric', 'better - worse', 'spread', 'as the paper',
               'beyond the spread'],
              [[f['name'], f'{f["metric"]} ({f["better"]} - {f["worse"]})',
                f'{f["difference"]:+.4g}', f'{f["spread"]:.2g}', yes_no(f['as_paper']),
                yes_no(f['beyond_spread'])] for f in summary['findings']])
  return markdown_tables(variants, findings)


def run_study(out: str, seeds: int, variants=('scratch', 'init', 'causal'),
              overrides: dict | None = None) -> dict:
  """Trains and evaluates every variant for seeds 0..seeds-1; writes and returns the summary.
  overrides ({'section.key': value}) apply to every run (the tests shrink the budget)."""
  overrides = overrides or {}
  files.makedirs(out)
  start = time.monotonic()
  llm = _pretrained(out, overrides)
  results = {v: [_run(out, v, seed, llm, overrides) for seed in range(seeds)] for v in variants}
  summary = summarize(results)
  summary.update(seeds=seeds, overrides=overrides, minutes=(time.monotonic() - start) / 60)
  write_summary(out, 'study', summary, markdown(summary, seeds))
  return summary


def command(out: str, seeds: int) -> str:
  """`study`: the study in `out` for `seeds` seeds per variant; its markdown table."""
  check_seeds(seeds)
  return markdown(run_study(out, seeds), seeds).rstrip('\n')
