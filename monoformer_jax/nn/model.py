"""The MonoFormer network: a LLaMA decoder that also denoises image tokens.

It knows nothing of diffusion maths: given noisy patches x_t and timesteps t it returns the raw
prediction (eps, and the variance interpolation v when sigma is learned); `diffusion.py` interprets
it. An image example is laid out as ImageSequence says (official 'add_before_image_tokens').
Dimension letters as in layers.py, plus P prefix, N image tokens, C channels.
"""

import dataclasses
import enum
import math
from typing import Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from monoformer_jax.base.errors import UserError
from monoformer_jax.config import schema
from monoformer_jax.nn import splash, understanding as understanding_lib
from monoformer_jax.nn.layers import (Array, AttentionImpl, BackboneConfig, Decoder, KVCache,
                                      LayerLoop, MaskType, Remat, RMSNorm, attention_mask,
                                      dense_init)
from monoformer_jax.nn.rope import RopeKind, RopeScaling


# Named model sizes for config files: (width D, depth L, heads H, kv heads K, mlp F).
SIZES = {
    'tiny': dict(width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64),
    'tiny-mha': dict(width=32, depth=2, num_heads=4, num_kv_heads=4, mlp_dim=64),
    'digits': dict(width=128, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=352),
    'bench': dict(width=256, depth=4, num_heads=4, num_kv_heads=4, mlp_dim=688),
    'tinyllama-1.1b': dict(width=2048, depth=22, num_heads=32, num_kv_heads=4, mlp_dim=5632),
}


@dataclasses.dataclass(frozen=True)
class ImageConfig:
  """The diffused array: [H, W, C] cut into p x p patches in row-major order."""
  patch_size: int = 2
  height: int = 32
  width: int = 32
  channels: int = 4
  learn_sigma: bool = True
  use_pos_embed: bool = True

  @property
  def grid(self) -> tuple[int, int]:
    return self.height // self.patch_size, self.width // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def out_channels(self) -> int:
    return 2 * self.channels if self.learn_sigma else self.channels

  def sequence(self, prefix: int, suffix: int = 1) -> 'ImageSequence':
    return ImageSequence(prefix, self.num_patches, suffix)


@dataclasses.dataclass(frozen=True)
class ImageSequence:
  """Where everything sits in an image example of length T: P prefix tokens (left-padded,
  ending with <im_start>), the time token, N image tokens, Q suffix tokens (<im_end>)."""
  prefix: int
  num_patches: int
  suffix: int = 1

  @property
  def image_start(self) -> int:
    return self.prefix + 1

  @property
  def image_end(self) -> int:
    return self.image_start + self.num_patches

  @property
  def length(self) -> int:
    return self.image_end + self.suffix


@dataclasses.dataclass(frozen=True)
class UnderstandingShape:
  """The images a pass may read (model.vision_encoder): M feature tokens of E features each
  (E = 0: the model reads no images and has no im_embedder)."""
  tokens_per_image: int = 0
  features: int = 0


# Biases of the DiT-side layers: zero, and replicated (small and read everywhere).
ZERO_BIAS = nn.with_logical_partitioning(nn.initializers.zeros, (None,))


@flax.struct.dataclass
class ModelOutput:
  logits: Optional[Array] = None  # [B, S, V] float32, text passes only
  hidden: Optional[Array] = None  # [B, S, D] final-norm output with return_hidden (image
  # passes: the S prefix tokens only)
  image: Optional[Array] = None  # [B, H, W, C_out] float32, image passes only
  cache: Optional[KVCache] = None


def patchify(x: Array, p: int) -> Array:
  """[B, H, W, C] -> [B, N, C*p*p], features ordered (c, i, j) like a conv kernel."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(x: Array, p: int, height: int, width: int) -> Array:
  """[B, N, p*p*C] with features ordered (i, j, c) -> [B, H, W, C]."""
  b, _, f = x.shape
  c = f // (p * p)
  x = x.reshape(b, height // p, width // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, height, width, c)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """Fixed 2-D position embedding [N, D], the official (MAE/DiT) layout.

  The first D/2 features encode the column, the last D/2 the row; each half is
  [sin, cos] of position * 10000^(-k / (D/4))."""
  def one_axis(d, pos):
    omega = 1.0 / 10000**(np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing='ij')
  return np.concatenate([one_axis(dim // 2, cols), one_axis(dim // 2, rows)],
                        axis=1).astype(np.float32)


def timestep_features(t: Array, dim: int = 256, max_period: float = 10000.0) -> Array:
  """Sinusoidal features [B, dim] of (possibly fractional) timesteps, [cos, sin] order."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class Activation(enum.Enum):
  SILU = 'silu'
  GELU = 'gelu'  # the exact erf form, as torch's nn.GELU()


class Init(enum.Enum):
  """How an Mlp2's kernels start (biases: zero, except TORCH)."""
  NORMAL = 'normal'  # N(0, 0.02), the official re-initialization of the DiT-side modules
  ZERO = 'zero'
  TORCH = 'torch'  # torch.nn.Linear's own: U(+-1/sqrt(fan_in)) for kernel and bias (im_embedder)


def _torch_bias(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)
  return nn.with_logical_partitioning(
      lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound),
      (None,))


class Mlp2(nn.Module):
  """Dense -> activation -> Dense with biases (the DiT-side MLPs and the im_embedder)."""
  width: int
  activation: Activation
  kernels: Init
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: Array) -> Array:
    def dense(name, fan_in):
      if self.kernels == Init.TORCH:
        # the input side unsharded: the encoder's features need not divide over the mesh
        kernel = nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform'),
            (None, 'mlp') if name == 'fc1' else ('embed', 'mlp'))
        bias = _torch_bias(fan_in)
      else:
        kernel = (nn.with_logical_partitioning(nn.initializers.zeros, ('embed', 'mlp'))
                  if self.kernels == Init.ZERO else dense_init('embed', 'mlp'))
        bias = ZERO_BIAS
      return nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=kernel, bias_init=bias, name=name)

    x = dense('fc1', x.shape[-1])(x)
    x = nn.silu(x) if self.activation == Activation.SILU else nn.gelu(x, approximate=False)
    return dense('fc2', self.width)(x)


class ImageHead(nn.Module):
  """DiT final layer: adaLN-modulated LayerNorm, then a linear to patch pixels."""
  out_features: int
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: Array, t_emb: Array) -> Array:
    mod = nn.Dense(2 * x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=dense_init('embed', 'mlp'), bias_init=ZERO_BIAS,
                   name='adaLN_modulation')(nn.silu(t_emb))
    shift, scale = jnp.split(mod, 2, axis=-1)
    x = nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=jnp.float32)(x)
    x = x * (1 + scale[:, None]) + shift[:, None]
    return nn.Dense(self.out_features, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=dense_init('embed', 'mlp'), bias_init=ZERO_BIAS, name='linear')(x)


class MonoFormer(nn.Module):
  """One set of weights for text logits and image denoising; image_mask is the mask
  its image passes are trained and sampled with."""
  backbone: BackboneConfig
  image: ImageConfig
  tie_embeddings: bool = False
  image_mask: MaskType = MaskType.HYBRID
  understanding: UnderstandingShape = UnderstandingShape()  # the images a pass may read

  def setup(self):
    cfg, img = self.backbone, self.image
    self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.width, dtype=cfg.dtype,
                                 param_dtype=cfg.param_dtype,
                                 embedding_init=dense_init('vocab', 'embed'))
    self.decoder = Decoder(cfg)
    self.norm = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype)
    if not self.tie_embeddings:
      self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype, kernel_init=dense_init('embed', 'vocab'))
    zeros = nn.with_logical_partitioning(nn.initializers.zeros, ('mlp', 'embed'))
    self.x_embedder = nn.Dense(cfg.width, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                               kernel_init=zeros, bias_init=ZERO_BIAS)
    self.t_embedder = Mlp2(cfg.width, Activation.SILU, Init.NORMAL, cfg.dtype, cfg.param_dtype)
    self.t_projector = Mlp2(cfg.width, Activation.GELU, Init.ZERO, cfg.dtype, cfg.param_dtype)
    self.final_layer = ImageHead(img.patch_size**2 * img.out_channels, cfg.dtype, cfg.param_dtype)
    if self.understanding.features:
      self.im_embedder = Mlp2(cfg.width, Activation.GELU, Init.TORCH, cfg.dtype, cfg.param_dtype)

  def __call__(self, tokens: Array, valid: Array, *, mask_type: MaskType,
               image: Optional[Array] = None, t: Optional[Array] = None,
               suffix: Optional[Array] = None, cache: Optional[KVCache] = None,
               return_hidden: bool = False,
               understand: Optional[understanding_lib.Understanding] = None) -> ModelOutput:
    """Text pass (image None): logits for every position, optionally through a cache; with
    return_hidden, the final-norm states instead (for a chunked loss).

    Image pass: tokens [B, P] prefix, image x_t [B, H, W, C], t [B], suffix [B, Q]; returns the
    prediction at the image tokens, unpatchified (with return_hidden, also the prefix's final-norm
    states). With a cache that already holds the prefix (a text pass over it), tokens may be [B, 0]:
    only the image part is computed, attending to the cached prefix; the returned cache holds it too
    (the time token, the image tokens and the suffix after the prefix).

    understand: images read by `tokens` (text, or an image pass's prefix) at its slots
    (understanding.py); their features go through the im_embedder."""
    cfg, img = self.backbone, self.image
    embeds = self.embed_tokens(tokens)
    if understand is not None:
      time_tokens = self.t_projector(self.t_embedder(
          timestep_features(understand.t).astype(cfg.dtype)))
      embeds = understanding_lib.place(embeds, understand, time_tokens,
                                       self.im_embedder(understand.features.astype(cfg.dtype)))
    span = jnp.zeros(tokens.shape, jnp.int32)
    if image is not None:
      t_emb = self.t_embedder(timestep_features(t).astype(cfg.dtype))
      patches = self.x_embedder(patchify(image.astype(cfg.dtype), img.patch_size))
      if img.use_pos_embed:
        patches = patches + jnp.asarray(sincos_2d(cfg.width, *img.grid), cfg.dtype)
      parts = [embeds, self.t_projector(t_emb)[:, None], patches]
      spans = [span, jnp.zeros((span.shape[0], 1), jnp.int32),
               jnp.ones_like(patches[..., 0], jnp.int32)]
      if suffix is not None:
        parts.append(self.embed_tokens(suffix))
        spans.append(jnp.zeros(suffix.shape, jnp.int32))
      embeds = jnp.concatenate(parts, axis=1)
      span = jnp.concatenate(spans, axis=1)
      valid = jnp.concatenate([valid, jnp.ones(span.shape[:1] + (span.shape[1] - valid.shape[1],),
                                               bool)], axis=1)

    new_positions = jnp.cumsum(valid, axis=1) - 1
    if cache is None:
      index = jnp.zeros((), jnp.int32)
      positions, kv_valid, kv_span, kv = jnp.maximum(new_positions, 0), valid, span, None
    else:
      index = cache.index
      positions = cache.next_position[:, None] + jnp.maximum(new_positions, 0)
      kv_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, index))
      # Cached slots are text (span 0); new image tokens keep their span ids.
      kv_span = jax.lax.dynamic_update_slice(jnp.zeros(kv_valid.shape, jnp.int32), span, (0, index))
      kv = (cache.k, cache.v)
    length = valid.shape[1]
    layout = img.sequence(tokens.shape[1], 0 if suffix is None else suffix.shape[1])
    if cfg.attention == AttentionImpl.SPLASH and splash.applies(length, cache is not None):
      image_block = (layout.image_start, img.num_patches) if image is not None else (0, 0)
      pattern = splash.MaskPattern(length, mask_type != MaskType.BIDIRECTIONAL,
                                   *(image_block if mask_type == MaskType.HYBRID else (0, 0)))
      mask = splash.KernelMask(valid.astype(jnp.int32), pattern)
    else:
      mask = attention_mask(mask_type, index + jnp.arange(length), kv_valid, span, kv_span)

    x = nn.with_logical_constraint(embeds, ('batch', 'length', 'embed'))
    x, kv = self.decoder(x, positions, mask, index, kv)
    x = self.norm(x)
    new_cache = None
    if cache is not None:
      new_cache = KVCache(k=kv[0], v=kv[1], valid=kv_valid, index=index + valid.shape[1],
                          next_position=cache.next_position + valid.sum(axis=1).astype(jnp.int32))

    if image is not None:
      out = self.final_layer(x[:, layout.image_start:layout.image_end], t_emb)
      out = unpatchify(out, img.patch_size, img.height, img.width)
      prefix = x[:, :tokens.shape[1]] if return_hidden else None  # the prompt's states
      return ModelOutput(image=out.astype(jnp.float32), hidden=prefix, cache=new_cache)

    if return_hidden:
      return ModelOutput(hidden=x, cache=new_cache)
    return ModelOutput(logits=self.logits(x), cache=new_cache)

  def logits(self, x: Array) -> Array:
    """Final-norm states [..., D] -> float32 logits [..., V]."""
    logits = self.embed_tokens.attend(x) if self.tie_embeddings else self.lm_head(x)
    if logits.ndim == 3:
      logits = nn.with_logical_constraint(logits, ('batch', 'length', 'vocab'))
    return logits.astype(jnp.float32)

  def init_all(self, tokens: Array, valid: Array, image: Array, t: Array) -> ModelOutput:
    """Touches every parameter (text, understanding and image paths) for `init`."""
    u = self.understanding
    understand = None if not u.features else understanding_lib.example(
        tokens.shape[0], tokens.shape[1], 1, u.tokens_per_image, u.features)
    self(tokens, valid, mask_type=MaskType.CAUSAL, understand=understand)
    return self(tokens, valid, mask_type=MaskType.HYBRID, image=image, t=t)


def _shape(m) -> dict:
  """The backbone shape named by the model section: a preset of SIZES, or the custom keys."""
  if m.size in SIZES:
    return dict(SIZES[m.size])
  if m.size == 'auto':
    raise UserError('config key model.size is \'auto\', which only `train` resolves (from '
                    'model.init_from); name a size or give the shape with size \'custom\'.')
  if m.size != 'custom':
    raise UserError(f'config key model.size is {m.size!r}; expected \'auto\', \'custom\' or one '
                    f'of {", ".join(sorted(SIZES))}.')
  for key in ('width', 'depth', 'num_heads', 'num_kv_heads', 'mlp_dim'):
    if not m[key] > 0:
      raise UserError(f'config key model.{key} is {m[key]!r}; size \'custom\' needs it positive.')
  if m.num_heads % m.num_kv_heads or (not m.head_dim and m.width % m.num_heads) or m.head_dim % 2:
    raise UserError(f'config keys model.num_heads {m.num_heads}, model.num_kv_heads '
                    f'{m.num_kv_heads}, model.width {m.width} and model.head_dim {m.head_dim} do '
                    'not fit: heads must split into the kv heads, and heads of even width.')
  head_dim = m.head_dim or m.width // m.num_heads
  return dict(width=m.width, depth=m.depth, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
              mlp_dim=m.mlp_dim, head_width=None if head_dim == m.width // m.num_heads else head_dim)


def build(model_config, learn_sigma: bool,
          understanding: UnderstandingShape = UnderstandingShape()) -> MonoFormer:
  """The module from the config's `model` section: the one place its choices are parsed.
  learn_sigma: whether the output carries variance channels (model.learn_sigma, where the
  diffusion process learns a variance), understanding: what its vision encoder gives
  (run.settings.build_model decides both)."""
  m, r = model_config, model_config.rope_scaling
  scaling = None if r.kind == 'none' else RopeScaling(
      schema.choice(RopeKind, r.kind, 'model.rope_scaling.kind'), r.factor, r.low_freq_factor,
      r.high_freq_factor, r.original_max_position)
  backbone = BackboneConfig(
      vocab_size=m.vocab_size, rope_theta=m.rope_theta, norm_eps=m.norm_eps, rope_scaling=scaling,
      dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype),
      remat=schema.choice(Remat, m.remat, 'model.remat'),
      layer_loop=schema.choice(LayerLoop, m.layer_loop, 'model.layer_loop'),
      attention=schema.choice(AttentionImpl, m.attention, 'model.attention'),
      attention_bias=m.attention_bias, **_shape(m))
  image = ImageConfig(patch_size=m.patch_size, height=m.image_size[0], width=m.image_size[1],
                      channels=m.image_channels, learn_sigma=learn_sigma,
                      use_pos_embed=m.use_pos_embed)
  return MonoFormer(backbone, image, m.tie_embeddings,
                    schema.choice(MaskType, m.image_mask, 'model.image_mask'), understanding)


def example_inputs(model: MonoFormer, batch: int = 1, length: int = 4):
  """(tokens [B, S], valid, image [B, H, W, C], t [B]) of zeros: what init traces."""
  img = model.image
  return (jnp.zeros((batch, length), jnp.int32), jnp.ones((batch, length), bool),
          jnp.zeros((batch, img.height, img.width, img.channels), jnp.float32),
          jnp.zeros((batch,), jnp.int32))


def init_params(model: MonoFormer, key: jax.Array):
  """The parameters a run starting from `key` begins with (logically boxed). Traced without
  logical axis rules, also inside sharding.activate: qwix's LoRA adapters, made inside the
  scanned blocks, carry their kernel's names with the 'layers' axis while their value has none,
  which a constraint rejects; where the parameters live is for out_shardings to say."""
  with nn.logical_axis_rules(()):
    return model.init(key, *example_inputs(model), method=MonoFormer.init_all)['params']
