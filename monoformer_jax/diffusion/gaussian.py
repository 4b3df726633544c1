"""Gaussian diffusion maths (DiT / IDDPM conventions), as pure functions.

Epsilon prediction; with a learned sigma the network's output carries, after the eps channels, v in
[-1, 1] that interpolates the log variance between the posterior variance (v = -1) and beta (v = 1).
Schedules are precomputed in float64 like the reference and used in float32.
Shapes: x [B, H, W, C]; model_out [B, H, W, C or 2C]; t [B] schedule indices.
"""

import math
from typing import Sequence, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def linear_betas(num_timesteps: int) -> np.ndarray:
  """DiT's linear schedule, scaled so that any step count spans the same range."""
  scale = 1000 / num_timesteps
  return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: Union[int, str, Sequence[int]]) -> list[int]:
  """The original steps kept when respacing (IDDPM's rule).

  An int or a comma list splits [0, T) into equal sections and takes that many
  evenly strided steps from each; 'ddimN' takes a fixed integer stride."""
  if isinstance(section_counts, str):
    if section_counts.startswith('ddim'):
      desired = int(section_counts[len('ddim'):])
      for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired:
          return list(range(0, num_timesteps, stride))
      raise ValueError(f'cannot take exactly {desired} steps with an integer stride')
    section_counts = [int(x) for x in section_counts.split(',')]
  elif isinstance(section_counts, int):
    section_counts = [section_counts]
  size_per, extra = divmod(num_timesteps, len(section_counts))
  start, kept = 0, []
  for i, count in enumerate(section_counts):
    size = size_per + (1 if i < extra else 0)
    if size < count:
      raise ValueError(f'cannot divide a section of {size} steps into {count}')
    frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
    cur = 0.0
    for _ in range(count):
      kept.append(start + round(cur))
      cur += frac_stride
    start += size
  return sorted(set(kept))


@flax.struct.dataclass
class Schedule:
  """Per-step constants, each [T]; timestep_map gives the network's timestep."""
  betas: Array
  alphas_cumprod: Array
  alphas_cumprod_prev: Array
  sqrt_alphas_cumprod: Array
  sqrt_one_minus_alphas_cumprod: Array
  sqrt_recip_alphas_cumprod: Array
  sqrt_recipm1_alphas_cumprod: Array
  posterior_variance: Array
  posterior_log_variance_clipped: Array
  posterior_mean_coef1: Array
  posterior_mean_coef2: Array
  timestep_map: Array

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def make_schedule(num_timesteps: int = 1000, respace_to: Union[int, str, None] = None) -> Schedule:
  """The linear schedule, optionally respaced to fewer steps (for sampling)."""
  betas = linear_betas(num_timesteps)
  timestep_map = np.arange(num_timesteps)
  if respace_to is not None:
    kept = space_timesteps(num_timesteps, respace_to)
    acp = np.cumprod(1.0 - betas)
    prev = np.concatenate([[1.0], acp[kept][:-1]])
    betas = 1.0 - acp[kept] / prev
    timestep_map = np.asarray(kept)
  alphas_cumprod = np.cumprod(1.0 - betas)
  prev = np.append(1.0, alphas_cumprod[:-1])
  post_var = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
  # The posterior variance is 0 at t = 0; the log is clipped to its t = 1 value.
  post_log_var = np.log(np.append(post_var[1], post_var[1:])) if len(post_var) > 1 else (
      np.log(np.maximum(post_var, 1e-20)))
  arrays = dict(
      betas=betas, alphas_cumprod=alphas_cumprod, alphas_cumprod_prev=prev,
      sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
      sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
      sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1),
      posterior_variance=post_var, posterior_log_variance_clipped=post_log_var,
      posterior_mean_coef1=betas * np.sqrt(prev) / (1.0 - alphas_cumprod),
      posterior_mean_coef2=(1.0 - prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod))
  arrays = {k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()}
  return Schedule(timestep_map=jnp.asarray(timestep_map, jnp.int32), **arrays)


def _at(values: Array, t: Array, like: Array) -> Array:
  """values[t] broadcast to the shape of `like` ([B] -> [B, 1, 1, 1])."""
  return values[t].reshape(t.shape + (1,) * (like.ndim - t.ndim))


def q_sample(s: Schedule, x0: Array, t: Array, noise: Array) -> Array:
  """x_t ~ q(x_t | x_0)."""
  return _at(s.sqrt_alphas_cumprod, t, x0) * x0 + _at(s.sqrt_one_minus_alphas_cumprod, t, x0) * noise


def q_posterior(s: Schedule, x0: Array, xt: Array, t: Array) -> tuple[Array, Array, Array]:
  """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
  mean = _at(s.posterior_mean_coef1, t, xt) * x0 + _at(s.posterior_mean_coef2, t, xt) * xt
  return mean, _at(s.posterior_variance, t, xt), _at(s.posterior_log_variance_clipped, t, xt)


def split_output(model_out: Array, channels: int) -> tuple[Array, Array]:
  """[..., C or 2C] -> eps [..., C], v [..., C] (v None when sigma is fixed)."""
  if model_out.shape[-1] == channels:
    return model_out, None
  return model_out[..., :channels], model_out[..., channels:]


def p_mean_variance(s: Schedule, model_out: Array, xt: Array, t: Array,
                    clip_x0: bool = False) -> dict[str, Array]:
  """The model's p(x_{t-1} | x_t): mean, log variance and predicted x_0."""
  eps, v = split_output(model_out, xt.shape[-1])
  if v is None:  # fixed large variance: beta, with the posterior's value at t = 0
    log_var = jnp.log(jnp.concatenate([s.posterior_variance[1:2], s.betas[1:]]))
    log_var = jnp.broadcast_to(_at(log_var, t, xt), xt.shape)
  else:
    frac = (v + 1) / 2
    log_var = frac * _at(jnp.log(s.betas), t, xt) + (1 - frac) * _at(
        s.posterior_log_variance_clipped, t, xt)
  x0 = (_at(s.sqrt_recip_alphas_cumprod, t, xt) * xt
        - _at(s.sqrt_recipm1_alphas_cumprod, t, xt) * eps)
  if clip_x0:
    x0 = jnp.clip(x0, -1, 1)
  mean, _, _ = q_posterior(s, x0, xt, t)
  return dict(mean=mean, log_variance=log_var, x0=x0)


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + (mean1 - mean2)**2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: Array) -> Array:
  """The tanh approximation of the normal CDF that IDDPM's likelihood uses."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Array, mean: Array, log_scale: Array) -> Array:
  """log P(x) for data in [-1, 1] quantized to 256 bins, elementwise (nats)."""
  centered = x - mean
  inv_stdv = jnp.exp(-log_scale)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _mean_flat(x: Array) -> Array:
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def vb_bits_per_dim(s: Schedule, model_out: Array, x0: Array, xt: Array, t: Array) -> Array:
  """The variational-bound term L_t in bits per dimension, [B]."""
  true_mean, _, true_log_var = q_posterior(s, x0, xt, t)
  p = p_mean_variance(s, model_out, xt, t)
  kl = _mean_flat(normal_kl(true_mean, true_log_var, p['mean'], p['log_variance'])) / math.log(2.0)
  nll = -_mean_flat(discretized_gaussian_log_likelihood(
      x0, p['mean'], 0.5 * p['log_variance'])) / math.log(2.0)
  return jnp.where(t == 0, nll, kl)


def training_loss(s: Schedule, model_out: Array, x0: Array, xt: Array, t: Array,
                  noise: Array) -> dict[str, Array]:
  """IDDPM hybrid loss per example: eps MSE, plus the VB term with eps frozen."""
  eps, v = split_output(model_out, x0.shape[-1])
  terms = {'mse': _mean_flat((noise - eps)**2)}
  if v is not None:
    frozen = jnp.concatenate([jax.lax.stop_gradient(eps), v], axis=-1)
    terms['vb'] = vb_bits_per_dim(s, frozen, x0, xt, t)
  terms['loss'] = terms['mse'] + terms.get('vb', 0.0)
  return terms


def ddpm_step(s: Schedule, model_out: Array, xt: Array, t: Array, noise: Array) -> Array:
  """One ancestral step x_t -> x_{t-1}; no noise is added at t = 0."""
  p = p_mean_variance(s, model_out, xt, t)
  nonzero = (t != 0).astype(xt.dtype).reshape(t.shape + (1,) * (xt.ndim - 1))
  return p['mean'] + nonzero * jnp.exp(0.5 * p['log_variance']) * noise


def ddim_step(s: Schedule, model_out: Array, xt: Array, t: Array, noise: Array,
              eta: float = 0.0) -> Array:
  """One DDIM step x_t -> x_{t-1} (deterministic at eta = 0)."""
  p = p_mean_variance(s, model_out, xt, t)
  eps = (_at(s.sqrt_recip_alphas_cumprod, t, xt) * xt - p['x0']) / _at(
      s.sqrt_recipm1_alphas_cumprod, t, xt)
  abar, abar_prev = _at(s.alphas_cumprod, t, xt), _at(s.alphas_cumprod_prev, t, xt)
  sigma = eta * jnp.sqrt((1 - abar_prev) / (1 - abar)) * jnp.sqrt(1 - abar / abar_prev)
  mean = p['x0'] * jnp.sqrt(abar_prev) + jnp.sqrt(1 - abar_prev - sigma**2) * eps
  nonzero = (t != 0).astype(xt.dtype).reshape(t.shape + (1,) * (xt.ndim - 1))
  return mean + nonzero * sigma * noise
