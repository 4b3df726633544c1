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
  summary = sweep.run_sweep(str(tmp_path), 2, overrides=TINY, grid=GRID)
  assert json.loads((tmp_path / 'sweep.json').read_text()) == json.loads(json.dumps(summary))
  entries = {(e['process'], e['sampler'], e['steps']): e for e in summary['entries']}
  assert set(entries) == {('ddpm', 'ddpm', 4), ('ddpm', 'dpmpp_2m', 3), ('flow', 'heun', 2)}
  assert entries['flow', 'heun', 2]['evaluations'] == 3
  for e in entries.values():
    assert len(e['fd']['values']) == 2 and all(math.isfinite(v) for v in e['fd']['values'])
    assert e['images_per_s'] > 0  # timed on the first seed
  # Different training seeds give different models.
  assert len(set(entries['ddpm', 'ddpm', 4]['fd']['values'])) == 2
  [verdict] = summary['verdicts']
  assert verdict['steps'] == 3 and verdict['fewer_evaluations'] == 4 / 3
  assert set(summary['processes']) == {'ddpm', 'flow'}
  assert all(len(p['perplexity']['values']) == 2 for p in summary['processes'].values())
  table = (tmp_path / 'sweep.md').read_text()
  assert table.count('\n| flow | heun |') == 1 and '| logsnr, 3 steps |' in table
  again = sweep.run_sweep(str(tmp_path), 2, overrides=TINY, grid=GRID)
  assert again['entries'] == summary['entries']  # finished runs and rows are read, not redone
