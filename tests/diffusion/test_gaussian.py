"""Diffusion maths against closed forms and diffusers' DDPMScheduler."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats

from monoformer_jax import diffusion

S = diffusion.make_schedule(1000)
RNG = np.random.default_rng(0)


def test_linear_schedule_is_diffusers_ddpm_schedule():
  """The betas and cumulative alphas of diffusers' linear DDPM scheduler, at 1000 steps and,
  with IDDPM's scale of 1000/T on both ends, at 250."""
  from diffusers import DDPMScheduler  # pylint: disable=g-import-not-at-top
  reference = DDPMScheduler(num_train_timesteps=1000, beta_schedule='linear')
  np.testing.assert_allclose(np.asarray(S.betas), reference.betas.numpy(), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(S.alphas_cumprod), reference.alphas_cumprod.numpy(),
                             rtol=1e-5)
  short = DDPMScheduler(num_train_timesteps=250, beta_start=4e-4, beta_end=0.08)
  np.testing.assert_allclose(diffusion.linear_betas(250), short.betas.numpy(), rtol=1e-6)


def test_q_sample_moments():
  x0 = jnp.asarray(RNG.normal(size=(4, 2, 2, 1)), jnp.float32)
  t = jnp.array([0, 10, 500, 999])
  abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[np.asarray(t)]
  zeros = jnp.zeros_like(x0)
  np.testing.assert_allclose(diffusion.q_sample(S, x0, t, zeros),
                             np.sqrt(abar)[:, None, None, None] * x0, rtol=1e-5)
  np.testing.assert_allclose(diffusion.q_sample(S, zeros, t, x0),
                             np.sqrt(1 - abar)[:, None, None, None] * x0, rtol=1e-5)


@pytest.mark.parametrize('t', [1, 7, 400, 999])
def test_posterior_is_bayes_rule(t):
  """q(x_{t-1} | x_t, x_0) from the product of two Gaussians, in float64."""
  betas = np.linspace(1e-4, 0.02, 1000)
  abar = np.cumprod(1 - betas)
  x0, xt = RNG.normal(size=(1, 3, 3, 1)), RNG.normal(size=(1, 3, 3, 1))
  prior_var = 1 - abar[t - 1]  # q(x_{t-1} | x_0)
  precision = 1 / prior_var + (1 - betas[t]) / betas[t]
  var = 1 / precision
  mean = var * (np.sqrt(abar[t - 1]) * x0 / prior_var + np.sqrt(1 - betas[t]) * xt / betas[t])
  got_mean, got_var, got_log_var = diffusion.q_posterior(
      S, jnp.asarray(x0, jnp.float32), jnp.asarray(xt, jnp.float32), jnp.array([t]))
  np.testing.assert_allclose(got_mean, mean, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.ravel(got_var), var, rtol=1e-4)
  np.testing.assert_allclose(np.ravel(got_log_var), np.log(var), rtol=1e-4)


def test_normal_kl_closed_form():
  m1, m2, s1, s2 = 0.3, -1.2, 0.7, 1.9
  want = math.log(s2 / s1) + (s1**2 + (m1 - m2)**2) / (2 * s2**2) - 0.5
  got = diffusion.normal_kl(m1, 2 * math.log(s1), m2, 2 * math.log(s2))
  assert float(got) == pytest.approx(want, rel=1e-5)
  assert float(diffusion.normal_kl(m1, 0.4, m1, 0.4)) == pytest.approx(0.0, abs=1e-7)


def test_discretized_likelihood_against_exact_bins():
  """log of the normal mass of each 2/255-wide bin (edge bins open-ended)."""
  x = np.array([-1.0, -0.5, 0.0, 0.3, 1.0])
  mean, log_scale = np.array([-0.9, -0.45, 0.1, 0.2, 0.8]), np.log(np.full(5, 0.2))
  sd = np.exp(log_scale)
  upper = np.where(x > 0.999, np.inf, x + 1 / 255)
  lower = np.where(x < -0.999, -np.inf, x - 1 / 255)
  exact = np.log(stats.norm.cdf(upper, mean, sd) - stats.norm.cdf(lower, mean, sd))
  got = diffusion.discretized_gaussian_log_likelihood(jnp.asarray(x), jnp.asarray(mean),
                                                      jnp.asarray(log_scale))
  np.testing.assert_allclose(got, exact, atol=2e-3)  # IDDPM's tanh CDF approximation


def test_space_timesteps():
  kept = diffusion.space_timesteps(1000, 250)
  assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
  assert diffusion.space_timesteps(1000, 'ddim50') == list(range(0, 1000, 20))
  assert diffusion.space_timesteps(100, '10,5') == sorted(
      set([round(i * 49 / 9) for i in range(10)] + [50 + round(i * 49 / 4) for i in range(5)]))


def test_respaced_schedule_keeps_alphas_cumprod():
  s = diffusion.make_schedule(1000, 25)
  kept = np.asarray(s.timestep_map)
  np.testing.assert_allclose(s.alphas_cumprod, np.asarray(S.alphas_cumprod)[kept], rtol=1e-5)


def test_learned_range_endpoints():
  xt = jnp.ones((1, 2, 2, 1))
  t = jnp.array([300])
  for v, want in ((-1.0, S.posterior_log_variance_clipped[300]), (1.0, jnp.log(S.betas[300]))):
    out = jnp.concatenate([jnp.zeros_like(xt), jnp.full_like(xt, v)], axis=-1)
    got = diffusion.p_mean_variance(S, out, xt, t)['log_variance']
    np.testing.assert_allclose(got, np.full(xt.shape, want), rtol=1e-6)


def test_ddim_with_true_noise_lands_on_the_forward_marginal():
  """With eps = the noise that made x_t, DDIM (eta 0) gives sqrt(abar') x0 + sqrt(1-abar') eps."""
  s = diffusion.make_schedule(1000, 50)
  x0 = jnp.asarray(RNG.uniform(-1, 1, (2, 4, 4, 1)), jnp.float32)
  eps = jnp.asarray(RNG.normal(size=x0.shape), jnp.float32)
  t = jnp.array([30, 30])
  xt = diffusion.q_sample(s, x0, t, eps)
  got = diffusion.ddim_step(s, eps, xt, t, jnp.zeros_like(x0))
  want = diffusion.q_sample(s, x0, t - 1, eps)
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_vb_term_does_not_train_eps():
  x0 = jnp.asarray(RNG.uniform(-1, 1, (3, 4, 4, 1)), jnp.float32)
  noise = jnp.asarray(RNG.normal(size=x0.shape), jnp.float32)
  t = jnp.array([0, 5, 900])
  xt = diffusion.q_sample(S, x0, t, noise)
  out = jnp.asarray(RNG.normal(size=(3, 4, 4, 2)) * 0.5, jnp.float32)
  terms = diffusion.training_loss(S, out, x0, xt, t, noise)
  np.testing.assert_allclose(terms['mse'], np.mean((noise - out[..., :1])**2, axis=(1, 2, 3)),
                             rtol=1e-6)
  grad = jax.grad(lambda o: diffusion.training_loss(S, o, x0, xt, t, noise)['vb'].sum())(out)
  assert np.all(np.asarray(grad[..., :1]) == 0) and np.abs(np.asarray(grad[..., 1:])).max() > 0


@pytest.mark.parametrize('t', [999, 500, 3, 0])
def test_ddpm_step_matches_diffusers(t):
  """An ancestral step with a learned-range variance, against DDPMScheduler (NCHW)."""
  from diffusers import DDPMScheduler  # pylint: disable=g-import-not-at-top
  sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule='linear', beta_start=1e-4,
                        beta_end=0.02, variance_type='learned_range', clip_sample=False,
                        prediction_type='epsilon')
  sample = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
  out = torch.cat([torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(2)),
                   torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(3)) * 2 - 1], 1)
  want = sched.step(out, t, sample, generator=torch.Generator().manual_seed(4)).prev_sample
  noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(4))
  nhwc = lambda x: jnp.asarray(x.numpy().transpose(0, 2, 3, 1))  # noqa: E731
  got = diffusion.ddpm_step(S, nhwc(out), nhwc(sample), jnp.array([t, t]), nhwc(noise))
  np.testing.assert_allclose(got, nhwc(want), atol=2e-4, rtol=1e-4)


def test_guidance_closed_form():
  cond = jnp.asarray(RNG.normal(size=(2, 2, 2, 8)), jnp.float32)
  uncond = jnp.asarray(RNG.normal(size=(2, 2, 2, 8)), jnp.float32)
  all_eps = diffusion.Guidance(4.0).combine(cond, uncond, eps_channels=4)
  np.testing.assert_allclose(all_eps[..., :4], uncond[..., :4] + 4 * (cond[..., :4] - uncond[..., :4]),
                             rtol=1e-6)
  np.testing.assert_array_equal(all_eps[..., 4:], cond[..., 4:])
  three = diffusion.Guidance(4.0, diffusion.GuidanceChannels.FIRST_THREE).combine(cond, uncond, eps_channels=4)
  np.testing.assert_array_equal(three[..., 3:], cond[..., 3:])
