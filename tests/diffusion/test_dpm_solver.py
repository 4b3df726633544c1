"""DPM-Solver++ 2M against diffusers' DPMSolverMultistepScheduler, step by step, for an analytic
epsilon function (no network): the same timesteps reach the model and every intermediate sample
agrees to 1e-5."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from monoformer_jax import diffusion
from monoformer_jax.diffusion import Sampler, Solver, TimeSpacing, dpm_solver


def analytic_eps(x: np.ndarray, t: np.ndarray, xp) -> np.ndarray:
  """A smooth function of x and t that is nothing like a true denoiser: any mismatch in the
  solver's coefficients or times shows."""
  t = t.reshape((-1,) + (1,) * (x.ndim - 1)) / 1000.0
  return 0.6 * xp.sin(1.3 * x + 2.0 * t) + 0.3 * x * xp.cos(3.0 * t) + 0.1 * t


def _diffusers_trajectory(x: np.ndarray, steps: int, spacing: TimeSpacing, learned: bool):
  scheduler = diffusers.DPMSolverMultistepScheduler(
      num_train_timesteps=1000, trained_betas=diffusion.linear_betas(1000),
      algorithm_type='dpmsolver++', solver_order=2, solver_type='midpoint',
      lower_order_final=True, final_sigmas_type='zero',
      use_lu_lambdas=spacing == TimeSpacing.LOGSNR, timestep_spacing='linspace',
      variance_type='learned_range' if learned else None)
  # The schedule in float64, as ours is tabulated: diffusers' own is float32, whose 1 - abar
  # near t = 0 cancels to about 1e-4 relative, which a log-SNR spacing spreads over every sigma.
  scheduler.alphas_cumprod = torch.from_numpy(np.cumprod(1.0 - diffusion.linear_betas(1000)))
  scheduler.set_timesteps(steps)
  sample = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())  # NCHW
  seen, trajectory = [], []
  for t in scheduler.timesteps:
    eps = analytic_eps(sample, torch.full((sample.shape[0],), float(t)), torch)
    out = torch.cat([eps, torch.full_like(eps, 7.0)], 1) if learned else eps
    sample = scheduler.step(out, t, sample).prev_sample
    seen.append(int(t))
    trajectory.append(sample.numpy().transpose(0, 2, 3, 1))
  return seen, trajectory


@pytest.mark.parametrize('steps,spacing,learned', [
    (20, TimeSpacing.TIME, False), (25, TimeSpacing.LOGSNR, False), (10, TimeSpacing.TIME, True),
    (3, TimeSpacing.LOGSNR, True), (2, TimeSpacing.TIME, False), (1, TimeSpacing.TIME, False)])
def test_trajectory_equals_diffusers(steps, spacing, learned):
  x = np.random.default_rng(steps).standard_normal((2, 4, 4, 3)).astype(np.float32)
  seen, want = _diffusers_trajectory(x, steps, spacing, learned)
  solver = Solver(Sampler.DPMPP_2M, steps, 1000, spacing)
  timesteps = []

  def predict(x, t):
    timesteps.append(t)
    eps = analytic_eps(x, t.astype(jnp.float32), jnp)
    return jnp.concatenate([eps, jnp.full_like(eps, 7.0)], -1) if learned else eps

  step = jax.jit(lambda state, i: solver.step(state, predict, i, jax.random.key(0)))
  state = solver.init(jnp.asarray(x))
  for i in range(steps):
    state = step(state, i)
    scale = np.abs(want[i]).max()
    np.testing.assert_allclose(np.asarray(solver.result(state)), want[i], rtol=1e-5,
                               atol=1e-5 * scale, err_msg=f'step {i}')
  np.testing.assert_array_equal(dpm_solver.tables(1000, steps, spacing).timesteps, seen)
  # The compiled loop gives the same image as the steps taken one by one.
  whole = jax.jit(lambda x: diffusion.integrate(solver, predict, x, jax.random.key(0)))
  np.testing.assert_allclose(np.asarray(whole(jnp.asarray(x))), want[-1], rtol=1e-5,
                             atol=1e-5 * np.abs(want[-1]).max())


def test_last_step_returns_the_predicted_data():
  tab = dpm_solver.tables(1000, 5, TimeSpacing.TIME)
  assert (tab.a[-1], tab.b[-1], tab.c[-1]) == (0.0, 1.0, 0.0)
  assert tab.c[0] == 0.0 and np.all(tab.c[1:-1] < 0)  # first order first, then second


def test_repeated_timesteps_are_refused():
  with pytest.raises(ValueError, match='repeat a timestep'):
    Solver(Sampler.DPMPP_2M, 1000, 1000, TimeSpacing.TIME).check()
  Solver(Sampler.DPMPP_2M, 500, 1000, TimeSpacing.TIME).check()
