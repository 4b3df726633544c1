"""Cross-entropy through the LM head, a chunk of tokens at a time, gradients made on the way.

Dimension letters: N tokens, C tokens per chunk, D width, V vocabulary.

The float32 logits [N, V] of a whole batch are the largest activation of a text step (8 x 256 tokens
x 8192 words is 64 MiB; a 32k vocabulary at pod batch sizes is gigabytes). Here they exist one chunk
[C, V] at a time. Because the loss is a scalar that nothing else consumes, the forward pass also
computes each chunk's gradient (softmax minus one-hot) and pulls it back through the head at once;
the backward pass only scales the stored gradients. That is three head matmuls per chunk, not the
four that rematerializing the logits would cost.
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp


Head = Callable[[Any, jax.Array], jax.Array]  # (head params, hidden [C, D]) -> float32 logits [C, V]


def _chunks(chunk: int, *arrays: jax.Array) -> tuple[jax.Array, ...]:
  """Pads the leading axis N to a multiple of chunk and splits it: [N, ...] -> [N/C, C, ...]."""
  pad = -arrays[0].shape[0] % chunk
  return tuple(jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(-1, chunk, *a.shape[1:])
               for a in arrays)


def _chunk_terms(logits: jax.Array, labels: jax.Array, weights: jax.Array):
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  return ((lse - picked) * weights).sum(), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5))
def weighted_cross_entropy(head: Head, head_params, hidden: jax.Array, labels: jax.Array,
                           weights: jax.Array, chunk: int) -> jax.Array:
  """sum_n weights[n] * -log softmax(head(hidden[n]))[labels[n]], chunk tokens at a time.

  hidden [N, D], labels [N] int, weights [N] float32; returns a float32 scalar."""

  def body(total, xs):
    h, y, w = xs
    return total + _chunk_terms(head(head_params, h), y, w)[0], None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), _chunks(chunk, hidden, labels, weights))
  return total


def _forward_with_gradients(head: Head, head_params, hidden, labels, weights, chunk: int):
  def body(carry, xs):
    total, d_params = carry
    h, y, w = xs
    logits, pullback = jax.vjp(head, head_params, h)
    loss, lse = _chunk_terms(logits, y, w)
    d_logits = (jnp.exp(logits - lse[:, None])
                - jax.nn.one_hot(y, logits.shape[-1], dtype=logits.dtype)) * w[:, None]
    d_head, d_hidden = pullback(d_logits)
    return (total + loss, jax.tree.map(jnp.add, d_params, d_head)), d_hidden

  init = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, head_params))
  (total, d_params), d_hidden = jax.lax.scan(body, init, _chunks(chunk, hidden, labels, weights))
  d_hidden = d_hidden.reshape(-1, hidden.shape[-1])[:hidden.shape[0]]
  return total, (d_params, d_hidden)


def _backward(head, chunk, grads, g):
  del head, chunk
  d_params, d_hidden = grads
  return jax.tree.map(lambda d: (g * d).astype(d.dtype), d_params), (g * d_hidden).astype(
      d_hidden.dtype), None, None


weighted_cross_entropy.defvjp(_forward_with_gradients, _backward)
