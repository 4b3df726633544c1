"""A CLIP vision tower (transformers' CLIPVisionModel), the frozen encoder of images to understand.

The official understanding models read the patch features of the second-to-last block (the CLS
token dropped): `features` returns exactly those. Its shape is data (clip.json, written by
`convert clip`); ViT-L/14 at 224 px gives 256 tokens of 1024 features.
Dimension letters: B images, R resolution, G patches per side, N = G * G, D width, F mlp width.
"""

import dataclasses
import enum
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from monoformer_jax.base import sharding
from monoformer_jax.nn import converted
from monoformer_jax.nn.layers import Array

CLIP_JSON = 'clip.json'


class Activation(enum.Enum):
  QUICK_GELU = 'quick_gelu'  # x * sigmoid(1.702 x), the OpenAI towers
  GELU = 'gelu'  # exact erf form


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  width: int = 1024
  mlp_dim: int = 4096
  depth: int = 24
  num_heads: int = 16
  image_size: int = 224
  patch_size: int = 14
  channels: int = 3
  norm_eps: float = 1e-5
  activation: str = Activation.QUICK_GELU.value
  dtype: str = 'float32'  # compute; bf16 on accelerators

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size)**2


def _dense(features: int, names: tuple[str, str], dtype, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]))


def _norm(cfg: ClipConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=cfg.norm_eps, dtype=jnp.float32, name=name)


class EncoderLayer(nn.Module):
  """Pre-norm block: x + attention(norm(x)), then x + mlp(norm(x)); full attention."""
  cfg: ClipConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    b, n, d = x.shape
    head = d // cfg.num_heads
    h = _norm(cfg, 'layer_norm1')(x).astype(dtype)
    q, k, v = (_dense(d, ('embed', 'heads'), dtype, f'{p}_proj')(h).reshape(b, n, cfg.num_heads,
                                                                             head)
               for p in 'qkv')
    logits = jnp.einsum('bqhe,bkhe->bhqk', q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits / math.sqrt(head), axis=-1).astype(dtype)
    attended = jnp.einsum('bhqk,bkhe->bqhe', weights, v).reshape(b, n, d)
    x = x + _dense(d, ('heads', 'embed'), dtype, 'out_proj')(attended).astype(jnp.float32)
    h = _dense(cfg.mlp_dim, ('embed', 'mlp'), dtype, 'fc1')(_norm(cfg, 'layer_norm2')(x).astype(dtype))
    if Activation(cfg.activation) == Activation.QUICK_GELU:
      h = h * jax.nn.sigmoid(1.702 * h)
    else:
      h = nn.gelu(h, approximate=False)
    return x + _dense(d, ('mlp', 'embed'), dtype, 'fc2')(h).astype(jnp.float32)


class VisionTower(nn.Module):
  """pixels [B, R, R, 3] (normalized as CLIPImageProcessor does: data.vision_input) -> hidden
  states."""
  cfg: ClipConfig

  def setup(self):
    cfg = self.cfg
    p = cfg.patch_size
    self.patch_embedding = nn.Conv(cfg.width, (p, p), strides=(p, p), padding='VALID',
                                   use_bias=False, dtype=jnp.dtype(cfg.dtype))
    self.class_embedding = self.param('class_embedding', nn.initializers.normal(0.02),
                                      (cfg.width,))
    self.position_embedding = self.param('position_embedding', nn.initializers.normal(0.02),
                                         (cfg.num_patches + 1, cfg.width))
    self.pre_layrnorm = _norm(cfg, 'pre_layrnorm')
    self.layers = [EncoderLayer(cfg, name=f'layers_{i}') for i in range(cfg.depth)]
    self.post_layernorm = _norm(cfg, 'post_layernorm')

  def _embed(self, pixels: Array) -> Array:
    patches = self.patch_embedding(pixels.astype(jnp.dtype(self.cfg.dtype)))
    patches = patches.reshape(patches.shape[0], -1, self.cfg.width).astype(jnp.float32)
    cls = jnp.broadcast_to(self.class_embedding, (patches.shape[0], 1, self.cfg.width))
    x = jnp.concatenate([cls, patches], axis=1) + self.position_embedding[None]
    return self.pre_layrnorm(x)

  def features(self, pixels: Array) -> Array:
    """[B, N, D] float32: the second-to-last block's output at the patch tokens, the
    official feature selection (hidden_states[-2] without CLS)."""
    x = self._embed(pixels)
    for layer in self.layers[:-1]:
      x = layer(x)
    return x[:, 1:]

  def __call__(self, pixels: Array) -> Array:
    """[B, D]: the pooled CLS state (every parameter touched, for init and the parity test)."""
    x = self._embed(pixels)
    for layer in self.layers:
      x = layer(x)
    return self.post_layernorm(x[:, 0])


def load(path: str, dtype: str = '') -> tuple[VisionTower, dict]:
  """(module, params as host arrays) of a converted CLIP directory; dtype overrides the compute
  dtype ('' keeps float32)."""
  d, params = converted.read_converted(path, CLIP_JSON, 'clip')
  cfg = ClipConfig(**dict(d, dtype=dtype or d.get('dtype', 'float32')))
  return VisionTower(cfg), params


def load_config(path: str) -> ClipConfig:
  return ClipConfig(**converted.read_meta(path, CLIP_JSON, 'clip'))


def feature_shape(path: str) -> tuple[int, int]:
  """(N tokens, D features) per image of a converted CLIP directory."""
  cfg = load_config(path)
  return cfg.num_patches, cfg.width


def encoder(path: str, layout: sharding.Layout, dtype: str):
  """Jitted fn(pixels [B, R, R, 3]) -> features [B, N, D] float32, the tower's params placed by
  the backbone's logical rules (frozen: never differentiated, never in the train state)."""
  tower, params = load(path, dtype)
  boxed = jax.eval_shape(tower.init, jax.random.key(0), jax.ShapeDtypeStruct(
      (1, tower.cfg.image_size, tower.cfg.image_size, 3), np.float32))['params']
  shardings = sharding.logical_shardings(boxed, layout)
  params = jax.device_put(params, shardings)
  rows = sharding.batch_sharding(layout)
  fn = jax.jit(lambda p, x: tower.apply({'params': p}, x, method=VisionTower.features),
               in_shardings=(shardings, rows), out_shardings=rows)
  return lambda pixels: fn(params, pixels)


def meta_path(path: str) -> str:
  return os.path.join(path, CLIP_JSON)
