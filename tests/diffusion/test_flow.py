"""Flow matching against closed forms: the interpolant and its velocity, and the Euler and Heun
samplers on a Gaussian data distribution, whose exact velocity field and ODE solution are known."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from monoformer_jax import diffusion
from monoformer_jax.diffusion import FlowTime, Process, Sampler, Solver, flow

MU, SCALE = 0.7, 0.3  # data ~ N(MU, SCALE^2) in every dimension
T = 1000


def _field(mu):
  """E[noise - x_0 | x_t = x] for data ~ N(mu, SCALE^2): x_t ~ N((1 - t) mu, (1 - t)^2 SCALE^2 +
  t^2), with covariances -(1 - t) SCALE^2 + t between the target and x_t."""
  def velocity(x, t):
    t = t.reshape((-1,) + (1,) * (x.ndim - 1))
    var = (1 - t)**2 * SCALE**2 + t**2
    return (t - (1 - t) * SCALE**2) / var * (x - (1 - t) * mu) - mu
  return velocity


exact_velocity = _field(MU)


def _predict(x, network_t):  # the samplers hand the network t x T
  return exact_velocity(x, network_t / T)


def test_interpolant_ends_and_velocity_is_its_time_derivative():
  key = jax.random.key(0)
  x0, noise = jax.random.normal(key, (2, 3, 4, 4, 2))
  np.testing.assert_array_equal(flow.interpolate(x0, noise, jnp.zeros(3)), x0)
  np.testing.assert_array_equal(flow.interpolate(x0, noise, jnp.ones(3)), noise)
  t = jnp.array([0.1, 0.5, 0.9])
  _, dxdt = jax.jvp(lambda t: flow.interpolate(x0, noise, t), (t,), (jnp.ones(3),))
  np.testing.assert_allclose(dxdt, flow.velocity_target(x0, noise), rtol=1e-6)


def test_exact_velocity_is_the_conditional_mean_of_the_target():
  """The field the samplers are tested with is the loss's minimizer: on draws of the process its
  residual against the velocity target is uncorrelated with any function of (x_t, t), which a
  field for other data is not."""
  training = diffusion.Training(Process.FLOW, T, FlowTime.UNIFORM)
  x0 = MU + SCALE * jax.random.normal(jax.random.key(1), (50000, 1, 1, 1))
  drawn = training.corrupt(jax.random.key(2), x0)
  xt, t = np.asarray(drawn['xt']).ravel(), np.asarray(drawn['t']).ravel() / T
  target = np.asarray(flow.velocity_target(x0, drawn['noise'])).ravel()
  np.testing.assert_allclose(xt, (1 - t) * np.asarray(x0).ravel()
                             + t * np.asarray(drawn['noise']).ravel(), rtol=1e-5, atol=1e-6)

  def correlations(mu):
    residual = target - np.asarray(_field(mu)(jnp.asarray(xt), jnp.asarray(t))).ravel()
    return [abs(np.mean(residual * g)) / (np.std(residual * g) / np.sqrt(len(g)))
            for g in (np.ones_like(t), xt, t, xt * t)]

  assert max(correlations(MU)) < 4.5  # standard errors
  assert min(correlations(MU + 0.1)) > 10


def _sample(sampler, steps, z):
  solver = Solver(sampler, steps, T)
  return np.asarray(jax.jit(lambda z: diffusion.integrate(solver, _predict, z, jax.random.key(0)))(z))


def test_samplers_reach_the_exact_ode_solution():
  """The ODE carries noise z to MU + SCALE z (the map is affine at every t); Euler converges at
  first order, Heun at second, each to the exact answer."""
  z = jax.random.normal(jax.random.key(3), (64, 2, 2, 1))
  exact = MU + SCALE * np.asarray(z)
  err = {(s, n): np.abs(_sample(s, n, z) - exact).max()
         for s in (Sampler.EULER, Sampler.HEUN) for n in (25, 50, 100)}
  assert err[Sampler.HEUN, 100] < 1e-3 and err[Sampler.EULER, 100] < 0.03
  for sampler, order in ((Sampler.EULER, 1), (Sampler.HEUN, 2)):
    for n in (25, 50):
      ratio = err[sampler, n] / err[sampler, 2 * n]
      assert 2**order * 0.8 < ratio < 2**order * 1.25, (sampler, n, ratio)


def test_euler_and_heun_steps_are_their_formulas():
  x = jax.random.normal(jax.random.key(4), (3, 2, 2, 1))
  t, t_next = jnp.full((3,), 0.6), jnp.full((3,), 0.4)
  v = exact_velocity(x, t)
  euler = x - 0.2 * v
  np.testing.assert_allclose(flow.euler_step(x, v, t, t_next), euler, rtol=1e-6)
  heun = x - 0.1 * (v + exact_velocity(euler, t_next))
  np.testing.assert_allclose(flow.heun_step(x, v, exact_velocity(euler, t_next), t, t_next), heun,
                             rtol=1e-6)
  # One Heun step from the sampler (not the last) is that formula, evaluated at t x T.
  solver = Solver(Sampler.HEUN, 5, T)  # grid 1, 0.8, ..., 0
  got = solver.step(x, _predict, 2, jax.random.key(0))
  v = exact_velocity(x, jnp.full((3,), 0.6))
  euler = x - 0.2 * v
  np.testing.assert_allclose(got, x - 0.1 * (v + exact_velocity(euler, jnp.full((3,), 0.4))),
                             rtol=1e-5)


def test_network_evaluations():
  assert Solver(Sampler.HEUN, 10).evaluations == 19
  assert Solver(Sampler.EULER, 10).evaluations == 10
  assert Solver(Sampler.DPMPP_2M, 20).evaluations == 20


@pytest.mark.parametrize('kind', list(FlowTime))
def test_training_times(kind):
  t = np.asarray(flow.draw_time(jax.random.key(5), 200000, kind))
  assert 0 < t.min() and t.max() < 1
  if kind == FlowTime.UNIFORM:
    np.testing.assert_allclose([t.mean(), t.var()], [0.5, 1 / 12], atol=3e-3)
  else:  # logit(t) is a standard normal
    logit = np.log(t / (1 - t))
    np.testing.assert_allclose([logit.mean(), logit.std()], [0.0, 1.0], atol=1e-2)
