"""The commonsense benchmarks read through TFDS (mocked with examples in each dataset's own
feature layout): the fields used, the prompts built, the answer index; and prepared by TFDS's
own builders from files in each dataset's published layout (only the network fetch replaced)."""

import json
import os
import zipfile
from unittest import mock

import numpy as np
import promise
import pytest
import requests
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath
from helpers import tiny_config

from monoformer_jax.base.errors import UserError
from monoformer_jax.evaluation import benchmarks


EXAMPLES = {
    'hellaswag': dict(activity_label='Baking cookies', context='A woman pours flour [title] into a bowl.',
                      endings=['She stirs it.', 'He [header] jumps.', 'It rains.', 'A dog sings.'],
                      label=np.int32(2), split_type='indomain', source_id='x'),
    'openbookqa': dict(question=dict(stem='The sun is a', choice_A='star', choice_B='planet',
                                     choice_C='moon', choice_D='rock'),
                       fact1='', humanScore=np.float32(1), clarity=np.float32(1),
                       turkIdAnonymized='', answerKey=np.int64(0)),
    'winogrande': dict(sentence='The cup fell off the table because _ was unsteady.',
                       option1='the cup', option2='the table', label=np.int64(1)),
    'arc_easy': dict(id='a', question='Which is a gas?',
                     choices=dict(text=['ice', 'steam', 'rock'], label=np.array([5, 6, 7])),
                     answerKey=np.int64(6)),
    'boolq': dict(question='is the sky blue', passage='The sky is blue by day.', idx=np.int32(0),
                  label=np.int64(1)),
    'piqa': dict(id='p', goal='Open a jar', sol1='Twist the lid.', sol2='Eat the lid.',
                 label=np.int64(0)),
}
EXAMPLES['arc_challenge'] = EXAMPLES['arc_easy']

WANT = {  # (contexts, continuations, choices, gold), as lm-eval-harness builds them
    'hellaswag': (('Baking cookies: A woman pours flour. into a bowl.',) * 4,
                  (' She stirs it.', ' He jumps.', ' It rains.', ' A dog sings.'),
                  ('She stirs it.', 'He jumps.', 'It rains.', 'A dog sings.'), 2),
    'openbookqa': (('The sun is a',) * 4, (' star', ' planet', ' moon', ' rock'),
                   ('star', 'planet', 'moon', 'rock'), 0),
    'winogrande': (('The cup fell off the table because the cup',
                    'The cup fell off the table because the table'), (' was unsteady.',) * 2,
                   ('The cup fell off the table because the cup',
                    'The cup fell off the table because the table'), 1),
    'arc_easy': (('Question: Which is a gas?\nAnswer:',) * 3, (' ice', ' steam', ' rock'),
                 ('ice', 'steam', 'rock'), 1),
    'boolq': (('The sky is blue by day.\nQuestion: is the sky blue?\nAnswer:',) * 2,
              (' no', ' yes'), ('no', 'yes'), 1),
    'piqa': (('Question: Open a jar\nAnswer:',) * 2, (' Twist the lid.', ' Eat the lid.'),
             ('Twist the lid.', 'Eat the lid.'), 0),
}
WANT['arc_challenge'] = WANT['arc_easy']


@pytest.mark.parametrize('name', sorted(benchmarks.BENCHMARKS))
def test_questions_from_tfds(name):
  seen = {}

  def as_dataset(self, split, **unused_kwargs):
    seen['name'], seen['split'] = self.name, split
    return tf.data.Dataset.from_tensors(EXAMPLES[name]).repeat(3)

  with tfds.testing.mock_data(as_dataset_fn=as_dataset, policy=tfds.testing.MockPolicy.USE_CODE):
    questions = benchmarks.questions(name, tiny_config().data, limit=3)
  bench = benchmarks.BENCHMARKS[name]
  assert seen == {'name': bench.tfds_name.split('/')[0], 'split': f'{bench.split}[:3]'}
  assert len(questions) == 3 and questions[0] == WANT[name], questions[0]


def test_an_unprepared_dataset_is_named(tmp_path):
  data = tiny_config().data
  data.tfds_data_dir = str(tmp_path)
  with pytest.raises(UserError, match=f'piqa is not prepared in {tmp_path}; run `python -m '
                     f'monoformer_jax prepare --tasks=piqa --tfds_data_dir={tmp_path}`'):
    benchmarks.questions('piqa', data)


def _jsonl(*rows) -> str:
  return ''.join(json.dumps(r) + '\n' for r in rows)


def _zip(path, members: dict) -> str:
  with zipfile.ZipFile(path, 'w') as z:
    for name, text in members.items():
      z.writestr(name, text)
  return str(path)


def _arc(labels, key):
  row = dict(id='a', answerKey=key, question=dict(stem='Which is a gas?', choices=[
      dict(text=t, label=l) for t, l in zip(['ice', 'steam', 'rock'], labels)]))
  return {f'ARC-V1-Feb2018-2/ARC-{c}/ARC-{c}-{s}.jsonl': _jsonl(row)
          for c in ('Easy', 'Challenge') for s in ('Train', 'Dev', 'Test')}


def published_files(tmp_path) -> dict:
  """{file name of the URL: a local file} holding the rows above (EXAMPLES) in the layout that
  each dataset publishes and its TFDS builder reads (archives zipped, answers as released)."""
  hellaswag = dict(ind=0, activity_label='Baking cookies', ctx_a='A woman pours flour.',
                   ctx_b='into a bowl.', ctx='A woman pours flour [title] into a bowl.',
                   endings=['She stirs it.', 'He [header] jumps.', 'It rains.', 'A dog sings.'],
                   source_id='wikihow~1', split='val', split_type='indomain', label=2)
  # TFDS splits HellaSwag by source and domain too, and every split needs a row.
  hellaswag = [dict(hellaswag, source_id=f'{source}~1', split_type=domain)
               for source in ('wikihow', 'activitynet') for domain in ('indomain', 'zeroshot')]
  unlabelled = [{k: v for k, v in row.items() if k != 'label'} for row in hellaswag]
  files = {f'hellaswag_{s}.jsonl': _jsonl(*(unlabelled if s == 'test' else hellaswag))
           for s in ('train', 'val', 'test')}
  for name, text in files.items():
    (tmp_path / name).write_text(text)
    files[name] = str(tmp_path / name)
  obqa = _jsonl(dict(id='7-1', question=dict(stem='The sun is a', choices=[
      dict(text=t, label=l) for t, l in zip(['star', 'planet', 'moon', 'rock'], 'ABCD')]),
                     fact1='the sun is a star', humanScore=1.0, clarity=2.0,
                     turkIdAnonymized='t', answerKey='A'))
  files['OpenBookQA-V1-Sep2018.zip'] = _zip(tmp_path / 'obqa.zip', {
      f'OpenBookQA-V1-Sep2018/Data/Additional/{s}_complete.jsonl': obqa
      for s in ('train', 'dev', 'test')})
  wino = dict(qID='w1', sentence='The cup fell off the table because _ was unsteady.',
              option1='the cup', option2='the table', answer='2')
  files['winogrande_1.1.zip'] = _zip(tmp_path / 'wino.zip', {
      **{f'winogrande_1.1/{s}.jsonl': _jsonl(wino)
         for s in ('train_xs', 'train_s', 'train_m', 'train_l', 'train_xl', 'dev')},
      'winogrande_1.1/test.jsonl': _jsonl({k: v for k, v in wino.items() if k != 'answer'})})
  arc = _arc('ABC', 'B')
  arc.update({k: v for k, v in _arc('123', '2').items() if 'Challenge' in k})  # some number them
  files['ARC-V1-Feb2018.zip'] = _zip(tmp_path / 'arc.zip', arc)
  boolq = dict(question='is the sky blue', passage='The sky is blue by day.', idx=0, label=True)
  files['BoolQ.zip'] = _zip(tmp_path / 'boolq.zip', {
      'BoolQ/train.jsonl': _jsonl(boolq), 'BoolQ/val.jsonl': _jsonl(boolq),
      'BoolQ/test.jsonl': _jsonl({k: v for k, v in boolq.items() if k != 'label'})})
  piqa = _jsonl(dict(id='p', goal='Open a jar', sol1='Twist the lid.', sol2='Eat the lid.'))
  files['physicaliqa-train-dev.zip'] = _zip(tmp_path / 'piqa.zip', {
      f'physicaliqa-train-dev/{s}{ext}': text for s in ('train', 'dev')
      for ext, text in (('.jsonl', piqa), ('-labels.lst', '0\n'))})
  return files


def test_prepare_then_read(tmp_path):
  """The real TFDS builders prepare every benchmark from its published files (only the network
  fetch is replaced, by local files), and `questions` reads the items back."""
  (tmp_path / 'published').mkdir()
  files = published_files(tmp_path / 'published')
  fetched = []

  def fetch(unused_self, resource):  # DownloadManager's fetch of a URL not in its cache
    fetched.append(resource.url)
    return promise.Promise.resolve(epath.Path(files[resource.url.rsplit('/', 1)[-1]]))

  data = tiny_config().data
  data.tfds_data_dir = str(tmp_path / 'tfds')
  with mock.patch.object(tfds.download.DownloadManager, '_download', fetch):
    prepared = benchmarks.prepare(sorted(benchmarks.BENCHMARKS), data.tfds_data_dir)
  assert {url.rsplit('/', 1)[-1] for url in fetched} == set(files), fetched
  for name, bench in benchmarks.BENCHMARKS.items():
    assert prepared[name].startswith(os.path.join(data.tfds_data_dir, bench.tfds_name)), prepared
    rows = 4 if name == 'hellaswag' else 1
    assert benchmarks.questions(name, data) == [WANT[name]] * rows, name


def test_prepare_names_what_failed(tmp_path):
  def offline(*unused_args, **unused_kwargs):
    raise requests.ConnectionError('Failed to resolve storage.googleapis.com')

  with mock.patch.object(requests.Session, 'get', offline):
    with pytest.raises(UserError, match=r'TFDS dataset piqa into .* failed \(ConnectionError'):
      benchmarks.prepare(['piqa'], str(tmp_path))
  with pytest.raises(UserError, match='next_line to prepare; expected'):
    benchmarks.prepare(['piqa', 'next_line'], str(tmp_path))
