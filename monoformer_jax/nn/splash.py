"""Pallas splash attention (TPU) for passes whose mask pattern is known before tracing.

A MonoFormer mask is static once the shapes are: causal text, or causal with one full block where
the image sits (prompt, time token, image, suffix), or fully bidirectional. Left padding varies per
row and becomes segment ids (1 real, 0 padding), which the kernel masks without a dense [B, T, S]
array. Padding queries then attend to padding keys only: their outputs differ from the XLA path's
but nothing reads them.

Off TPU the kernel runs in Pallas interpret mode, which is slow and meant for tests. Under a
multi-device mesh the kernel runs per shard through shard_map (batch over its mesh axes, heads over
theirs).
Dimension letters: B batch, T length, H heads, K key/value heads, E head width.
"""

import dataclasses
import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import (splash_attention_kernel as kernel_lib,
                                                              splash_attention_mask as mask_lib)


BLOCK = 128  # the kernel's tile along T and S; sequence lengths must be multiples of it


@dataclasses.dataclass(frozen=True)
class MaskPattern:
  """The static part of a mask: its length, whether it is causal, and the block
  [image_start, image_start + image_len) of full attention inside a causal mask."""
  length: int
  causal: bool = True
  image_start: int = 0
  image_len: int = 0

  def mask(self) -> mask_lib.Mask:
    shape = (self.length, self.length)
    if not self.causal:
      return mask_lib.FullMask(shape)
    if self.image_len == 0:
      return mask_lib.CausalMask(shape)
    allowed = np.tril(np.ones(shape, bool))
    end = self.image_start + self.image_len
    allowed[self.image_start:end, self.image_start:end] = True
    return mask_lib.NumpyMask(allowed)


@flax.struct.dataclass
class KernelMask:
  """What attention gets instead of a dense mask: segment ids [B, T] and the pattern."""
  segment_ids: jax.Array
  pattern: MaskPattern = flax.struct.field(pytree_node=False)


def applies(length: int, cached: bool) -> bool:
  """Whether a pass can use the kernel: no KV cache and a whole number of tiles."""
  return not cached and length % BLOCK == 0


def _kernel(pattern: MaskPattern, num_heads: int):
  # Built in every trace that needs it: the kernel keeps arrays made in the current trace.
  sizes = kernel_lib.BlockSizes(block_q=BLOCK, block_kv=BLOCK, block_kv_compute=BLOCK,
                                block_q_dkv=BLOCK, block_kv_dkv=BLOCK,
                                block_kv_dkv_compute=BLOCK, block_q_dq=BLOCK, block_kv_dq=BLOCK)
  return kernel_lib.make_splash_mha(mask_lib.MultiHeadMask([pattern.mask()] * num_heads),
                                    block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    interpret=jax.default_backend() != 'tpu')


def _local_attention(q, k, v, segment_ids, pattern: MaskPattern):
  """One shard: q [b, T, h, E], k/v [b, S, k, E], segment_ids [b, T] -> [b, T, h, E]."""
  groups = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  kernel = _kernel(pattern, q.shape[2])
  scale = jnp.asarray(q.shape[-1]**-0.5, q.dtype)

  def one_row(q, k, v, segments):  # the kernel takes [H, T, E]
    ids = kernel_lib.SegmentIds(q=segments, kv=segments)
    out = kernel(jnp.swapaxes(q * scale, 0, 1), jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1),
                 segment_ids=ids)
    return jnp.swapaxes(out, 0, 1)

  return jax.vmap(one_row)(q, k, v, segment_ids)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: KernelMask) -> jax.Array:
  """Splash attention of q [B, T, H, E] over k, v [B, S, K, E] -> [B, T, H, E]."""
  local = functools.partial(_local_attention, pattern=mask.pattern)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return local(q, k, v, mask.segment_ids)
  # Pallas calls are not partitioned by XLA: run the kernel on each shard's rows and heads.
  q_spec = nn.logical_to_mesh_axes(('batch', 'length', 'heads', 'head_dim'))
  kv_spec = nn.logical_to_mesh_axes(('batch', 'length', 'kv_heads', 'head_dim'))
  row_spec = nn.logical_to_mesh_axes(('batch', 'length'))
  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, row_spec),
                       out_specs=q_spec, check_vma=False)(q, k, v, mask.segment_ids)
