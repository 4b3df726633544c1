"""What `bench` measures with: random inputs of a config's shapes, their token counts, the
analytic model FLOPs of a pass and a step, and a timer that takes several programs in turn.

Dimension letters: L layers, B batch, T query length, S key length, D width.
"""

import statistics
import time

import jax
import ml_collections
import numpy as np

from monoformer_jax.nn.model import MonoFormer
from monoformer_jax.training.steps import StepKind


def random_batch(config: ml_collections.ConfigDict, kind: StepKind, rng: np.random.Generator) -> dict:
  """A batch of the config's shapes for one step kind."""
  d, m = config.data, config.model
  if kind == StepKind.JOINT:
    return dict(text=random_batch(config, StepKind.AR, rng),
                image=random_batch(config, StepKind.DIFFUSION, rng))
  if kind == StepKind.AR:
    tokens = rng.integers(0, m.vocab_size, (d.text_batch_size, d.text_seq_len), np.int32)
    return dict(tokens=tokens, valid=np.ones(tokens.shape, bool), loss_mask=np.ones(tokens.shape, bool))
  tokens = rng.integers(0, m.vocab_size, (d.image_batch_size, d.prompt_len), np.int32)
  image = rng.standard_normal((d.image_batch_size, *m.image_size, m.image_channels), np.float32)
  return dict(tokens=tokens, valid=np.ones(tokens.shape, bool), image=np.clip(image, -1, 1))


def sequence_length(config: ml_collections.ConfigDict, model: MonoFormer, kind: StepKind) -> int:
  """T: tokens per sequence (an image sequence is prompt, time token, patches, <im_end>)."""
  if kind == StepKind.AR:
    return config.data.text_seq_len
  return model.image.sequence(config.data.prompt_len).length


def tokens_per_step(config: ml_collections.ConfigDict, model: MonoFormer, kind: StepKind) -> int:
  if kind == StepKind.JOINT:
    return sum(tokens_per_step(config, model, k) for k in (StepKind.AR, StepKind.DIFFUSION))
  batch = config.data.text_batch_size if kind == StepKind.AR else config.data.image_batch_size
  return batch * sequence_length(config, model, kind)


def forward_flops(model: MonoFormer, params, kind: StepKind, batch: int, q_len: int,
                  kv_len: int) -> float:
  """Model FLOPs of one forward pass: 2 x matmul parameters x tokens + 4 L B T S D.

  q_len tokens are computed against kv_len keys (equal unless a cache holds a prefix);
  an image pass has one image of N patches per sequence."""
  decoder = sum(x.size for x in jax.tree.leaves(params['decoder']) if x.ndim >= 3)  # kernels [L, ...]
  attention = 4 * model.backbone.depth * batch * q_len * kv_len * model.backbone.width
  if kind == StepKind.AR:
    head = params['embed_tokens' if model.tie_embeddings else 'lm_head']
    return 2.0 * (decoder + jax.tree.leaves(head)[0].size) * batch * q_len + attention
  kernels = lambda name: sum(x.size for x in jax.tree.leaves(params[name]) if x.ndim >= 2)  # noqa: E731
  per_patch = kernels('x_embedder') + params['final_layer']['linear']['kernel'].size
  per_image = (kernels('t_embedder') + kernels('t_projector')
               + params['final_layer']['adaLN_modulation']['kernel'].size)
  return (2.0 * (decoder * batch * q_len + per_patch * batch * model.image.num_patches
                 + per_image * batch) + attention)


def step_flops(config: ml_collections.ConfigDict, model: MonoFormer, params,
               kind: StepKind) -> float:
  """Model FLOPs of one train step: the forward pass and a backward pass of twice its cost."""
  if kind == StepKind.JOINT:
    return sum(step_flops(config, model, params, k) for k in (StepKind.AR, StepKind.DIFFUSION))
  batch = config.data.text_batch_size if kind == StepKind.AR else config.data.image_batch_size
  length = sequence_length(config, model, kind)
  return 3 * forward_flops(model, params, kind, batch, length, length)


def separate_medians(runs: dict, repeats: int, warmup: int) -> dict:
  """{name: median seconds} of blocking callables timed one after the other, each in a block of
  its own: PyTorch's OpenMP threads spin for a while after each of its runs, and whatever runs
  next in this process competes with them for the cores (our `ar` step took 30% longer right
  after a torch step than alone on a 2-core Xeon)."""
  return {name: interleaved_medians({name: fn}, repeats, warmup)[name] for name, fn in runs.items()}


def interleaved_medians(runs: dict, repeats: int, warmup: int) -> dict:
  """{name: median seconds} of several blocking callables timed in turn, round after round."""
  for _ in range(warmup):
    for fn in runs.values():
      fn()
  times = {name: [] for name in runs}
  for _ in range(repeats):
    for name, fn in runs.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}
