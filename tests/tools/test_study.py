"""The ablation study end to end in miniature: pretrain, export, convert, init, evaluate, table."""

import json
import math

import pytest

from monoformer_jax.tools import study


TINY = {'model.size': 'tiny', 'train.num_steps': 3, 'sample.steps': 3,
        'eval.samples_per_class': 2, 'eval.text_questions': 8, 'eval.text_batches': 1,
        'train.log_every': 1}


@pytest.mark.slow
def test_a_tiny_study_writes_a_finite_table(tmp_path):
  summary = study.run_study(str(tmp_path), 1, variants=('scratch', 'init'), overrides=TINY)
  assert json.loads((tmp_path / 'study.json').read_text()) == json.loads(json.dumps(summary))
  assert set(summary['variants']) == {'scratch', 'init'}
  for metrics in summary['variants'].values():
    assert set(metrics) == set(study.METRICS)
    for m in metrics.values():
      assert len(m['values']) == 1 and all(math.isfinite(v) for v in m['values'] + [m['mean']])
  assert [f['metric'] for f in summary['findings']] == ['fd/overall', 'next_line/acc',
                                                        'text/perplexity']
  table = (tmp_path / 'study.md').read_text()
  assert table.count('\n| scratch |') == 1 and table.count('\n| init |') == 1
  # The init run started from the converted text-only backbone: its source is recorded.
  assert (tmp_path / 'init_seed0' / 'llm_source.json').exists()
  assert (tmp_path / 'pretrained_llm' / 'tokenizer.model').exists()
  again = study.run_study(str(tmp_path), 1, variants=('scratch', 'init'), overrides=TINY)
  assert again['variants'] == summary['variants']  # finished runs are read, not redone


def test_tables_are_markdown_with_means_and_spreads():
  stats = study.over_seeds([0.5, 0.7])
  assert study.mean_std(stats, '.1f', scale=100, unit='%') == '60.0% ± 14.1'
  assert study.mean_std(stats, '.4g', '.2g') == '0.6 ± 0.14'
  assert study.markdown_tables((['a', 'b'], [[1, study.yes_no(True)]]), (['c'], [])) == (
      '| a | b |\n| --- | --- |\n| 1 | yes |\n\n| c |\n| --- |\n')
