"""The training loop: `train_and_evaluate(config, workdir)`.

Resumes from the newest checkpoint in the workdir that restores (train state, both data-iterator
states), alternates `ar` and `diffusion` steps by the seeded mixture schedule (or takes `joint`
steps on both streams, train.objective), logs to TensorBoard and WORKDIR/metrics.jsonl, and
evaluates at the end. Checkpoints come every train.checkpoint_every steps, every
train.checkpoint_minutes, at the end, and at a preemption notice, after which the run stops with
guards.Preempted. Steps that are not finite are skipped; train.max_skipped_steps of them in a row
stop the run.
"""

import dataclasses
import os
import sys
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from monoformer_jax.base import files, sharding
from monoformer_jax.base.errors import UserError
from monoformer_jax.base.workdir_layout import EVAL_JSON, Workdir
from monoformer_jax.data import common, pipeline
from monoformer_jax.evaluation import default_eval, periodic as evaluators
from monoformer_jax.nn import converted, vae
from monoformer_jax.run import backbone, settings as settings_lib, workdir as workdir_lib
from monoformer_jax.run import workdir_lock
from monoformer_jax.training import checkpoint, finetune, guards, steps
from monoformer_jax.training.metrics_log import MetricsLog
from monoformer_jax.training.steps import StepKind


def init_backbone(setup: workdir_lib.Setup, shardings, key: jax.Array):
  """A fresh state whose backbone is the converted LLM of model.init_from and whose own
  modules (and LoRA adapters) are drawn from `key` as in a run from scratch. Where
  train.finetune freezes the backbone, the state holds what trains and setup.frozen the rest."""
  model, finetune = setup.model, setup.settings.finetune
  if finetune.frozen:
    params = steps.init_params_where(model, setup.layout, key, finetune.trains)
  else:
    pretrained = workdir_lib.backbone_on_devices(setup)
    own = steps.init_params_where(model, setup.layout, key, lambda path: path[0] not in pretrained)
    params = dict(own, **pretrained)
  return steps.fresh_state(params, setup.tx, shardings)


def _from_weights(workdir: str, setup: workdir_lib.Setup, abstract, shardings):
  """A fresh train state on the parameters and EMA of a workdir a conversion wrote."""
  reader = checkpoint.Checkpointer(workdir, create=False)  # restoring parts needs its own manager
  step = reader.latest_step()
  params, ema = (reader.restore_params(step, abstract.params, use_ema) for use_ema in (False, True))
  reader.close()
  return steps.fresh_state(params, setup.tx, shardings, ema)


class _SaveClock:
  """train.checkpoint_minutes: whether that long has passed since the last save, decided by
  process 0 at logged steps so that every process saves at the same step."""

  def __init__(self, minutes: float):
    self.seconds, self.last = 60.0 * minutes, time.monotonic()

  def due(self) -> bool:
    if not self.seconds:
      return False
    late = np.int32(time.monotonic() - self.last >= self.seconds)
    return bool(multihost_utils.broadcast_one_to_all(late))

  def saved(self) -> None:
    self.last = time.monotonic()


def _profile(workdir: str, t: ml_collections.ConfigDict, done: int, state) -> None:
  """Traces steps [profile_start, profile_start + profile_steps) into WORKDIR/plugins/profile."""
  if not t.profile_steps or jax.process_index() != 0:
    return
  if done == t.profile_start:
    jax.profiler.start_trace(Workdir(workdir).tensorboard)
  elif done == t.profile_start + t.profile_steps:
    jax.block_until_ready(state)
    jax.profiler.stop_trace()


@dataclasses.dataclass
class _Run:
  """Everything the loop works on, restored or fresh."""
  setup: workdir_lib.Setup
  ckpt: checkpoint.Checkpointer
  iterators: dict
  step_fns: dict
  encode: Any  # pixels -> latents on the devices, or None
  see: Any  # images to understand -> their features (model.vision_encoder), or None
  state: steps.TrainState
  start: int


def _prepare(config: ml_collections.ConfigDict, workdir: str) -> _Run:
  """Checks every input, then creates the workdir and restores or initializes the run. A new
  workdir is removed again if anything fails before the first step. Model size 'auto' is
  resolved here, so the saved config names the shape."""
  config = backbone.resolve_auto(config)
  layout = sharding.make_layout(config.mesh)
  image_shape = (*config.model.image_size, config.model.image_channels)
  fresh = not files.exists(workdir)
  ckpt = setup = None
  try:
    setup = workdir_lib.for_training(config, workdir, layout)
    tok, model, tx, settings = setup.tok, setup.model, setup.tx, setup.settings
    encode = None
    if config.model.vae and settings.image_source.pixels:  # pixels encoded to latents on the fly
      encode = vae.pixel_encoder(config.model.vae, layout, config.data.image_resolution,
                                 image_shape)
    abstract, shardings = steps.abstract_state(model, tx, layout, settings.finetune)
    reading = settings.vision.reading()
    # The data is read before the checkpoint manager starts its background clean-up, which
    # must not race the removal of a new workdir when a data file is bad.
    datasets = {
        StepKind.AR: pipeline.text_dataset(config.data, settings.text_source, tok, config.seed,
                                           settings.chat_format),
        StepKind.DIFFUSION: pipeline.image_dataset(config.data, settings.image_source, tok,
                                                   config.seed, image_shape, reading)}
    see = None
    if settings.understanding:
      datasets[StepKind.UNDERSTANDING] = pipeline.understanding_dataset(
          config.data, settings.understanding_source, tok, config.seed, reading)
    if settings.understanding or settings.image_source == pipeline.ImageSource.LLAVA_JSON:
      see = settings.vision.feature_encoder(layout, encode)
    iterators = {kind: common.iterator(ds) for kind, ds in datasets.items()}
    ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints,
                                   async_saves=settings.async_saves.enabled())
    if ckpt.all_steps() and not ckpt.has_optimizer_state(ckpt.all_steps()[0]):
      setup = workdir_lib.with_frozen_backbone(setup)
      start, state = 0, _from_weights(workdir, setup, abstract, shardings)
    elif ckpt.all_steps():
      workdir_lib.check_same_state(ckpt, config, layout)
      start, (state, data_state, setup) = ckpt.newest_restorable(lambda s: (
          *ckpt.restore(s, abstract), workdir_lib.with_frozen_backbone(setup, ckpt, s)))
      for kind, it in iterators.items():
        it.set_state(data_state[kind.value])
      if jax.process_index() == 0:
        print(f'resuming from checkpoint step {start} in {ckpt.directory}', flush=True)
    else:
      start, setup = 0, workdir_lib.with_frozen_backbone(setup)
      key = jax.random.key(config.seed)
      if not config.model.init_from:
        state = steps.init_state(model, tx, layout, key)
      else:
        state = init_backbone(setup, shardings, key)
        if jax.process_index() == 0:  # the LLM's description, for `convert export-llama`
          files.copy(os.path.join(config.model.init_from, converted.MODEL_JSON),
                     Workdir(workdir).llm_source)
  except BaseException:
    if ckpt is not None:
      ckpt.close()
    if setup is not None and setup.lock:
      setup.lock.close()
    if fresh and jax.process_index() == 0:
      files.rmtree(workdir)
    raise
  step_config = steps.StepConfig.from_config(config, tok.im_end_id, settings.objective,
                                             settings.diffusion, settings.understanding)
  if step_config.adapter_dropout:  # the steps' model drops the adapters' inputs; no other does
    model = settings_lib.build_model(config, training=True)
  step_fns = steps.jit_steps(model, tx, step_config, layout, shardings,
                             None if setup.frozen is None else jax.tree.map(
                                 lambda a: a.sharding, setup.frozen))
  return _Run(setup, ckpt, iterators, step_fns, encode, see, state, start)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains to config.train.num_steps (resuming if possible); returns the final eval metrics."""
  run = _prepare(config, workdir)
  try:
    return _train(run, workdir)
  finally:
    if run.setup.lock:
      run.setup.lock.close()


def _train(run: _Run, workdir: str) -> dict:
  setup, ckpt, iterators, state = run.setup, run.ckpt, run.iterators, run.state
  config, layout, t = setup.config, setup.layout, setup.config.train
  finished = _finished_eval(workdir, run.start, t)
  if finished is not None:
    ckpt.close()
    return finished
  log = MetricsLog(workdir, run.start, t.num_steps, setup.lock)
  notice, guard = guards.PreemptionNotice(), guards.SkipGuard(t.max_skipped_steps)
  clock = _SaveClock(t.checkpoint_minutes)
  joint = StepKind.JOINT in run.step_fns
  seed_key = jax.random.key(config.seed)
  periodic = evaluators.from_config(setup)
  frozen = () if setup.frozen is None else (setup.frozen,)  # the steps' last argument, if any
  held = False  # a save is due but held back while steps of some kind are being skipped

  def save(step: int) -> bool:
    """Saves the state at `step`, unless steps are being skipped (then returns False)."""
    _stop_if_diverged(guard.flush(), ckpt)
    workdir_lock.check_held(setup.lock, workdir)
    if guard.streak and step != t.num_steps:
      return False
    if guard.streak and jax.process_index() == 0:  # the end: shorter than the limit, kept
      print(f'warning: {_describe(guard)} and were skipped.', file=sys.stderr, flush=True)
    data = {k.value: it.get_state() for k, it in iterators.items()}
    if setup.base:
      data[checkpoint.FROZEN_BASE] = setup.base
    # train.checkpoint_frozen: the frozen backbone too (4-bit kernels widened only while saved)
    ckpt.save(step, state, data, config, finetune.storable(setup.frozen)
              if setup.settings.finetune.checkpoint_frozen else None)
    log.flush()  # a bucket's metrics.jsonl holds the rows of every step saved
    clock.saved()
    return True

  try:
    with sharding.activate(layout):
      for step in range(run.start, t.num_steps):
        kind = steps.step_kind(config.seed, step, t.ar_weight, t.diffusion_weight, joint,
                               t.understanding_weight)
        # Steps are dispatched asynchronously, so the next batch is read and sent while
        # the device still runs this one; what the loop waits here is the input's cost.
        wait_start = time.perf_counter()
        batch = _next_batch(iterators, kind, layout)
        log.input_wait_s += time.perf_counter() - wait_start
        step_key = jax.random.fold_in(seed_key, step)
        images = batch['image'] if kind == StepKind.JOINT else batch
        if run.encode is not None and kind in (StepKind.DIFFUSION, StepKind.JOINT):
          images['image'] = run.encode(images['image'], jax.random.fold_in(step_key, 1))
        parts = [batch.get('understand'), batch['image']] if kind == StepKind.JOINT else [batch]
        for part in parts:  # pictures read (understanding, interleaved prompts) -> features
          if run.see is not None and part is not None and 'images' in part:
            part['features'] = run.see(part.pop('images'), jax.random.fold_in(step_key, 3))
        with log.compiling(kind.value):  # a step kind's first call compiles it, synchronously
          state, metrics = run.step_fns[kind](state, batch, step_key, *frozen)
        done = step + 1
        _stop_if_diverged(guard.push(done, kind.value, metrics['skipped']), ckpt)
        logged = done % t.log_every == 0 or done == t.num_steps
        if logged:
          _stop_if_diverged(guard.flush(), ckpt)
          log.write(done, kind.value, jax.device_get(metrics), guard.total)
        if notice.reached(done):
          if save(done):
            raise guards.Preempted(done, ckpt.directory)
          raise guards.Preempted(ckpt.latest_step(), ckpt.directory, held=_describe(guard))
        if held or done % t.checkpoint_every == 0 or done == t.num_steps or (
            logged and clock.due()):
          held = not save(done)
        for evaluator in periodic:
          if done % evaluator.every == 0:
            with log.pause():
              values = evaluator.measure(state, done)
            log.write_rows(done, evaluator.name, values)
        _profile(workdir, t, done, state)
  finally:
    notice.close()
    log.flush()
    ckpt.close()

  metrics = {}
  if t.eval_at_end:
    params = evaluators.sampled_params(state, setup)
    with sharding.activate(layout):
      metrics, images = default_eval.evaluate(setup, params, workdir, t.num_steps)
    log.write_eval(t.num_steps, metrics, images, default_eval.table(metrics))
  log.close()
  if jax.process_index() == 0:
    paths = Workdir(workdir)
    evaluated = f', the evaluation in {paths.eval_json}' if t.eval_at_end else ''
    print(f'done: step {t.num_steps} saved in {paths.checkpoints}; the metrics of every logged '
          f'step in {log.path}{evaluated}, TensorBoard events in {paths.tensorboard}.', flush=True)
  return metrics


def _finished_eval(workdir: str, start: int, t: ml_collections.ConfigDict) -> Optional[dict]:
  """The saved metrics when the workdir is already trained to train.num_steps and evaluated
  there (a rerun then says so instead of evaluating again); else None."""
  if start < t.num_steps or not t.eval_at_end:
    return None
  metrics = default_eval.saved_metrics(workdir)
  if metrics.get('step') != t.num_steps:
    return None
  if jax.process_index() == 0:
    print(f'{workdir} is trained to step {t.num_steps} and evaluated ({EVAL_JSON}); nothing to do. '
          'Raise --config.train.num_steps to train further, or run `evaluate` to evaluate again.',
          flush=True)
  return metrics


def _next_batch(iterators: dict, kind: StepKind, layout: sharding.Layout) -> dict:
  """The next global batch of a step kind; a joint step's is {'text': ..., 'image': ...}."""
  if kind == StepKind.JOINT:
    batch = dict(text=_next_batch(iterators, StepKind.AR, layout),
                 image=_next_batch(iterators, StepKind.DIFFUSION, layout))
    if StepKind.UNDERSTANDING in iterators:
      batch['understand'] = _next_batch(iterators, StepKind.UNDERSTANDING, layout)
    return batch
  batch = next(iterators[kind])
  batch.pop('label', None)
  return sharding.global_batch(batch, layout)


def _describe(guard: guards.SkipGuard) -> str:
  kind, count = guard.streak
  return f'the last {count} {kind} step(s) were not finite'


def _stop_if_diverged(diverged: Optional[guards.Diverged], ckpt: checkpoint.Checkpointer) -> None:
  """Stops the run when the guard saw train.max_skipped_steps steps of one kind skipped in a
  row. No save was taken during that streak, so the newest checkpoint predates it."""
  if diverged is not None:
    last = ckpt.all_steps()
    raise UserError(f'the loss or the gradients were not finite at {diverged.count} '
                    f'{diverged.kind} steps in a row up to step {diverged.step} '
                    '(train.max_skipped_steps), so the run stopped; a lower '
                    'optim.learning_rate may help. The last good checkpoint is '
                    f'{f"step {last[0]}" if last else "none"} in {ckpt.directory}; no checkpoint '
                    'was written during those steps.')
