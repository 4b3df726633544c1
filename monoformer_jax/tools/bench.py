"""`bench`: speed and memory of the train steps, the image sampler and the decoder.

Every figure is the median of `repeats` timed runs after compilation and warm-up. Inputs are random
arrays of the config's shapes and parameters are a fresh initialization (no tokenizer, no data
files, no checkpoint): the figures measure the compiled programs alone. Model FLOPs are counted
analytically (6 x matmul parameters x tokens, plus 12 x L x B x T^2 x D for attention scores and
values) and divided by the matmul peak measured in the same run.
"""

import dataclasses
import enum
import json
import os
import platform
import resource
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from monoformer_jax.base import files, sharding
from monoformer_jax.base.errors import UserError
from monoformer_jax.config import schema
from monoformer_jax.diffusion import Process, Sampler
from monoformer_jax.generation import sampling
from monoformer_jax.run import settings
from monoformer_jax.tools import bench_finetune, bench_storage, bench_torch
from monoformer_jax.tools.bench_inputs import (forward_flops, interleaved_medians, random_batch,
                                               separate_medians, sequence_length, step_flops,
                                               tokens_per_step)
from monoformer_jax.training import objective, steps
from monoformer_jax.training.steps import StepKind


class Part(enum.Enum):
  """What `bench.parts` may name: each train step kind, the image sampler, text decoding."""
  AR = 'ar'
  DIFFUSION = 'diffusion'
  JOINT = 'joint'  # one text and one image batch per update (train.objective 'joint')
  SAMPLING = 'sampling'
  DECODE = 'decode'


def parts_of(bench: ml_collections.ConfigDict) -> tuple[Part, ...]:
  """bench.parts parsed; decode batches checked too (both are only read here)."""
  if isinstance(bench.parts, str) or not bench.parts:
    raise UserError(f'config key bench.parts is {bench.parts!r}; expected a non-empty tuple of '
                    + ', '.join(repr(p.value) for p in Part) + '.')
  batches = bench.decode_batches
  if (isinstance(batches, (str, int)) or not batches
      or not all(isinstance(b, int) and b > 0 for b in batches)):
    raise UserError(f'config key bench.decode_batches is {batches!r}; expected a non-empty tuple '
                    'of positive integers.')
  return tuple(schema.choice(Part, p, 'bench.parts') for p in bench.parts)


def matmul_peak(dtype: jnp.dtype, repeats: int) -> dict:
  """FLOP/s of large square matmuls on the first device: the practical matmul peak.

  On an accelerator one program chains 16 dependent 8192^3 products (a single one is too
  short to time against launch and clock ramp-up) after a second of warm-up."""
  n, chain, warmup = (2048, 1, 2) if jax.default_backend() == 'cpu' else (8192, 16, 30)
  x = jax.random.normal(jax.random.key(0), (n, n), dtype)
  w = (jax.random.normal(jax.random.key(1), (n, n)) / np.sqrt(n)).astype(dtype)  # keeps x O(1)
  products = jax.jit(lambda x, w: jax.lax.fori_loop(0, chain, lambda _, y: y @ w, x))
  products = products.lower(x, w).compile()
  run = lambda: products(x, w).block_until_ready()  # noqa: E731
  seconds = interleaved_medians({'dot': run}, repeats, warmup)['dot']
  return dict(n=n, chain=chain, dtype=jnp.dtype(dtype).name, flops_per_s=2 * n**3 * chain / seconds)


def _xla_flops(compiled) -> float | None:
  costs = compiled.cost_analysis()
  costs = costs[0] if isinstance(costs, (list, tuple)) else costs
  return float(costs['flops']) if costs and 'flops' in costs else None


def _program_bytes(compiled) -> int | None:
  """Arguments + outputs + temporaries of one compiled program, donated buffers counted once."""
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes)


def bench_steps(config, model, tx, layout, shardings, state, peak: float, torch_steps: dict,
                kinds: tuple[StepKind, ...]):
  """{kind: timings, throughput, FLOPs and MFU} for the step kinds asked for; the final state.

  torch_steps ({kind: blocking callable}, may be empty) are timed after ours."""
  repeats, warmup = config.bench.repeats, config.bench.warmup
  # Any valid token id works as <im_end> for timing.
  step_config = steps.StepConfig.from_config(config, 2, objective.Objective.ALTERNATE,
                                             settings.validate(config).diffusion)
  fns = {}
  for joint in (False, True):  # whatever train.objective says, both kinds can be timed
    fns |= steps.jit_steps(model, tx, dataclasses.replace(step_config, joint=joint), layout,
                           shardings)
  rng = np.random.default_rng(0)
  results = {}
  for kind in kinds:
    batch = sharding.global_batch(random_batch(config, kind, rng), layout)
    key = jax.random.key(0)
    start = time.perf_counter()
    compiled = fns[kind].lower(state, batch, key).compile()
    compile_s = time.perf_counter() - start
    holder = [state]

    def run_step():
      holder[0], metrics = compiled(holder[0], batch, key)  # noqa: B023
      jax.block_until_ready((holder[0], metrics))

    runs = {'jax': run_step}
    if kind.value in torch_steps:
      runs['torch'] = torch_steps[kind.value]
    seconds = separate_medians(runs, repeats, warmup)
    state = holder[0]
    flops = step_flops(config, model, state.params, kind)
    results[kind.value] = r = dict(
        median_ms=1e3 * seconds['jax'],
        tokens_per_s=tokens_per_step(config, model, kind) / seconds['jax'],
        model_flops=flops, flops_per_s=flops / seconds['jax'], mfu=flops / seconds['jax'] / peak,
        xla_flops=_xla_flops(compiled), program_bytes=_program_bytes(compiled),
        compile_s=compile_s, runs=repeats)
    if 'torch' in seconds:
      r['torch_ms'] = 1e3 * seconds['torch']
      r['speedup_vs_torch'] = seconds['torch'] / seconds['jax']
  return results, state


# Few-step samplers timed beside the config's (about 20 network evaluations; at most its steps).
FEW_STEPS = {Process.DDPM: ((Sampler.DPMPP_2M, 20), (Sampler.DDIM, 20)),
             Process.FLOW: ((Sampler.EULER, 20), (Sampler.HEUN, 10))}


def bench_sampler(config, model, spec: sampling.ImageSampling, params, peak: float,
                  repeats: int) -> dict:
  """Images/s with CFG (scale 1.5 if spec has none) of the process's own sampler at spec's steps
  (DDPM, or Euler for flow) compiled, of the few-step samplers (FEW_STEPS) and, with
  bench.sampler_baselines, of the first without the prefix cache and as a Python loop calling a
  jitted single denoising step (timed in turn, so drift hits all alike)."""
  num = config.bench.sample_images
  process = spec.sampler.process
  spec = spec.but(Sampler.default_for(process), cfg_scale=1.5 if spec.guidance.scale == 1.0 else None)
  batch = random_batch(config, StepKind.DIFFUSION, np.random.default_rng(1))
  prompt = jnp.asarray(batch['tokens'][:1].repeat(num, 0))
  valid = jnp.ones(prompt.shape, bool)
  null_valid = valid.at[:, :-1].set(False)
  suffix = jnp.full((num, 1), 2, jnp.int32)
  args = (params, prompt, valid, prompt, null_valid, suffix, jax.random.key(0))
  result = dict(images=num, sampler=spec.sampler.value, steps=spec.steps,
                cfg_scale=spec.guidance.scale, few_steps=[])
  runs = {}
  variants = [('compiled', spec)]
  for sampler, count in FEW_STEPS[process]:
    few = spec.but(sampler, min(count, spec.steps))  # never more steps than the config's
    variants.append((f'{sampler.value}_{few.steps}', few))
    result['few_steps'].append(dict(name=variants[-1][0], sampler=sampler.value, steps=few.steps,
                                    evaluations=few.solver.evaluations))
  if config.bench.sampler_baselines:
    variants.append(('compiled_no_prefix_cache', dataclasses.replace(spec, cache_prefix=False)))
  for name, sampler_spec in variants:
    start = time.perf_counter()
    compiled = sampling.make_image_sampler(model, sampler_spec).lower(*args).compile()
    result[f'{name}_compile_s'] = time.perf_counter() - start
    runs[name] = lambda compiled=compiled: compiled(*args).block_until_ready()
  if config.bench.sampler_baselines:
    runs['python_loop'] = _python_loop_sampler(model, spec, args, num)
  for name, seconds in interleaved_medians(runs, repeats, 1).items():
    result[f'{name}_images_per_s'] = num / seconds
  for few in result['few_steps']:
    few['images_per_s'] = result[f'{few["name"]}_images_per_s']
    few['speedup'] = few['images_per_s'] / result['compiled_images_per_s']
  # With the prefix cached, each step computes the image part against the whole sequence.
  length = sequence_length(config, model, StepKind.DIFFUSION)
  sequences = num * (2 if spec.guidance.scale != 1.0 else 1)
  flops = spec.solver.evaluations * forward_flops(model, params, StepKind.DIFFUSION, sequences,
                                                  length - config.data.prompt_len, length)
  result['model_flops_per_run'] = flops
  result['mfu'] = flops * result['compiled_images_per_s'] / num / peak
  if config.bench.sampler_baselines:
    result['speedup_vs_python_loop'] = (result['compiled_images_per_s']
                                        / result['python_loop_images_per_s'])
  return result


def _python_loop_sampler(model, spec: sampling.ImageSampling, args: tuple, num: int):
  """A blocking callable: the sampler as a Python loop over a jitted denoising step."""
  params, key = args[0], args[-1]
  prepare, predict = sampling.make_denoiser(model, spec)
  prepare, solver = jax.jit(prepare), spec.solver
  step = jax.jit(lambda params, context, state, i: solver.step(
      state, lambda x, t: predict(params, context, x, t), i, key))
  context = prepare(*args[:-1])
  img = model.image
  x0 = jax.random.normal(jax.random.key(1), (num, img.height, img.width, img.channels))

  def python_loop():
    state = solver.init(x0)
    for i in range(spec.steps):
      state = step(params, context, state, i)
    solver.result(state).block_until_ready()

  return python_loop


def bench_decode(config, model, params, batch: int, repeats: int, torch_decode=None) -> dict:
  """Tokens/s of sampling bench.decode_tokens new tokens for `batch` prompts, with the KV cache
  and by recomputation; with torch_decode, transformers' generate (KV cache) too."""
  rng = np.random.default_rng(2)
  new_tokens = config.bench.decode_tokens
  prompt = jnp.asarray(rng.integers(0, config.model.vocab_size, (batch, config.data.prompt_len),
                                    np.int32))
  result = dict(batch=batch, prompt_tokens=prompt.shape[1], new_tokens=new_tokens)
  dynamic = dict(temperature=1.0, stop_ids=(-1,), pad_id=0)  # -1: never stops early
  args = (model, params, prompt, jnp.ones(prompt.shape, bool), jax.random.key(0))
  runs = {}
  for name, use_cache in (('cached', True), ('recompute', False)):
    static = dict(max_tokens=new_tokens, top_k=0, top_p=1.0, use_cache=use_cache)
    start = time.perf_counter()
    compiled = sampling.generate.lower(*args, **static, **dynamic).compile()
    result[f'{name}_compile_s'] = time.perf_counter() - start
    runs[name] = lambda compiled=compiled: compiled(*args[1:], **dynamic).block_until_ready()
  seconds = interleaved_medians(runs, repeats, 1)  # ours, cached and recomputing, in turn
  if torch_decode is not None:
    host_prompt = np.asarray(prompt).astype(np.int64)
    seconds |= separate_medians({'torch': lambda: torch_decode(host_prompt, new_tokens)},
                                repeats, 1)
  for name, s in seconds.items():
    result[f'{name}_tokens_per_s'] = batch * new_tokens / s
  result['speedup'] = result['cached_tokens_per_s'] / result['recompute_tokens_per_s']
  if torch_decode is not None:
    result['speedup_vs_torch'] = result['cached_tokens_per_s'] / result['torch_tokens_per_s']
  return result


def machine() -> str:
  """The accelerator (or the CPU's model name and core count) and the jax version."""
  devices = jax.devices()
  if jax.default_backend() == 'cpu':
    name = platform.machine()
    if os.path.exists('/proc/cpuinfo'):  # local: this machine's CPU
      with open('/proc/cpuinfo') as f:  # local: this machine's CPU
        names = [l.split(':', 1)[1].strip() for l in f if l.startswith('model name')]
      name = names[0] if names else name
    return f'{name}, {os.cpu_count()} cores, {len(devices)} CPU device(s), jax {jax.__version__}'
  return f'{len(devices)} x {devices[0].device_kind}, jax {jax.__version__}'


def memory() -> dict:
  """Peak host RSS of this process, and the first device's peak where the backend reports it."""
  stats = jax.devices()[0].memory_stats() or {}
  return dict(host_peak_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              device_peak_bytes=stats.get('peak_bytes_in_use'))


def measure(config: ml_collections.ConfigDict, compare_torch: bool = False) -> dict:
  """The whole report as a dict (see `run`)."""
  typed = settings.validate(config)
  if compare_torch:
    bench_torch.modules()  # a missing torch stops the command now, not after the JAX side's setup
  parts = parts_of(config.bench)
  model = settings.build_model(config)
  tx = steps.make_optimizer(config.optim, config.train.num_steps)
  layout = sharding.make_layout(config.mesh)
  _, shardings = steps.abstract_state(model, tx, layout)
  state = steps.init_state(model, tx, layout, jax.random.key(config.seed))
  peak = matmul_peak(jnp.dtype(config.model.dtype), config.bench.repeats)
  m, d = config.model, config.data
  report = dict(machine=machine(),
                config=dict(size=m.size, dtype=m.dtype, param_dtype=m.param_dtype,
                            attention=m.attention, layer_loop=m.layer_loop, remat=m.remat,
                            loss_chunk=config.train.loss_chunk, vocab_size=m.vocab_size,
                            text_batch=[d.text_batch_size, d.text_seq_len],
                            image_batch=[d.image_batch_size,
                                         sequence_length(config, model, StepKind.DIFFUSION)]),
                matmul_peak=peak)
  torch_steps = {}
  if compare_torch:
    torch_steps, report['torch'] = bench_torch.make_steps(config, model.backbone)
  kinds = tuple(StepKind(p.value) for p in parts if p.value in {k.value for k in StepKind})
  with sharding.activate(layout):
    report['steps'], state = bench_steps(config, model, tx, layout, shardings, state,
                                         peak['flops_per_s'], torch_steps, kinds)
    report['memory_after_steps'] = memory()
    params = state.params
    if Part.SAMPLING in parts:
      report['sampling'] = bench_sampler(config, model, typed.sampling, params,
                                         peak['flops_per_s'], config.bench.sample_repeats)
    if Part.DECODE in parts:
      torch_decode = (bench_torch.make_decoder(config, model.backbone) if compare_torch
                      else None)
      report['decode'] = [bench_decode(config, model, params, batch, config.bench.sample_repeats,
                                       torch_decode) for batch in config.bench.decode_batches]
  report['memory'] = dict(memory(), includes_torch_models=compare_torch)
  return report


def print_table(report: dict) -> None:
  print(f'machine: {report["machine"]}')
  peak = report['matmul_peak']
  print(f'matmul peak ({peak["chain"]} x {peak["n"]}^3 {peak["dtype"]}): '
        f'{peak["flops_per_s"] / 1e9:.1f} GFLOP/s')
  print(f'{"step":10s} {"median ms":>10s} {"tokens/s":>10s} {"GFLOP/s":>9s} {"MFU":>6s} '
        f'{"compile s":>10s} {"torch ms":>9s} {"vs torch":>9s}')
  for kind, r in report['steps'].items():
    torch = (f'{r["torch_ms"]:9.1f} {r["speedup_vs_torch"]:8.2f}x' if 'torch_ms' in r
             else f'{"-":>9s} {"-":>9s}')
    print(f'{kind:10s} {r["median_ms"]:10.1f} {r["tokens_per_s"]:10.0f} '
          f'{r["flops_per_s"] / 1e9:9.1f} {r["mfu"]:6.1%} {r["compile_s"]:10.1f} {torch}')
  s = report.get('sampling')
  if s:
    baselines = (f'{s["compiled_no_prefix_cache_images_per_s"]:.2f} without the prefix cache, '
                 f'{s["python_loop_images_per_s"]:.2f} in a Python loop '
                 f'({s["speedup_vs_python_loop"]:.2f}x); ' if 'python_loop_images_per_s' in s
                 else '')
    print(f'sampling {s["images"]} images, {s["sampler"]} {s["steps"]} steps, CFG '
          f'{s["cfg_scale"]}: {s["compiled_images_per_s"]:.2f} images/s compiled, {baselines}'
          f'MFU {s["mfu"]:.1%}')
    for few in s['few_steps']:
      print(f'  {few["sampler"]} {few["steps"]} steps ({few["evaluations"]} evaluations): '
            f'{few["images_per_s"]:.2f} images/s, {few["speedup"]:.1f}x')
  for d in report.get('decode', []):
    torch = (f', transformers generate {d["torch_tokens_per_s"]:.0f} '
             f'({d["speedup_vs_torch"]:.2f}x)' if 'torch_tokens_per_s' in d else '')
    print(f'decoding {d["new_tokens"]} tokens x {d["batch"]}: {d["cached_tokens_per_s"]:.0f} '
          f'tokens/s with the KV cache, {d["recompute_tokens_per_s"]:.0f} recomputing '
          f'({d["speedup"]:.1f}x){torch}')
  mem = report['memory']
  device = (f'{mem["device_peak_bytes"] / 2**30:.2f} GiB' if mem['device_peak_bytes'] is not None
            else 'not reported by this backend')
  print(f'peak memory: host {mem["host_peak_bytes"] / 2**30:.2f} GiB, device {device}')


def run(config: ml_collections.ConfigDict, out_path: str, compare_torch: bool = False,
        storage: str = '', finetune: bool = False) -> dict:
  """Measures, prints a table, and writes the JSON report to out_path ('' for none); with
  storage (directories, comma-separated), the storage costs instead (bench_storage); with
  finetune, the memory of train.finetune's modes (bench_finetune)."""
  if finetune:
    report = bench_finetune.measure(config)
    bench_finetune.print_table(report)
  elif storage:
    report = bench_storage.measure(config, [d.strip() for d in storage.split(',') if d.strip()])
    bench_storage.print_table(report)
  else:
    report = measure(config, compare_torch=compare_torch)
    print_table(report)
  if out_path:
    files.write_text(out_path, json.dumps(report, indent=1))
  return report
