"""Fréchet distances: feature statistics streamed batch by batch, and the distance itself.

Statistics are accumulated on the host in float64, each batch's mean and centred second
moment merged into the running ones (the pairwise update of Chan et al.), so N images never
sit in memory and the covariance keeps its precision. Images are split over the devices of
every host; each batch's features are gathered to every process and accumulated in the
global order, so 1 or N processes give the same statistics. The distance follows the
standard numerics (pytorch-fid, ADM's evaluator): the square root of the covariance product,
1e-6 added to both diagonals when that product is singular, and an imaginary part that is
dropped when small. Where those numerics give up (a large imaginary part) or cannot work
(no more images than features), the trace comes from the symmetric form of the same product.
Dimension letters: N images, B batch, H/W image, F features.
"""

import dataclasses
import warnings
import zipfile
from typing import Callable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from scipy import linalg

from monoformer_jax.base import files, images as images_lib, sharding
from monoformer_jax.base.errors import UserError


FeatureFn = Callable[[jax.Array], jax.Array]  # images [B, H, W, 3] in [0, 1] -> [B, F]


@dataclasses.dataclass(frozen=True)
class Stats:
  mu: np.ndarray  # [F]
  sigma: np.ndarray  # [F, F], the unbiased (N - 1) covariance
  count: int


class StreamingStats:
  """Mean and covariance of features added batch by batch."""

  def __init__(self):
    self.count, self.mean, self.m2 = 0, None, None

  def add(self, features: np.ndarray) -> None:
    x = np.asarray(features, np.float64)
    if not len(x):
      return
    batch_mean = x.mean(axis=0)
    centred = x - batch_mean
    if self.mean is None:
      self.mean, self.m2 = np.zeros_like(batch_mean), np.zeros((x.shape[1],) * 2)
    total = self.count + len(x)
    delta = batch_mean - self.mean
    self.mean = self.mean + delta * (len(x) / total)
    self.m2 = self.m2 + centred.T @ centred + np.outer(delta, delta) * (self.count * len(x) / total)
    self.count = total

  def result(self) -> Stats:
    if self.count < 2:
      raise UserError(f'a Fréchet distance needs at least 2 images; got {self.count}.')
    return Stats(self.mean, self.m2 / (self.count - 1), self.count)


def _trace_sqrt_symmetric(a: np.ndarray, b: np.ndarray) -> float:
  """tr (A B)^1/2 for covariances A, B, as tr (A^1/2 B A^1/2)^1/2: a symmetric matrix whose
  eigenvalues are real, so a rank-deficient product has no spurious imaginary part.

  Eigenvalues below F eps times the scale of their matrix (the tolerance of numpy's matrix_rank)
  count as 0: statistics of N <= F images leave about F - N eigenvalues that are rounding (near eps
  times the scale, of either sign), and the square roots of the positive ones, each near eps^1/2 of
  the largest, would add up to a distance too small (by about 4e-8 of the trace for 200 images of
  512 features), below 0 for a set against itself. A genuine eigenvalue that small is within eigh's
  rounding anyway. The scale of A is its largest eigenvalue; that of the product, whose rounding
  grows with |A| |B|, is A's times the Frobenius norm of B (a cheap bound on B's largest)."""
  floor = len(a) * np.finfo(np.float64).eps
  w, v = np.linalg.eigh(a)
  largest = max(w[-1], 0.0)
  keep = w > floor * largest
  root_a = (v[:, keep] * np.sqrt(w[keep])) @ v[:, keep].T
  product = np.linalg.eigvalsh(root_a @ b @ root_a)
  return float(np.sqrt(product[product > floor * largest * np.linalg.norm(b)]).sum())


def frechet_distance(a: Stats, b: Stats, eps: float = 1e-6) -> float:
  """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2), with the standard numerics. Where
  those give up (an imaginary part that is not small), or cannot work (statistics of no more
  images than features, whose product is singular), the trace is taken through the symmetric
  form instead, which is exact for covariances. A squared distance: what rounding leaves
  below 0 (a set against itself) is 0."""
  if a.mu.shape != b.mu.shape:
    raise UserError(f'the statistics have {len(a.mu)} and {len(b.mu)} features; a Fréchet '
                    'distance needs the same feature space on both sides.')
  diff = a.mu - b.mu
  if any(0 < s.count <= len(diff) for s in (a, b)):  # surely singular: skip the slow sqrtm
    trace = _trace_sqrt_symmetric(a.sigma, b.sigma)
  else:
    with warnings.catch_warnings():  # a singular product is handled below, not reported
      warnings.simplefilter('ignore', linalg.LinAlgWarning)
      covmean = linalg.sqrtm(a.sigma @ b.sigma)
      if not np.isfinite(covmean).all():  # a singular product: regularize both
        offset = np.eye(len(diff)) * eps
        covmean = linalg.sqrtm((a.sigma + offset) @ (b.sigma + offset))
    if np.iscomplexobj(covmean) and not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      trace = _trace_sqrt_symmetric(a.sigma, b.sigma)
    else:
      trace = float(np.trace(covmean.real))
  return max(0.0, float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * trace))


def npz_images(local: str, batch: int, path: str) -> Iterator[np.ndarray]:
  """The `arr_0` images of an ADM-format .npz (uint8 [N, H, W, 3]) at path, batch by batch, read
  from `local`, its local copy, as a stream so that host memory holds one batch."""
  with zipfile.ZipFile(local) as z, z.open('arr_0.npy') as f:  # local: a member of the copy
    read_header = (np.lib.format.read_array_header_1_0 if np.lib.format.read_magic(f) == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read_header(f)
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3) or fortran:
      raise UserError(f'arr_0 in {path} is {dtype} of shape {shape}; expected uint8 images '
                      '[N, H, W, 3] (the ADM evaluator\'s format).')
    row = int(np.prod(shape[1:]))
    for start in range(0, shape[0], batch):
      n = min(batch, shape[0] - start)
      images = np.frombuffer(f.read(n * row), np.uint8).reshape((n,) + tuple(shape[1:]))
      yield np.repeat(images, 3, axis=-1) if shape[-1] == 1 else images


def _npz_keys(local: str, path: str, flag: str) -> list[str]:
  try:
    with zipfile.ZipFile(local) as z:
      return [n[:-len('.npy')] for n in z.namelist()]
  except zipfile.BadZipFile:
    raise UserError(f'{flag} file {path} is not an .npz archive.') from None


def check_global_batch(global_batch: int, layout: sharding.Layout) -> None:
  """--fid_batch splits evenly over every device of every host."""
  devices, hosts = layout.mesh.size, jax.process_count()
  if global_batch < 1 or global_batch % devices or global_batch % hosts:
    raise UserError(f'--fid_batch is {global_batch}; expected a positive multiple of the '
                    f'{devices} devices and {hosts} hosts.')


class Encoder:
  """Streams uint8 images through an Inception split over the layout's devices."""

  def __init__(self, features: FeatureFn, layout: sharding.Layout, global_batch: int):
    check_global_batch(global_batch, layout)
    self.features, self.layout, self.batch = features, layout, global_batch

  def add(self, stats: StreamingStats, images: np.ndarray) -> None:
    """Adds the features of a global batch of uint8 images [B <= global batch, H, W, 3] that
    every process holds (padded to the global batch, the padding dropped after)."""
    n = len(images)
    padded = np.zeros((self.batch,) + images.shape[1:], np.uint8)
    padded[:n] = images
    per_host = self.batch // jax.process_count()
    mine = padded[jax.process_index() * per_host:(jax.process_index() + 1) * per_host]
    with sharding.activate(self.layout):
      x = sharding.global_batch({'x': mine.astype(np.float32) / 255.0}, self.layout)['x']
      out = multihost_utils.process_allgather(self.features(x), tiled=True)
    stats.add(np.asarray(out)[:n])

  def stats_of(self, batches: Iterator[np.ndarray]) -> Stats:
    stats = StreamingStats()
    for images in batches:
      self.add(stats, images)
    return stats.result()

  def npz_stats(self, path: str, flag: str) -> Stats:
    """Statistics of an .npz: computed from its `arr_0` images when it has them (ADM's
    reference batches, sample files), else read from its `mu` and `sigma`."""
    if not files.isfile(path):
      raise UserError(f'{flag} file {path} does not exist.')
    with files.local_copy(path) as local:  # zipfile and np.load stream local files only
      keys = _npz_keys(local, path, flag)
      if 'arr_0' in keys:
        return self.stats_of(npz_images(local, self.batch, path))
      if not {'mu', 'sigma'} <= set(keys):
        raise UserError(f'{flag} file {path} has neither arr_0 (images) nor mu and sigma '
                        f'(statistics); it holds {", ".join(keys) or "nothing"}.')
      with np.load(local, allow_pickle=False) as d:
        mu, sigma = d['mu'].astype(np.float64), d['sigma'].astype(np.float64)
        count = int(d['count']) if 'count' in d else 0
    if mu.ndim != 1 or sigma.shape != (len(mu),) * 2:
      raise UserError(f'{flag} file {path} has mu {mu.shape} and sigma {sigma.shape}; '
                      'expected [F] and [F, F].')
    return Stats(mu, sigma, count)


def write_stats(path: str, stats: Stats) -> None:
  """mu, sigma and count as an .npz that `npz_stats` reads back (process 0 writes)."""
  if jax.process_index() == 0:
    images_lib.write_npz(path, mu=stats.mu, sigma=stats.sigma, count=stats.count)
