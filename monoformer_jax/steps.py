"""Train state, the two pure step kinds, and their construction under a mesh.

An `ar` step takes next-token cross-entropy on text under the causal mask; a
`diffusion` step takes the IDDPM hybrid loss on noised images under the image
mask. Each is a pure function of (state, batch, key); keys come from
fold_in(seed key, step), so a resumed run replays the same randomness. A step
whose loss or gradient norm is not finite leaves the state as it was (metric
`skipped` is 1); state.step counts the updates applied.
Dimension letters: B batch, S text length, P prompt length, V vocabulary.
"""

import dataclasses
import enum
import functools
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from monoformer_jax import cross_entropy, diffusion, sharding
from monoformer_jax.layers import MaskType
from monoformer_jax.model import MonoFormer


class StepKind(enum.Enum):
  AR = 'ar'
  DIFFUSION = 'diffusion'


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """What the step functions need from the config (hashable: static under jit)."""
  lm_loss_weight: float
  diffusion_loss_weight: float
  ema_decay: float
  num_timesteps: int
  im_end_id: int
  loss_chunk: int = 0  # tokens per cross-entropy chunk; 0 = the whole batch at once
  learning_rate: Callable[[jax.Array], jax.Array] = optax.constant_schedule(0.0)  # for the logs

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, im_end_id: int) -> 'StepConfig':
    return cls(config.train.lm_loss_weight,
               config.train.diffusion_loss_weight, config.train.ema_decay,
               config.diffusion.num_timesteps, im_end_id, config.train.loss_chunk,
               learning_rate(config.optim, config.train.num_steps))


def step_kind(seed: int, step: int, ar_weight: float, diffusion_weight: float) -> StepKind:
  """The seeded mixture schedule: the kind of step `step`, a pure function of (seed, step)."""
  u = np.random.default_rng([seed, step]).random()
  return StepKind.AR if u < ar_weight / (ar_weight + diffusion_weight) else StepKind.DIFFUSION


def learning_rate(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """The learning rate after n applied updates: constant, or warmup then optional cosine decay."""
  if optim.cosine_decay:
    return optax.warmup_cosine_decay_schedule(0.0, optim.learning_rate, optim.warmup_steps,
                                              max(num_steps, optim.warmup_steps + 1))
  if optim.warmup_steps:
    return optax.linear_schedule(0.0, optim.learning_rate, optim.warmup_steps)
  return optax.constant_schedule(optim.learning_rate)


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  """AdamW after global-norm clipping, on the learning_rate schedule."""
  lr = learning_rate(optim, num_steps)
  if not (optim.cosine_decay or optim.warmup_steps):
    lr = optim.learning_rate  # a float keeps the optimizer state free of a step count
  return optax.chain(optax.clip_by_global_norm(optim.grad_clip),
                     optax.adamw(lr, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay))


def example_inputs(model: MonoFormer, batch: int = 1, length: int = 4):
  img = model.image
  return (jnp.zeros((batch, length), jnp.int32), jnp.ones((batch, length), bool),
          jnp.zeros((batch, img.height, img.width, img.channels), jnp.float32),
          jnp.zeros((batch,), jnp.int32))


def init_params(model: MonoFormer, key: jax.Array):
  """The parameters a run starting from `key` begins with (logically boxed)."""
  return model.init(key, *example_inputs(model), method=MonoFormer.init_all)['params']


def _init_boxed(model: MonoFormer, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
  params = init_params(model, key)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=params)


def abstract_state(model, tx, layout: sharding.Layout) -> tuple[TrainState, Any]:
  """The state's shapes (nothing allocated) and its NamedShardings on the layout's mesh."""
  boxed = jax.eval_shape(functools.partial(_init_boxed, model, tx), jax.random.key(0))
  shardings = sharding.logical_shardings(boxed, layout)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.unbox(boxed), shardings)
  return abstract, shardings


def init_state(model, tx, layout: sharding.Layout, key: jax.Array) -> TrainState:
  """A fresh state created directly in its shards (never whole on one device)."""
  _, shardings = abstract_state(model, tx, layout)
  init = jax.jit(lambda k: nn.unbox(_init_boxed(model, tx, k)), out_shardings=shardings)
  with sharding.activate(layout):
    return init(key)


def _apply_gradients(state: TrainState, grads, loss: jax.Array, tx,
                     cfg: StepConfig) -> tuple[TrainState, dict]:
  """The updated state, or the same state when the loss or the gradients are not finite."""
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def update(state: TrainState) -> TrainState:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(lambda e, p: cfg.ema_decay * e + (1.0 - cfg.ema_decay) * p,
                       state.ema_params, params)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)

  metrics = dict(grad_norm=grad_norm, skipped=(~finite).astype(jnp.float32),
                 learning_rate=jnp.asarray(cfg.learning_rate(state.step), jnp.float32))
  return jax.lax.cond(finite, update, lambda s: s, state), metrics


def next_token_loss(model: MonoFormer, params, tokens: jax.Array, valid: jax.Array, chunk: int,
                    loss_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy of predicting tokens [B, S] from their prefixes; and the count.

  Only tokens where loss_mask [B, S] is set are predicted (default: every valid one).
  The logits are made `chunk` tokens at a time (0 = all at once); see cross_entropy.
  """
  hidden = model.apply({'params': params}, tokens, valid, mask_type=MaskType.CAUSAL,
                       return_hidden=True).hidden  # [B, S, D]
  # Position s predicts token s + 1; the last position predicts nothing (weight 0).
  labels = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
  learn = valid if loss_mask is None else valid & loss_mask
  weights = jnp.concatenate([learn[:, 1:] & valid[:, :-1], jnp.zeros_like(valid[:, :1])], axis=1)
  weights = weights.reshape(-1).astype(jnp.float32)
  head_name = 'embed_tokens' if model.tie_embeddings else 'lm_head'
  head = lambda head_params, h: model.apply({'params': {head_name: head_params}}, h,  # noqa: E731
                                            method=MonoFormer.logits)
  chunk = chunk if 0 < chunk < tokens.size else tokens.size
  total = cross_entropy.weighted_cross_entropy(head, params[head_name],
                                               hidden.reshape(tokens.size, -1),
                                               labels.reshape(-1), weights, chunk)
  count = weights.sum()
  return total / jnp.maximum(count, 1.0), count


def ar_step(state: TrainState, batch: dict, key: jax.Array, *, model: MonoFormer,
            tx: optax.GradientTransformation, cfg: StepConfig) -> tuple[TrainState, dict]:
  """One language-model step on batch {'tokens', 'valid', 'loss_mask'} (each [B, S])."""
  del key  # no randomness in the text step

  def loss_fn(params):
    loss, _ = next_token_loss(model, params, batch['tokens'], batch['valid'], cfg.loss_chunk,
                              batch['loss_mask'])
    return loss * cfg.lm_loss_weight, loss

  (_, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state, metrics = _apply_gradients(state, grads, loss, tx, cfg)
  return state, dict(metrics, loss=loss)


def diffusion_step(state: TrainState, batch: dict, key: jax.Array, *, model: MonoFormer,
                   tx: optax.GradientTransformation, cfg: StepConfig) -> tuple[TrainState, dict]:
  """One denoising step on batch {'tokens' [B, P], 'valid' [B, P], 'image' [B, H, W, C]}."""
  schedule = diffusion.make_schedule(cfg.num_timesteps)
  x0 = batch['image']
  t_key, noise_key = jax.random.split(key)
  t = jax.random.randint(t_key, x0.shape[:1], 0, cfg.num_timesteps)
  noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
  xt = diffusion.q_sample(schedule, x0, t, noise)
  suffix = jnp.full(x0.shape[:1] + (1,), cfg.im_end_id, jnp.int32)

  def loss_fn(params):
    out = model.apply({'params': params}, batch['tokens'], batch['valid'],
                      mask_type=model.image_mask, image=xt, t=t, suffix=suffix).image
    terms = jax.tree.map(jnp.mean, diffusion.training_loss(schedule, out, x0, xt, t, noise))
    return terms['loss'] * cfg.diffusion_loss_weight, terms

  (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state, metrics = _apply_gradients(state, grads, terms['loss'], tx, cfg)
  return state, dict(terms, **metrics)


def jit_steps(model, tx, cfg: StepConfig, layout: sharding.Layout,
              state_shardings) -> dict[StepKind, Any]:
  """Both step kinds jitted with state shardings in and out and the state donated."""
  batch_sharding = sharding.batch_sharding(layout)
  replicated = sharding.replicated(layout)
  steps = {}
  for kind, fn in ((StepKind.AR, ar_step), (StepKind.DIFFUSION, diffusion_step)):
    steps[kind] = jax.jit(functools.partial(fn, model=model, tx=tx, cfg=cfg),
                          in_shardings=(state_shardings, batch_sharding, replicated),
                          out_shardings=(state_shardings, replicated), donate_argnums=0)
  return steps
