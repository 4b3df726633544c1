"""The digit FD of the embedded default: Fréchet distances of 8 x 8 digits in the feature space of a
small classifier fitted on the real training digits only (the practice of FID on MNIST, where
Inception has nothing to see).

The classifier is an MLP with one hidden layer of 64 ReLU units, fitted by L-BFGS from a fixed seed,
so every run of the same split gets the same features; its hidden layer is the feature space. The
reference statistics are the training digits', overall and per digit. Two anchors of the same size
as the samples come with every evaluation: held-out real digits (the floor: what a perfect generator
of that many images scores) and samples of the untrained model (the ceiling).
Dimension letters: N images, F features (64).
"""

import functools

import ml_collections
import numpy as np

from monoformer_jax.data import digits
from monoformer_jax.evaluation import fid


HIDDEN_UNITS = 64


def _pixels(images: np.ndarray) -> np.ndarray:
  """[-1, 1] images [N, 8, 8, 1] -> [N, 64] on the 0..16 scale of the original data."""
  return np.clip((np.asarray(images, np.float64) + 1.0) * 8.0, 0.0, 16.0).reshape(len(images), -1)


@functools.lru_cache(maxsize=4)
def _fitted(heldout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  from sklearn.neural_network import MLPClassifier  # pylint: disable=g-import-not-at-top
  images, labels = digits.subset(heldout_fraction, heldout=False)
  classifier = MLPClassifier(hidden_layer_sizes=(HIDDEN_UNITS,), solver='lbfgs', alpha=1e-3,
                             max_iter=2000, random_state=0).fit(_pixels(images) / 16.0, labels)
  return classifier.coefs_[0], classifier.intercepts_[0]


def features(data: ml_collections.ConfigDict, images: np.ndarray) -> np.ndarray:
  """The classifier's hidden activations [N, F] of [-1, 1] digit images [N, 8, 8, 1]."""
  weights, bias = _fitted(float(data.heldout_fraction))
  return np.maximum(_pixels(images) / 16.0 @ weights + bias, 0.0)


def _stats(x: np.ndarray) -> fid.Stats:
  stats = fid.StreamingStats()
  stats.add(x)
  return stats.result()


@functools.lru_cache(maxsize=4)
def _reference(heldout_fraction: float) -> tuple[list[fid.Stats], fid.Stats]:
  """The training digits' statistics, per digit and overall (computed once per split)."""
  images, labels = digits.subset(heldout_fraction, heldout=False)
  x = features(ml_collections.ConfigDict({'heldout_fraction': heldout_fraction}), images)
  return [_stats(x[labels == i]) for i in range(len(digits.CLASS_NAMES))], _stats(x)


def distances(data: ml_collections.ConfigDict, images: np.ndarray,
              labels: np.ndarray) -> dict[str, float]:
  """FD of images [N, 8, 8, 1] (label[i] the digit image i should show) to the training
  digits: {'<name>': per-digit FD (digits with 2 images or more), ..., 'overall': FD of all}."""
  per_digit, overall = _reference(float(data.heldout_fraction))
  got = features(data, images)
  result = {name: fid.frechet_distance(_stats(got[labels == i]), per_digit[i])
            for i, name in enumerate(digits.CLASS_NAMES) if (labels == i).sum() > 1}
  result['overall'] = fid.frechet_distance(_stats(got), overall)
  return result


def heldout_like(data: ml_collections.ConfigDict, per_class: int) -> tuple[np.ndarray, np.ndarray]:
  """The first `per_class` held-out real digits of each class (fewer where the split has
  fewer): the floor's images."""
  images, labels = digits.subset(data.heldout_fraction, heldout=True)
  keep = np.concatenate([np.flatnonzero(labels == c)[:per_class]
                         for c in range(len(digits.CLASS_NAMES))])
  return images[keep], labels[keep]
