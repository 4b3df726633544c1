"""How well the model answers questions about images it reads: the embedded default's held-out
digits ("Which digit is this?", "Are these the same digit?"), answered greedily.

Each prompt is the question's human turn (images in their slots, the time tokens at t = 0 as the
official inference sets it). A one-image answer counts when its decoded text, stripped, is the
digit's name; a two-image answer when its verdict (the last word: yes or no) is right.
Dimension letters: B batch, P prompt length, I images per question.
"""

import jax
import jax.numpy as jnp
import numpy as np

from monoformer_jax.base import progress
from monoformer_jax.data import digits_vqa, understanding
from monoformer_jax.generation import sampling
from monoformer_jax.nn.understanding import Understanding

_ROWS = 128  # questions per generate call


def prompts(setup, conversations: list[list[dict]]) -> dict:
  """Left-padded prompts of each conversation without its answer, as long as the longest:
  tokens, valid, slot, offset [B, P]."""
  m = setup.model.understanding.tokens_per_image
  ids = [understanding.conversation_ids(turns[:-1], setup.tok) for turns in conversations]
  length = max(len(i) + m * i.count(understanding.IMAGE) for i, _ in ids)
  rows = [understanding.lay_out(i, setup.tok, m, length).left_aligned() for i in ids]
  return {k: np.stack([r[k] for r in rows]) for k in ('tokens', 'valid', 'slot', 'offset')}


def _read(p: dict, images: np.ndarray, see, key: jax.Array) -> tuple[dict, Understanding]:
  """Prompts p ('tokens', 'valid') and what they read: images [B, I, ...] through see, the time
  tokens at t = 0 (as the official inference)."""
  read = Understanding(see(jnp.asarray(images), key), jnp.asarray(p['slot']),
                       jnp.asarray(p['offset']), jnp.zeros((len(images),), jnp.int32))
  return dict(tokens=jnp.asarray(p['tokens']), valid=jnp.asarray(p['valid'])), read


def reading(setup, conversations: list[list[dict]], images: np.ndarray,
            key: jax.Array) -> tuple[dict, Understanding]:
  """Left-padded prompts ('tokens', 'valid' [B, P]) of conversations without their last
  turn, and what they read: images [B, I, ...] through the config's vision encoder."""
  see = setup.settings.vision.feature_encoder(setup.layout)
  return _read(prompts(setup, conversations), images, see, key)


def answers(setup, params, conversations: list[list[dict]], images: np.ndarray,
            max_tokens: int = 10, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
            key: jax.Array | None = None) -> list[list[int]]:
  """The ids the model continues each conversation with (its last turn, the answer, left out;
  greedy by default), reading images [B, I, ...]; key draws the samples (default: key 0)."""
  key = jax.random.key(0) if key is None else key
  tok = setup.tok
  see = setup.settings.vision.feature_encoder(setup.layout)
  every = prompts(setup, conversations)  # one length for every chunk
  out = []
  for start in range(0, len(conversations), _ROWS):
    n = min(_ROWS, len(conversations) - start)
    rows = n if len(conversations) <= _ROWS else _ROWS  # chunks of one shape: one compile
    picked = np.minimum(np.arange(start, start + rows), start + n - 1)  # the last row repeated
    prompt, read = _read({k: v[picked] for k, v in every.items()}, images[picked], see, key)
    ids = sampling.generate(setup.model, params, prompt['tokens'], prompt['valid'],
                            jax.random.fold_in(key, start), max_tokens=max_tokens,
                            temperature=temperature,
                            top_k=min(top_k, setup.model.backbone.vocab_size), top_p=top_p,
                            stop_ids=tok.stop_ids, pad_id=tok.pad_id, understand=read)
    out += np.asarray(ids)[:n].tolist()
  return out


def digit_questions(setup, params, pairs: int = 200) -> dict[str, float]:
  """understanding/one_image and understanding/two_images: the fractions answered right;
  understanding/two_image_names: the two-image answers that name both digits right;
  understanding/contradictions: the two-image answers whose verdict its own names refute."""
  questions = digits_vqa.heldout_questions(setup.config.data, pairs)
  with progress.phase(f'eval: {len(questions)} questions on held-out digits'):
    ids = answers(setup, params, [q for q, _ in questions], np.stack([i for _, i in questions]))
  got = [setup.tok.decode(row).strip() for row in ids]
  expected = [q[-1]['value'] for q, _ in questions]
  two = np.array([understanding.count_placeholders(q) == 2 for q, _ in questions])
  right = np.array([(_verdict(a) == _verdict(e)) if pair else a == e
                    for a, e, pair in zip(got, expected, two)])
  metrics = {'understanding/one_image': float(right[~two].mean())}
  if two.any():
    pairs_got = [a for a, pair in zip(got, two) if pair]
    pairs_expected = [e for e, pair in zip(expected, two) if pair]
    metrics['understanding/two_images'] = float(right[two].mean())
    metrics['understanding/two_image_names'] = float(np.mean(
        [_names(a) == _names(e) for a, e in zip(pairs_got, pairs_expected)]))
    metrics['understanding/contradictions'] = float(np.mean([contradicts(a) for a in pairs_got]))
  return metrics


def _verdict(answer: str) -> str:
  return answer.split()[-1] if answer.split() else ''


def _names(answer: str) -> list[str]:
  """The digits an answer 'seven and three no' names ([] when it is not of that form)."""
  words = answer.split()
  return [words[0], words[2]] if len(words) == 4 and words[1] == 'and' else []


def contradicts(answer: str) -> bool:
  """Whether a two-image answer's verdict is refuted by the names it gives: 'five and five no',
  'five and six yes'. An answer of another form contradicts nothing."""
  names, verdict = _names(answer), _verdict(answer)
  if not names or verdict not in ('yes', 'no'):
    return False
  return (names[0] == names[1]) != (verdict == 'yes')
