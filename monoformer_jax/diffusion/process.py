"""The diffusion process a network is trained for: how a training image is corrupted, and what
the network's output is scored against.

Shapes: x0 [B, H, W, C]; model_out [B, H, W, C_out]; t [B], the network's time input.
"""

import dataclasses
import enum

import jax

from monoformer_jax.diffusion import flow, gaussian
from monoformer_jax.diffusion.flow import FlowTime


class Process(enum.Enum):
  """What the network learns to undo, and so which samplers fit it."""
  DDPM = 'ddpm'  # the paper's: Gaussian noise on the linear schedule, eps (+ variance) predicted
  FLOW = 'flow'  # flow matching: the straight line from data to noise, velocity predicted


@dataclasses.dataclass(frozen=True)
class Training:
  """A process as training sees it (hashable: static under jit)."""
  process: Process = Process.DDPM
  num_timesteps: int = 1000
  flow_time: FlowTime = FlowTime.LOGIT_NORMAL

  def corrupt(self, key: jax.Array, x0: jax.Array) -> dict[str, jax.Array]:
    """{'xt', 't' (the network's time), 'noise'}, drawn for every example of x0."""
    t_key, noise_key = jax.random.split(key)
    noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
    if self.process == Process.DDPM:
      t = jax.random.randint(t_key, x0.shape[:1], 0, self.num_timesteps)
    else:
      t = flow.network_time(flow.draw_time(t_key, x0.shape[0], self.flow_time),
                            self.num_timesteps)
    return dict(xt=self.corrupt_at(x0, t, noise), t=t, noise=noise)

  def corrupt_at(self, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t for the network's time t [B] (a DDPM index; t / num_timesteps along a flow)."""
    if self.process == Process.DDPM:
      return gaussian.q_sample(gaussian.make_schedule(self.num_timesteps), x0, t, noise)
    return flow.interpolate(x0, noise, t / self.num_timesteps)

  def loss(self, model_out: jax.Array, x0: jax.Array, xt: jax.Array, t: jax.Array,
           noise: jax.Array) -> dict[str, jax.Array]:
    """Per-example terms [B]: 'loss', 'mse' (and 'vb' for DDPM with a learned variance)."""
    if self.process == Process.DDPM:
      return gaussian.training_loss(gaussian.make_schedule(self.num_timesteps), model_out, x0, xt,
                                    t, noise)
    return flow.training_loss(model_out, x0, noise)
