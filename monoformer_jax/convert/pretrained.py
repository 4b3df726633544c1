"""Converted LLM directories: HF LLaMA -> Orbax, and the text backbone -> HF.

A converted directory holds
  params/          Orbax checkpoint of the backbone params (the source's dtype)
  model.json       the backbone shape ({'backbone': ..., 'tie_embeddings': ...})
  tokenizer.model  the source's sentencepiece model, when it has one
and is written under DST.partial, then renamed, so a crash leaves no DST.
"""

import contextlib
import json
import os
import shutil
from typing import Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from monoformer_jax.convert import llama, safetensors_io
from monoformer_jax.errors import UserError
from monoformer_jax.layers import BackboneConfig

PARAMS, MODEL_JSON, TOKENIZER = 'params', 'model.json', 'tokenizer.model'


@contextlib.contextmanager
def atomic_directory(dst: str) -> Iterator[str]:
  """Yields a scratch directory that becomes `dst` only if the block finishes."""
  if os.path.exists(dst):
    raise UserError(f'destination {dst} already exists; remove it or choose another.')
  parent = os.path.dirname(os.path.abspath(dst))
  if not os.path.isdir(parent):
    raise UserError(f'the parent directory of {dst} does not exist.')
  tmp = os.path.abspath(dst) + '.partial'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  os.rename(tmp, dst)


def read_hf_config(src: str) -> dict:
  path = os.path.join(src, 'config.json')
  if not os.path.isfile(path):
    raise UserError(f'{path} does not exist; expected a HF checkpoint directory with config.json.')
  with open(path) as f:
    return json.load(f)


def convert_llama(src: str, dst: str) -> None:
  """HF LlamaForCausalLM directory (safetensors) -> converted directory."""
  cfg, tie = llama.config_from_hf(read_hf_config(src), os.path.join(src, 'config.json'))
  params = llama.backbone_from_hf(safetensors_io.SafetensorsDir(src), cfg, tie)
  with atomic_directory(dst) as tmp:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, PARAMS), params)
    with open(os.path.join(tmp, MODEL_JSON), 'w') as f:
      json.dump({'backbone': llama.config_to_json(cfg), 'tie_embeddings': tie,
                 'source': os.path.abspath(src)}, f, indent=1)
    if os.path.exists(os.path.join(src, TOKENIZER)):
      shutil.copy(os.path.join(src, TOKENIZER), os.path.join(tmp, TOKENIZER))


def load(path: str) -> tuple[dict, BackboneConfig, bool]:
  """(params as host arrays, backbone config, tie_embeddings) of a converted directory."""
  meta_path = os.path.join(path, MODEL_JSON)
  if not os.path.isfile(meta_path):
    raise UserError(f'{path} is not a converted LLM directory (no {MODEL_JSON}); create one with '
                    '`python -m monoformer_jax convert llama`.')
  with open(meta_path) as f:
    meta = json.load(f)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(os.path.join(os.path.abspath(path), PARAMS))
  except (ValueError, KeyError, FileNotFoundError, OSError) as e:
    raise UserError(f'the params in {path} cannot be read ({type(e).__name__}).') from e
  params = jax.tree.map(np.asarray, params)
  return params, llama.config_from_json(meta['backbone']), bool(meta['tie_embeddings'])


def export_llama(params: dict, cfg: BackboneConfig, tie: bool, dst: str, tokenizer_file: str,
                 special_ids: tuple[int, int, int]) -> None:
  """Backbone params -> a HF LlamaForCausalLM directory (config.json + model.safetensors)."""
  tensors = llama.backbone_to_hf(params, cfg, tie)
  dtype = np.dtype(next(iter(tensors.values())).dtype)
  torch_dtype = {np.dtype(np.float32): 'float32', np.dtype(np.float16): 'float16'}.get(
      dtype, 'bfloat16')
  with atomic_directory(dst) as tmp:
    safetensors_io.write(os.path.join(tmp, safetensors_io.SINGLE_FILE), list(tensors.items()),
                         {'format': 'pt'})
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
      json.dump(llama.hf_config(cfg, tie, torch_dtype, *special_ids), f, indent=1)
    if tokenizer_file and os.path.exists(tokenizer_file):
      shutil.copy(tokenizer_file, os.path.join(tmp, TOKENIZER))
