"""Mixed-modal generation: the model decides, mid-sequence, to draw.

Text is decoded with the KV cache until a row emits `<im_start>` (or EOS, or its token
budget). The image is then denoised by the configured sampler against the cached sequence,
with guidance from the prefix `BOS <im_start>` alone (what `sample` and training's dropped
prompts use); its time token (t = 0) and image tokens enter the cache as a clean image's
would, `<im_end>` follows as the row's next token, and text decoding continues.

Phases alternate, each one compiled program: `text_phase` (a while loop over tokens) and
`image_phase` (the sampler's loop over steps, then one pass writing the image). Rows of a
batch share the cache's write index: a row that has stopped waits with its slots masked
until the others stop too.
Dimension letters: B batch, S cache length, T emitted tokens, V vocabulary, H/W/C image.
"""

import dataclasses
import functools
import json
import os
from typing import Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from monoformer_jax import diffusion
from monoformer_jax.base import files, images as images_lib, workdir_layout
from monoformer_jax.generation import sampling
from monoformer_jax.nn.layers import KVCache, MaskType
from monoformer_jax.nn.model import MonoFormer


@dataclasses.dataclass(frozen=True)
class Specials:
  """The token ids generation needs (hashable: static under jit)."""
  bos: tuple[int, ...]  # what the tokenizer puts before a text: BOS, or nothing
  stops: tuple[int, ...]  # the ids that end a row (the tokenizer's stop_ids)
  pad: int
  im_start: int
  im_end: int

  @classmethod
  def of(cls, tok) -> 'Specials':
    return cls(tuple(tok.bos), tuple(tok.stop_ids), tok.pad_id, tok.im_start_id, tok.im_end_id)


@dataclasses.dataclass(frozen=True)
class Decoding:
  """How tokens are picked (hashable: static under jit)."""
  max_tokens: int  # per row, <im_start> and <im_end> included
  temperature: float
  top_k: int
  top_p: float


@flax.struct.dataclass
class State:
  cache: KVCache
  logits: jax.Array  # [B, V] the next token's
  tokens: jax.Array  # [B, T] emitted so far (pad after the end)
  count: jax.Array  # [B] tokens emitted
  done: jax.Array  # [B] EOS, the budget, or a full cache
  waiting: jax.Array  # [B] emitted <im_start>, awaiting the image
  forced: jax.Array  # [B] the next token when >= 0 (<im_end> after an image), else sampled


@functools.partial(jax.jit, static_argnames=('model', 'decoding', 'specials', 'room'))
def text_phase(model: MonoFormer, params, state: State, key: jax.Array, *, decoding: Decoding,
               specials: Specials, room: int) -> State:
  """Decodes until no row is active (each has stopped or waits for an image) or the cache
  index reaches `room`; rows still active then are done."""

  def active(s: State):
    return ~s.done & ~s.waiting

  def body(s: State) -> State:
    live = active(s)
    logits = sampling.filter_logits(s.logits / max(decoding.temperature, 1e-6), decoding.top_k,
                                    decoding.top_p)
    if decoding.temperature > 0:
      picked = jax.random.categorical(jax.random.fold_in(key, s.cache.index), logits)
    else:
      picked = jnp.argmax(logits, axis=-1)
    token = jnp.where(s.forced >= 0, s.forced, picked.astype(jnp.int32))
    token = jnp.where(live, token, specials.pad)
    out = model.apply({'params': params}, token[:, None], live[:, None],
                      mask_type=MaskType.CAUSAL, cache=s.cache)
    cache, logits = out.cache, out.logits[:, -1]
    rows = jnp.arange(token.shape[0])
    slot = jnp.minimum(s.count, s.tokens.shape[1] - 1)  # rows that stopped may sit at the end
    tokens = s.tokens.at[rows, slot].set(jnp.where(live, token, s.tokens[rows, slot]))
    count = s.count + live
    stop = live & (jnp.isin(token, jnp.asarray(specials.stops)) | (count >= decoding.max_tokens))
    return State(cache=cache, logits=logits, tokens=tokens, count=count, done=s.done | stop,
                 waiting=s.waiting | (live & ~stop & (token == specials.im_start)),
                 forced=jnp.where(live, -1, s.forced))

  state = jax.lax.while_loop(lambda s: active(s).any() & (s.cache.index < room), body, state)
  return state.replace(done=state.done | active(state))


def _stack(a: KVCache, b: KVCache) -> KVCache:
  """Two caches of one index as one of twice the batch."""
  return KVCache(k=jnp.concatenate([a.k, b.k], axis=1), v=jnp.concatenate([a.v, b.v], axis=1),
                 valid=jnp.concatenate([a.valid, b.valid]), index=a.index,
                 next_position=jnp.concatenate([a.next_position, b.next_position]))


@functools.partial(jax.jit, static_argnames=('model', 'spec', 'specials'))
def image_phase(model: MonoFormer, params, state: State, key: jax.Array, *,
                spec: sampling.ImageSampling, specials: Specials) -> tuple[jax.Array, State]:
  """Images [B, H, W, C] sampled against each row's cached sequence (only waiting rows'
  count), written into the cache; waiting rows then emit <im_end>."""
  cache, img = state.cache, model.image
  batch = state.count.shape[0]
  _, predict = sampling.make_denoiser(model, spec)
  suffix = jnp.full((batch, 1), specials.im_end, jnp.int32)
  context_cache = cache
  if spec.guidance.scale != 1.0:
    # The unconditional prefix `BOS <im_start>` in the slots before the write index.
    null_ids = specials.bos + (specials.im_start,)
    null = KVCache(k=jnp.zeros_like(cache.k), v=jnp.zeros_like(cache.v),
                   valid=jnp.zeros_like(cache.valid), index=cache.index - len(null_ids),
                   next_position=jnp.zeros_like(cache.next_position))
    prefix = jnp.tile(jnp.asarray([null_ids], jnp.int32), (batch, 1))
    null = model.apply({'params': params}, prefix, jnp.ones(prefix.shape, bool),
                       mask_type=MaskType.CAUSAL, cache=null).cache
    context_cache, suffix = _stack(cache, null), jnp.concatenate([suffix, suffix])
  empty = jnp.zeros((context_cache.valid.shape[0], 0), jnp.int32)
  context = (empty, empty.astype(bool), suffix, context_cache)
  init_key, loop_key = jax.random.split(key)
  x = jax.random.normal(init_key, (batch, img.height, img.width, img.channels), jnp.float32)
  x = diffusion.integrate(spec.solver, lambda x, t: predict(params, context, x, t), x, loop_key)
  written = model.apply({'params': params}, empty[:batch], empty[:batch].astype(bool),
                        mask_type=model.image_mask, image=x, t=jnp.zeros((batch,), jnp.int32),
                        cache=cache).cache
  return x, state.replace(cache=written, waiting=jnp.zeros_like(state.waiting),
                          forced=jnp.where(state.waiting, specials.im_end, state.forced))


@dataclasses.dataclass
class Generation:
  """One row's result: emitted tokens ([-1] marks where each image sits) and its images."""
  tokens: list[int]
  images: list[np.ndarray]  # [H, W, C] each, as the model samples them (pixels or latents)


def generate(model: MonoFormer, params, prompt: np.ndarray, valid: np.ndarray, key: jax.Array,
             *, tok, spec: sampling.ImageSampling, decoding: Decoding,
             max_images: int, understand=None) -> list[Generation]:
  """Continues left-padded prompts [B, P] with text and up to max_images images per row;
  understand: the pictures the prompts read (an nn.understanding.Understanding over P)."""
  specials = Specials.of(tok)
  batch, length = prompt.shape
  span = model.image.num_patches + 1  # the time token and the image tokens
  total = length + decoding.max_tokens + max_images * span + 1
  out = model.apply({'params': params}, jnp.asarray(prompt), jnp.asarray(valid),
                    mask_type=MaskType.CAUSAL, cache=KVCache.empty(model.backbone, batch, total),
                    understand=understand)
  state = State(cache=out.cache, logits=out.logits[:, -1],
                tokens=jnp.full((batch, decoding.max_tokens), specials.pad, jnp.int32),
                count=jnp.zeros((batch,), jnp.int32), done=jnp.zeros((batch,), bool),
                waiting=jnp.zeros((batch,), bool), forced=jnp.full((batch,), -1, jnp.int32))
  drawn = []  # (rows that waited [B], images [B, H, W, C]) per image phase
  for phase in range(max_images + 1):
    # Text may fill the cache but for the images still allowed.
    state = text_phase(model, params, state, jax.random.fold_in(key, 2 * phase), decoding=decoding,
                       specials=specials, room=total - (max_images - phase) * span)
    waiting = np.asarray(state.waiting)
    if not waiting.any() or phase == max_images:
      break
    images, state = image_phase(model, params, state, jax.random.fold_in(key, 2 * phase + 1),
                                spec=spec, specials=specials)
    drawn.append((waiting, np.asarray(images)))
  tokens, count = np.asarray(state.tokens), np.asarray(state.count)
  return [Generation(tokens[row, :count[row]].tolist(),
                     [x[row] for waited, x in drawn if waited[row]]) for row in range(batch)]


def describe(generation: Generation, tok, image_names: list[str]) -> str:
  """The row as text, each drawn image as [image NAME] after its <im_start>."""
  pieces, text, images = [], [], iter(image_names)
  for token in generation.tokens:
    if token == tok.im_start_id:
      pieces.append(tok.decode(text))
      text = []
      name = next(images, None)
      pieces.append(f' [image {name}] ' if name else ' [image not drawn] ')
    elif token != tok.im_end_id:
      text.append(token)
  pieces.append(tok.decode(text))
  return ''.join(pieces).strip()


def write_record(out_dir: str, prompt: str, rows: list[Generation], tok,
                 decode: Optional[Callable[[jax.Array], jax.Array]]) -> list[str]:
  """OUT_DIR/<row>_<k>.png for every drawn image (latents decoded by `decode`) and
  OUT_DIR/generation.json with each row's prompt, text, tokens and pictures; returns each
  row's text with [image NAME] placeholders (process 0 writes)."""
  texts, record = [], []
  leader = jax.process_index() == 0
  if leader:
    files.makedirs(out_dir)
  for r, row in enumerate(rows):
    names = [workdir_layout.generation_picture(r, k) for k in range(len(row.images))]
    for name, image in zip(names, row.images):
      pixels = images_lib.to_uint8(decode(image[None]) if decode else image[None])
      if leader:
        images_lib.write_png(os.path.join(out_dir, name), pixels, columns=1)
    texts.append(describe(row, tok, names))
    record.append(dict(prompt=prompt, text=texts[-1], tokens=row.tokens, images=names))
  if leader:
    files.write_text(workdir_layout.generation_record(out_dir), json.dumps(record, indent=1))
  return texts
