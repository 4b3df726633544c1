"""Pictures: model images ([-1, 1] floats) to uint8, a grid of them, and the one place that
writes them as PNG (grids) and .npz (the arrays) files, atomically.
Dimension letters: N images, H/W/C image.
"""

import io

import numpy as np

from monoformer_jax.base import files


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> [0, 255] uint8."""
  return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, columns: int, zoom: int = 4, pad: int = 1) -> np.ndarray:
  """uint8 [N, H, W, C] -> one [rows*(H+pad)*zoom, columns*(W+pad)*zoom, C] uint8 picture."""
  n, h, w, c = images.shape
  rows = -(-n // columns)
  grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    top, left = pad + r * (h + pad), pad + col * (w + pad)
    grid[top:top + h, left:left + w] = image
  return np.repeat(np.repeat(grid, zoom, axis=0), zoom, axis=1)


def write_png(path: str, images: np.ndarray, columns: int) -> None:
  """uint8 images [N, H, W, C] as one grid picture at `path` (grayscale when C is 1)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  grid = image_grid(images, columns)
  with files.atomic_file(path) as tmp:
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(tmp, format='PNG')


def write_npz(path: str, **arrays: np.ndarray) -> None:
  buffer = io.BytesIO()  # small arrays (samples, statistics): built in memory, written as one
  np.savez(buffer, **arrays)
  files.write_bytes(path, buffer.getvalue())
