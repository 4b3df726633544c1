"""Compiled samplers against step-by-step references."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import signal_params

from monoformer_jax import diffusion
from monoformer_jax.diffusion import Sampler
from monoformer_jax.generation import sampling
from monoformer_jax.nn.layers import BackboneConfig, KVCache, MaskType
from monoformer_jax.nn.model import ImageConfig, MonoFormer


MODEL = MonoFormer(BackboneConfig(vocab_size=40, width=32, depth=2, num_heads=4, num_kv_heads=2,
                                  mlp_dim=48), ImageConfig(patch_size=2, height=4, width=4,
                                                           channels=1))


PARAMS = signal_params(MODEL)
PROMPT = jnp.array([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
VALID = jnp.array([[False, False, True, True, True], [True] * 5])


def test_kv_cache_reproduces_full_forward():
  tokens = jnp.concatenate([PROMPT, jnp.array([[9, 10, 11], [12, 13, 14]])], axis=1)
  valid = jnp.concatenate([VALID, jnp.ones((2, 3), bool)], axis=1)
  full = MODEL.apply({'params': PARAMS}, tokens, valid, mask_type=MaskType.CAUSAL).logits
  cache = KVCache.empty(MODEL.backbone, 2, 8)
  out = MODEL.apply({'params': PARAMS}, PROMPT, VALID, mask_type=MaskType.CAUSAL, cache=cache)
  pieces = [out.logits]
  for i in range(3):
    out = MODEL.apply({'params': PARAMS}, tokens[:, 5 + i:6 + i], valid[:, 5 + i:6 + i],
                      mask_type=MaskType.CAUSAL, cache=out.cache)
    pieces.append(out.logits)
  got = jnp.concatenate(pieces, axis=1)
  np.testing.assert_allclose(got[valid], full[valid], atol=1e-5)


def test_cached_generation_equals_recompute():
  kwargs = dict(max_tokens=6, temperature=0.7, top_k=10, top_p=0.9, stop_ids=(2,), pad_id=0)
  key = jax.random.key(3)
  cached = sampling.generate(MODEL, PARAMS, PROMPT, VALID, key, use_cache=True, **kwargs)
  recomputed = sampling.generate(MODEL, PARAMS, PROMPT, VALID, key, use_cache=False, **kwargs)
  np.testing.assert_array_equal(cached, recomputed)
  assert cached.shape == (2, 6)


def test_filter_logits():
  logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  np.testing.assert_array_equal(sampling.filter_logits(logits, 2, 1.0) > -1e30,
                                [[True, True, False, False, False]])
  # Smallest prefix with mass >= 0.8: 0.5 + 0.2 + 0.15.
  np.testing.assert_array_equal(sampling.filter_logits(logits, 0, 0.8) > -1e30,
                                [[True, True, True, False, False]])


@pytest.mark.slow
def test_compiled_ddpm_loop_equals_python_loop_of_steps():
  guidance = diffusion.Guidance(2.0)
  spec = sampling.ImageSampling(Sampler.DDPM, steps=6, guidance=guidance)
  null = jnp.zeros_like(PROMPT).at[:, -1].set(7)
  null_valid = jnp.zeros_like(VALID).at[:, -1].set(True)
  suffix = jnp.full((2, 1), 8)
  key = jax.random.key(5)
  got = sampling.make_image_sampler(MODEL, spec)(PARAMS, PROMPT, VALID, null, null_valid, suffix,
                                                 key)

  schedule = diffusion.make_schedule(1000, 6)
  init_key, loop_key = jax.random.split(key)
  x = jax.random.normal(init_key, (2, 4, 4, 1))
  for i in range(6):
    t = jnp.full((2,), 5 - i)
    model_t = schedule.timestep_map[t]
    run = lambda tok, val: MODEL.apply({'params': PARAMS}, tok, val, mask_type=MaskType.HYBRID,  # noqa: E731
                                       image=x, t=model_t, suffix=suffix).image
    out = guidance.combine(run(PROMPT, VALID), run(null, null_valid), 1)
    x = diffusion.ddpm_step(schedule, out, x, t, jax.random.normal(jax.random.fold_in(loop_key, i),
                                                                   x.shape))
  np.testing.assert_allclose(got, x, rtol=1e-5, atol=1e-4)


def test_image_pass_over_a_cached_prompt_equals_the_full_pass():
  """The prompt prefix's keys and values, cached once, give the full pass's prediction."""
  x = jax.random.normal(jax.random.key(3), (2, 4, 4, 1))
  t = jnp.array([10, 900])
  suffix = jnp.full((2, 1), 8)
  full = MODEL.apply({'params': PARAMS}, PROMPT, VALID, mask_type=MaskType.HYBRID, image=x, t=t,
                     suffix=suffix).image
  cache = KVCache.empty(MODEL.backbone, 2, MODEL.image.sequence(PROMPT.shape[1]).length)
  cache = MODEL.apply({'params': PARAMS}, PROMPT, VALID, mask_type=MaskType.CAUSAL, cache=cache,
                      return_hidden=True).cache
  cached = MODEL.apply({'params': PARAMS}, PROMPT[:, :0], VALID[:, :0], mask_type=MaskType.HYBRID,
                       image=x, t=t, suffix=suffix, cache=cache).image
  np.testing.assert_allclose(cached, full, atol=2e-5, rtol=1e-5)
  assert np.abs(full).max() > 0.1  # a real prediction, not zeros


def test_sampler_with_and_without_prefix_cache_agree():
  spec = sampling.ImageSampling(Sampler.DDIM, steps=4, guidance=diffusion.Guidance(2.0))
  null = jnp.zeros_like(PROMPT).at[:, -1].set(7)
  null_valid = jnp.zeros_like(VALID).at[:, -1].set(True)
  args = (PARAMS, PROMPT, VALID, null, null_valid, jnp.full((2, 1), 8), jax.random.key(2))
  cached = sampling.make_image_sampler(MODEL, spec)(*args)
  uncached = sampling.make_image_sampler(MODEL, dataclasses.replace(spec, cache_prefix=False))(*args)
  np.testing.assert_allclose(cached, uncached, atol=1e-4, rtol=1e-4)
