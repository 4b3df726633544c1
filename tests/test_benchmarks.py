"""The commonsense benchmarks read through TFDS (mocked with examples in each dataset's own
feature layout): the fields used, the prompts built, the answer index."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from helpers import tiny_config
from monoformer_jax.data import benchmarks
from monoformer_jax.errors import UserError

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
  with pytest.raises(UserError, match='piqa is not prepared'):
    benchmarks.questions('piqa', data)
