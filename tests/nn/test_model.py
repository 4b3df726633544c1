"""Mask semantics, checked on a real forward pass with random (non-zero) weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import signal_params

from monoformer_jax.nn.layers import BackboneConfig, MaskType
from monoformer_jax.nn.model import ImageConfig, MonoFormer


P, H = 5, 4  # prompt tokens; image 4x4, patch 2 -> 4 image tokens


def _model_and_params():
  model = MonoFormer(BackboneConfig(vocab_size=50, width=32, depth=2, num_heads=4, num_kv_heads=2,
                                    mlp_dim=48), ImageConfig(patch_size=2, height=H, width=H,
                                                             channels=1))
  return model, signal_params(model, noise=0.2)


def test_causal_text_output_ignores_later_tokens():
  model, params = _model_and_params()
  tokens = jnp.arange(8)[None] % 50
  changed = tokens.at[0, 5].set(42)
  run = lambda t: model.apply({'params': params}, t, jnp.ones(t.shape, bool),  # noqa: E731
                              mask_type=MaskType.CAUSAL).logits[0]
  a, b = run(tokens), run(changed)
  np.testing.assert_array_equal(np.asarray(a[:5]), np.asarray(b[:5]))
  assert np.abs(np.asarray(a[5:] - b[5:])).max() > 1e-3


@pytest.mark.parametrize('mask_type', [MaskType.HYBRID, MaskType.CAUSAL, MaskType.BIDIRECTIONAL])
def test_image_tokens_see_their_span_only_under_hybrid(mask_type):
  """Image output [B, H, W, C]: patch k is token k of the span (row-major 2x2 grid)."""
  model, params = _model_and_params()
  tokens, valid = jnp.arange(P)[None] + 1, jnp.ones((1, P), bool)
  image = jax.random.normal(jax.random.key(2), (1, H, H, 1))
  suffix = jnp.array([[7]])
  run = lambda img, suf: model.apply({'params': params}, tokens, valid, mask_type=mask_type,  # noqa: E731
                                     image=img, t=jnp.array([10]), suffix=suf).image[0]
  base = run(image, suffix)
  later_patch = run(image.at[0, 2:, 2:].add(1.0), suffix)  # the last image token changes
  first_patch_moved = np.abs(np.asarray(later_patch[:2, :2] - base[:2, :2])).max()
  later_suffix = run(image, suffix + 3)
  suffix_moved = np.abs(np.asarray(later_suffix - base)).max()
  if mask_type == MaskType.HYBRID:
    assert first_patch_moved > 1e-4 and suffix_moved == 0.0
  elif mask_type == MaskType.CAUSAL:
    assert first_patch_moved == 0.0 and suffix_moved == 0.0
  else:
    assert first_patch_moved > 1e-4 and suffix_moved > 1e-4
