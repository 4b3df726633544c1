"""Evaluators for the embedded default.

Image half: samples for every prompt "a handwritten digit {name}" are labelled
by an independent classifier (an RBF SVM fitted only on the held-out real
digits, which the generator never saw); we report how often the label is the
prompted digit, per class and overall. Text half: perplexity of held-out text.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from monoformer_jax import files, sampling
from monoformer_jax.data import corpus, digits
from monoformer_jax.steps import next_token_loss


def digit_classifier(data: ml_collections.ConfigDict):
  """An SVM fitted on the held-out real digits (pixel values 0..16)."""
  from sklearn import svm  # pylint: disable=g-import-not-at-top
  images, labels = digits.heldout(data)
  return svm.SVC(gamma=0.001, C=10.0).fit(_features(images), labels)


def _features(images: np.ndarray) -> np.ndarray:
  """[-1, 1] images [N, 8, 8, 1] -> the 0..16 scale of the original data, flattened."""
  return np.clip((np.asarray(images) + 1.0) * 8.0, 0.0, 16.0).reshape(len(images), -1)


def prompt_accuracy(setup, params, key: jax.Array) -> tuple[dict[str, float], np.ndarray]:
  """Fraction of samples classified as the prompted digit, per digit name and overall."""
  config = setup.config
  n = config.eval.samples_per_class
  names = digits.CLASS_NAMES
  prompts = [config.eval.prompt_template.format(name=name) for name in names for _ in range(n)]
  images = sampling.images_for_prompts(setup.model, params, setup.tok, prompts,
                                       config.data.prompt_len, setup.settings.sampling, key)
  predicted = digit_classifier(config.data).predict(_features(images))
  wanted = np.repeat(np.arange(len(names)), n)
  result = {f'accuracy/{name}': float(np.mean(predicted[wanted == i] == i))
            for i, name in enumerate(names)}
  result['accuracy/overall'] = float(np.mean(predicted == wanted))
  return result, images


def text_perplexity(setup, params) -> float:
  """exp(mean next-token NLL) over held-out text chunks."""
  config, model = setup.config, setup.model
  chunks = corpus.chunks(config.data, setup.tok, heldout=True)
  batch = config.data.text_batch_size
  chunks = chunks[:batch * config.eval.text_batches] if config.eval.text_batches > 0 else chunks

  @jax.jit
  def nll_sum(params, tokens):
    mean, count = next_token_loss(model, params, tokens, jnp.ones(tokens.shape, bool),
                                  config.train.loss_chunk)
    return mean * count, count

  total, count = 0.0, 0.0
  for start in range(0, len(chunks), batch):
    s, c = multihost_utils.process_allgather(nll_sum(params, chunks[start:start + batch]), tiled=True)
    total, count = total + float(s), count + float(c)
  return math.exp(total / count)


def evaluate(setup, params, workdir: str, step: int) -> tuple[dict, np.ndarray]:
  """Both metrics of a workdir.Setup's model, written to WORKDIR/eval.json; returns them and
  the sample images."""
  key = jax.random.fold_in(jax.random.key(setup.config.seed), 2**30)
  metrics, images = prompt_accuracy(setup, params, key)
  metrics['text/perplexity'] = text_perplexity(setup, params)
  metrics['step'] = step
  if jax.process_index() == 0:
    files.write_text(os.path.join(workdir, 'eval.json'), json.dumps(metrics, indent=1))
  return metrics, images
