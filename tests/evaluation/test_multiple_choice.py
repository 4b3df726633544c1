"""Multiple-choice scoring against lm-eval-harness: its HF backend on the export-llama output of
a trained workdir, with local tasks (a shared context, and WinoGrande's partial contexts)."""

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import TESTS, cli, devices_env, error_line, launch_two, tiny_config

from monoformer_jax import train
from monoformer_jax.base.errors import UserError
from monoformer_jax.data import corpus
from monoformer_jax.evaluation import benchmarks, multiple_choice as mc, text_tasks
from monoformer_jax.run import workdir as workdir_lib



_WORDS = ('the cup table jar lid sun star gas ice steam rock water sky blue day flour bowl '
          'woman dog opens pours stirs falls sings twists eats is was because then she he it').split()
_TFDS_ARC_LABELS = ['A', 'B', 'C', 'D', 'E', '1', '2', '3', '4']
_HARNESS_YAML = {'hellaswag': 'hellaswag/hellaswag.yaml', 'openbookqa': 'openbookqa/openbookqa.yaml',
                 'winogrande': 'winogrande/default.yaml', 'arc_easy': 'arc/arc_easy.yaml',
                 'arc_challenge': 'arc/arc_challenge.yaml',
                 'boolq': 'super_glue/boolq/default.yaml', 'piqa': 'piqa/piqa.yaml'}


def _doc(name: str, rng) -> tuple[dict, dict]:
  """One random item of the task as the harness's HF dataset has it and as TFDS has it."""
  say = lambda n: ' '.join(rng.choice(_WORDS, n))  # noqa: E731
  if name == 'hellaswag':
    ctx_a, ctx_b = say(6).capitalize() + '.', 'Then ' + say(2)  # ctx_b as .capitalize() leaves it
    endings, label = [say(4) + '.' for _ in range(4)], int(rng.integers(4))
    return (dict(ind=0, activity_label=say(2), ctx_a=ctx_a, ctx_b=ctx_b, ctx=f'{ctx_a} {ctx_b}',
                 endings=endings, source_id='s', split='val', split_type='indomain',
                 label=str(label)),
            dict(activity_label=None, context=f'{ctx_a} {ctx_b}', endings=endings, label=label))
  if name == 'openbookqa':
    texts, gold = [say(2) for _ in range(4)], int(rng.integers(4))
    return (dict(id='o', question_stem=say(5), choices=dict(text=texts, label=list('ABCD')),
                 answerKey='ABCD'[gold]),
            dict(question=dict(stem=None, **{f'choice_{k}': t for k, t in zip('ABCD', texts)}),
                 answerKey=gold))
  if name == 'winogrande':
    options, answer = [say(2), say(2)], int(rng.integers(2))
    sentence = f'{say(4)} _ {say(3)}.'
    return (dict(sentence=sentence, option1=options[0], option2=options[1], answer=str(answer + 1)),
            dict(sentence=sentence, option1=options[0], option2=options[1], label=answer))
  if name.startswith('arc'):
    n = int(rng.integers(3, 6))
    labels = list('ABCDE')[:n] if rng.integers(2) else ['1', '2', '3', '4'][:min(n, 4)]
    texts, gold = [say(2) for _ in labels], int(rng.integers(len(labels)))
    return (dict(id='a', question=say(5) + '?', choices=dict(text=texts, label=labels),
                 answerKey=labels[gold]),
            dict(question=None, choices=dict(text=texts, label=[_TFDS_ARC_LABELS.index(l)
                                                                for l in labels]),
                 answerKey=_TFDS_ARC_LABELS.index(labels[gold])))
  if name == 'boolq':
    question, passage, label = say(4), say(9) + '.', int(rng.integers(2))
    return (dict(question=question, passage=passage, idx=0, label=label),
            dict(question=question, passage=passage, label=label))
  goal, sols, label = say(4), [say(4) + '.', say(4) + '.'], int(rng.integers(2))
  return (dict(goal=goal, sol1=sols[0], sol2=sols[1], label=label),
          dict(goal=goal, sol1=sols[0], sol2=sols[1], label=label))


def _fill(tfds_doc: dict, hf_doc: dict) -> dict:
  """The TFDS fields left None are the HF ones of the same name (question, stem, label)."""
  out = {}
  for key, value in tfds_doc.items():
    if isinstance(value, dict):
      out[key] = _fill(value, hf_doc)
    elif value is None:
      out[key] = {'stem': hf_doc.get('question_stem')}.get(key, hf_doc.get(key))
    else:
      out[key] = value
  return out


@pytest.mark.slow
def test_every_benchmark_scores_as_lm_eval_harness(trained, tmp_path, monkeypatch):
  """Each task's items written in the harness's format (its own task config, read from local
  files) and in TFDS's: per-item log-likelihoods equal to 1e-4, the same choices and scores."""
  monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  import lm_eval  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  hf_dir = tmp_path / 'hf'
  result = cli('convert', 'export-llama', f'--src={trained}', f'--dst={hf_dir}')
  assert result.returncode == 0, result.stderr[-2000:]
  harness_tasks = os.path.join(os.path.dirname(lm_eval.__file__), 'tasks')
  rng = np.random.default_rng(0)
  docs = {name: [_doc(name, rng) for _ in range(24)] for name in benchmarks.BENCHMARKS}
  for name, pairs in docs.items():
    split = benchmarks.BENCHMARKS[name].split
    data = tmp_path / f'{name}.jsonl'
    data.write_text(''.join(json.dumps(hf) + '\n' for hf, _ in pairs))
    (tmp_path / f'local_{name}.yaml').write_text(
        f'include: {harness_tasks}/{_HARNESS_YAML[name]}\ntask: local_{name}\ntag: []\n'
        f'dataset_path: json\ndataset_name: null\n'
        f'dataset_kwargs:\n  data_files:\n    {split}: {data}\ntraining_split: null\n'
        f'validation_split: {split if split == "validation" else "null"}\n'
        f'test_split: {split if split == "test" else "null"}\n')
  theirs = lm_eval.simple_evaluate(
      model='hf', model_args=f'pretrained={hf_dir},dtype=float32',
      tasks=[f'local_{n}' for n in docs], task_manager=TaskManager(include_path=str(tmp_path)),
      log_samples=True, batch_size=16, device='cpu')

  restored = workdir_lib.for_inference(trained, use_ema=True)
  setup = restored.setup
  for name, pairs in docs.items():
    examples = [_fill(t, hf) for hf, t in pairs]
    dataset = functools.reduce(lambda a, b: a.concatenate(b),
                               [tf.data.Dataset.from_tensors(e) for e in examples])
    with tfds.testing.mock_data(as_dataset_fn=lambda *args, dataset=dataset, **kwargs: dataset,
                                policy=tfds.testing.MockPolicy.USE_CODE):
      items = text_tasks.TASKS[name].items(setup.config, 0)
    ours = mc.loglikelihoods(setup.model, restored.params, setup.tok, items, batch=16,
                             max_length=setup.config.model.context_length, layout=setup.layout)
    samples = sorted(theirs['samples'][f'local_{name}'], key=lambda s: s['doc_id'])
    assert len(samples) == len(ours) == 24
    for mine, sample in zip(ours, samples):
      want = np.array([r[0] for r in sample['filtered_resps']])
      np.testing.assert_allclose(mine, want, rtol=1e-4, atol=1e-4, err_msg=name)
      assert np.argmax(mine) == np.argmax(want), name
    got, reported = mc.metrics(items, ours), theirs['results'][f'local_{name}']
    for metric in benchmarks.BENCHMARKS[name].metrics:
      assert got[metric] == pytest.approx(reported[f'{metric},none'], abs=1e-12), (name, metric)
      assert got[f'{metric}_stderr'] == pytest.approx(reported[f'{metric}_stderr,none'],
                                                      abs=1e-12), (name, metric)


def _inside_a_word(rng, lm) -> tuple[str, tuple[str, str]]:
  """A context that stops inside a word and two continuations that finish the sentence from
  there (an empty target delimiter); each adds a token to the context as the harness splits."""
  while True:
    words = list(rng.choice([w for w in _WORDS if len(w) > 2], 7))
    k = int(rng.integers(1, 6))
    cut = int(rng.integers(1, len(words[k])))
    context = ' '.join(words[:k] + [words[k][:cut]])
    endings = (words[k][cut:] + ' ' + ' '.join(words[k + 1:]) + '.',
               words[k][cut:] + ' ' + ' '.join(rng.choice(_WORDS, 3)) + '.')
    if all(lm._encode_pair(context, e)[1] for e in endings):  # pylint: disable=protected-access
      return context, endings


@pytest.mark.slow
def test_continuations_inside_a_word_score_as_lm_eval_harness(trained, tmp_path):
  """An empty target delimiter: each request has the tokens the harness's HF backend feeds
  (the context encoded alone, then the whole text's tokens past it) and its log-likelihood;
  a continuation that adds no token is refused by name, where the harness stops."""
  from lm_eval.api.instance import Instance  # pylint: disable=g-import-not-at-top
  from lm_eval.models.huggingface import HFLM  # pylint: disable=g-import-not-at-top
  hf_dir = tmp_path / 'hf'
  result = cli('convert', 'export-llama', f'--src={trained}', f'--dst={hf_dir}')
  assert result.returncode == 0, result.stderr[-2000:]
  lm = HFLM(pretrained=str(hf_dir), dtype='float32', device='cpu', batch_size=8)
  restored = workdir_lib.for_inference(trained, use_ema=True)
  setup, rng = restored.setup, np.random.default_rng(5)
  items = [mc.Item.shared_context(*_inside_a_word(rng, lm), gold=0, delimiter='')
           for _ in range(12)]
  requests = [(c, x) for item in items for c, x in zip(item.contexts, item.continuations)]
  split_matters, encode_pair = 0, lm._encode_pair  # pylint: disable=protected-access
  for context, continuation in requests:
    context_enc, continuation_enc = encode_pair(context, continuation)
    ids, n = mc.encode_request(setup.tok, context, continuation, 256)
    assert (ids[:len(ids) - n], ids[len(ids) - n:]) == (context_enc, continuation_enc)
    split_matters += context_enc + continuation_enc != lm.tok_encode(context + continuation)
  assert split_matters >= 3, split_matters  # the whole text's tokens would differ
  theirs = lm.loglikelihood([Instance('loglikelihood', {}, r, i) for i, r in enumerate(requests)])
  ours = np.concatenate(mc.loglikelihoods(setup.model, restored.params, setup.tok, items, batch=8,
                                          max_length=256, layout=setup.layout))
  np.testing.assert_allclose(ours, [ll for ll, _ in theirs], rtol=1e-4, atol=1e-4)

  context, ending = 'The cup is on the ta', 'ble'  # the whole has no more tokens than the context
  assert not encode_pair(context, ending)[1]
  with pytest.raises(AssertionError):
    lm.loglikelihood([Instance('loglikelihood', {}, (context, ending), 0)])
  bad = items[:1] + [mc.Item.shared_context(context, ['ble is blue', 'ble'], 0, delimiter='')]
  with pytest.raises(UserError, match=r"^choice 1 of item 1 .*'ble'.* adds no token"):
    mc.loglikelihoods(setup.model, restored.params, setup.tok, bad, batch=8, max_length=256,
                      layout=setup.layout)


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
  env = devices_env(4)
  one = cli(*flags, env=env)
  assert one.returncode == 0 and 'next_line' in one.stdout, one.stderr[-2000:]
  with open(os.path.join(trained, 'eval.json')) as f:
    first = json.load(f)['tasks']
  two = launch_two(*flags, env=devices_env(DEVICES_PER_PROCESS='2'))
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
  config.eval.tasks = 'next_line,hellaswagg'
  with pytest.raises(UserError, match='eval.tasks names hellaswagg'):
    train.train_and_evaluate(config, workdir)


@pytest.mark.slow
def test_scores_under_an_fsdp_mesh_equal_one_device(trained):
  env = devices_env(8, JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, os.path.join(TESTS, 'mc_sharded_check.py'), trained],
                          capture_output=True, text=True, env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['items'] == 24 and report['max_abs_diff'] < 1e-4, report
  assert report['acc'][0] == report['acc'][1]
