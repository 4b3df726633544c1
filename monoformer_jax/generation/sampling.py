"""Compiled samplers: images by any of diffusion.Sampler with classifier-free guidance, text
by a KV-cached decode loop. Each whole loop is one XLA program.

Dimension letters: B batch, P prompt length, H/W/C image, V vocabulary.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from monoformer_jax import diffusion
from monoformer_jax.base.errors import UserError
from monoformer_jax.config import schema
from monoformer_jax.diffusion import (Guidance, GuidanceChannels, Process, Sampler, Solver,
                                      TimeSpacing, Training)
from monoformer_jax.nn.layers import KVCache, MaskType
from monoformer_jax.nn.model import MonoFormer


@dataclasses.dataclass(frozen=True)
class ImageSampling:
  """How images are sampled; the attention mask is the model's image_mask."""
  sampler: Sampler
  steps: int
  guidance: Guidance
  num_timesteps: int = 1000
  spacing: TimeSpacing = TimeSpacing.TIME  # DPM-Solver++'s steps
  # The prompt never attends to the image (unless the mask is bidirectional), so
  # its keys and values are computed once instead of at every step.
  cache_prefix: bool = True

  @classmethod
  def from_config(cls, sample, process: Training) -> 'ImageSampling':
    """The config's `sample` section: the one place its choices are parsed ('auto' is the
    sampler of the model's diffusion process)."""
    sampler = (Sampler.default_for(process.process) if sample.sampler == 'auto'
               else schema.choice(Sampler, sample.sampler, 'sample.sampler'))
    return cls(sampler, sample.steps, Guidance(sample.cfg_scale, schema.choice(
        GuidanceChannels, sample.guidance_channels, 'sample.guidance_channels')),
               process.num_timesteps,
               schema.choice(TimeSpacing, sample.time_spacing, 'sample.time_spacing'))

  def but(self, sampler: Sampler | None = None, steps: int | None = None,
          cfg_scale: float | None = None, spacing: TimeSpacing | None = None) -> 'ImageSampling':
    """This spec with the given settings (command-line flags) replacing its own."""
    guidance = self.guidance if cfg_scale is None else dataclasses.replace(self.guidance,
                                                                           scale=cfg_scale)
    return dataclasses.replace(self, sampler=self.sampler if sampler is None else sampler,
                               steps=self.steps if steps is None else steps, guidance=guidance,
                               spacing=self.spacing if spacing is None else spacing)

  @property
  def solver(self) -> Solver:
    return Solver(self.sampler, self.steps, self.num_timesteps, self.spacing)


def check_fits(spec: ImageSampling, process: Process, where: str) -> None:
  """A UserError when spec cannot sample a model of `process`; `where` names what set the
  sampler and its steps (flags, config keys)."""
  if spec.sampler.process != process:
    fitting = ', '.join(s.value for s in Sampler if s.process == process)
    raise UserError(f'the sampler {spec.sampler.value!r} ({where}) samples '
                    f'{spec.sampler.process.value} models, and this one is {process.value} '
                    f'(diffusion.process); expected one of {fitting}.')
  try:
    spec.solver.check()
  except ValueError as e:
    raise UserError(f'{spec.steps} steps of {spec.sampler.value} ({where}): {e}.') from None


def make_denoiser(model: MonoFormer, spec: ImageSampling):
  """(prepare, predict) for one sampling run.

  prepare(params, prompt [B, P], valid, null_prompt, null_valid, suffix [B, Q]) -> context
  predict(params, context, x [B, H, W, C], t [B]) -> the guided network output at the network's
  time t, what spec.solver steps with."""
  guided = spec.guidance.scale != 1.0
  use_cache = spec.cache_prefix and model.image_mask != MaskType.BIDIRECTIONAL

  def prepare(params, prompt, valid, null_prompt, null_valid, suffix):
    if guided:
      prompt, valid = jnp.concatenate([prompt, null_prompt]), jnp.concatenate([valid, null_valid])
      suffix = jnp.concatenate([suffix, suffix])
    if not use_cache:
      return prompt, valid, suffix, None
    length = model.image.sequence(prompt.shape[1], suffix.shape[1]).length
    cache = KVCache.empty(model.backbone, prompt.shape[0], length)
    cache = model.apply({'params': params}, prompt, valid, mask_type=MaskType.CAUSAL,
                        cache=cache, return_hidden=True).cache
    return prompt[:, :0], valid[:, :0], suffix, cache

  def predict(params, context, x, t):
    tokens, valid, suffix, cache = context
    batch = x.shape[0]
    x_in, t_in = (jnp.concatenate([x, x]), jnp.concatenate([t, t])) if guided else (x, t)
    out = model.apply({'params': params}, tokens, valid, mask_type=model.image_mask, image=x_in,
                      t=t_in, suffix=suffix, cache=cache).image
    if guided:
      out = spec.guidance.combine(out[:batch], out[batch:], model.image.channels)
    return out

  return prepare, predict


@functools.lru_cache(maxsize=8)  # one compilation per model and spec, however often sampled
def make_image_sampler(model: MonoFormer, spec: ImageSampling):
  """Returns jitted fn(params, prompt [B, P], valid, null_prompt, null_valid, suffix [B, Q], key)."""
  prepare, predict = make_denoiser(model, spec)
  img = model.image

  @jax.jit
  def sample(params, prompt, valid, null_prompt, null_valid, suffix, key):
    init_key, loop_key = jax.random.split(key)
    x = jax.random.normal(init_key, (prompt.shape[0], img.height, img.width, img.channels),
                          jnp.float32)
    context = prepare(params, prompt, valid, null_prompt, null_valid, suffix)
    return diffusion.integrate(spec.solver, lambda x, t: predict(params, context, x, t), x,
                               loop_key)

  return sample


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """Keeps the top_k largest logits [B, V] and the smallest set with mass >= top_p."""
  neg = jnp.finfo(logits.dtype).min
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    mass_before = jnp.cumsum(jax.nn.softmax(sorted_logits), axis=-1) - jax.nn.softmax(sorted_logits)
    sorted_logits = jnp.where(mass_before >= top_p, neg, sorted_logits)
    logits = jnp.zeros_like(logits).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
  return logits


@functools.partial(jax.jit, static_argnames=('model', 'max_tokens', 'top_k', 'top_p', 'use_cache'))
def generate(model: MonoFormer, params, prompt: jax.Array, valid: jax.Array, key: jax.Array, *,
             max_tokens: int, temperature: float, top_k: int, top_p: float, stop_ids,
             pad_id: int, use_cache: bool = True, understand=None) -> jax.Array:
  """Continues left-padded prompts [B, P]; returns [B, max_tokens] (pad after the first of
  stop_ids, a sequence of ids that end a turn, which is kept).

  With use_cache=False every step recomputes the whole prefix (the reference
  the cached loop is measured against). understand: the images the prompts read (an
  nn.understanding.Understanding over the P prompt slots)."""
  batch, length = prompt.shape
  total = length + max_tokens

  def pick(logits, i):
    logits = filter_logits(logits / jnp.maximum(temperature, 1e-6), top_k, top_p)
    sampled = jax.random.categorical(jax.random.fold_in(key, i), logits)
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)

  def run(tokens, tok_valid, cache, read=None):
    return model.apply({'params': params}, tokens, tok_valid, mask_type=MaskType.CAUSAL,
                       cache=cache, understand=read)

  if use_cache:
    out = run(prompt, valid, KVCache.empty(model.backbone, batch, total), understand)
    state = (out.logits[:, -1], out.cache)
  else:
    seq = jnp.concatenate([prompt, jnp.full((batch, max_tokens), pad_id, prompt.dtype)], axis=1)
    seq_valid = jnp.concatenate([valid, jnp.zeros((batch, max_tokens), bool)], axis=1)
    state = (run(prompt, valid, None, understand).logits[:, -1], (seq, seq_valid))
    if understand is not None:  # the whole sequence's slots: none among the generated tokens
      grow = lambda a: jnp.pad(a, ((0, 0), (0, max_tokens)))  # noqa: E731
      understand = understand.replace(slot=grow(understand.slot), offset=grow(understand.offset))

  def body(carry, i):
    logits, done, state_rest = carry
    token = jnp.where(done, pad_id, pick(logits, i))
    alive = ~done
    if use_cache:
      out = run(token[:, None], alive[:, None], state_rest)
      new_rest, next_logits = out.cache, out.logits[:, -1]
    else:
      seq, seq_valid = state_rest
      seq = seq.at[:, length + i].set(token)
      seq_valid = seq_valid.at[:, length + i].set(alive)
      logits_all = run(seq, seq_valid, None, understand).logits
      next_logits, new_rest = logits_all[:, length + i], (seq, seq_valid)
    return (next_logits, done | jnp.isin(token, jnp.asarray(stop_ids)), new_rest), token

  init = (state[0], jnp.zeros((batch,), bool), state[1])
  _, tokens = jax.lax.scan(body, init, jnp.arange(max_tokens))
  return tokens.T


def images_for_prompts(model: MonoFormer, params, tok, prompts: list[str], prompt_len: int,
                       spec: ImageSampling, key: jax.Array) -> np.ndarray:
  """Samples one image per prompt: [len(prompts), H, W, C] float32, roughly in [-1, 1]."""
  tokens, valid = map(np.stack, zip(*[tok.image_prompt(p, prompt_len) for p in prompts]))
  null = [np.broadcast_to(x, tokens.shape) for x in tok.image_prompt('', prompt_len)]
  suffix = np.full((len(prompts), 1), tok.im_end_id, np.int32)
  images = make_image_sampler(model, spec)(params, tokens, valid, *null, suffix, key)
  return np.asarray(multihost_utils.process_allgather(images, tiled=True))  # every host, whole
