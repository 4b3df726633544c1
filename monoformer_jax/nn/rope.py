"""Rotary position embeddings with HF transformers' exact semantics, scaling kinds included.

Dimension letters: B batch, T length, N heads, E head width.
"""

import dataclasses
import enum
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


class RopeKind(enum.Enum):
  LINEAR = 'linear'  # positions divided by factor
  DYNAMIC = 'dynamic'  # NTK: past original_max_position, the base grows with the longest position
  LLAMA3 = 'llama3'  # low frequencies divided by factor, a smooth band in between


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """HF's `rope_scaling` for the supported kinds. original_max_position is the llama3 kind's
  `original_max_position_embeddings`, and the dynamic kind's `max_position_embeddings`."""
  kind: RopeKind
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192


def frequencies(head_dim: int, theta: float, scaling: Optional[RopeScaling],
                positions: jax.Array) -> jax.Array:
  """Inverse frequencies [E/2] float32, as HF computes them for a forward pass over positions
  [B, T] (only the dynamic kind looks at them: its longest position + 1)."""
  exponents = np.arange(0, head_dim, 2, dtype=np.float32) / head_dim
  if scaling is not None and scaling.kind == RopeKind.DYNAMIC:
    original = scaling.original_max_position
    seq_len = jnp.maximum(jnp.max(positions) + 1, original).astype(jnp.float32)
    base = theta * ((scaling.factor * seq_len / original) - (scaling.factor - 1))**(
        head_dim / (head_dim - 2))
    return 1.0 / base**jnp.asarray(exponents)
  inv_freq = (1.0 / theta**exponents).astype(np.float32)  # a constant: computed once, on the host
  if scaling is None:
    return jnp.asarray(inv_freq)
  if scaling.kind == RopeKind.LINEAR:
    return jnp.asarray((inv_freq / scaling.factor).astype(np.float32))
  low_wavelen = scaling.original_max_position / scaling.low_freq_factor
  high_wavelen = scaling.original_max_position / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.asarray(np.where(medium, smoothed, scaled).astype(np.float32))


def apply(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates x [B, T, N, E] by positions [B, T] (HF's half-split layout)."""
  half = x.shape[-1] // 2
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, E/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
