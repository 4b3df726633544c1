"""Streaming safetensors reading and writing, one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header mapping names to dtype, shape and
byte offsets, then the raw bytes. Reading a tensor touches only its own bytes, so converting a
checkpoint never holds more than the output and one input tensor (a bucket's files are staged on
the local disk first, for the seeks).
"""

import contextlib
import dataclasses
import json
import os
import struct
import weakref
from typing import Callable, Iterable, Union

import ml_dtypes
import numpy as np

from monoformer_jax.base import files
from monoformer_jax.base.errors import UserError


DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
          'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
          'BOOL': np.bool_}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
SINGLE_FILE, INDEX_FILE = 'model.safetensors', 'model.safetensors.index.json'


def _read_header(path: str, local: str) -> tuple[dict, int]:
  """(header, where the data starts) of `path`, read from its local copy `local`."""
  try:
    with open(local, 'rb') as f:  # local: files.local_copy's file
      (length,) = struct.unpack('<Q', f.read(8))
      header = json.loads(f.read(length))
  except (OSError, struct.error, ValueError) as e:
    raise UserError(f'{path} is not a readable safetensors file ({e}).') from e
  header.pop('__metadata__', None)
  return header, 8 + length


class SafetensorsDir:
  """The tensors of a HF checkpoint directory: one file, or shards listed by an index."""

  def __init__(self, directory: str, single_file: str = SINGLE_FILE):
    if not files.isdir(directory):
      raise UserError(f'checkpoint directory {directory} does not exist.')
    index_path = os.path.join(directory, single_file + '.index.json')
    single = os.path.join(directory, single_file)
    if files.exists(index_path):
      names = sorted(set(files.read_json(index_path)['weight_map'].values()))
    elif files.exists(single):
      names = [single_file]
    else:
      raise UserError(f'{directory} has neither {single_file} nor its .index.json.')
    self._copies = contextlib.ExitStack()  # local copies of a bucket's files, while self lives
    weakref.finalize(self, self._copies.close)
    self.entries = {}  # name -> (path, local copy, dtype, shape, start, end)
    for name in names:
      path = os.path.join(directory, name)
      if not files.exists(path):
        raise UserError(f'shard {path} named by {index_path} does not exist.')
      local = self._copies.enter_context(files.local_copy(path))
      header, base = _read_header(path, local)
      for tensor, info in header.items():
        if info['dtype'] not in DTYPES:
          raise UserError(f'tensor {tensor} in {path} has dtype {info["dtype"]}; expected one of '
                          f'{", ".join(DTYPES)}.')
        start, end = info['data_offsets']
        self.entries[tensor] = (path, local, DTYPES[info['dtype']], tuple(info['shape']),
                                base + start, base + end)

  def __contains__(self, name: str) -> bool:
    return name in self.entries

  def keys(self) -> list[str]:
    return list(self.entries)

  def __getitem__(self, name: str) -> np.ndarray:
    """The tensor in its stored dtype (bf16 through ml_dtypes)."""
    path, local, dtype, shape, start, end = self.entries[name]
    count = int(np.prod(shape))
    if end - start != count * np.dtype(dtype).itemsize:
      raise UserError(f'tensor {name} in {path}: {end - start} bytes do not hold shape {shape}.')
    with open(local, 'rb') as f:  # local: files.local_copy's file
      f.seek(start)
      data = np.fromfile(f, dtype=dtype, count=count)
    if data.size != count:
      raise UserError(f'tensor {name} in {path} is truncated.')
    return data.reshape(shape)


@dataclasses.dataclass(frozen=True)
class LazyTensor:
  """A tensor made only when its bytes are written: shape and dtype known ahead."""
  shape: tuple[int, ...]
  dtype: np.dtype
  make: Callable[[], np.ndarray]

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def write(path: str, tensors: Iterable[tuple[str, Union[np.ndarray, LazyTensor]]],
          metadata: dict[str, str]) -> None:
  """Writes (name, array or LazyTensor) pairs to `path` atomically, one tensor at a time.

  The iterable is walked twice (header, then data), so pass a re-iterable
  sequence or a function-backed view, not a one-shot generator."""
  header, offset = {'__metadata__': metadata}, 0
  for name, array in tensors:
    dtype = np.dtype(array.dtype)
    if dtype not in _NAMES:
      raise ValueError(f'cannot store tensor {name} of dtype {dtype} in safetensors')
    header[name] = {'dtype': _NAMES[dtype], 'shape': list(array.shape),
                    'data_offsets': [offset, offset + array.nbytes]}
    offset += array.nbytes
  raw = json.dumps(header, separators=(',', ':')).encode()
  raw += b' ' * (-len(raw) % 8)  # the data starts 8-byte aligned
  with files.atomic_file(path) as tmp, open(tmp, 'wb') as f:  # local: atomic_file's scratch file
    f.write(struct.pack('<Q', len(raw)))
    f.write(raw)
    for name, array in tensors:
      data = array.make() if isinstance(array, LazyTensor) else array
      if tuple(data.shape) != tuple(array.shape) or np.dtype(data.dtype) != np.dtype(array.dtype):
        raise ValueError(f'tensor {name} came out {data.dtype} {data.shape}, not as announced')
      f.write(np.ascontiguousarray(data).tobytes())
