"""DPM-Solver++ (2M: multistep, second order, data prediction) for epsilon-prediction models of the
linear schedule, as diffusers' DPMSolverMultistepScheduler runs it with algorithm 'dpmsolver++',
order 2, the midpoint form, and final sigma 0.

In sigma = sqrt((1 - abar) / abar) and lambda = -log sigma (half the log-SNR), a step from s to
s' with h = lambda' - lambda moves x along the predicted data x_0:
  x' = (sigma_t' / sigma_t) x + phi (D0 + D1 / 2),  phi = alpha' (1 - e^-h),
with D0 the newest x_0 and D1 = (D0 - previous x_0) / r, r = h_prev / h. The first step and the
last have no usable previous x_0 and are first order (D1 = 0); the last goes to sigma 0, so its
result is the x_0 predicted there. Every step's coefficients are fixed by the step count, so they
are tabulated here once in float64 and a step is x' = a x + b x_0 + c x_0_prev.
"""

import dataclasses
import enum

import numpy as np

from monoformer_jax.diffusion import gaussian


class TimeSpacing(enum.Enum):
  """Where the solver's N steps fall in [0, T)."""
  TIME = 'time'  # evenly spaced timesteps, T - 1 first (diffusers' 'linspace')
  LOGSNR = 'logsnr'  # evenly spaced log-SNR (diffusers' use_lu_lambdas)


@dataclasses.dataclass(frozen=True)
class Tables:
  """Per step i of N: the network's timestep, x_0 = x0_x x - x0_eps eps, and the update."""
  timesteps: np.ndarray  # [N] int32, decreasing
  x0_x: np.ndarray  # [N] each float32
  x0_eps: np.ndarray
  a: np.ndarray
  b: np.ndarray
  c: np.ndarray


def noise_levels(num_timesteps: int, steps: int, spacing: TimeSpacing) -> tuple[np.ndarray,
                                                                                 np.ndarray]:
  """The N timesteps the network sees and the N + 1 sigmas the solver steps through (last 0)."""
  acp = np.cumprod(1.0 - gaussian.linear_betas(num_timesteps))
  sigmas = np.sqrt((1.0 - acp) / acp)
  log_sigmas = np.log(sigmas)
  if spacing == TimeSpacing.TIME:
    timesteps = np.linspace(0, num_timesteps - 1, steps + 1).round()[::-1][:-1]
    levels = np.interp(timesteps, np.arange(num_timesteps), sigmas)
  else:
    levels = np.exp(np.linspace(log_sigmas[-1], log_sigmas[0], steps))
    # The timestep whose log-sigma is nearest by linear interpolation, rounded.
    timesteps = np.interp(np.log(levels), log_sigmas, np.arange(num_timesteps)).round()
  if steps > 1 and np.any(np.diff(timesteps) >= 0):
    raise ValueError(f'{steps} steps of {spacing.value} spacing repeat a timestep of the '
                     f'{num_timesteps}; take fewer steps')
  return timesteps.astype(np.int32), np.append(levels, 0.0)


def tables(num_timesteps: int, steps: int, spacing: TimeSpacing) -> Tables:
  timesteps, sigmas = noise_levels(num_timesteps, steps, spacing)
  alphas = 1.0 / np.sqrt(sigmas**2 + 1.0)
  with np.errstate(divide='ignore'):  # lambda is +inf at the final sigma 0
    lambdas = -np.log(sigmas)
  a, b, c = np.zeros(steps), np.zeros(steps), np.zeros(steps)
  for i in range(steps):
    if i == steps - 1:  # to sigma 0: the x_0 predicted here
      b[i] = 1.0
      continue
    h = lambdas[i + 1] - lambdas[i]
    phi = alphas[i + 1] * (1.0 - np.exp(-h))
    a[i] = sigmas[i + 1] * alphas[i + 1] / (sigmas[i] * alphas[i])
    if i == 0:
      b[i] = phi
    else:
      half_over_r = 0.5 * h / (lambdas[i] - lambdas[i - 1])
      b[i], c[i] = phi * (1.0 + half_over_r), -phi * half_over_r
  f32 = lambda v: np.asarray(v, np.float32)  # noqa: E731
  return Tables(timesteps=timesteps, x0_x=f32(1.0 / alphas[:-1]), x0_eps=f32(sigmas[:-1]),
                a=f32(a), b=f32(b), c=f32(c))
