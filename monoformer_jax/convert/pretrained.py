"""Converted LLM directories: HF LLaMA -> Orbax, and the text backbone -> HF.

A converted directory holds
  params/          Orbax checkpoint of the backbone params (the source's dtype), with
                   the blocks stored one by one under decoder/layers/{0..L-1}
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
  """HF LlamaForCausalLM directory (safetensors) -> converted directory.

  Memory stays near the checkpoint's size: each tensor is read, moved into a
  jax array (the numpy copy dropped), and Orbax writes with a bounded number of
  bytes in flight; blocks are kept apart so no [L, ...] stack is ever built.
  """
  cfg, tie = llama.config_from_hf(read_hf_config(src), os.path.join(src, 'config.json'))
  tensors = safetensors_io.SafetensorsDir(src)
  put = lambda tree: jax.tree.map(jax.device_put, tree)  # noqa: E731
  params = put(llama.outer_from_hf(tensors, cfg, tie))
  params['decoder'] = {'layers': {str(i): put(llama.layer_from_hf(tensors, cfg, i))
                                  for i in range(cfg.depth)}}
  largest = max(x.nbytes for x in jax.tree.leaves(params))
  handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=max(0.15, 1.1 * largest / 1e9))
  with atomic_directory(dst) as tmp:
    with ocp.Checkpointer(handler) as ckptr:
      ckptr.save(os.path.join(tmp, PARAMS), args=ocp.args.PyTreeSave(params))
    with open(os.path.join(tmp, MODEL_JSON), 'w') as f:
      json.dump({'backbone': llama.config_to_json(cfg), 'tie_embeddings': tie,
                 'source': os.path.abspath(src)}, f, indent=1)
    if os.path.exists(os.path.join(src, TOKENIZER)):
      shutil.copy(os.path.join(src, TOKENIZER), os.path.join(tmp, TOKENIZER))


def read_converted(path: str, meta_file: str, kind: str) -> tuple[dict, dict]:
  """(the JSON description, params as host arrays) of a directory `convert KIND` wrote."""
  meta_path = os.path.join(path, meta_file)
  if not os.path.isfile(meta_path):
    raise UserError(f'{path} is not a converted {kind} directory (no {meta_file}); create one '
                    f'with `python -m monoformer_jax convert {kind}`.')
  with open(meta_path) as f:
    meta = json.load(f)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(os.path.join(os.path.abspath(path), PARAMS))
  except (ValueError, KeyError, FileNotFoundError, OSError) as e:
    raise UserError(f'the params in {path} cannot be read ({type(e).__name__}).') from e
  return meta, jax.tree.map(np.asarray, params)


def load(path: str) -> tuple[dict, BackboneConfig, bool]:
  """(params as host arrays, backbone config, tie_embeddings) of a converted LLM directory."""
  meta, params = read_converted(path, MODEL_JSON, 'llama')
  cfg = llama.config_from_json(meta['backbone'])
  blocks = params['decoder']['layers']
  params['decoder']['layers'] = llama.stack_layers([blocks[str(i)] for i in range(cfg.depth)])
  return params, cfg, bool(meta['tie_embeddings'])


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


def _check_backbone(cfg: BackboneConfig, model_cfg: BackboneConfig, path: str) -> None:
  # Shapes are compared parameter by parameter later; these settings leave no trace in them.
  for field in ('rope_theta', 'rope_scaling', 'norm_eps'):
    got, want = getattr(cfg, field), getattr(model_cfg, field)
    if got != want:
      raise UserError(f'{path} has {field} = {got}, but the model config gives {want}.')
  if model_cfg.vocab_size < cfg.vocab_size:
    raise UserError(f'{path} has {cfg.vocab_size} vocabulary rows; config key model.vocab_size '
                    f'is only {model_cfg.vocab_size}.')


def graft_backbone(params: dict, path: str, model_cfg: BackboneConfig, tie: bool) -> dict:
  """`params` with the backbone replaced by the converted LLM at `path` (host arrays).

  Shapes are checked leaf by leaf; vocabulary rows beyond the LLM's (the special
  tokens and any padding) are set to the mean of its rows. MonoFormer's own
  parameters keep their initialization.
  """
  pretrained, cfg, pretrained_tie = load(path)
  _check_backbone(cfg, model_cfg, path)
  if pretrained_tie != tie:
    raise UserError(f'{path} has tie_embeddings = {pretrained_tie}; config key '
                    f'model.tie_embeddings is {tie}.')
  extra = model_cfg.vocab_size - cfg.vocab_size

  def extend(rows: np.ndarray, axis: int) -> np.ndarray:
    mean = rows.astype(np.float32).mean(axis=axis, keepdims=True)
    return np.concatenate([rows.astype(np.float32), np.repeat(mean, extra, axis=axis)], axis=axis)

  pretrained['embed_tokens']['embedding'] = extend(pretrained['embed_tokens']['embedding'], 0)
  if 'lm_head' in pretrained:
    pretrained['lm_head']['kernel'] = extend(pretrained['lm_head']['kernel'], 1)

  flat_target = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  merged = dict(params)
  for key, subtree in pretrained.items():
    for leaf_path, value in jax.tree_util.tree_flatten_with_path(subtree)[0]:
      full = (jax.tree_util.DictKey(key),) + tuple(leaf_path)
      name = '/'.join(str(getattr(p, 'key', p)) for p in full)
      target = flat_target.get(full)
      if target is None:
        raise UserError(f'parameter {name} of {path} has no counterpart in the model.')
      if tuple(target.shape) != tuple(value.shape):
        raise UserError(f'parameter {name} has shape {tuple(value.shape)} in {path}, but the model '
                        f'config gives {tuple(target.shape)}.')
    merged[key] = jax.tree.map(lambda v, t: np.asarray(v).astype(t.dtype), subtree, params[key])
  return merged
