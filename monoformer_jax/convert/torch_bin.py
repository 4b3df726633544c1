"""The tensors of a checkpoint directory: safetensors, or torch `.bin` files (what the official
MonoFormer training script saves) read without unpickling arbitrary objects.

`.bin` files go through torch's weights_only loader, which accepts tensors and plain containers
only, memory-mapped so that a tensor is read when it is used. torch is needed for this path alone.
"""

import os
import pickle

import ml_dtypes
import numpy as np

from monoformer_jax.base import files
from monoformer_jax.base.errors import UserError
from monoformer_jax.convert import safetensors_io


BIN_FILE = 'pytorch_model.bin'


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError('reading torch weight files needs torch (pip install torch).') from None
  return torch


def read_state_dict(path: str) -> dict:
  """{name: tensor} of one torch file, through the weights_only loader (memory-mapped when
  the file is in the zip format; a bucket's file from a local copy, which the mapping keeps
  readable after the copy's name is gone)."""
  torch = _torch()
  if not files.isfile(path):
    raise UserError(f'{path} does not exist; expected a torch weights file.')
  try:
    with files.local_copy(path) as local:
      try:
        state = torch.load(local, map_location='cpu', weights_only=True, mmap=True)
      except RuntimeError as e:  # the legacy format cannot be memory-mapped
        if 'mmap' not in str(e):
          raise
        state = torch.load(local, map_location='cpu', weights_only=True)
  except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
    first = (str(e).splitlines() or [''])[0][:160]
    raise UserError(f'{path} cannot be read as tensors only (torch weights_only: {first}); '
                    'objects other than tensors are never unpickled.') from None
  if not isinstance(state, dict):
    raise UserError(f'{path} holds a {type(state).__name__}; expected a state dict of tensors.')
  return state


def to_numpy(tensor) -> np.ndarray:
  """A torch tensor's values; bfloat16 keeps its bits through ml_dtypes (numpy has none)."""
  torch = _torch()
  tensor = tensor.detach()
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


class TorchBinDir:
  """The tensors of pytorch_model.bin, or of the shards its .index.json lists."""

  def __init__(self, directory: str):
    index_path = os.path.join(directory, BIN_FILE + '.index.json')
    if files.exists(index_path):
      names = sorted(set(files.read_json(index_path)['weight_map'].values()))
    else:
      names = [BIN_FILE]
    self.tensors = {}
    for name in names:
      self.tensors.update(read_state_dict(os.path.join(directory, name)))

  def __contains__(self, name: str) -> bool:
    return name in self.tensors

  def keys(self) -> list[str]:
    return list(self.tensors)

  def __getitem__(self, name: str) -> np.ndarray:
    return to_numpy(self.tensors[name])


def open_weights(directory: str):
  """The directory's tensors: safetensors when present, else torch .bin files."""
  if not files.isdir(directory):
    raise UserError(f'checkpoint directory {directory} does not exist.')
  single = safetensors_io.SINGLE_FILE
  if any(files.exists(os.path.join(directory, n)) for n in (single, single + '.index.json')):
    return safetensors_io.SafetensorsDir(directory)
  if any(files.exists(os.path.join(directory, n)) for n in (BIN_FILE, BIN_FILE + '.index.json')):
    return TorchBinDir(directory)
  raise UserError(f'{directory} has neither {single} nor {BIN_FILE} (nor their .index.json); '
                  'expected the weights of a HF checkpoint.')
