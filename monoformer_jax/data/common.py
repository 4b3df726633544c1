"""What every source shares: text files with universal newlines, the fixed held-out split, ADM's
center crop, and this host's rows of every global batch, read through a prefetching iterator.

Dimension letters: R resolution (R x R x 3 pixels).
"""

import io

import grain
import jax
import numpy as np
from PIL import Image

from monoformer_jax.base import files
from monoformer_jax.base.errors import UserError


_SPLIT_SEED = 20240924  # fixed: the held-out split never depends on the run's seed


def text_file(path: str) -> io.StringIO:
  """A text file, local or in a bucket, read as text mode reads one: '\r\n' and '\r' end
  lines as '\n' does."""
  return io.StringIO(files.read_text(path), newline=None)


def split(n: int, heldout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Train and held-out indices of n items."""
  order = np.random.default_rng(_SPLIT_SEED).permutation(n)
  n_held = max(1, int(round(n * heldout_fraction)))
  return np.sort(order[n_held:]), np.sort(order[:n_held])


def center_crop(image: np.ndarray, resolution: int) -> np.ndarray:
  """ADM's center crop of a uint8 [H, W, 3] image to [R, R, 3] uint8: halve with a box
  filter while the short side is at least twice R, bicubic to R, crop the center."""
  pil = Image.fromarray(image)
  while min(pil.size) >= 2 * resolution:
    pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.Resampling.BOX)
  scale = resolution / min(pil.size)
  pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.Resampling.BICUBIC)
  array = np.asarray(pil.convert('RGB'))
  top = (array.shape[0] - resolution) // 2
  left = (array.shape[1] - resolution) // 2
  return array[top:top + resolution, left:left + resolution]


def to_unit_range(pixels: np.ndarray) -> np.ndarray:
  """uint8 pixels -> float32 in [-1, 1]."""
  return pixels.astype(np.float32) / 127.5 - 1.0


def host_batches(ds: grain.MapDataset, global_batch: int) -> grain.MapDataset:
  """This host's rows of every global batch: a contiguous block, so that the global
  batch (assembled across hosts) is the same whatever the number of hosts."""
  hosts, host = jax.process_count(), jax.process_index()
  if global_batch % hosts:
    raise UserError(f'batch size {global_batch} is not divisible by {hosts} hosts.')
  per_host = global_batch // hosts

  def element(k):
    batch, row = divmod(k, per_host)
    return ds[batch * global_batch + host * per_host + row]

  rows = grain.MapDataset.range(len(ds) // global_batch * per_host).map(element)
  return rows.batch(per_host, drop_remainder=True)


def iterator(ds: grain.MapDataset) -> grain.DatasetIterator:
  """A checkpointable iterator that prefetches on background threads."""
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))
