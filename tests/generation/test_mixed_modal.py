"""Mixed-modal generation against the single-modality samplers it is built from."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import cli, signal_params, tiny_config

from monoformer_jax.data import tokenizer as tokenizer_lib
from monoformer_jax.diffusion import Guidance, Sampler
from monoformer_jax.generation import mixed_modal, sampling
from monoformer_jax.run import settings as settings_lib
from monoformer_jax.nn.layers import KVCache, MaskType


PROMPTS = ['a handwritten digit seven', 'The', 'a handwritten digit one please']


@pytest.fixture(scope='module')
def parts(tokenizer_file):
  tok = tokenizer_lib.SentencePiece(tokenizer_file)
  config = tiny_config()
  model = settings_lib.build_model(config)
  return tok, model, signal_params(model, key=4)


def _prompts(tok, length=12):
  encoded = [tok.text_prompt(p, length) for p in PROMPTS]
  return np.stack([e[0] for e in encoded]), np.stack([e[1] for e in encoded])


def test_text_is_the_cached_decoder_until_an_image_starts(parts):
  tok, model, params = parts
  tokens, valid = _prompts(tok)
  decoding = mixed_modal.Decoding(max_tokens=12, temperature=0.0, top_k=0, top_p=1.0)
  spec = sampling.ImageSampling(Sampler.DDPM, 2, Guidance(1.0))
  rows = mixed_modal.generate(model, params, tokens, valid, jax.random.key(0), tok=tok, spec=spec,
                              decoding=decoding, max_images=0)
  want = np.asarray(sampling.generate(model, params, tokens, valid, jax.random.key(0),
                                      max_tokens=12, temperature=0.0, top_k=0, top_p=1.0,
                                      stop_ids=tok.stop_ids, pad_id=tok.pad_id))
  for row, reference in zip(rows, want.tolist()):
    stops = [i + 1 for i, t in enumerate(reference) if t in (tok.eos_id, tok.im_start_id)]
    assert row.tokens == reference[:stops[0] if stops else 12]
    assert not row.images


def test_an_image_started_mid_sequence_is_the_samplers_image(parts):
  """Rows forced to emit <im_start> after their text prompt draw what `sample` draws for
  the same prompt and key (guidance included); <im_end> follows, then text again."""
  tok, model, params = parts
  tokens, valid = _prompts(tok)
  batch = len(PROMPTS)
  spec = sampling.ImageSampling(Sampler.DDPM, 4, Guidance(2.0))
  specials = mixed_modal.Specials.of(tok)
  span = model.image.num_patches + 1
  total = tokens.shape[1] + 8 + span + 1
  out = model.apply({'params': params}, jnp.asarray(tokens), jnp.asarray(valid),
                    mask_type=MaskType.CAUSAL, cache=KVCache.empty(model.backbone, batch, total))
  state = mixed_modal.State(
      cache=out.cache, logits=out.logits[:, -1], tokens=jnp.zeros((batch, 8), jnp.int32),
      count=jnp.zeros((batch,), jnp.int32), done=jnp.zeros((batch,), bool),
      waiting=jnp.zeros((batch,), bool), forced=jnp.full((batch,), tok.im_start_id, jnp.int32))
  decoding = mixed_modal.Decoding(max_tokens=8, temperature=0.0, top_k=0, top_p=1.0)
  state = mixed_modal.text_phase(model, params, state, jax.random.key(1), decoding=decoding,
                                 specials=specials, room=total - span - 1)
  assert np.asarray(state.waiting).all() and np.asarray(state.count).tolist() == [1] * batch
  key = jax.random.key(5)
  images, state = mixed_modal.image_phase(model, params, state, key, spec=spec, specials=specials)

  prompted = [tok.image_prompt(p, 13) for p in PROMPTS]
  null = tok.image_prompt('', 13)
  want = sampling.make_image_sampler(model, spec)(
      params, np.stack([p[0] for p in prompted]), np.stack([p[1] for p in prompted]),
      np.stack([null[0]] * batch), np.stack([null[1]] * batch),
      np.full((batch, 1), tok.im_end_id, np.int32), key)
  np.testing.assert_allclose(np.asarray(images), np.asarray(want), atol=2e-4, rtol=1e-4)
  assert np.abs(np.asarray(want)[0] - np.asarray(want)[1]).max() > 1e-2  # prompts matter

  assert int(state.cache.index) == tokens.shape[1] + 1 + span
  state = mixed_modal.text_phase(model, params, state, jax.random.key(2), decoding=decoding,
                                 specials=specials, room=total)
  emitted = np.asarray(state.tokens)
  assert (emitted[:, :2] == [tok.im_start_id, tok.im_end_id]).all()


@pytest.mark.slow
def test_generate_out_writes_text_images_and_a_record(trained, tmp_path):
  out = tmp_path / 'mixed'
  result = cli('generate', f'--workdir={trained}', '--prompt=a handwritten digit seven',
               f'--out={out}', '--num=3', '--max_tokens=6', '--steps=3')
  assert result.returncode == 0, result.stderr[-2000:]
  record = json.loads((out / 'generation.json').read_text())
  assert len(record) == 3 and all(r['prompt'] == 'a handwritten digit seven' for r in record)
  pictures = sorted(p.name for p in out.glob('*.png'))
  assert pictures == sorted(name for r in record for name in r['images'])
  assert all(len(r['tokens']) <= 6 for r in record)
  *rows, written = result.stdout.splitlines()
  assert len(rows) == 3 and written == (f'wrote {out / "generation.json"} and {len(pictures)} '
                                        'picture(s) beside it.')
  bad = cli('generate', f'--workdir={trained}', '--prompt=x', f'--out={tmp_path / "no"}',
            '--max_images=-1')
  assert bad.returncode == 2 and '--max_images' in bad.stderr and 'Traceback' not in bad.stderr
  assert not (tmp_path / 'no').exists()
