"""Samples that read images laid out as the official training lays out LLaVA data: the layout,
LLaVA JSON records and their pictures, and the digit questions of the embedded default."""

import json
import re

import numpy as np
import pytest
from helpers import metrics_rows, tiny_config
from PIL import Image

from monoformer_jax import train
from monoformer_jax.base.errors import UserError
from monoformer_jax.data import (common, digits_vqa, llava, pipeline, understanding,
                                 vision_input)
from monoformer_jax.data.tokenizer import SentencePiece
from monoformer_jax.data.understanding import Reading, UnderstandingSource
from monoformer_jax.data.vision_input import PictureFormat

# 8 x 8 pictures read as 16 tokens, the model's own grey or RGB pixels
GREY = Reading(16, PictureFormat.DIFFUSION, (8, 8, 1))
RGB = Reading(16, PictureFormat.DIFFUSION, (8, 8, 3))


@pytest.fixture(scope='module')
def tok(tokenizer_file):
  return SentencePiece(tokenizer_file)


def test_placeholders_become_time_and_feature_slots(tok):
  turns = [{'from': 'human', 'value': '<image>\nWhat is<image> this?'},
           {'from': 'gpt', 'value': 'a digit'}]
  m, length = 3, 40
  layout = understanding.lay_out(understanding.conversation_ids(turns, tok), tok, m, length)
  text = (tok.bos + tok.encode('\nWhat is') + tok.encode(' this?') + tok.encode('a digit')
          + [tok.eos_id])
  n = len(text) + 2 * (m + 1)
  assert layout.images_placed == 2 and layout.valid.sum() == n
  # BOS, then image 1's time token and features, then text, then image 2
  first = 1 + len(tok.bos) - 1
  np.testing.assert_array_equal(layout.slot[first:first + m + 1], 1)
  np.testing.assert_array_equal(layout.offset[first:first + m + 1], np.arange(m + 1))
  assert (layout.slot == 2).sum() == m + 1 and (layout.slot[n:] == 0).all()
  # every text token is learned (the official train_on_source), no image slot is
  assert not layout.loss_mask[layout.slot > 0].any()
  np.testing.assert_array_equal(layout.tokens[layout.loss_mask], text)
  assert (layout.tokens[n:] == tok.pad_id).all() and not layout.loss_mask[n:].any()


def test_an_image_that_does_not_fit_ends_the_sequence(tok):
  turns = [{'from': 'human', 'value': 'look <image>'}, {'from': 'gpt', 'value': 'ok'}]
  ids = understanding.conversation_ids(turns, tok)
  before = ids[0].index(understanding.IMAGE)
  layout = understanding.lay_out(ids, tok, tokens_per_image=8, length=before + 5)
  assert layout.images_placed == 0 and layout.valid.sum() == before
  assert (layout.slot == 0).all()


def test_turns_are_cut_as_the_official_tokenizer_calls_cut_them(tok):
  long = ' '.join(['word'] * 300)
  turns = [{'from': 'human', 'value': long}, {'from': 'gpt', 'value': long}]
  ids, learned = understanding.conversation_ids(turns, tok)
  human = (tok.bos + tok.encode(long))[:understanding.HUMAN_MAX]
  assert ids[:len(human)] == human and len(human) == understanding.HUMAN_MAX
  assert ids[len(human):] == (tok.encode(long) + [tok.eos_id])[:understanding.GPT_MAX]
  assert all(learned)  # the official train_on_source
  _, answers_only = understanding.conversation_ids(turns, tok, learn_questions=False)
  assert answers_only == [False] * len(human) + [True] * (len(ids) - len(human))


def test_placeholder_count_must_match_the_images():
  turns = [{'from': 'human', 'value': '<image><image> same?'}, {'from': 'gpt', 'value': 'no'}]
  understanding.check_placeholders(turns, 2, 2, 'x.json, record 3')
  with pytest.raises(UserError, match=r'x.json, record 3 has 2 <image> placeholder\(s\) for 1'):
    understanding.check_placeholders(turns, 1, 2, 'x.json, record 3')
  with pytest.raises(UserError, match='data.images_per_sample allows 1'):
    understanding.check_placeholders(turns, 2, 1, 'x.json, record 3')


def test_digit_questions(tok):
  data = tiny_config().data
  data.understanding_seq_len = 64
  ds = digits_vqa.examples(data, tok, seed=0, tokens_per_image=16)
  rows = [ds[i] for i in range(64)]
  reads = [int(r['slot'].max()) for r in rows]
  assert set(reads) == {1, 2} and 20 < reads.count(2) < 44
  for r in rows:  # unread image rows are zeros, read ones are digits in [-1, 1]
    assert r['images'].shape == (2, 8, 8, 1)
    assert (r['images'][int(r['slot'].max()):] == 0).all()
    said = tok.decode(r['tokens'][r['loss_mask']])
    assert said.split()[-1] in ('yes', 'no', *digits_vqa.digits.CLASS_NAMES), said
  questions = digits_vqa.heldout_questions(data, pairs=40)
  two = [q for q, _ in questions if understanding.count_placeholders(q) == 2]
  assert len(two) == 40 and 10 < sum(q[-1]['value'].endswith(' yes') for q in two) < 30
  again = digits_vqa.heldout_questions(data, pairs=40)  # the same questions every time
  assert [q for q, _ in again] == [q for q, _ in questions]
  assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(again, questions))


def _llava_files(tmp_path, records):
  (tmp_path / 'pics').mkdir(exist_ok=True)
  rng = np.random.default_rng(0)
  for name in ('a.png', 'b.jpg'):
    Image.fromarray(rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)).save(tmp_path / 'pics' / name)
  (tmp_path / 'notes.png').write_text('not a picture')
  path = tmp_path / 'llava.json'
  path.write_text(json.dumps(records))
  data = tiny_config().data
  data.understanding_source, data.llava_files = 'llava_json', str(path)
  data.understanding_seq_len = 64
  return data


def _conversation(question, answer='fine'):
  return [{'from': 'human', 'value': question}, {'from': 'gpt', 'value': answer}]


def test_llava_records_read_their_pictures(tok, tmp_path):
  data = _llava_files(tmp_path, [
      {'id': 1, 'image': 'pics/a.png', 'conversations': _conversation('<image>\nWhat is it?')},
      {'id': 2, 'image': ['pics/b.jpg', 'pics/a.png'],
       'conversations': _conversation('<image> or <image>?', 'the first')},
      {'id': 3, 'conversations': _conversation('Hello?')}])
  ds = pipeline.understanding_dataset(data, UnderstandingSource.LLAVA_JSON, tok, 0, GREY)
  rows = [ds[0][k] for k in ('images', 'slot', 'tokens', 'loss_mask')]
  seen = {int(slot.max()) for slot in ds[0]['slot']}
  assert seen == {0, 1, 2}  # the three records, shuffled into one batch of 4
  picture = vision_input.encoder_input(Image.open(tmp_path / 'pics' / 'a.png').convert('RGB'),
                                       PictureFormat.DIFFUSION, (8, 8, 1))
  assert picture.shape == (8, 8, 1) and -1 <= picture.min() and picture.max() <= 1
  one = [i for i, slot in enumerate(rows[1]) if slot.max() == 1][0]
  np.testing.assert_allclose(rows[0][one, 0], picture)
  assert (rows[0][one, 1] == 0).all()


@pytest.mark.parametrize('record,named', [
    ({'image': 'pics/a.png', 'conversations': _conversation('<image><image> twice?')},
     'has 2 <image> placeholder(s) for 1 image(s)'),
    ({'image': ['pics/a.png'] * 3, 'conversations': _conversation('<image>' * 3)},
     'has 3 images; config key data.images_per_sample allows 2'),
    ({'image': 'pics/a.png', 'conversations': [{'from': 'bot', 'value': 'x'}]},
     '"conversations" must be a non-empty list'),
])
def test_bad_llava_records_are_named_or_skipped(tok, tmp_path, record, named):
  good = {'image': 'pics/a.png', 'conversations': _conversation('<image> ok?')}
  data = _llava_files(tmp_path, [good, record])
  with pytest.raises(UserError, match=re.escape(f'llava.json, record 1: {named}')):
    llava.records(data)
  data.skip_bad_records = True
  assert len(llava.records(data)) == 1


def test_an_unreadable_picture_is_named_or_skipped(tok, tmp_path):
  data = _llava_files(tmp_path, [
      {'image': 'notes.png', 'conversations': _conversation('<image> ok?')},
      {'image': 'pics/a.png', 'conversations': _conversation('<image> ok?')}])
  listed = llava.records(data)
  reader = llava.Conversation(listed, tok, data, GREY)
  with pytest.raises(UserError, match='llava.json, record 0: .*notes.png is not an image file'):
    reader.map(0)
  data.skip_bad_records = True
  sample = llava.Conversation(listed, tok, data, GREY).map(0)
  assert sample['slot'].max() == 1 and sample['images'][0].any()


def _drawing_config(tmp_path):
  """A pixel-space model of 8 x 8 RGB pictures that reads (vision_encoder 'vae') and draws
  LLaVA records: one that reads a picture, one that reads one and draws another."""
  data = _llava_files(tmp_path, [
      {'image': 'pics/a.png', 'conversations': _conversation('<image>\nWhat is it?')},
      {'image': ['pics/a.png', 'pics/b.jpg'],
       'conversations': _conversation('<image> Draw it again.', 'Here: <image>')}])
  config = tiny_config(num_steps=3, understanding_weight=1.0)
  config.data = data
  config.data.image_source, config.data.image_resolution = 'llava_json', 8
  config.data.prompt_len, config.data.cfg_dropout = 40, 0.0
  config.model.vision_encoder = 'vae'
  config.model.image_size, config.model.image_channels = (8, 8), 3
  return config


def test_a_record_that_draws_is_an_interleaved_image_sample(tok, tmp_path):
  config = _drawing_config(tmp_path)
  ds = pipeline.image_dataset(config.data, pipeline.ImageSource.LLAVA_JSON, tok, 0, (8, 8, 3),
                              RGB)
  row = {k: v[0] for k, v in ds[0].items()}
  # the prompt: BOS, the read picture's 17 slots, the text, "Here:", <im_start>; left-padded
  ids, _ = understanding.conversation_ids(_conversation('<image> Draw it again.')[:1], tok)
  ids += tok.encode('Here: ') + [tok.im_start_id]
  assert row['valid'].sum() == len(ids) + 16 and row['tokens'][-1] == tok.im_start_id
  assert (row['slot'] == 1).sum() == 17 and row['slot'].max() == 1
  drawn = np.asarray(Image.open(tmp_path / 'pics' / 'b.jpg').convert('RGB'))
  np.testing.assert_allclose(row['image'], common.to_unit_range(common.center_crop(drawn, 8)))
  read = vision_input.encoder_input(Image.open(tmp_path / 'pics' / 'a.png').convert('RGB'),
                                    PictureFormat.DIFFUSION, (8, 8, 3))
  np.testing.assert_allclose(row['images'][0], read)
  assert (row['images'][1] == 0).all()
  config.data.prompt_len = len(ids) + 15  # one slot short
  with pytest.raises(UserError, match=r'llava.json, record 1: its prompt does not fit in '
                                      r'data.prompt_len'):
    pipeline.image_dataset(config.data, pipeline.ImageSource.LLAVA_JSON, tok, 0, (8, 8, 3),
                           RGB)[0]


@pytest.mark.slow
def test_training_reads_and_draws_llava_records(workdir, tmp_path):
  """Joint steps (one compiled program) on text, the drawing record and the reading one."""
  config = _drawing_config(tmp_path)
  config.train.objective, config.train.understanding_weight = 'joint', 0.0
  config.train.num_steps = 2
  train.train_and_evaluate(config, workdir)
  rows = metrics_rows(workdir)
  assert [r['kind'] for r in rows] == ['joint', 'joint']
  assert all(np.isfinite(r['loss']) and r['diffusion'] > 0 and r['ce'] > 0 for r in rows)
