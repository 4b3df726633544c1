"""The speed options change the schedule of the computation, never its result."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import signal_params

from monoformer_jax.nn.layers import BackboneConfig, LayerLoop, MaskType, Remat
from monoformer_jax.nn.model import ImageConfig, MonoFormer
from monoformer_jax.training import objective


MODEL = MonoFormer(BackboneConfig(vocab_size=50, width=32, depth=3, num_heads=4, num_kv_heads=2,
                                  mlp_dim=48), ImageConfig(patch_size=2, height=4, width=4,
                                                           channels=1))
TOKENS = jax.random.randint(jax.random.key(1), (3, 11), 0, 50)
VALID = jnp.ones((3, 11), bool).at[0, :4].set(False)  # a left-padded row


def _reference_loss(params, model=MODEL):
  """Cross-entropy over whole-batch logits, written out plainly."""
  logits = model.apply({'params': params}, TOKENS, VALID, mask_type=MaskType.CAUSAL).logits
  weights = (VALID[:, 1:] & VALID[:, :-1]).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], TOKENS[:, 1:])
  return (ce * weights).sum() / weights.sum()


SLOW = pytest.mark.slow


@pytest.mark.parametrize('chunk,tied', [(0, False), (5, False), (16, True),  # 33 tokens: padded,
                                        pytest.param(33, False, marks=SLOW),  # exact, whole
                                        pytest.param(1000, True, marks=SLOW)])
def test_chunked_cross_entropy_matches_whole_batch_logits(chunk, tied):
  model = MODEL.clone(tie_embeddings=tied)
  params = signal_params(model)
  want, want_grads = jax.value_and_grad(lambda p: _reference_loss(p, model))(params)
  (got, count), got_grads = jax.value_and_grad(
      lambda p: objective.next_token_loss(model, p, TOKENS, VALID, chunk), has_aux=True)(params)
  assert objective.next_token_loss(model, params, TOKENS, VALID, chunk)[0] == pytest.approx(got)
  assert count == 3 * 10 - 4  # the padded row loses 3 predictions from padding and 1 at its start
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('loop,remat', [(LayerLoop.UNROLLED, Remat.NONE),
                                        (LayerLoop.SCAN, Remat.DOTS_WITH_BATCH),
                                        pytest.param(LayerLoop.UNROLLED, Remat.FULL, marks=SLOW)])
def test_layer_loop_and_remat_leave_loss_and_gradients_alone(loop, remat):
  params = signal_params(MODEL)
  other = MODEL.clone(backbone=dataclasses.replace(MODEL.backbone, layer_loop=loop, remat=remat))
  loss = lambda model, p: objective.next_token_loss(model, p, TOKENS, VALID, 0)[0]  # noqa: E731
  want, want_grads = jax.value_and_grad(lambda p: loss(MODEL, p))(params)
  got, got_grads = jax.value_and_grad(lambda p: loss(other, p))(params)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_loss_mask_keeps_only_marked_targets():
  params = signal_params(MODEL)
  mask = jax.random.bernoulli(jax.random.key(4), 0.5, TOKENS.shape)
  logits = MODEL.apply({'params': params}, TOKENS, VALID, mask_type=MaskType.CAUSAL).logits
  ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], TOKENS[:, 1:])
  weights = (VALID[:, 1:] & VALID[:, :-1] & mask[:, 1:]).astype(jnp.float32)
  loss, count = objective.next_token_loss(MODEL, params, TOKENS, VALID, 7, mask)
  assert count == weights.sum() > 0
  np.testing.assert_allclose(loss, (ce * weights).sum() / weights.sum(), rtol=1e-6)
