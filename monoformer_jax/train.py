"""The training loop: `train_and_evaluate(config, workdir)`.

Resumes from the newest finished checkpoint in the workdir (train state, both
data-iterator states), alternates `ar` and `diffusion` steps by the seeded
mixture schedule, logs to TensorBoard and WORKDIR/metrics.jsonl, and evaluates
at the end.
"""

import json
import os
import shutil
import time

import jax
import ml_collections
import numpy as np

from monoformer_jax import checkpoint, evaluate, pretrained, sampling, sharding, steps, vae
from monoformer_jax import workdir as workdir_lib
from monoformer_jax.data import common, pipeline
from monoformer_jax.steps import StepKind

METRICS_FILE = 'metrics.jsonl'


class MetricsLog:
  """TensorBoard scalars/images, one JSON line per logged step, and a progress line."""

  def __init__(self, workdir: str, start_step: int, num_steps: int):
    # clu brings in TensorFlow; imported here so that commands that log nothing stay light.
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    self.leader = jax.process_index() == 0
    self.path = os.path.join(workdir, METRICS_FILE)
    self.writer = metric_writers.create_default_writer(workdir, just_logging=not self.leader,
                                                       asynchronous=False)
    self.num_steps = num_steps
    self.last = (start_step, time.monotonic())
    if self.leader and os.path.exists(self.path):  # drop rows a resumed run will redo
      with open(self.path) as f:
        rows = [line for line in f if json.loads(line)['step'] <= start_step]
      with open(self.path, 'w') as f:
        f.writelines(rows)

  def write(self, step: int, kind: StepKind, metrics: dict, input_wait_s: float) -> None:
    """Logs one step's metrics (the only device-to-host fetch of the loop) and the share
    of the wall time since the last write spent waiting for input batches."""
    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.monotonic()
    elapsed = max(now - self.last[1], 1e-9)
    rate = (step - self.last[0]) / elapsed
    input_wait = input_wait_s / elapsed
    self.last = (step, now)
    self.writer.write_scalars(step, {f'{kind.value}/{k}': v for k, v in scalars.items()}
                              | {'steps_per_sec': rate, 'input_wait_fraction': input_wait})
    if not self.leader:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': step, 'kind': kind.value, **scalars,
                          'steps_per_sec': rate, 'input_wait_fraction': input_wait}) + '\n')
    eta = (self.num_steps - step) / max(rate, 1e-9)
    print(f'step {step}/{self.num_steps}  {kind.value:9s} loss {scalars["loss"]:.4f}  '
          f'{rate:.1f} steps/s  input wait {input_wait:.1%}  ETA {eta / 60:.1f} min', flush=True)

  def write_eval(self, step: int, metrics: dict, images: np.ndarray) -> None:
    self.writer.write_scalars(step, {k: v for k, v in metrics.items() if k != 'step'})
    grid = sampling.image_grid(sampling.to_uint8(images), columns=len(images) // 10)
    self.writer.write_images(step, {'samples': grid[None]})
    if self.leader:
      print('eval: ' + '  '.join(f'{k} {v:.4g}' for k, v in metrics.items()), flush=True)

  def close(self) -> None:
    self.writer.close()


def init_backbone(state, setup: workdir_lib.Setup, shardings):
  """The fresh state with params, EMA and optimizer state started from the converted LLM
  of model.init_from."""
  model = setup.model
  grafted = pretrained.graft_backbone(jax.device_get(state.params), setup.config.model.init_from,
                                      model.backbone, model.tie_embeddings)
  # Two transfers: params and EMA must not share buffers, since the steps donate both.
  params = jax.device_put(grafted, shardings.params)
  return state.replace(params=params, ema_params=jax.device_put(grafted, shardings.ema_params),
                       opt_state=jax.jit(setup.tx.init, out_shardings=shardings.opt_state)(params))


def _record_llm_source(init_from: str, workdir: str) -> None:
  """Keeps the converted LLM's description in the workdir, for `convert export-llama`."""
  if jax.process_index() == 0:
    shutil.copy(os.path.join(init_from, pretrained.MODEL_JSON),
                os.path.join(workdir, pretrained.SOURCE_JSON))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains to config.train.num_steps (resuming if possible); returns the final eval metrics."""
  setup = workdir_lib.for_training(config, workdir)
  settings, tok, model, tx, layout = setup.settings, setup.tok, setup.model, setup.tx, setup.layout
  image_shape = (*config.model.image_size, config.model.image_channels)
  encode = None  # pixels -> latents on the devices, when the images are pixels and a VAE is set
  if config.model.vae and settings.image_source.pixels:
    encode = vae.pixel_encoder(config.model.vae, layout, config.data.image_resolution, image_shape)
  abstract, shardings = steps.abstract_state(model, tx, layout)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  datasets = {
      StepKind.AR: pipeline.text_dataset(config.data, settings.text_source, tok, config.seed),
      StepKind.DIFFUSION: pipeline.image_dataset(config.data, settings.image_source, tok,
                                                 config.seed, image_shape)}
  iterators = {kind: common.iterator(ds) for kind, ds in datasets.items()}
  latest = ckpt.latest_step()
  start = latest or 0
  if latest is not None:
    state, data_state = ckpt.restore(latest, abstract)
    for kind, it in iterators.items():
      if kind.value in data_state:  # converted checkpoints start their data afresh
        it.set_state(data_state[kind.value])
  else:
    state = steps.init_state(model, tx, layout, jax.random.key(config.seed))
    if config.model.init_from:
      state = init_backbone(state, setup, shardings)
      _record_llm_source(config.model.init_from, workdir)

  step_fns = steps.jit_steps(model, tx, steps.StepConfig.from_config(config, tok.im_end_id),
                             layout, shardings)
  log = MetricsLog(workdir, start, config.train.num_steps)
  seed_key = jax.random.key(config.seed)
  t = config.train
  input_wait = 0.0
  with sharding.activate(layout):
    for step in range(start, t.num_steps):
      kind = steps.step_kind(config.seed, step, t.ar_weight, t.diffusion_weight)
      # Steps are dispatched asynchronously, so the next batch is read and sent while
      # the device still runs this one; what the loop waits here is the input's cost.
      wait_start = time.perf_counter()
      batch = next(iterators[kind])
      batch.pop('label', None)
      batch = sharding.global_batch(batch, layout)
      input_wait += time.perf_counter() - wait_start
      step_key = jax.random.fold_in(seed_key, step)
      if encode is not None and kind == StepKind.DIFFUSION:
        batch['image'] = encode(batch['image'], jax.random.fold_in(step_key, 1))
      state, metrics = step_fns[kind](state, batch, step_key)
      done = step + 1
      if done % t.log_every == 0 or done == t.num_steps:
        log.write(done, kind, metrics, input_wait)
        input_wait = 0.0
      if done % t.checkpoint_every == 0 or done == t.num_steps:
        ckpt.save(done, state, {k.value: it.get_state() for k, it in iterators.items()}, config)
  ckpt.close()

  metrics = {}
  if t.eval_at_end:
    params = state.ema_params if config.sample.use_ema else state.params
    with sharding.activate(layout):
      metrics, images = evaluate.evaluate(setup, params, workdir, t.num_steps)
    log.write_eval(t.num_steps, metrics, images)
  log.close()
  return metrics
