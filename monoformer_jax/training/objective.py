"""What one update minimizes, and its gradient over microbatches.

Objectives (train.objective):
- alternate: each step is one kind, `ar` or `diffusion`, picked by the seeded schedule;
- joint (the official code): each step sees a text batch and an image batch, and minimizes
  diffusion_loss_weight x diffusion + lm_loss_weight x cross-entropy.
train.prompt_lm_loss adds cross-entropy on the prompt tokens of image samples (`<im_start>`
included), read from the image pass itself; in a joint step those tokens are pooled with the
text batch's. train.grad_accum splits each batch into M microbatches, rows i with i % M == m
(so each stays spread over the data-parallel devices), and sums their gradients in a scan.
Every loss here is a sum over a microbatch divided by the whole batch's count, so the summed
gradient is the whole batch's, whatever M.
Dimension letters: B batch, M microbatches, S text length, P prompt length, D width.
"""

import dataclasses
import enum
from typing import Any, Callable

import jax
import jax.numpy as jnp

from monoformer_jax import diffusion
from monoformer_jax.nn.layers import MaskType
from monoformer_jax.nn.model import MonoFormer
from monoformer_jax.nn.understanding import Understanding
from monoformer_jax.training import cross_entropy


# The cross-entropy passes an update may hold: text, and samples that read images.
TEXT_KINDS = ('text', 'understand')


class Objective(enum.Enum):
  ALTERNATE = 'alternate'
  JOINT = 'joint'


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The loss settings of a step (hashable: static under jit)."""
  lm_loss_weight: float
  diffusion_loss_weight: float
  diffusion: diffusion.Training
  im_end_id: int
  loss_chunk: int = 0  # tokens per cross-entropy chunk; 0 = the whole batch at once
  prompt_lm_loss: bool = False
  grad_accum: int = 1


def next_token_weights(valid: jax.Array, learn: jax.Array) -> jax.Array:
  """[B, S] float32: 1 where position s predicts token s + 1 with a loss (both valid, s + 1
  learned); the last position predicts nothing."""
  predicts = learn[:, 1:] & valid[:, :-1]
  return jnp.concatenate([predicts, jnp.zeros_like(valid[:, :1])], axis=1).astype(jnp.float32)


def cross_entropy_sum(model: MonoFormer, params, hidden: jax.Array, tokens: jax.Array,
                      weights: jax.Array, chunk: int) -> jax.Array:
  """Summed weighted cross-entropy of predicting tokens [B, S] from final states [B, S, D]."""
  labels = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
  head_name = 'embed_tokens' if model.tie_embeddings else 'lm_head'
  head = lambda head_params, h: model.apply({'params': {head_name: head_params}}, h,  # noqa: E731
                                            method=MonoFormer.logits)
  chunk = chunk if 0 < chunk < tokens.size else tokens.size
  return cross_entropy.weighted_cross_entropy(head, params[head_name],
                                              hidden.reshape(tokens.size, -1),
                                              labels.reshape(-1), weights.reshape(-1), chunk)


def text_inputs(batch: dict, key: jax.Array | None = None, num_timesteps: int = 1000) -> dict:
  """A text batch {'tokens', 'valid', 'loss_mask'} with its cross-entropy weights; an
  understanding batch (also 'features', 'slot', 'offset') with its images' time tokens drawn
  uniformly over the timesteps from key, as the official training draws every row's."""
  out = dict(tokens=batch['tokens'], valid=batch['valid'],
             weights=next_token_weights(batch['valid'], batch['valid'] & batch['loss_mask']))
  if 'features' in batch:
    t = jax.random.randint(key, batch['tokens'].shape[:1], 0, num_timesteps)
    out['understand'] = Understanding(batch['features'], batch['slot'], batch['offset'], t)
  return out


def image_inputs(batch: dict, key: jax.Array, cfg: LossConfig) -> dict:
  """An image batch {'tokens', 'valid', 'image'} with its noise, timesteps and noised images
  drawn for the whole batch (so that microbatching changes none of them), and the prompt's
  cross-entropy weights; prompts that read pictures also have 'features', 'slot', 'offset'."""
  x0 = batch['image']
  text = batch['valid'] & (batch['slot'] == 0) if 'slot' in batch else batch['valid']
  out = dict(tokens=batch['tokens'], valid=batch['valid'], x0=x0,
             **cfg.diffusion.corrupt(key, x0), weights=next_token_weights(batch['valid'], text))
  if 'features' in batch:  # prompts that read pictures: their time tokens take the image's t
    out['understand'] = Understanding(batch['features'], batch['slot'], batch['offset'], out['t'])
  return out


def dropout_rngs(inputs: dict) -> dict:
  """The rngs of a (micro)batch's pass: with adapter dropout, its rows' keys 'dropout'
  [B, 2] (raw, so that microbatches split them as any input), of which its first row's serves."""
  return {'dropout': jax.random.wrap_key_data(inputs['dropout'][0])} if 'dropout' in inputs else {}


def text_pass(model: MonoFormer, params, text: dict, chunk: int) -> jax.Array:
  """Summed cross-entropy of a text (micro)batch under the causal mask."""
  hidden = model.apply({'params': params}, text['tokens'], text['valid'], rngs=dropout_rngs(text),
                       mask_type=MaskType.CAUSAL, return_hidden=True,
                       understand=text.get('understand')).hidden
  return cross_entropy_sum(model, params, hidden, text['tokens'], text['weights'], chunk)


def image_pass(model: MonoFormer, params, image: dict, cfg: LossConfig) -> tuple[dict, jax.Array]:
  """Per-example diffusion terms {'loss', 'mse'[, 'vb']} [B] of an image (micro)batch under
  the image mask, and the summed cross-entropy of its prompts (0 without prompt_lm_loss)."""
  suffix = jnp.full(image['t'].shape + (1,), cfg.im_end_id, jnp.int32)
  out = model.apply({'params': params}, image['tokens'], image['valid'], rngs=dropout_rngs(image),
                    mask_type=model.image_mask, image=image['xt'], t=image['t'], suffix=suffix,
                    return_hidden=cfg.prompt_lm_loss, understand=image.get('understand'))
  terms = cfg.diffusion.loss(out.image, image['x0'], image['xt'], image['t'], image['noise'])
  prompt_ce = jnp.zeros((), jnp.float32)
  if cfg.prompt_lm_loss:
    prompt_ce = cross_entropy_sum(model, params, out.hidden, image['tokens'], image['weights'],
                                  cfg.loss_chunk)
  return terms, prompt_ce


def loss_fn(model: MonoFormer, cfg: LossConfig, counts: dict) -> Callable:
  """params, {'text'?: ..., 'image'?: ...} microbatch -> (weighted loss, metrics), each a share of
  the whole batch's: counts holds its 'examples' (images) and 'tokens' (the cross-entropy's)."""

  def fn(params, inputs: dict) -> tuple[jax.Array, dict]:
    metrics, ce = {}, jnp.zeros((), jnp.float32)
    weighted = jnp.zeros((), jnp.float32)
    for kind in TEXT_KINDS:
      if kind in inputs:
        ce = ce + text_pass(model, params, inputs[kind], cfg.loss_chunk)
    if 'image' in inputs:
      terms, prompt_ce = image_pass(model, params, inputs['image'], cfg)
      metrics = {k: v.sum() / counts['examples'] for k, v in terms.items()}
      weighted = cfg.diffusion_loss_weight * metrics['loss']
      ce = ce + prompt_ce
    if any(kind in inputs for kind in TEXT_KINDS) or cfg.prompt_lm_loss:
      metrics['ce'] = ce / counts['tokens']
      weighted = weighted + cfg.lm_loss_weight * metrics['ce']
    return weighted, metrics

  return fn


def counts_of(inputs: dict, cfg: LossConfig) -> dict:
  """The whole batch's image count and cross-entropy token count (see loss_fn)."""
  tokens = jnp.zeros((), jnp.float32)
  for kind in TEXT_KINDS:
    if kind in inputs:
      tokens = tokens + inputs[kind]['weights'].sum()
  image = inputs.get('image')
  if image is not None and cfg.prompt_lm_loss:
    tokens = tokens + image['weights'].sum()
  return dict(examples=image['t'].shape[0] if image is not None else 1,
              tokens=jnp.maximum(tokens, 1.0))


def microbatches(tree: Any, m: int) -> Any:
  """[B, ...] leaves -> [M, B/M, ...]: microbatch j holds rows i with i % M == j."""
  return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1),
                      tree)


def value_and_grad(fn: Callable, params, inputs: dict, m: int):
  """((value, metrics), grads) of fn summed over m microbatches of inputs (one pass if m == 1)."""
  grad_fn = jax.value_and_grad(fn, has_aux=True)
  if m == 1:
    return grad_fn(params, inputs)
  split = microbatches(inputs, m)
  first = jax.tree.map(lambda x: x[0], split)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(grad_fn, params, first))

  def add(total, microbatch):
    return jax.tree.map(jnp.add, total, grad_fn(params, microbatch)), None

  return jax.lax.scan(add, zeros, split)[0]


def next_token_loss(model: MonoFormer, params, tokens: jax.Array, valid: jax.Array, chunk: int,
                    loss_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy of predicting tokens [B, S] from their prefixes; and the count.

  Only tokens where loss_mask [B, S] is set are predicted (default: every valid one).
  The logits are made `chunk` tokens at a time (0 = all at once); see cross_entropy."""
  learn = valid if loss_mask is None else valid & loss_mask
  text = dict(tokens=tokens, valid=valid, weights=next_token_weights(valid, learn))
  count = text['weights'].sum()
  return text_pass(model, params, text, chunk) / jnp.maximum(count, 1.0), count
