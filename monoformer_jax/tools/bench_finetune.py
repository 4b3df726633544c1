"""`bench --finetune`: the memory train.finetune takes, per device, from XLA's own accounting.

For each mode (full, lora, qlora with int8 and nf4 kernels, frozen_text) the train steps are
compiled, never run, for the TinyLlama-1.1B shape on the presets' meshes (16 and 8 devices,
their global batch of 256 split over them) and for a 1B and a 7B source on one device at a
small batch; `compiled.memory_analysis()` gives the bytes of the arguments (train state, frozen
backbone, batch), the outputs (aliased to the donated state) and the temporaries (activations,
gradients, optimizer scratch). A compile needs its mesh's devices: each platform runs in its own
process on forced CPU devices, as XLA places the same program on TPUs and GPUs. Then, at the
SmolLM2-135M shape on this CPU, each mode's step time (median) and the process's peak RSS, one
process per mode.
"""

import json
import os
import resource
import subprocess
import sys
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from monoformer_jax.base import sharding
from monoformer_jax.config import schema
from monoformer_jax.nn import model as model_lib
from monoformer_jax.run import settings
from monoformer_jax.tools.bench_inputs import random_batch
from monoformer_jax.training import steps
from monoformer_jax.training.finetune import BaseQuant, Finetune, FinetuneSpec
from monoformer_jax.training.steps import StepKind

# (name, mode, quantization of the adapted kernels)
MODES = (('full', Finetune.FULL, None), ('lora', Finetune.LORA, None),
         ('qlora-int8', Finetune.QLORA, BaseQuant.INT8), ('qlora-nf4', Finetune.QLORA, BaseQuant.NF4),
         ('frozen_text', Finetune.FROZEN_TEXT, None))
# Sources: TinyLlama-1.1B (the paper's) and LLaMA-2-7B's shape.
SOURCES = {'1b': dict(size='tinyllama-1.1b', vocab_size=32003),
           '7b': dict(size='custom', width=4096, depth=32, num_heads=32, num_kv_heads=32,
                      mlp_dim=11008, head_dim=128, vocab_size=32003)}
# (name, devices, source, global batch of images and of texts)
MESHES = (('v5p-32', 16, '1b', 256), ('h100x8', 8, '1b', 256),
          ('1 device', 1, '1b', 8), ('1 device', 1, '7b', 8),
          ('1 device', 1, '1b', 1), ('1 device', 1, '7b', 1))
GiB = 2**30


def spec_of(mode: Finetune, quantize) -> FinetuneSpec:
  return FinetuneSpec(mode, rank=8, alpha=16.0, quantize=quantize, block_size=64 if quantize else 0)


def paper_config(source: str, devices: int, batch: int) -> ml_collections.ConfigDict:
  """The paper's settings (bf16 compute, fp32 parameters, remat 'dots', 512-token texts and
  32 x 32 latents behind 128 prompt tokens) at a source's shape, fully sharded."""
  c = schema.base_config()
  m = c.model
  m.update(SOURCES[source])
  m.norm_eps, m.patch_size, m.image_size, m.image_channels, m.learn_sigma = 1e-5, 2, (32, 32), 4, True
  m.dtype, m.param_dtype, m.layer_loop, m.remat = 'bfloat16', 'float32', 'scan', 'dots'
  c.data.image_source, c.data.image_batch_size, c.data.text_batch_size = 'latents', batch, batch
  c.data.text_seq_len, c.data.prompt_len, c.train.loss_chunk = 512, 128, 2048
  c.mesh.data, c.mesh.fsdp, c.train.eval_at_end = 1, devices, False
  return c


def _steps(model, config: ml_collections.ConfigDict, layout, spec: FinetuneSpec):
  """(jitted steps, optimizer, abstract state, its shardings, abstract frozen parameters or
  None), each abstract leaf carrying its sharding."""
  tx = steps.make_optimizer(config.optim, config.train.num_steps)
  state, shardings = steps.abstract_state(model, tx, layout, spec)
  frozen = spec.split(steps.abstract_params(model, layout))[1] if spec.frozen else None
  checked = settings.validate(config)
  cfg = steps.StepConfig.from_config(config, 1, checked.objective, checked.diffusion)
  frozen_shardings = None if frozen is None else jax.tree.map(lambda a: a.sharding, frozen)
  fns = steps.jit_steps(model, tx, cfg, layout, shardings, frozen_shardings)
  return fns, tx, state, shardings, frozen


def compiled_memory(config: ml_collections.ConfigDict, spec: FinetuneSpec) -> dict:
  """{step kind: bytes per device of its compiled train step (arguments, outputs, aliased,
  temporaries, their total) and its compile time}, for the ar and diffusion steps."""
  model = settings.build_model(config, spec)
  layout = sharding.make_layout(config.mesh)
  fns, _, state, _, frozen = _steps(model, config, layout, spec)
  key = jax.eval_shape(lambda: jax.random.key(0))
  out = {}
  with sharding.activate(layout):
    for kind in (StepKind.AR, StepKind.DIFFUSION):
      batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                           random_batch(config, kind, np.random.default_rng(0)))
      args = (state, batch, key) + (() if frozen is None else (frozen,))
      start = time.perf_counter()
      mem = fns[kind].lower(*args).compile().memory_analysis()
      out[kind.value] = dict(arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes,
                             aliased=mem.alias_size_in_bytes, temporaries=mem.temp_size_in_bytes,
                             compile_s=time.perf_counter() - start)
  for r in out.values():
    r['total'] = r['arguments'] + r['outputs'] - r['aliased'] + r['temporaries']
  return out


def _fresh(model, config, layout, spec: FinetuneSpec):
  """(jitted steps, train state, frozen parameters or None) of random weights."""
  fns, tx, _, shardings, frozen = _steps(model, config, layout, spec)
  params = nn.unbox(model_lib.init_params(model, jax.random.key(config.seed)))
  trainable, rest = spec.split(params) if spec.frozen else (params, None)
  state = steps.fresh_state(jax.device_put(trainable, shardings.params), tx, shardings)
  if rest is not None:
    rest = jax.device_put(rest, jax.tree.map(lambda a: a.sharding, frozen))
  return fns, state, rest


def cpu_step_times(config: ml_collections.ConfigDict, spec: FinetuneSpec) -> dict:
  """Median ms of the ar and diffusion steps at the config's shape on this machine, and the
  process's peak RSS (call it in a process of its own)."""
  model = settings.build_model(config, spec)
  layout = sharding.make_layout(config.mesh)
  fns, state, frozen = _fresh(model, config, layout, spec)
  out = {}
  with sharding.activate(layout):
    for kind in (StepKind.AR, StepKind.DIFFUSION):
      batch = sharding.global_batch(random_batch(config, kind, np.random.default_rng(0)), layout)
      args = (batch, jax.random.key(0)) + (() if frozen is None else (frozen,))
      times = []
      for i in range(config.bench.warmup + config.bench.repeats):
        start = time.perf_counter()
        state, metrics = fns[kind](state, *args)
        jax.block_until_ready((state, metrics))
        if i >= config.bench.warmup:
          times.append(time.perf_counter() - start)
      out[f'{kind.value}_ms'] = 1e3 * float(np.median(times))
  out['peak_rss_bytes'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  out['trainable_params'] = int(sum(x.size for x in jax.tree.leaves(state.params)))
  return out


def _in_process(task: dict, devices: int) -> dict:
  """Runs `task` (see _main) in a fresh process with `devices` forced CPU devices."""
  flags = os.environ.get('XLA_FLAGS', '').split()
  flags = [f for f in flags if 'force_host_platform_device_count' not in f]
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=' '.join(
      flags + [f'--xla_force_host_platform_device_count={devices}']))
  result = subprocess.run([sys.executable, '-m', 'monoformer_jax.tools.bench_finetune',
                           json.dumps(task)], capture_output=True, text=True, env=env)
  if result.returncode:
    raise RuntimeError(f'bench --finetune: {task} failed:\n{result.stderr[-3000:]}')
  return json.loads(result.stdout.strip().splitlines()[-1])


def measure(config: ml_collections.ConfigDict) -> dict:
  """The whole report: compiled memory per mesh and mode, and this CPU's step times and RSS
  per mode at the config's shape."""
  return dict(compiled=measure_compiled(), cpu=measure_cpu(config))


def measure_compiled() -> list[dict]:
  rows = []
  for name, devices, source, batch in MESHES:
    task = dict(task='memory', devices=devices, source=source, batch=batch)
    rows.append(dict(mesh=name, devices=devices, source=source, batch=batch,
                     modes=_in_process(task, devices)))
  return rows


def measure_cpu(config: ml_collections.ConfigDict) -> list[dict]:
  return [dict(mode=name, **_in_process(dict(task='cpu', mode=name, config=config.to_dict()), 1))
          for name, _, _ in MODES]


def _spec_named(name: str) -> FinetuneSpec:
  (_, mode, quantize), = (m for m in MODES if m[0] == name)
  return spec_of(mode, quantize)


def _main(task: dict) -> dict:
  if task['task'] == 'memory':
    config = paper_config(task['source'], task['devices'], task['batch'])
    return {name: compiled_memory(config, spec_of(mode, q)) for name, mode, q in MODES}
  return cpu_step_times(schema.config_from_dict(task['config']), _spec_named(task['mode']))


def print_table(report: dict) -> None:
  print('bytes per device of the compiled train step (the larger of ar and diffusion), GiB: '
        'arguments (state + frozen + batch) / temporaries / total')
  print(f'{"mesh":10s} {"source":6s} {"batch":>5s} ' + ' '.join(f'{n:>18s}' for n, _, _ in MODES))
  for row in report['compiled']:
    cells = []
    for name, _, _ in MODES:
      r = max(row['modes'][name].values(), key=lambda v: v['total'])
      cells.append(f'{r["arguments"] / GiB:5.1f}/{r["temporaries"] / GiB:5.1f}/{r["total"] / GiB:5.1f}')
    print(f'{row["mesh"]:10s} {row["source"]:6s} {row["batch"]:5d} ' + ' '.join(f'{c:>18s}' for c in cells))
  print(f'{"mode":12s} {"ar ms":>8s} {"diffusion ms":>13s} {"peak RSS GiB":>13s} {"trained":>12s}')
  for r in report['cpu']:
    print(f'{r["mode"]:12s} {r["ar_ms"]:8.1f} {r["diffusion_ms"]:13.1f} '
          f'{r["peak_rss_bytes"] / GiB:13.2f} {r["trainable_params"]:12,d}')


if __name__ == '__main__':
  print(json.dumps(_main(json.loads(sys.argv[1]))))
