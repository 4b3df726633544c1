"""`sweep`: the samplers against each other at equal cost, on the default (configs/digits.py).

For each seed it trains the default DDPM model and the same with diffusion.process 'flow' (same
steps, same data), then samples the evaluation's 200 prompted digits (same prompts, same sampling
key) with each sampler and step count of GRID: prompt accuracy, digit FD, and for the first seed
the images/s of a second, compiled run. OUT/sweep.json holds every figure, OUT/sweep.md the table
of means and standard deviations over the seeds, with the goal's verdict. Each run keeps its rows
in RUN/sweep_rows.json, so a stopped sweep resumes where it was.
"""

import json
import math
import os
import time

import jax
import numpy as np

from monoformer_jax import train
from monoformer_jax.base import files
from monoformer_jax.base.workdir_layout import Workdir
from monoformer_jax.data import digits, tokenizer as tokenizer_lib
from monoformer_jax.diffusion import Sampler, TimeSpacing
from monoformer_jax.evaluation import default_eval, digit_fd
from monoformer_jax.generation import sampling
from monoformer_jax.run import workdir as workdir_lib
from monoformer_jax.tools import bench, study

# (sampler, spacing, step counts) per process; spacing matters to DPM-Solver++ alone.
GRID = {
    'ddpm': ((Sampler.DDPM, TimeSpacing.TIME, (250, 50, 25)),
             (Sampler.DDIM, TimeSpacing.TIME, (50, 20, 10)),
             (Sampler.DPMPP_2M, TimeSpacing.TIME, (25, 20, 15, 10)),
             (Sampler.DPMPP_2M, TimeSpacing.LOGSNR, (25, 20, 10))),
    'flow': ((Sampler.EULER, TimeSpacing.TIME, (250, 50, 20, 10)),
             (Sampler.HEUN, TimeSpacing.TIME, (25, 10, 5))),
}
REFERENCE = ('ddpm', 'ddpm', 'time', 250)  # the paper's sampler, the default's step count
GOAL_EVALUATIONS = 25  # DPM-Solver++ at this many or fewer should match the reference's FD


def _row_key(process: str, sampler: Sampler, spacing: TimeSpacing, steps: int) -> tuple:
  return process, sampler.value, spacing.value, steps


def _train(out: str, process: str, seed: int, overrides: dict, tokenizer_from: str) -> str:
  """The run's workdir, trained and evaluated (once); every run after the first takes the first
  one's tokenizer, so that only the process and the seed differ."""
  workdir = os.path.join(out, f'{process}_seed{seed}')
  if not files.exists(Workdir(workdir).eval_json):  # written at the end
    config = study.config_file('digits', overrides={**overrides, 'diffusion.process': process})
    config.seed = seed
    if tokenizer_from and not files.exists(workdir):
      files.makedirs(workdir)
      tokenizer_lib.copy_files(tokenizer_from, workdir)
    train.train_and_evaluate(config, workdir)
  return workdir


def _measure(workdir: str, process: str, grid, timed: bool) -> list[dict]:
  """This run's rows: one per (sampler, spacing, steps), computed where not saved yet."""
  path = Workdir(workdir).sweep_rows
  rows = files.read_json(path) if files.exists(path) else []
  done = {tuple(r['key']) for r in rows}
  todo = [(s, sp, n) for s, sp, counts in grid for n in counts
          if _row_key(process, s, sp, n) not in done]
  if not todo:
    return rows
  restored = workdir_lib.for_inference(workdir, use_ema=True)
  setup, params = restored.setup, restored.params
  config = setup.config
  key = jax.random.fold_in(jax.random.key(config.seed), 2**30)  # the evaluation's own
  labels = np.repeat(np.arange(len(digits.CLASS_NAMES)), config.eval.samples_per_class)
  prompts = [config.eval.prompt_template.format(name=name) for name in digits.CLASS_NAMES
             for _ in range(config.eval.samples_per_class)]
  for sampler, spacing, steps in todo:
    spec = setup.settings.sampling.but(sampler, steps, spacing=spacing)
    accuracy, images = default_eval.prompt_accuracy(setup, params, key, spec)
    row = dict(key=list(_row_key(process, sampler, spacing, steps)),
               evaluations=spec.solver.evaluations, accuracy=accuracy['accuracy/overall'],
               fd=digit_fd.distances(config.data, images, labels)['overall'])
    if timed:  # compiled by the run above: this one is the sampler alone
      start = time.perf_counter()
      sampling.images_for_prompts(setup.model, params, setup.tok, prompts,
                                  config.data.prompt_len, spec, key)
      row['images_per_s'] = len(prompts) / (time.perf_counter() - start)
    rows.append(row)
    files.write_text(path, json.dumps(rows, indent=1))
  return rows


def summarize(rows: list[dict], evaluations: dict[str, list[dict]]) -> dict:
  """Rows of every run -> one entry per (process, sampler, spacing, steps) with the seeds'
  statistics, the goal's verdict for each DPM-Solver++ entry, and per process the training's own
  evaluation (eval.json: the FD floor and ceiling, held-out perplexity)."""
  grouped: dict[tuple, list[dict]] = {}
  for r in rows:
    grouped.setdefault(tuple(r['key']), []).append(r)
  entries = []
  for key, runs in grouped.items():
    entry = dict(process=key[0], sampler=key[1], spacing=key[2], steps=key[3],
                 evaluations=runs[0]['evaluations'],
                 accuracy=study.over_seeds([r['accuracy'] for r in runs]),
                 fd=study.over_seeds([r['fd'] for r in runs]))
    timed = [r['images_per_s'] for r in runs if 'images_per_s' in r]
    if timed:
      entry['images_per_s'] = timed[0]
    entries.append(entry)
  order = [s.value for s in Sampler]  # as the enum lists them: ddpm, ddim, dpmpp_2m, ...
  entries.sort(key=lambda e: (e['process'], order.index(e['sampler']), e['spacing'] != 'time',
                              -e['steps']))
  reference = next((e for e in entries
                    if (e['process'], e['sampler'], e['spacing'], e['steps']) == REFERENCE), None)
  verdicts = []
  for e in entries if reference else []:
    if e['sampler'] == Sampler.DPMPP_2M.value and e['evaluations'] <= GOAL_EVALUATIONS:
      difference = e['fd']['mean'] - reference['fd']['mean']
      spread = math.hypot(e['fd']['std'], reference['fd']['std'])
      verdicts.append(dict(spacing=e['spacing'], steps=e['steps'], difference=difference,
                           spread=spread, within=bool(difference <= spread),
                           fewer_evaluations=reference['evaluations'] / e['evaluations']))
  processes = {process: {name: study.over_seeds([e[key] for e in runs]) for name, key in (
      ('fd_floor', 'fd_floor/overall'), ('fd_ceiling', 'fd_ceiling/overall'),
      ('perplexity', 'text/perplexity'))} for process, runs in evaluations.items()}
  return dict(entries=entries, verdicts=verdicts, processes=processes)


def markdown(summary: dict, seeds: int) -> str:
  samplers = (['process', 'sampler', 'spacing', 'steps', 'network evaluations',
               f'prompt accuracy ({seeds} seeds)', f'digit FD ({seeds} seeds)', 'images/s'],
              [[e['process'], e['sampler'],
                e['spacing'] if e['sampler'] == Sampler.DPMPP_2M.value else '', e['steps'],
                e['evaluations'], study.mean_std(e['accuracy'], '.1f', scale=100, unit='%'),
                study.mean_std(e['fd'], '.2f'),
                f'{e["images_per_s"]:.3g}' if 'images_per_s' in e else '']
               for e in summary['entries']])
  processes = (['process', 'FD floor (held-out digits)',
                'FD ceiling (untrained, its 250-step sampler)', 'held-out perplexity'],
               [[process, f'{e["fd_floor"]["mean"]:.2f}', study.mean_std(e['fd_ceiling'], '.2f'),
                 study.mean_std(e['perplexity'], '.2f')]
                for process, e in summary['processes'].items()])
  verdicts = (['DPM-Solver++ 2M', 'FD - DDPM 250', 'spread', 'within the spread',
               'fewer evaluations'],
              [[f'{v["spacing"]}, {v["steps"]} steps', f'{v["difference"]:+.2f}',
                f'{v["spread"]:.2f}', study.yes_no(v['within']),
                f'{v["fewer_evaluations"]:.0f}x'] for v in summary['verdicts']])
  return study.markdown_tables(samplers, processes, verdicts)


def run_sweep(out: str, seeds: int, overrides: dict | None = None, grid: dict | None = None) -> dict:
  """Trains and measures both processes for seeds 0..seeds-1; writes and returns the summary.
  overrides ({'section.key': value}) apply to every run, grid replaces GRID (the tests shrink
  both)."""
  overrides, grid = overrides or {}, grid or GRID
  files.makedirs(out)
  start = time.monotonic()
  rows, evaluations, first = [], {process: [] for process in grid}, ''
  for seed in range(seeds):
    for process, process_grid in grid.items():
      workdir = _train(out, process, seed, overrides, first)
      first = first or workdir
      rows += _measure(workdir, process, process_grid, timed=seed == 0)
      evaluations[process].append(default_eval.saved_metrics(workdir))
  summary = summarize(rows, evaluations)
  # A rerun reads finished runs and rows instead of redoing them: only this call's time is known.
  summary.update(seeds=seeds, overrides=overrides, machine=bench.machine(),
                 minutes_this_invocation=(time.monotonic() - start) / 60)
  study.write_summary(out, 'sweep', summary, markdown(summary, seeds))
  return summary


def command(out: str, seeds: int) -> str:
  """`sweep`: the sweep in `out` for `seeds` training seeds; its markdown table."""
  study.check_seeds(seeds)
  return markdown(run_sweep(out, seeds), seeds).rstrip('\n')
