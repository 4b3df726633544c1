"""The sampler sweep end to end in miniature: both processes trained, every grid entry measured,
the table and its verdict written, a rerun reading what is done."""

import json
import math

import pytest

from monoformer_jax.diffusion import Sampler, TimeSpacing
from monoformer_jax.tools import sweep

TINY = {'model.size': 'tiny', 'train.num_steps': 3, 'sample.steps': 3,
        'eval.samples_per_class': 2, 'eval.text_questions': 0, 'eval.text_batches': 1,
        'train.log_every': 1}
GRID = {'ddpm': ((Sampler.DDPM, TimeSpacing.TIME, (4,)),
                 (Sampler.DPMPP_2M, TimeSpacing.LOGSNR, (3,))),
        'flow': ((Sampler.HEUN, TimeSpacing.TIME, (2,)),)}


@pytest.mark.slow
def test_a_tiny_sweep_writes_a_finite_table(tmp_path, monkeypatch):
  monkeypatch.setattr(sweep, 'REFERENCE', ('ddpm', 'ddpm', 'time', 4))
  summary = sweep.run_sweep(str(tmp_path), 1, overrides=TINY, grid=GRID)
  assert json.loads((tmp_path / 'sweep.json').read_text()) == json.loads(json.dumps(summary))
  entries = {(e['process'], e['sampler'], e['steps']): e for e in summary['entries']}
  assert set(entries) == {('ddpm', 'ddpm', 4), ('ddpm', 'dpmpp_2m', 3), ('flow', 'heun', 2)}
  assert entries['flow', 'heun', 2]['evaluations'] == 3
  for e in entries.values():
    assert len(e['fd']['values']) == 1 and math.isfinite(e['fd']['mean'])
    assert 0 <= e['accuracy']['mean'] <= 1 and e['images_per_s'] > 0  # timed on the first seed
  [verdict] = summary['verdicts']
  assert verdict['steps'] == 3 and verdict['fewer_evaluations'] == 4 / 3
  assert set(summary['processes']) == {'ddpm', 'flow'}
  assert all(math.isfinite(p['perplexity']['mean']) for p in summary['processes'].values())
  table = (tmp_path / 'sweep.md').read_text()
  assert table.count('\n| flow | heun |') == 1 and '| logsnr, 3 steps |' in table
  again = sweep.run_sweep(str(tmp_path), 1, overrides=TINY, grid=GRID)
  assert again['entries'] == summary['entries']  # finished runs and rows are read, not redone


def test_seeds_are_summarized_with_their_spread_and_the_goal_is_judged_on_it():
  def row(sampler, steps, fd, evaluations=None):
    return dict(key=['ddpm', sampler, 'time', steps], evaluations=evaluations or steps,
                accuracy=1.0, fd=fd)

  rows = [row('ddpm', 250, 30.0), row('ddpm', 250, 32.0), row('dpmpp_2m', 20, 31.0),
          row('dpmpp_2m', 20, 35.0), row('dpmpp_2m', 10, 40.0), row('dpmpp_2m', 10, 41.0)]
  evaluation = {'fd_floor/overall': 5.0, 'fd_ceiling/overall': 80.0, 'text/perplexity': 40.0}
  summary = sweep.summarize(rows, {'ddpm': [evaluation, evaluation]})
  reference = next(e for e in summary['entries'] if e['steps'] == 250)
  assert reference['fd']['mean'] == 31.0 and reference['fd']['std'] == pytest.approx(2 ** 0.5)
  verdicts = {v['steps']: v for v in summary['verdicts']}
  assert verdicts[20]['difference'] == 2.0 and verdicts[20]['spread'] == pytest.approx(10 ** 0.5)
  assert verdicts[20]['within'] and not verdicts[10]['within']  # 9.5 worse, spread 1.58
  assert verdicts[20]['fewer_evaluations'] == 12.5
