"""Step timings: median wall time of each step kind after compilation and warm-up.

Batches are random arrays of the config's shapes (no tokenizer, no data
files), so the figures measure the compiled steps alone.
"""

import json
import os
import platform
import statistics
import time

import jax
import ml_collections
import numpy as np

from monoformer_jax import config_lib, sharding, steps
from monoformer_jax import model as model_lib
from monoformer_jax.steps import StepKind


def random_batch(config: ml_collections.ConfigDict, kind: StepKind, rng: np.random.Generator) -> dict:
  """A batch of the config's shapes for one step kind."""
  d, m = config.data, config.model
  if kind == StepKind.AR:
    tokens = rng.integers(0, m.vocab_size, (d.text_batch_size, d.text_seq_len), np.int32)
    return dict(tokens=tokens, valid=np.ones(tokens.shape, bool))
  tokens = rng.integers(0, m.vocab_size, (d.image_batch_size, d.prompt_len), np.int32)
  image = rng.standard_normal((d.image_batch_size, *m.image_size, m.image_channels), np.float32)
  return dict(tokens=tokens, valid=np.ones(tokens.shape, bool), image=np.clip(image, -1, 1))


def tokens_per_step(config: ml_collections.ConfigDict, kind: StepKind) -> int:
  d, m = config.data, config.model
  if kind == StepKind.AR:
    return d.text_batch_size * d.text_seq_len
  patches = (m.image_size[0] // m.patch_size) * (m.image_size[1] // m.patch_size)
  return d.image_batch_size * (d.prompt_len + 1 + patches + 1)  # prompt, time token, image, <im_end>


def bench_steps(config: ml_collections.ConfigDict, repeats: int = 20, warmup: int = 3) -> dict:
  """{kind: {'median_ms', 'tokens_per_s', 'compile_s', 'runs'}} for both step kinds."""
  config_lib.validate(config)
  model = model_lib.build(config.model)
  tx = steps.make_optimizer(config.optim, config.train.num_steps)
  layout = sharding.make_layout(config.mesh)
  _, shardings = steps.abstract_state(model, tx, layout)
  state = steps.init_state(model, tx, layout, jax.random.key(config.seed))
  # Any valid token id works as <im_end> for timing.
  fns = steps.jit_steps(model, tx, steps.StepConfig.from_config(config, 2), layout, shardings)
  rng = np.random.default_rng(0)
  results = {}
  with sharding.activate(layout):
    for kind, fn in fns.items():
      batch = sharding.global_batch(random_batch(config, kind, rng), layout)
      key = jax.random.key(0)
      start = time.perf_counter()
      compiled = fn.lower(state, batch, key).compile()
      compile_s = time.perf_counter() - start
      for _ in range(warmup):
        state, _ = compiled(state, batch, key)
      times = []
      for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = compiled(state, batch, key)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
      median = statistics.median(times)
      results[kind.value] = dict(median_ms=1e3 * median, tokens_per_s=tokens_per_step(config, kind) / median,
                                 compile_s=compile_s, runs=repeats)
  return results


def machine() -> str:
  """The accelerator (or the CPU's model name and core count) and the jax version."""
  devices = jax.devices()
  if jax.default_backend() == 'cpu':
    name = platform.machine()
    if os.path.exists('/proc/cpuinfo'):
      with open('/proc/cpuinfo') as f:
        names = [l.split(':', 1)[1].strip() for l in f if l.startswith('model name')]
      name = names[0] if names else name
    return f'{name}, {os.cpu_count()} cores, {len(devices)} CPU device(s), jax {jax.__version__}'
  return f'{len(devices)} x {devices[0].device_kind}, jax {jax.__version__}'



def run(config: ml_collections.ConfigDict, out_path: str) -> dict:
  """Measures, prints a table, and writes the JSON report to out_path ('' for none)."""
  report = dict(machine=machine(), steps=bench_steps(config))
  print(f'machine: {report["machine"]}')
  print(f'{"step":10s} {"median ms":>10s} {"tokens/s":>10s} {"compile s":>10s}')
  for kind, r in report['steps'].items():
    print(f'{kind:10s} {r["median_ms"]:10.1f} {r["tokens_per_s"]:10.0f} {r["compile_s"]:10.1f}')
  if out_path:
    with open(out_path + '.tmp', 'w') as f:
      json.dump(report, f, indent=1)
    os.replace(out_path + '.tmp', out_path)
  return report

