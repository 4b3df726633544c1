"""LLaMA decoder pieces: RMSNorm, RoPE, masks, GQA attention, SwiGLU, scanned blocks.

Dimension letters: B batch, T query length, S key/value length, D model width,
H query heads, K key/value heads, E head width, F MLP width, L layers.
Semantics follow HF transformers' LlamaModel so converted weights give the same logits.
"""

import dataclasses
import enum
import math
from typing import Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from monoformer_jax.nn import rope, splash
from monoformer_jax.nn.rope import RopeScaling


Array = jax.Array


class MaskType(enum.Enum):
  """Attention pattern of a forward pass."""
  CAUSAL = 'causal'
  BIDIRECTIONAL = 'bidirectional'
  HYBRID = 'hybrid'  # causal, plus full attention inside each image span


class AttentionImpl(enum.Enum):
  """How attention runs (jax.nn.dot_product_attention or the splash kernel)."""
  XLA = 'xla'  # any backend, any mask
  CUDNN = 'cudnn'  # NVIDIA GPUs, bf16/fp16 compute (the XLA path on other backends)
  SPLASH = 'splash'  # Pallas splash kernel on TPU for passes of 128k tokens without a cache


class Remat(enum.Enum):
  """What a decoder block keeps for the backward pass."""
  NONE = 'none'  # keep every activation
  FULL = 'full'  # keep only the block inputs
  DOTS = 'dots'  # keep matmul outputs without batch dims
  DOTS_WITH_BATCH = 'dots_with_batch'  # keep every matmul output, attention scores included


class LayerLoop(enum.Enum):
  """How the L decoder blocks are compiled; the parameters are stacked either way."""
  SCAN = 'scan'  # one block body in a loop: compile time and code size independent of L
  UNROLLED = 'unrolled'  # L inlined copies: XLA may fuse and schedule across blocks


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
  """The LLaMA decoder's shape and numerics (hashable: a static module field)."""
  vocab_size: int
  width: int
  depth: int
  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  rope_theta: float = 10000.0
  rope_scaling: Optional[RopeScaling] = None
  norm_eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  remat: Remat = Remat.NONE
  layer_loop: LayerLoop = LayerLoop.SCAN
  attention: AttentionImpl = AttentionImpl.XLA

  head_width: Optional[int] = None  # E when it is not width / num_heads (HF's head_dim)
  attention_bias: bool = False  # q, k and v projections with a bias, o without (Qwen2)
  # The attention projections contract their kernels' axes as stored rather than as one 2-D
  # matmul: what a base that qwix quantizes (train.finetune 'qlora') needs, since it stores
  # each kernel quantized as the contraction sees it, with the kernel's axis names.
  keep_kernel_axes: bool = False
  # The rank of the LoRA adapters qwix adds (train.finetune), 0 without: the remat policies
  # recompute their rank-r up-projections rather than keep those [tokens, out] float32 outputs.
  adapter_rank: int = 0

  @property
  def head_dim(self) -> int:
    return self.head_width or self.width // self.num_heads


def dense_init(*names: str, stddev: float = 0.02):
  """LLaMA's normal(0.02) initializer, annotated with logical axis names."""
  return nn.with_logical_partitioning(nn.initializers.normal(stddev), names)


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer for incremental decoding.

  k, v: [L, B, S, K, E]; valid: [B, S] slots holding a real token; index: the next slot to write;
  next_position: [B] RoPE position of the next real token of each row."""
  k: Array
  v: Array
  valid: Array
  index: Array
  next_position: Array

  @classmethod
  def empty(cls, cfg: BackboneConfig, batch: int, length: int) -> 'KVCache':
    shape = (cfg.depth, batch, length, cfg.num_kv_heads, cfg.head_dim)
    return cls(k=jnp.zeros(shape, cfg.dtype), v=jnp.zeros(shape, cfg.dtype),
               valid=jnp.zeros((batch, length), bool), index=jnp.zeros((), jnp.int32),
               next_position=jnp.zeros((batch,), jnp.int32))


def attention_mask(mask_type: MaskType, q_slots: Array, kv_valid: Array, q_span: Array,
                   kv_span: Array) -> Array:
  """Which keys each query may attend to: [B, 1, T, S] booleans.

  q_slots [T]: sequence slot of each query; key slots are 0..S-1.
  kv_valid [B, S]: real (not padding) keys.
  q_span [B, T], kv_span [B, S]: image-span id of each token, 0 outside images."""
  kv_slots = jnp.arange(kv_valid.shape[1])
  if mask_type == MaskType.BIDIRECTIONAL:
    allowed = jnp.ones((1, q_slots.shape[0], kv_slots.shape[0]), bool)
  else:
    allowed = (kv_slots[None, :] <= q_slots[:, None])[None]
    if mask_type == MaskType.HYBRID:
      same_image = (q_span[:, :, None] == kv_span[:, None, :]) & (q_span[:, :, None] != 0)
      allowed = allowed | same_image
  return (allowed & kv_valid[:, None, :])[:, None]


class RMSNorm(nn.Module):
  eps: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (scale.astype(self.dtype) * x32.astype(self.dtype))


class Projection(nn.Module):
  """Linear map contracting x's last `in_dims` axes into `features`; the kernel keeps its full
  multi-axis shape (e.g. [D, H, E]) so each axis can carry its own logical name. The bias, when
  there is one, has the features' shape (e.g. [H, E])."""
  features: tuple[int, ...]
  names: tuple[str, ...]
  in_dims: int
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  use_bias: bool = False
  keep_kernel_axes: bool = False  # contract the kernel's axes as stored (see BackboneConfig)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_shape = x.shape[x.ndim - self.in_dims:]
    kernel = self.param('kernel', dense_init(*self.names), in_shape + self.features,
                        self.param_dtype)
    if self.keep_kernel_axes:  # the kernel as it is stored: a quantized one may not reshape
      rows = x.reshape(-1, *in_shape).astype(self.dtype)
      if isinstance(kernel, jax.Array):  # else quantized: qwix computes in the rows' dtype
        kernel = kernel.astype(self.dtype)
      contracted = tuple(range(self.in_dims))
      out = jax.lax.dot_general(rows, kernel,
                                ((tuple(d + 1 for d in contracted), contracted), ((), ())))
    else:
      # As one 2-D matmul: XLA:CPU runs the weight gradient of a [B, T, ...] contraction
      # markedly slower than the same [B*T, ...] one, and lays a multi-axis kernel out with
      # extra copies; the reshapes are free. jax.lax's dot_general is what qwix intercepts
      # to add LoRA adapters.
      rows = x.reshape(-1, math.prod(in_shape)).astype(self.dtype)
      out = jax.lax.dot_general(rows, kernel.reshape(rows.shape[1], -1).astype(self.dtype),
                                (((1,), (0,)), ((), ())))
    # In the compute dtype: qwix adds its float32 adapters' product in float32.
    out = out.astype(self.dtype).reshape(x.shape[:x.ndim - self.in_dims] + self.features)
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(
          nn.initializers.zeros, self.names[self.in_dims:]), self.features, self.param_dtype)
      out = out + bias.astype(self.dtype)
    return out


def cudnn_fits(q: Array, k: Array) -> bool:
  """Whether cuDNN's fused attention takes these [B, T, H, E] inputs with a mask.

  Elsewhere the XLA path runs, so a GPU config stays runnable (and testable) on CPU, and odd
  lengths (one decoded token) need no special case: cuDNN wants 16-bit inputs, E a multiple
  of 8 up to 128, and even T and S when a mask (a bias to it) is differentiated."""
  return (jax.default_backend() == 'gpu' and q.dtype in (jnp.bfloat16, jnp.float16)
          and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128
          and q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0)


class Attention(nn.Module):
  cfg: BackboneConfig

  @nn.compact
  def __call__(self, x: Array, positions: Array, mask: Array,
               cache: Optional[tuple[Array, Array]], cache_index: Array):
    cfg = self.cfg
    dense = lambda features, names, name, in_dims=1, bias=False: Projection(  # noqa: E731
        features, names, in_dims, cfg.dtype, cfg.param_dtype, bias, cfg.keep_kernel_axes,
        name=name)
    bias = cfg.attention_bias
    q = dense((cfg.num_heads, cfg.head_dim), ('embed', 'heads', 'head_dim'), 'q_proj', bias=bias)(x)
    k = dense((cfg.num_kv_heads, cfg.head_dim), ('embed', 'kv_heads', 'head_dim'), 'k_proj',
              bias=bias)(x)
    v = dense((cfg.num_kv_heads, cfg.head_dim), ('embed', 'kv_heads', 'head_dim'), 'v_proj',
              bias=bias)(x)
    inv_freq = rope.frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, positions)
    q = rope.apply(q, positions, inv_freq)
    k = rope.apply(k, positions, inv_freq)
    q = nn.with_logical_constraint(q, ('batch', 'length', 'heads', 'head_dim'))
    if cache is not None:  # write this chunk into the cache and attend to all of it
      start = (0, cache_index, 0, 0)
      k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), start)
      v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), start)
      cache = (k, v)
    if isinstance(mask, splash.KernelMask):
      out = splash.attention(q, k, v, mask)
    else:  # [B, T, H, E]
      impl = 'cudnn' if cfg.attention == AttentionImpl.CUDNN and cudnn_fits(q, k) else 'xla'
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    out = dense((cfg.width,), ('heads', 'head_dim', 'embed'), 'o_proj', in_dims=2)(out)
    return out, cache


class Mlp(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""
  cfg: BackboneConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    dense = lambda features, names, name: lambda h: nn.Dense(  # noqa: E731
        features, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=dense_init(*names), name=name)(h).astype(cfg.dtype)  # see Projection
    rows = x.reshape(-1, x.shape[-1])  # [B*T, D]: see Projection
    gate = dense(cfg.mlp_dim, ('embed', 'mlp'), 'gate_proj')(rows)
    up = dense(cfg.mlp_dim, ('embed', 'mlp'), 'up_proj')(rows)
    hidden = nn.with_logical_constraint(nn.silu(gate) * up, ('batch', 'mlp'))
    return dense(cfg.width, ('mlp', 'embed'), 'down_proj')(hidden).reshape(x.shape)


class DecoderBlock(nn.Module):
  """Pre-norm block; shaped (carry, *xs) -> (carry, ys) for nn.scan."""
  cfg: BackboneConfig

  @nn.compact
  def __call__(self, x: Array, positions: Array, mask: Array, cache_index: Array,
               cache: Optional[tuple[Array, Array]]):
    cfg = self.cfg
    norm = lambda name: RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name=name)  # noqa: E731
    attn, cache = Attention(cfg, name='self_attn')(norm('input_layernorm')(x), positions,
                                                   mask, cache, cache_index)
    x = x + attn
    x = x + Mlp(cfg, name='mlp')(norm('post_attention_layernorm')(x))
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
    return x, cache


_REMAT_POLICIES = {
    Remat.FULL: jax.checkpoint_policies.nothing_saveable,
    Remat.DOTS: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    Remat.DOTS_WITH_BATCH: jax.checkpoint_policies.dots_saveable,
}


def _recomputing_narrow_dots(policy, rank: int):
  """`policy`, except that it saves no dot contracting over `rank` inputs or fewer: a LoRA
  adapter's up-projection [tokens, r] x [r, out], recomputed from its saved [tokens, r] input
  for r / in of its projection's cost."""
  def saveable(prim, *avals, **params):
    if prim is jax.lax.dot_general_p:
      (contracting, _), (batch, _) = params['dimension_numbers']
      if not batch and all(avals[0].shape[d] <= rank for d in contracting):
        return False
    return policy(prim, *avals, **params)
  return saveable


class Decoder(nn.Module):
  """L decoder blocks stacked with nn.scan (params carry a leading 'layers' axis)."""
  cfg: BackboneConfig

  @nn.compact
  def __call__(self, x: Array, positions: Array, mask: Array, cache_index: Array,
               cache: Optional[tuple[Array, Array]] = None):
    block = DecoderBlock
    if self.cfg.remat != Remat.NONE:
      policy = _REMAT_POLICIES[self.cfg.remat]
      if self.cfg.adapter_rank:
        policy = _recomputing_narrow_dots(policy, self.cfg.adapter_rank)
      block = nn.remat(block, prevent_cse=False, policy=policy)
    # Each block draws its own LoRA dropout (train.finetune's adapters) from the 'dropout' key.
    scanned = nn.scan(block, variable_axes={'params': 0},
                      split_rngs={'params': True, 'dropout': True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
                      length=self.cfg.depth, unroll=self.cfg.depth if self.cfg.layer_loop == LayerLoop.UNROLLED else 1,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
    return scanned(self.cfg, name='layers')(x, positions, mask, cache_index, cache)
