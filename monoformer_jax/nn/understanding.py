"""Images the sequence reads (image understanding, as the official main branch has it): how the
features of the vision encoder (nn.vision) fill their slots of the sequence.

An image to understand takes 1 + M slots: a time token (the official code gives every image one,
of the row's timestep), then M feature tokens, each the encoder's features [E] through the
im_embedder (Linear -> GELU -> Linear). They attend causally, like text, and carry neither the
2-D position embedding nor a loss. The encoders are frozen and run outside the differentiated
step (model.vision_encoder; the network sees only their features).
Dimension letters: B batch, S sequence, I images per row, M feature tokens per image, E features,
D width.
"""

import flax.struct
import jax.numpy as jnp

from monoformer_jax.nn.layers import Array


@flax.struct.dataclass
class Understanding:
  """What a pass needs to place I images per row among its tokens."""
  features: Array  # [B, I, M, E] from the vision encoder (rows with fewer images: anything)
  slot: Array  # [B, S] int32: 1 + i at the 1 + M slots of image i, 0 at text
  offset: Array  # [B, S] int32: 0 at an image's time token, 1 + m at its feature token m
  t: Array  # [B] the timestep of the row's time tokens (the generated image's, if any)


def place(embeds: Array, understand: Understanding, time_tokens: Array,
          feature_tokens: Array) -> Array:
  """embeds [B, S, D] with each image slot replaced: time_tokens [B, D] at offset 0,
  feature_tokens [B, I, M, D] after it."""
  b, i, m, d = feature_tokens.shape
  per_image = jnp.concatenate(
      [jnp.broadcast_to(time_tokens[:, None, None].astype(feature_tokens.dtype), (b, i, 1, d)),
       feature_tokens], axis=2).reshape(b, i * (m + 1), d)
  index = jnp.clip((understand.slot - 1) * (m + 1) + understand.offset, 0, i * (m + 1) - 1)
  filled = jnp.take_along_axis(per_image, index[..., None], axis=1)
  return jnp.where((understand.slot > 0)[..., None], filled.astype(embeds.dtype), embeds)


def example(batch: int, length: int, num_images: int, tokens_per_image: int,
            features: int) -> Understanding:
  """Zeros of the shapes a pass with understanding takes (for init)."""
  return Understanding(jnp.zeros((batch, num_images, tokens_per_image, features), jnp.float32),
                       jnp.zeros((batch, length), jnp.int32), jnp.zeros((batch, length), jnp.int32),
                       jnp.zeros((batch,), jnp.int32))
