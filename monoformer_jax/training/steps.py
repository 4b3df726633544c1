"""Train state, the pure step kinds, and their construction under a mesh.

An `ar` step takes next-token cross-entropy on text under the causal mask; a `diffusion` step takes
the IDDPM hybrid loss on noised images under the image mask; a `joint` step both, in one update
(objective.py says what each minimizes).
Each is a pure function of (state, batch, key); keys come from fold_in(seed key, step), so a resumed
run replays the same randomness. A step whose loss or gradient norm is not finite leaves the state
as it was (metric `skipped` is 1); state.step counts the updates applied.
Dimension letters: B batch, S text length, P prompt length, V vocabulary.
"""

import dataclasses
import enum
import functools
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from monoformer_jax import diffusion
from monoformer_jax.base import sharding
from monoformer_jax.nn import model as model_lib
from monoformer_jax.nn.model import MonoFormer
from monoformer_jax.training import objective
from monoformer_jax.training.finetune import FinetuneSpec, merge


class StepKind(enum.Enum):
  AR = 'ar'
  DIFFUSION = 'diffusion'
  JOINT = 'joint'  # train.objective 'joint': a text batch and an image batch in one update
  UNDERSTANDING = 'understanding'  # cross-entropy on samples that read images


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """What the step functions need from the config (hashable: static under jit)."""
  loss: objective.LossConfig
  ema_decay: float
  learning_rate: Callable[[jax.Array], jax.Array] = optax.constant_schedule(0.0)  # for the logs
  joint: bool = False  # train.objective is 'joint'
  understanding: bool = False  # samples that read images are trained (their own batches)
  adapter_dropout: bool = False  # lora.dropout: the model drops its adapters' inputs

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, im_end_id: int,
                  kind: objective.Objective, process: diffusion.Training,
                  understanding: bool = False) -> 'StepConfig':
    """From the config's numbers, its objective and diffusion process, parsed once
    (run.settings); understanding: whether it has a source of samples that read images."""
    t = config.train
    loss = objective.LossConfig(t.lm_loss_weight, t.diffusion_loss_weight, process, im_end_id,
                                t.loss_chunk,
                                t.prompt_lm_loss, t.grad_accum)
    return cls(loss, t.ema_decay, learning_rate(config.optim, t.num_steps),
               kind == objective.Objective.JOINT, understanding,
               FinetuneSpec.from_config(config).adapter_dropout)

  @property
  def kinds(self) -> tuple[StepKind, ...]:
    if self.joint:
      return (StepKind.JOINT,)
    return (StepKind.AR, StepKind.DIFFUSION) + ((StepKind.UNDERSTANDING,) if self.understanding
                                                 else ())


def step_kind(seed: int, step: int, ar_weight: float, diffusion_weight: float,
              joint: bool = False, understanding_weight: float = 0.0) -> StepKind:
  """The kind of step `step`: always `joint` under that objective, else the seeded mixture
  schedule's pick, a pure function of (seed, step). Without understanding steps the picks
  are those of the two-kind schedule."""
  if joint:
    return StepKind.JOINT
  u = np.random.default_rng([seed, step]).random()
  total = ar_weight + diffusion_weight + understanding_weight
  if u < ar_weight / total:
    return StepKind.AR
  return StepKind.DIFFUSION if u < (ar_weight + diffusion_weight) / total else (
      StepKind.UNDERSTANDING)


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


def _init_boxed(model: MonoFormer, tx: optax.GradientTransformation, key: jax.Array,
                finetune: FinetuneSpec) -> TrainState:
  params = finetune.split(model_lib.init_params(model, key))[0]  # what trains
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=params)


def abstract_state(model, tx, layout: sharding.Layout,
                   finetune: FinetuneSpec = FinetuneSpec()) -> tuple[TrainState, Any]:
  """The state's shapes (nothing allocated) and its NamedShardings on the layout's mesh; its
  parameters, optimizer state and EMA are those of the parameters that train."""
  boxed = jax.eval_shape(functools.partial(_init_boxed, model, tx, finetune=finetune),
                         jax.random.key(0))
  shardings = sharding.logical_shardings(boxed, layout)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.unbox(boxed), shardings)
  return abstract, shardings


def abstract_params(model, layout: sharding.Layout):
  """The parameters' shapes with their shardings, for inference: no optimizer involved."""
  boxed = jax.eval_shape(functools.partial(model_lib.init_params, model), jax.random.key(0))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nn.unbox(boxed), sharding.logical_shardings(boxed, layout))


def fresh_state(params, tx: optax.GradientTransformation, shardings,
                ema_params=None) -> TrainState:
  """Step 0 on the given parameters and EMA (default: a copy of them, since the steps donate
  both), with a new optimizer state placed as shardings.opt_state."""
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  if ema_params is None:
    ema_params = jax.tree.map(jnp.copy, params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                    ema_params=ema_params)


def init_state(model, tx, layout: sharding.Layout, key: jax.Array) -> TrainState:
  """A fresh state of every parameter, created directly in its shards (never whole on one
  device); a run with a frozen backbone starts from train.init_backbone instead."""
  _, shardings = abstract_state(model, tx, layout)
  init = jax.jit(lambda k: nn.unbox(_init_boxed(model, tx, k, FinetuneSpec())),
                 out_shardings=shardings)
  with sharding.activate(layout):
    return init(key)


def init_params_where(model, layout: sharding.Layout, key: jax.Array, keep) -> dict:
  """The parameters init_state draws from `key`, created in their shards, but only those whose
  path (a tuple of keys) `keep` accepts: the others are left out of the program, so they are
  never drawn (a pretrained backbone's, which are replaced or frozen anyway)."""
  boxed = jax.eval_shape(functools.partial(model_lib.init_params, model), key)

  def kept(tree):
    flat = flax.traverse_util.flatten_dict(tree)
    return flax.traverse_util.unflatten_dict({p: v for p, v in flat.items() if keep(p)})
  # Traced outside the layout's rules: qwix, creating an adapter, checks the adapted kernel's
  # logical names against the adapter's shape. out_shardings places every leaf anyway.
  return jax.jit(lambda k: kept(nn.unbox(model_lib.init_params(model, k))),
                 out_shardings=kept(sharding.logical_shardings(boxed, layout)))(key)


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


def _update(state: TrainState, inputs: dict, frozen, key: jax.Array, *, model: MonoFormer, tx,
            cfg: StepConfig):
  """The state after one update on inputs {'text'?, 'image'?}; metrics: the objective's
  terms (means over the batch), grad_norm, skipped, learning_rate. frozen: the parameters that
  do not train (train.finetune), merged in for the forward passes and never differentiated.
  With adapter dropout, every row gets a key of its own from `key` (objective.dropout_rngs)."""
  if cfg.adapter_dropout:
    key = jax.random.fold_in(key, 5)  # apart from the keys the inputs were drawn with
    inputs = {kind: dict(part, dropout=jax.random.key_data(jax.random.split(
                  jax.random.fold_in(key, i), part['tokens'].shape[0])))
              for i, (kind, part) in enumerate(sorted(inputs.items()))}
  loss = objective.loss_fn(model, cfg.loss, objective.counts_of(inputs, cfg.loss))
  fn = lambda params, inputs: loss(merge(params, frozen), inputs)  # noqa: E731
  (value, terms), grads = objective.value_and_grad(fn, state.params, inputs, cfg.loss.grad_accum)
  state, metrics = _apply_gradients(state, grads, value, tx, cfg)
  return state, dict(terms, **metrics), value


def ar_step(state: TrainState, batch: dict, key: jax.Array, frozen=None, *, model: MonoFormer,
            tx: optax.GradientTransformation, cfg: StepConfig) -> tuple[TrainState, dict]:
  """One language-model step on batch {'tokens', 'valid', 'loss_mask'} (each [B, S]); an
  understanding step when the batch also has the images' 'features' [B, I, M, E], 'slot' and
  'offset' [B, S] (key draws their time tokens)."""
  text = objective.text_inputs(batch, key, cfg.loss.diffusion.num_timesteps)
  state, metrics, _ = _update(state, dict(text=text), frozen, key, model=model, tx=tx, cfg=cfg)
  return state, dict(metrics, loss=metrics.pop('ce'))


def diffusion_step(state: TrainState, batch: dict, key: jax.Array, frozen=None, *,
                   model: MonoFormer, tx: optax.GradientTransformation,
                   cfg: StepConfig) -> tuple[TrainState, dict]:
  """One denoising step on batch {'tokens' [B, P], 'valid' [B, P], 'image' [B, H, W, C]};
  metric `loss` is the diffusion loss (and `ce` the prompts' with train.prompt_lm_loss)."""
  inputs = dict(image=objective.image_inputs(batch, key, cfg.loss))
  return _update(state, inputs, frozen, key, model=model, tx=tx, cfg=cfg)[:2]


def joint_step(state: TrainState, batch: dict, key: jax.Array, frozen=None, *, model: MonoFormer,
               tx: optax.GradientTransformation, cfg: StepConfig) -> tuple[TrainState, dict]:
  """One update on batch {'text': an `ar` batch, 'image': a `diffusion` batch[, 'understand':
  an understanding batch]}, as the official code: metric `loss` is the weighted sum, `diffusion`
  and `ce` its two terms (ce over the text and understanding tokens together)."""
  inputs = dict(text=objective.text_inputs(batch['text']),
                image=objective.image_inputs(batch['image'], key, cfg.loss))
  if 'understand' in batch:
    inputs['understand'] = objective.text_inputs(batch['understand'], jax.random.fold_in(key, 2),
                                                 cfg.loss.diffusion.num_timesteps)
  state, metrics, value = _update(state, inputs, frozen, key, model=model, tx=tx, cfg=cfg)
  return state, dict(metrics, diffusion=metrics.pop('loss'), loss=value)


def jit_steps(model, tx, cfg: StepConfig, layout: sharding.Layout, state_shardings,
              frozen_shardings=None) -> dict[StepKind, Any]:
  """Every step kind jitted with state shardings in and out and the state donated; called as
  (state, batch, key), or (state, batch, key, frozen) when frozen_shardings is given."""
  replicated = sharding.replicated(layout)
  fns = {StepKind.AR: ar_step, StepKind.DIFFUSION: diffusion_step, StepKind.JOINT: joint_step,
         StepKind.UNDERSTANDING: ar_step}
  ins = (state_shardings, sharding.batch_sharding(layout), replicated)
  if frozen_shardings is not None:
    ins += (frozen_shardings,)
  return {kind: jax.jit(functools.partial(fns[kind], model=model, tx=tx, cfg=cfg),
                        in_shardings=ins, out_shardings=(state_shardings, replicated),
                        donate_argnums=0)
          for kind in cfg.kinds}
