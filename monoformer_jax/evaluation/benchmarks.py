"""The zero-shot commonsense benchmarks of the TinyLlama and MonoFormer tables, read through
tensorflow-datasets and turned into multiple-choice questions with lm-eval-harness's prompts.

Each question is (contexts, continuations, choices, gold) as mc.Item takes it. The split is
the one the harness evaluates: test where it has one with labels (ARC, OpenBookQA), else
validation. `prepare` (the `prepare` command) downloads and prepares the datasets once through
TFDS's Python builders; `questions` only reads a prepared data_dir and never downloads.

Known difference: TFDS keeps HellaSwag's context as one string, where the harness builds it as
ctx_a + ' ' + ctx_b.capitalize(); here the context's sentences are used as TFDS gives them.
"""

import dataclasses
import re
from typing import Callable, Sequence

import ml_collections
import numpy as np

from monoformer_jax.base import quiet_import
from monoformer_jax.base.errors import UserError


Question = tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], int]


def _shared(context: str, choices, gold: int) -> Question:
  choices = tuple(str(c) for c in choices)
  return (context,) * len(choices), tuple(' ' + c for c in choices), choices, int(gold)


def _hellaswag_clean(text: str) -> str:
  """The harness's HellaSwag preprocessing: WikiHow's bracketed artifacts removed."""
  text = text.strip().replace(' [title]', '. ')
  text = re.sub(r'\[.*?\]', '', text)
  return text.replace('  ', ' ')


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def hellaswag(ex) -> Question:
  query = _hellaswag_clean(f'{_text(ex["activity_label"])}: {_text(ex["context"])}')
  return _shared(query, [_hellaswag_clean(_text(e)) for e in ex['endings']], ex['label'])


def openbookqa(ex) -> Question:
  q = ex['question']
  return _shared(_text(q['stem']), [_text(q[f'choice_{k}']) for k in 'ABCD'], ex['answerKey'])


def arc(ex) -> Question:
  labels = list(np.asarray(ex['choices']['label']))
  return _shared(f'Question: {_text(ex["question"])}\nAnswer:',
                 [_text(t) for t in ex['choices']['text']], labels.index(int(ex['answerKey'])))


def piqa(ex) -> Question:
  return _shared(f'Question: {_text(ex["goal"])}\nAnswer:', [_text(ex['sol1']), _text(ex['sol2'])],
                 ex['label'])


def boolq(ex) -> Question:
  return _shared(f'{_text(ex["passage"])}\nQuestion: {_text(ex["question"])}?\nAnswer:',
                 ['no', 'yes'], ex['label'])


def winogrande(ex) -> Question:
  """Partial scoring: each option completes the sentence up to the blank (a context each);
  the rest of the sentence is the continuation scored in both."""
  sentence = _text(ex['sentence'])
  cut = sentence.index('_')
  contexts = tuple(sentence[:cut] + _text(ex[o]) for o in ('option1', 'option2'))
  target = ' ' + sentence[cut + 1:].strip()
  return contexts, (target, target), contexts, int(ex['label'])


@dataclasses.dataclass(frozen=True)
class Benchmark:
  tfds_name: str
  split: str
  question: Callable[[dict], Question]
  metrics: tuple[str, ...]  # the first is the one tables average
  chance: float


BENCHMARKS = {
    'hellaswag': Benchmark('hellaswag', 'validation', hellaswag, ('acc_norm', 'acc'), 0.25),
    'openbookqa': Benchmark('openbookqa', 'test', openbookqa, ('acc_norm', 'acc'), 0.25),
    'winogrande': Benchmark('winogrande', 'validation', winogrande, ('acc',), 0.5),
    'arc_easy': Benchmark('ai2_arc/ARC-Easy', 'test', arc, ('acc', 'acc_norm'), 0.25),
    'arc_challenge': Benchmark('ai2_arc/ARC-Challenge', 'test', arc, ('acc_norm', 'acc'), 0.25),
    'boolq': Benchmark('super_glue/boolq', 'validation', boolq, ('acc',), 0.5),
    'piqa': Benchmark('piqa', 'validation', piqa, ('acc', 'acc_norm'), 0.5),
}


def prepare(names: Sequence[str], data_dir: str = '') -> dict[str, str]:
  """Downloads and prepares each named benchmark's TFDS dataset in data_dir ('' = TFDS's
  default); already prepared ones are left as they are. Returns {name: dataset directory}.

  This is TFDS's Python route (builder.download_and_prepare): the `tfds build` command
  would need apache-beam for its own imports, which none of these builders use."""
  quiet_import.load_tensorflow()
  import requests  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core.download import \
      download_manager  # pylint: disable=g-import-not-at-top
  unknown = [n for n in names if n not in BENCHMARKS]
  if unknown or not names:
    raise UserError(f'--tasks names {", ".join(unknown) or "nothing"} to prepare; expected a '
                    f'comma-separated list of {", ".join(BENCHMARKS)}.')
  where = data_dir or 'the default TFDS data_dir'
  prepared = {}
  for name in names:
    tfds_name = BENCHMARKS[name].tfds_name
    builder = tfds.builder(tfds_name, data_dir=data_dir or None)
    try:
      builder.download_and_prepare()
    except (requests.RequestException, tfds.download.DownloadError,
            download_manager.NonMatchingChecksumError) as e:
      reason = ' '.join(f'{type(e).__name__}: {e}'.split())
      raise UserError(f'downloading the files of the TFDS dataset {tfds_name} into {where} failed '
                      f'({reason}); prepare needs network access to them: retry later, or prepare '
                      'on a machine that has it, copy its data_dir here and pass '
                      '--tfds_data_dir=DIR.') from None
    prepared[name] = str(builder.data_dir)
  return prepared


def questions(name: str, data: ml_collections.ConfigDict, limit: int = 0) -> list[Question]:
  """The benchmark's questions in TFDS order (the first `limit`, 0 = all)."""
  quiet_import.load_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  bench = BENCHMARKS[name]
  split = bench.split if not limit else f'{bench.split}[:{limit}]'
  try:
    builder = tfds.builder(bench.tfds_name, data_dir=data.tfds_data_dir or None)
    examples = builder.as_dataset(split=split)
  except (AssertionError, FileNotFoundError, tfds.core.registered.DatasetNotFoundError):
    where = data.tfds_data_dir or 'the default TFDS data_dir'
    flag = f' --tfds_data_dir={data.tfds_data_dir}' if data.tfds_data_dir else ''
    raise UserError(f'the TFDS dataset {bench.tfds_name} is not prepared in {where}; run '
                    f'`python -m monoformer_jax prepare --tasks={name}{flag}`, or pass '
                    '--tfds_data_dir=DIR where it is prepared (config key data.tfds_data_dir '
                    'for training\'s text_eval_every).') from None
  return [bench.question(ex) for ex in tfds.as_numpy(examples)]
