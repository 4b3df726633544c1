"""Flow matching maths (rectified flow / SD3 conventions), as pure functions.

The linear interpolant x_t = (1 - t) x_0 + t noise runs from data (t = 0) to noise (t = 1); the
network predicts the velocity dx_t/dt = noise - x_0, with no learned variance. The network's time
input is t x num_timesteps, so that its embedding spans the same range as a DDPM index (and t grows
with the noise in both processes).
Shapes: x [B, H, W, C]; model_out [B, H, W, C]; t [B] in [0, 1].
"""

import enum

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class FlowTime(enum.Enum):
  """How training draws t."""
  UNIFORM = 'uniform'
  LOGIT_NORMAL = 'logit_normal'  # sigmoid of a standard normal (SD3): more weight mid-way


def _at(t: Array, like: Array) -> Array:
  return t.reshape(t.shape + (1,) * (like.ndim - t.ndim))


def draw_time(key: Array, batch: int, kind: FlowTime) -> Array:
  """t [B] in (0, 1)."""
  if kind == FlowTime.UNIFORM:
    return jax.random.uniform(key, (batch,), jnp.float32)
  return jax.nn.sigmoid(jax.random.normal(key, (batch,), jnp.float32))


def interpolate(x0: Array, noise: Array, t: Array) -> Array:
  """x_t on the straight line from the data (t = 0) to the noise (t = 1)."""
  return (1.0 - _at(t, x0)) * x0 + _at(t, x0) * noise


def velocity_target(x0: Array, noise: Array) -> Array:
  """d x_t / dt along the interpolant."""
  return noise - x0


def network_time(t: Array, num_timesteps: int) -> Array:
  return t * num_timesteps


def training_loss(model_out: Array, x0: Array, noise: Array) -> dict[str, Array]:
  """Velocity MSE per example [B] (the model's extra channels, if any, are not predicted)."""
  v = model_out[..., :x0.shape[-1]]
  mse = jnp.mean((velocity_target(x0, noise) - v)**2, axis=tuple(range(1, x0.ndim)))
  return {'mse': mse, 'loss': mse}


def time_grid(steps: int) -> np.ndarray:
  """[steps + 1] times, uniform from the noise (1) to the data (0)."""
  return np.linspace(1.0, 0.0, steps + 1)


def euler_step(x: Array, velocity: Array, t: Array, t_next: Array) -> Array:
  """x_t -> x_{t_next} along the velocity at (x, t)."""
  return x + _at(t_next - t, x) * velocity


def heun_step(x: Array, velocity: Array, velocity_at_euler: Array, t: Array,
              t_next: Array) -> Array:
  """The trapezoidal correction: the mean of the velocity at x_t and at the Euler point."""
  return x + _at(t_next - t, x) * 0.5 * (velocity + velocity_at_euler)
