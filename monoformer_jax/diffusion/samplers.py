"""Samplers: how a trained network's predictions carry noise to an image, each a pure step that
one `fori_loop` repeats, and the classifier-free guidance that combines two predictions.

A sampler fits one diffusion process (the one its network was trained for); it calls
predict(x [B, H, W, C], t [B]) -> the network's raw output at its own time input t (a DDPM index,
or the flow time x num_timesteps), guidance already applied.
"""

import dataclasses
import enum
from typing import Any, Callable

import jax
import jax.numpy as jnp

from monoformer_jax.diffusion import dpm_solver, flow, gaussian
from monoformer_jax.diffusion.dpm_solver import TimeSpacing
from monoformer_jax.diffusion.process import Process

Array = jax.Array
Predict = Callable[[Array, Array], Array]


class Sampler(enum.Enum):
  DDPM = 'ddpm'  # ancestral steps (gaussian.ddpm_step)
  DDIM = 'ddim'  # deterministic steps (gaussian.ddim_step, eta 0)
  DPMPP_2M = 'dpmpp_2m'  # DPM-Solver++ 2M (dpm_solver)
  EULER = 'euler'  # flow ODE, one evaluation per step
  HEUN = 'heun'  # flow ODE, two per step but the last

  @property
  def process(self) -> Process:
    return Process.FLOW if self in (Sampler.EULER, Sampler.HEUN) else Process.DDPM

  @classmethod
  def default_for(cls, process: Process) -> 'Sampler':
    return cls.DDPM if process == Process.DDPM else cls.EULER


@dataclasses.dataclass(frozen=True)
class Solver:
  """A sampler run for a number of steps (hashable: static under jit)."""
  sampler: Sampler
  steps: int
  num_timesteps: int = 1000
  spacing: TimeSpacing = TimeSpacing.TIME  # DPM-Solver++ only

  @property
  def evaluations(self) -> int:
    """Network evaluations per image (twice that with guidance)."""
    return 2 * self.steps - 1 if self.sampler == Sampler.HEUN else self.steps

  def check(self) -> None:
    """ValueError when the steps cannot be taken."""
    if not 1 <= self.steps <= self.num_timesteps:
      raise ValueError(f'expected 1..{self.num_timesteps} steps, not {self.steps}')
    if self.sampler == Sampler.DPMPP_2M:
      dpm_solver.noise_levels(self.num_timesteps, self.steps, self.spacing)

  def init(self, x: Array) -> Any:
    if self.sampler == Sampler.DPMPP_2M:
      return x, jnp.zeros_like(x)  # and the previous step's x_0
    return x

  def result(self, state: Any) -> Array:
    return state[0] if self.sampler == Sampler.DPMPP_2M else state

  def step(self, state: Any, predict: Predict, i: Array, key: Array) -> Any:
    """Step i of self.steps, counting from the noise."""
    if self.sampler in (Sampler.DDPM, Sampler.DDIM):
      return self._gaussian_step(state, predict, i, key)
    if self.sampler == Sampler.DPMPP_2M:
      return self._dpm_step(state, predict, i)
    return self._flow_step(state, predict, i)

  def _gaussian_step(self, x, predict, i, key):
    schedule = gaussian.make_schedule(self.num_timesteps, self.steps)
    t = jnp.full((x.shape[0],), schedule.num_timesteps - 1 - i, jnp.int32)
    out = predict(x, schedule.timestep_map[t])
    noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
    step_fn = gaussian.ddpm_step if self.sampler == Sampler.DDPM else gaussian.ddim_step
    return step_fn(schedule, out, x, t, noise)

  def _dpm_step(self, state, predict, i):
    x, previous_x0 = state
    tab = dpm_solver.tables(self.num_timesteps, self.steps, self.spacing)
    at = lambda values: jnp.asarray(values)[i]  # noqa: E731
    eps, _ = gaussian.split_output(predict(x, jnp.full((x.shape[0],), at(tab.timesteps))),
                                   x.shape[-1])  # the learned variance plays no part
    x0 = at(tab.x0_x) * x - at(tab.x0_eps) * eps
    return at(tab.a) * x + at(tab.b) * x0 + at(tab.c) * previous_x0, x0

  def _flow_step(self, x, predict, i):
    grid = jnp.asarray(flow.time_grid(self.steps), jnp.float32)
    t, t_next = jnp.full((x.shape[0],), grid[i]), jnp.full((x.shape[0],), grid[i + 1])
    velocity = predict(x, flow.network_time(t, self.num_timesteps))[..., :x.shape[-1]]
    euler = flow.euler_step(x, velocity, t, t_next)
    if self.sampler == Sampler.EULER:
      return euler

    def corrected():
      at_euler = predict(euler, flow.network_time(t_next, self.num_timesteps))[..., :x.shape[-1]]
      return flow.heun_step(x, velocity, at_euler, t, t_next)

    # The last step ends at t = 0, where the network is not evaluated (as in EDM's Heun).
    return jax.lax.cond(i == self.steps - 1, lambda: euler, corrected)


def integrate(solver: Solver, predict: Predict, x: Array, key: Array) -> Array:
  """x [B, H, W, C] at full noise -> the sample, in one loop."""
  state = jax.lax.fori_loop(0, solver.steps, lambda i, s: solver.step(s, predict, i, key),
                            solver.init(x))
  return solver.result(state)


class GuidanceChannels(enum.Enum):
  """Which predicted channels (eps or velocity) classifier-free guidance moves."""
  ALL = 'all'
  FIRST_THREE = 'first_three'  # what the official sampler does, whatever the channel count

  def count(self, eps_channels: int) -> int:
    return eps_channels if self == GuidanceChannels.ALL else 3


@dataclasses.dataclass(frozen=True)
class Guidance:
  """Classifier-free guidance: its scale and the channels it moves."""
  scale: float
  channels: GuidanceChannels = GuidanceChannels.ALL

  def combine(self, cond: Array, uncond: Array, eps_channels: int) -> Array:
    """Guided output from [B, ..., C_out] conditional and unconditional outputs.

    The guided channels get uncond + scale * (cond - uncond); the rest (the variance part, and with
    FIRST_THREE any eps channel past the third) are the conditional ones."""
    n = self.channels.count(eps_channels)
    guided = uncond[..., :n] + self.scale * (cond[..., :n] - uncond[..., :n])
    return jnp.concatenate([guided, cond[..., n:]], axis=-1)
