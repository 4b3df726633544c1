"""The understanding evaluator: questions answered in padded chunks of one shape get the answers
each question gets alone (its own prompt length, a batch of one)."""

import shutil

import numpy as np
from helpers import reading_digits, signal_params, tiny_config

from monoformer_jax.data import digits_vqa
from monoformer_jax.evaluation import understanding_eval
from monoformer_jax.run import workdir as workdir_lib


def test_chunked_answers_equal_each_question_alone(tokenizer_file, tmp_path, monkeypatch):
  shutil.copy(tokenizer_file, tmp_path / 'tokenizer.model')
  config = reading_digits(tiny_config())
  setup = workdir_lib.for_training(config, str(tmp_path))
  setup.lock.close()
  params = signal_params(setup.model, key=3)
  questions = digits_vqa.heldout_questions(config.data, pairs=2)
  picked = questions[:3] + questions[-2:]  # one-image prompts, then longer two-image ones
  conversations, images = [q for q, _ in picked], np.stack([i for _, i in picked])
  monkeypatch.setattr(understanding_eval, '_ROWS', 2)  # three chunks, the last one padded
  together = understanding_eval.answers(setup, params, conversations, images, max_tokens=4)
  alone = [understanding_eval.answers(setup, params, [c], i[None], max_tokens=4)[0]
           for c, i in zip(conversations, images)]
  assert together == alone
  assert len({tuple(a) for a in alone}) > 1  # the answers depend on what is read


def test_a_verdict_its_own_names_refute_is_a_contradiction():
  assert digits_vqa.conversation([5, 5])[-1]['value'] == 'five and five yes'
  assert understanding_eval.contradicts('five and five no')
  assert understanding_eval.contradicts('five and six yes')
  assert not understanding_eval.contradicts('five and five yes')
  assert not understanding_eval.contradicts('zero and six no')
  assert not understanding_eval.contradicts('five')  # not a comparison
  assert not understanding_eval.contradicts('five and six maybe')
  assert not understanding_eval.contradicts('five or six yes')
