"""eval.json gathers every evaluation of a workdir, and the default's table reads as one."""

from monoformer_jax.base.workdir_layout import Workdir
from monoformer_jax.data import digits
from monoformer_jax.evaluation import default_eval


def test_evaluations_merge_into_eval_json(tmp_path):
  workdir = str(tmp_path)
  assert default_eval.saved_metrics(workdir) == {}
  default_eval.merge_saved(workdir, {'tasks': [{'task': 'piqa'}], 'piqa/acc': 0.5})
  default_eval.merge_saved(workdir, {'accuracy/overall': 0.9, 'step': 7})
  assert default_eval.saved_metrics(workdir) == {'tasks': [{'task': 'piqa'}], 'piqa/acc': 0.5,
                                                 'accuracy/overall': 0.9, 'step': 7}
  with open(Workdir(workdir).eval_json, 'w') as f:
    f.write('{"torn')
  assert default_eval.saved_metrics(workdir) == {}  # unreadable: as if there were none

def test_the_table_has_a_column_per_digit():
  metrics = {f'accuracy/{name}': i / 10 for i, name in enumerate(digits.CLASS_NAMES)}
  metrics.update({'accuracy/overall': 0.45, 'fd/overall': 30.2, 'text/perplexity': 42.3,
                  'sampler': 'ddpm', 'step': 2000})
  lines = default_eval.table(metrics).splitlines()
  assert lines[0].split() == ['overall', *digits.CLASS_NAMES]
  assert lines[1].split() == ['accuracy', '0.45', *[f'{i / 10:.4g}' for i in range(10)]]
  rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
  assert rows['fd/overall'] == ['30.2'] and rows['text/perplexity'] == ['42.3']
  assert rows['step'] == ['2000'] and 'sampler' not in rows  # text is not a figure
