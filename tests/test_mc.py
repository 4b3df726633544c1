"""Multiple-choice scoring against lm-eval-harness: its HF backend on the export-llama output of
a trained workdir, with local tasks (a shared context, and WinoGrande's partial contexts)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import cli, error_line, launch_two, tiny_config
from monoformer_jax import mc, train
from monoformer_jax.data import corpus
from monoformer_jax import workdir as workdir_lib

HERE = os.path.dirname(os.path.abspath(__file__))

_SHARED = '''task: local_shared
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{gold}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
'''
_PARTIAL = '''task: local_partial
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
doc_to_text: !function partial.doc_to_text
doc_to_target: !function partial.doc_to_target
doc_to_choice: !function partial.doc_to_choice
metric_list:
  - metric: acc
'''
_PARTIAL_PY = '''def doc_to_text(doc):
    return {"1": 0, "2": 1}[doc["answer"]]


def doc_to_target(doc):
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def doc_to_choice(doc):
    cut = doc["sentence"].index("_")
    return [doc["sentence"][:cut] + option for option in (doc["option1"], doc["option2"])]
'''


def _shared_docs(rng):
  words = ['the module', 'a string', 'an integer', 'the keyword', 'a list of names', 'none']
  return [dict(question=f'What does {w} return when called with {v}?',
               choices=[str(c) for c in rng.permutation(words)[:4]], gold=int(rng.integers(4)))
          for v, w in zip(rng.integers(0, 99, 14), rng.choice(words, 14))]


def _partial_docs(rng):
  names = ['the function', 'the class', 'the object', 'the parser']
  return [dict(sentence=f'When {a} raised an error, _ had to handle it before {v} calls.',
               option1=a, option2=b, answer=str(1 + int(rng.integers(2))))
          for v, (a, b) in zip(rng.integers(2, 9, 10), [rng.choice(names, 2, replace=False)
                                                      for _ in range(10)])]


def _ours(doc, partial: bool) -> mc.Item:
  if not partial:
    return mc.Item.shared_context(f'Question: {doc["question"]}\nAnswer:', doc['choices'],
                                  doc['gold'])
  cut = doc['sentence'].index('_')
  contexts = tuple(doc['sentence'][:cut] + o for o in (doc['option1'], doc['option2']))
  target = ' ' + doc['sentence'][cut + 1:].strip()
  return mc.Item(contexts, (target, target), contexts, {'1': 0, '2': 1}[doc['answer']])


@pytest.mark.slow
def test_scores_equal_lm_eval_harness(trained, tmp_path, monkeypatch):
  monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  import lm_eval  # pylint: disable=g-import-not-at-top
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  hf_dir = tmp_path / 'hf'
  result = cli('convert', 'export-llama', f'--src={trained}', f'--dst={hf_dir}')
  assert result.returncode == 0, result.stderr[-2000:]
  rng = np.random.default_rng(0)
  docs = {'local_shared': _shared_docs(rng), 'local_partial': _partial_docs(rng)}
  for task, text in (('local_shared', _SHARED), ('local_partial', _PARTIAL)):
    data = tmp_path / f'{task}.jsonl'
    data.write_text(''.join(json.dumps(d) + '\n' for d in docs[task]))
    (tmp_path / f'{task}.yaml').write_text(text.format(data=data))
  (tmp_path / 'partial.py').write_text(_PARTIAL_PY)
  theirs = lm_eval.simple_evaluate(
      model='hf', model_args=f'pretrained={hf_dir},dtype=float32', tasks=list(docs),
      task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True, batch_size=8,
      device='cpu')

  restored = workdir_lib.for_inference(trained, use_ema=True)
  setup = restored.setup
  for task, task_docs in docs.items():
    items = [_ours(d, task == 'local_partial') for d in task_docs]
    ours = mc.loglikelihoods(setup.model, restored.params, setup.tok, items, batch=8,
                             max_length=setup.config.model.context_length, layout=setup.layout)
    samples = sorted(theirs['samples'][task], key=lambda s: s['doc_id'])
    for mine, sample in zip(ours, samples):
      want = np.array([r[0] for r in sample['filtered_resps']])
      np.testing.assert_allclose(mine, want, rtol=1e-4, atol=1e-4)
      assert np.argmax(mine) == np.argmax(want)
    got, reported = mc.metrics(items, ours), theirs['results'][task]
    for metric in ('acc', 'acc_norm') if task == 'local_shared' else ('acc',):
      assert got[metric] == pytest.approx(reported[f'{metric},none'], abs=1e-12), (task, metric)
      assert got[f'{metric}_stderr'] == pytest.approx(reported[f'{metric}_stderr,none'],
                                                      abs=1e-12), (task, metric)
  assert os.path.exists(hf_dir / 'tokenizer_config.json')


def test_next_line_questions_differ_only_in_word_order():
  questions = corpus.next_line_questions(tiny_config().data, 60)
  assert len(questions) == 60 and len({q[2] for q in questions}) == 4  # the gold moves around
  for context, choices, gold in questions:
    assert context and len(set(choices)) == 4 and len({len(c) for c in choices}) == 1
    assert all(sorted(c.split()) == sorted(choices[gold].split()) for c in choices)
  assert corpus.next_line_questions(tiny_config().data, 60) == questions  # seeded


@pytest.mark.multiprocess
def test_tasks_from_two_processes_equal_one(trained):
  """evaluate --tasks in one process with 4 devices and in two processes of 2: the same scores."""
  flags = ['evaluate', f'--workdir={trained}', '--tasks=next_line', '--limit=24']
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4')
  one = cli(*flags, env=env)
  assert one.returncode == 0 and 'next_line' in one.stdout, one.stderr[-2000:]
  with open(os.path.join(trained, 'eval.json')) as f:
    first = json.load(f)['tasks']
  two = launch_two(*flags, env=dict(os.environ, XLA_FLAGS='', DEVICES_PER_PROCESS='2'))
  assert two.returncode == 0, two.stderr[-3000:]
  with open(os.path.join(trained, 'eval.json')) as f:
    second = json.load(f)['tasks']
  assert first == second and first[0]['items'] == 24
  bad = cli('evaluate', f'--workdir={trained}', '--tasks=next_line,hellaswagg')
  assert bad.returncode == 2 and 'hellaswagg' in error_line(bad)


@pytest.mark.slow
def test_text_scores_during_training(workdir):
  config = tiny_config(num_steps=4, text_eval_every=2)
  config.eval.text_questions = 16
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f if '"text_tasks"' in line]
  assert [r['step'] for r in rows] == [2, 4] and all(0 <= r['next_line/acc'] <= 1 for r in rows)


@pytest.mark.slow
def test_scores_under_an_fsdp_mesh_equal_one_device(trained):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=8')
  result = subprocess.run([sys.executable, os.path.join(HERE, 'mc_sharded_check.py'), trained],
                          capture_output=True, text=True, env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['items'] == 24 and report['max_abs_diff'] < 1e-4, report
  assert report['acc'][0] == report['acc'][1]
