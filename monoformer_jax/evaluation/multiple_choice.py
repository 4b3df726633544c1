"""Multiple-choice scoring as lm-eval-harness defines it (output_type multiple_choice).

An item has one request per choice, a (context, continuation) pair of strings. Each request is
tokenized as the harness's HF backend tokenizes for a causal LM: trailing spaces of the context move
to the continuation; the context and the whole are each encoded with what the tokenizer puts
before a text (BOS, or nothing as for Qwen2.5), the continuation is the
whole's tokens after the context's, and the model reads the context's own tokens followed by those
(not the whole's tokens: they differ where a continuation starts inside a word, as with an empty
target delimiter); an empty context is BOS (EOS for a tokenizer without one); a request longer than the model's context keeps its last tokens. Its score is the
summed log-probability of the continuation. A continuation that adds no token is an error, as in the
harness. Known difference with a sentencepiece tokenizer: text that spells a special piece ('<s>',
'</s>') is plain text here, where HF's tokenizer reads the special token (a tokenizer.json reads it
as HF does). `acc` is how often the highest score is the gold
choice, `acc_norm` the same with each score divided by its choice's length in characters; both with
the standard error of a mean. Requests are scored in batches right-padded to a multiple of 32
tokens, split over the devices of every host (each host scores its rows; the scores are gathered).
Dimension letters: R requests, B batch, L length.
"""

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from monoformer_jax.base import sharding
from monoformer_jax.base.errors import UserError
from monoformer_jax.data.tokenizer import Tokenizer
from monoformer_jax.nn.layers import MaskType
from monoformer_jax.nn.model import MonoFormer


_LENGTH_STEP = 32  # padded lengths are multiples of this, so few shapes are compiled


@dataclasses.dataclass(frozen=True)
class Item:
  """One question: request i is (contexts[i], continuations[i]) for choice i; `choices` are the
  choice texts whose lengths acc_norm divides by."""
  contexts: tuple[str, ...]
  continuations: tuple[str, ...]
  choices: tuple[str, ...]
  gold: int

  @classmethod
  def shared_context(cls, context: str, choices: Sequence[str], gold: int,
                     delimiter: str = ' ') -> 'Item':
    """The usual form: one context, each choice (after the delimiter) as its continuation."""
    return cls((context,) * len(choices), tuple(delimiter + c for c in choices), tuple(choices),
               gold)


def encode_request(tok: Tokenizer, context: str, continuation: str, max_length: int,
                   name: str = 'a request') -> tuple[list[int], int]:
  """(tokens of context + continuation, how many of the last ones are the continuation),
  cut to the last max_length + 1 tokens as the harness does (the last is never an input).
  `name` says which request an error is about."""
  spaces = len(context) - len(context.rstrip())
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  if context:
    context_ids = tok.bos + tok.encode(context)
    target = (tok.bos + tok.encode(context + continuation))[len(context_ids):]
  else:  # the harness conditions on BOS, or EOS where the tokenizer has none
    context_ids, target = [tok.eos_id if tok.bos_id is None else tok.bos_id], tok.encode(continuation)
    if target[:1] == context_ids:
      context_ids, target = target[:1], target[1:]
  if not target:
    raise UserError(f'{name} (continuation {continuation!r} after {context[-40:]!r}) adds no '
                    'token to its context; expected a continuation of at least one token, as '
                    'lm-eval-harness requires.')
  if len(target) > max_length:
    raise UserError(f'{name} has a continuation of {len(target)} tokens; expected at most the '
                    f'model\'s context of {max_length}.')
  return (context_ids + target)[-(max_length + 1):], len(target)


@functools.lru_cache(maxsize=4)  # compiled once per model, however often a run scores
def _score_fn(model: MonoFormer):
  @jax.jit
  def score(params, tokens, valid, target):
    """Summed log-probabilities [B] of the tokens where target [B, L] is set."""
    logits = model.apply({'params': params}, tokens, valid, mask_type=MaskType.CAUSAL).logits
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.where(target[:, 1:], picked, 0.0).sum(axis=1)
  return score


def loglikelihoods(model: MonoFormer, params, tok: Tokenizer, items: Sequence[Item],
                   batch: int, max_length: int, layout: sharding.Layout,
                   scored: Callable[[int], None] = lambda n: None) -> list[np.ndarray]:
  """The score of every choice of every item (one float64 array per item), for requests of
  at most max_length input tokens (the model's context); scored(n) hears of each batch of n
  requests done. Errors name a request as choice j of item i, both counted from 0."""
  requests = [encode_request(tok, c, x, max_length, f'choice {j} of item {i}')
              for i, item in enumerate(items)
              for j, (c, x) in enumerate(zip(item.contexts, item.continuations))]
  score = _score_fn(model)
  scores = []
  with sharding.activate(layout):
    for start in range(0, len(requests), batch):
      chunk = requests[start:start + batch]
      length = _LENGTH_STEP * math.ceil(max(len(ids) for ids, _ in chunk) / _LENGTH_STEP)
      tokens = np.full((batch, length), tok.pad_id, np.int32)
      valid = np.zeros((batch, length), bool)
      target = np.zeros((batch, length), bool)
      for row, (ids, n) in enumerate(chunk):
        tokens[row, :len(ids)], valid[row, :len(ids)] = ids, True
        target[row, len(ids) - n:len(ids)] = True
      per_host = batch // jax.process_count()
      mine = slice(jax.process_index() * per_host, (jax.process_index() + 1) * per_host)
      g = sharding.global_batch(dict(tokens=tokens[mine], valid=valid[mine], target=target[mine]),
                                layout)
      out = multihost_utils.process_allgather(score(params, g['tokens'], g['valid'], g['target']),
                                              tiled=True)
      scores.extend(np.asarray(out, np.float64)[:len(chunk)])
      scored(len(chunk))
  result, at = [], 0
  for item in items:
    result.append(np.asarray(scores[at:at + len(item.contexts)]))
    at += len(item.contexts)
  return result


def _mean_and_stderr(x: np.ndarray) -> tuple[float, float]:
  return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0


def metrics(items: Sequence[Item], scores: Sequence[np.ndarray]) -> dict[str, float]:
  """acc, acc_norm, their standard errors, and the item count."""
  acc = np.array([float(np.argmax(s) == item.gold) for item, s in zip(items, scores)])
  norm = np.array([float(np.argmax(s / np.array([len(c) for c in item.choices])) == item.gold)
                   for item, s in zip(items, scores)])
  (a, a_err), (n, n_err) = _mean_and_stderr(acc), _mean_and_stderr(norm)
  return {'acc': a, 'acc_stderr': a_err, 'acc_norm': n, 'acc_norm_stderr': n_err,
          'items': len(items)}
