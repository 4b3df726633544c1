"""Evaluators for the embedded default.

Image half: samples for every prompt "a handwritten digit {name}" are labelled by an independent
classifier (an RBF SVM fitted only on the held-out real digits, which the generator never saw); we
report how often the label is the prompted digit, per class and overall; the digit FD with its floor
and ceiling. Text half: perplexity of held-out text, and next-line multiple-choice questions. With
train.prompt_lm_loss, `drawn_digits`: whether bare prompts start an image by themselves in
mixed-modal generation, and whether it is the prompted digit. During training (train.eval_every),
`heldout_losses` gives the held-out text loss and the held-out diffusion loss of each quarter of the
timesteps.
Dimension letters: B batch, P prompt length, H/W/C image.
"""

import json
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from monoformer_jax.base import files, progress
from monoformer_jax.base.errors import UserError
from monoformer_jax.base.workdir_layout import EVAL_JSON, Workdir
from monoformer_jax.data import corpus, digits
from monoformer_jax.data.understanding import UnderstandingSource
from monoformer_jax.evaluation import digit_fd, text_tasks, understanding_eval
from monoformer_jax.generation import mixed_modal, sampling
from monoformer_jax.nn import model as model_lib
from monoformer_jax.training import objective


def digit_classifier(data: ml_collections.ConfigDict):
  """An SVM fitted on the held-out real digits (pixel values 0..16)."""
  from sklearn import svm  # pylint: disable=g-import-not-at-top
  images, labels = digits.subset(data.heldout_fraction, heldout=True)
  return svm.SVC(gamma=0.001, C=10.0).fit(_features(images), labels)


def _features(images: np.ndarray) -> np.ndarray:
  """[-1, 1] images [N, 8, 8, 1] -> the 0..16 scale of the original data, flattened."""
  return np.clip((np.asarray(images) + 1.0) * 8.0, 0.0, 16.0).reshape(len(images), -1)


def prompt_accuracy(setup, params, key: jax.Array,
                    spec: sampling.ImageSampling) -> tuple[dict[str, float], np.ndarray]:
  """Fraction of samples classified as the prompted digit, per digit name and overall."""
  config = setup.config
  n = config.eval.samples_per_class
  names = digits.CLASS_NAMES
  prompts = [config.eval.prompt_template.format(name=name) for name in names for _ in range(n)]
  with progress.phase(f'eval: sampling {len(prompts)} digits ({spec.sampler.value}, '
                      f'{spec.steps} steps)'):
    images = sampling.images_for_prompts(setup.model, params, setup.tok, prompts,
                                         config.data.prompt_len, spec, key)
  predicted = digit_classifier(config.data).predict(_features(images))
  wanted = np.repeat(np.arange(len(names)), n)
  result = {f'accuracy/{name}': float(np.mean(predicted[wanted == i] == i))
            for i, name in enumerate(names)}
  result['accuracy/overall'] = float(np.mean(predicted == wanted))
  return result, images


def heldout_text_loss(setup, params) -> float:
  """Mean next-token NLL over held-out text chunks (eval.text_batches batches; 0 = all)."""
  config, model = setup.config, setup.model
  chunks = corpus.chunks(config.data, setup.tok, heldout=True)
  batch = config.data.text_batch_size
  chunks = chunks[:batch * config.eval.text_batches] if config.eval.text_batches > 0 else chunks

  @jax.jit
  def nll_sum(params, tokens):
    mean, count = objective.next_token_loss(model, params, tokens, jnp.ones(tokens.shape, bool),
                                  config.train.loss_chunk)
    return mean * count, count

  total, count = 0.0, 0.0
  for start in range(0, len(chunks), batch):
    s, c = multihost_utils.process_allgather(nll_sum(params, chunks[start:start + batch]), tiled=True)
    total, count = total + float(s), count + float(c)
  return total / count


def heldout_diffusion_losses(setup, params) -> dict[str, float]:
  """The diffusion loss of the held-out digits, prompted with eval.prompt_template, at fixed
  noise and timesteps drawn from each quarter of [0, T): {'diffusion_q1': ..., ...}."""
  config, model, tok = setup.config, setup.model, setup.tok
  images, labels = digits.subset(config.data.heldout_fraction, heldout=True)
  tokens, valid = map(np.stack, zip(*[tok.image_prompt(config.eval.prompt_template.format(
      name=digits.CLASS_NAMES[c]), config.data.prompt_len) for c in labels]))
  num_t, process = config.diffusion.num_timesteps, setup.settings.diffusion
  rng = np.random.default_rng(0)  # the same noise at every evaluation
  noise = rng.standard_normal(images.shape).astype(np.float32)

  @jax.jit
  def loss_sum(params, tokens, valid, x0, t, noise):
    xt = process.corrupt_at(x0, t, noise)
    suffix = jnp.full((x0.shape[0], 1), tok.im_end_id, jnp.int32)
    out = model.apply({'params': params}, tokens, valid, mask_type=model.image_mask, image=xt,
                      t=t, suffix=suffix).image
    return process.loss(out, x0, xt, t, noise)['loss'].sum()

  losses, batch = {}, config.data.image_batch_size
  for quarter in range(4):
    t = rng.integers(quarter * num_t // 4, (quarter + 1) * num_t // 4, len(images)).astype(np.int32)
    total = sum(float(loss_sum(params, tokens[i:i + batch], valid[i:i + batch],
                               images[i:i + batch], t[i:i + batch], noise[i:i + batch]))
                for i in range(0, len(images), batch))
    losses[f'diffusion_q{quarter + 1}'] = total / len(images)
  return losses


def heldout_losses(setup, params) -> dict[str, float]:
  """Held-out text loss and diffusion loss per timestep quarter (digits and corpus sources)."""
  return {'text': heldout_text_loss(setup, params), **heldout_diffusion_losses(setup, params)}


def digit_distances(setup, images: np.ndarray, key: jax.Array,
                    spec: sampling.ImageSampling) -> dict[str, float]:
  """The digit FD of the prompt-accuracy samples (eval.samples_per_class of each digit, in
  order), per digit and overall, with its floor (as many held-out real digits) and ceiling
  (as many samples of the untrained model, from the same key)."""
  config = setup.config
  n = config.eval.samples_per_class
  names = digits.CLASS_NAMES
  untrained = nn.unbox(jax.jit(model_lib.init_params, static_argnums=0)(setup.model,
                                                                    jax.random.key(config.seed)))
  prompts = [config.eval.prompt_template.format(name=name) for name in names for _ in range(n)]
  with progress.phase('eval: digit FD with its floor and ceiling'):
    noise_like = sampling.images_for_prompts(setup.model, untrained, setup.tok, prompts,
                                             config.data.prompt_len, spec, key)
    labels = np.repeat(np.arange(len(names)), n)
    anchors = {'fd': (images, labels), 'fd_floor': digit_fd.heldout_like(config.data, n),
               'fd_ceiling': (noise_like, labels)}
    return {f'{what}/{k}': v for what, (x, y) in anchors.items()
            for k, v in digit_fd.distances(config.data, x, y).items()}


def drawn_digits(setup, params, key: jax.Array, per_class: int,
                 spec: sampling.ImageSampling) -> dict[str, float]:
  """Mixed-modal generation from the bare prompts ("a handwritten digit seven", no
  <im_start>): the fraction of rows that start an image by themselves within 8 tokens
  (and as their first token), and how often those images show the prompted digit."""
  config, tok = setup.config, setup.tok
  names = digits.CLASS_NAMES
  tokens, valid = map(np.stack, zip(*[tok.text_prompt(config.eval.prompt_template.format(
      name=name), config.data.prompt_len) for name in names for _ in range(per_class)]))
  with progress.phase(f'eval: mixed-modal generation from {len(tokens)} bare prompts'):
    rows = mixed_modal.generate(
        setup.model, params, tokens, valid, key, tok=tok, spec=spec, max_images=1,
        decoding=mixed_modal.Decoding(max_tokens=8, temperature=1.0, top_k=0, top_p=1.0))
  wanted = np.repeat(np.arange(len(names)), per_class)
  started = np.array([bool(r.images) for r in rows])
  first = np.array([r.tokens[:1] == [tok.im_start_id] for r in rows])
  result = {'drawn/started': float(started.mean()), 'drawn/started_first': float(first.mean())}
  if started.any():
    images = np.stack([r.images[0] for r in rows if r.images])
    predicted = digit_classifier(config.data).predict(_features(images))
    result['drawn/accuracy'] = float(np.mean(predicted == wanted[started]))
  return result


def evaluate(setup, params, workdir: str, step: int,
             spec: Optional[sampling.ImageSampling] = None) -> tuple[dict, np.ndarray]:
  """The metrics of a workdir.Setup's model (prompt accuracy, digit FD with its floor and
  ceiling, held-out perplexity), merged into WORKDIR/eval.json; returns them and the sample
  images. Samples come from `spec` (default: the config's sampler)."""
  spec = spec or setup.settings.sampling
  key = jax.random.fold_in(jax.random.key(setup.config.seed), 2**30)
  metrics, images = prompt_accuracy(setup, params, key, spec)
  metrics.update(digit_distances(setup, images, key, spec))
  with progress.phase('eval: held-out perplexity'):
    metrics['text/perplexity'] = math.exp(heldout_text_loss(setup, params))
  if setup.config.eval.text_questions:
    metrics.update(text_tasks.metrics_of(text_tasks.score(setup, params, ['next_line'])))
    metrics['next_line/chance'] = text_tasks.TASKS['next_line'].chance
  if setup.settings.understanding_source == UnderstandingSource.DIGITS:
    metrics.update(understanding_eval.digit_questions(setup, params))
  if setup.config.train.prompt_lm_loss:  # the model learned to start images by itself
    metrics.update(drawn_digits(setup, params, jax.random.fold_in(key, 1),
                                setup.config.eval.samples_per_class, spec))
  # eval.json says which sampler its figures come from.
  metrics.update(step=step, sampler=spec.sampler.value, sampler_steps=spec.steps,
                 cfg_scale=spec.guidance.scale)
  merge_saved(workdir, metrics)
  return metrics, images




def saved_metrics(workdir: str) -> dict:
  """WORKDIR/eval.json, or {} where there is none (or it cannot be read)."""
  path = Workdir(workdir).eval_json
  if not files.exists(path):
    return {}
  try:
    saved = json.loads(files.read_text(path))
  except (OSError, ValueError, UserError):  # torn by a crash: the evaluation runs again
    return {}
  return saved if isinstance(saved, dict) else {}


def merge_saved(workdir: str, metrics: dict) -> None:
  """Updates WORKDIR/eval.json with `metrics`, keeping what other evaluations wrote there
  (the task table of `evaluate --tasks`, FID figures); process 0 writes."""
  if jax.process_index() == 0:
    saved = saved_metrics(workdir)
    saved.update(metrics)
    files.write_text(Workdir(workdir).eval_json, json.dumps(saved, indent=1))


def table(metrics: dict) -> str:
  """The metrics as a readable table: a row per group ('accuracy', 'fd', ...) with its overall
  value and, where it has them, one column per digit; a row for every other metric."""
  groups: dict[str, dict[str, float]] = {}
  for name, value in metrics.items():
    group, _, key = name.rpartition('/')
    if isinstance(value, float) or isinstance(value, int):
      groups.setdefault(group, {})[key] = value
  per_digit = [g for g, values in groups.items() if set(values) & set(digits.CLASS_NAMES)]
  lines = []
  if per_digit:
    columns = ['overall'] + list(digits.CLASS_NAMES)
    lines.append(f'{"":<12}' + ''.join(f'{c:>9}' for c in columns))
    for g in per_digit:
      lines.append(f'{g:<12}' + ''.join(
          f'{groups[g][c]:9.4g}' if c in groups[g] else f'{"":>9}' for c in columns))
  for g, values in groups.items():
    if g in per_digit:
      continue
    for key, value in values.items():
      name = f'{g}/{key}' if g else key
      lines.append(f'{name:<28}{value:>12.6g}' if isinstance(value, float)
                   else f'{name:<28}{value:>12}')
  return '\n'.join(lines)
