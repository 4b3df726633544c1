"""Reading the directories `convert` wrote: their JSON description and params, and a converted
LLM's backbone config, read whole or one parameter at a time.

A converted LLM directory holds
  params/          Orbax checkpoint of the backbone params (the source's dtype), with
                   the blocks stored one by one under decoder/layers/{0..L-1}
  model.json       {'backbone': the BackboneConfig, 'tie_embeddings', 'hf_config': the
                   source's config.json, 'source'}
  tokenizer files  the source's: tokenizer.model, or tokenizer.json with the JSON files
                   beside it that name its special tokens and chat template
Dimension letters: L layers.
"""

import functools
import operator
import os
from typing import Callable, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from monoformer_jax.base import files
from monoformer_jax.base.errors import UserError
from monoformer_jax.base.workdir_layout import LLM_SOURCE
from monoformer_jax.nn.layers import BackboneConfig
from monoformer_jax.nn.rope import RopeKind, RopeScaling


PARAMS, MODEL_JSON = 'params', 'model.json'


def source_meta(directory: str) -> dict:
  """The model.json of a converted directory, or of the one a workdir was trained from (its
  copy); empty if neither is there."""
  for name in (MODEL_JSON, LLM_SOURCE):
    path = os.path.join(directory, name)
    if files.isfile(path):
      return files.read_json(path)
  return {}


def hf_source(directory: str) -> Optional[dict]:
  """The HF config.json a converted directory, or a workdir trained from one, came from."""
  return source_meta(directory).get('hf_config')


def get(tree, keys):
  """tree[keys[0]][keys[1]]..."""
  return functools.reduce(operator.getitem, keys, tree)


def nest(keys, leaf):
  """{keys[0]: {keys[1]: ... leaf}}."""
  return functools.reduce(lambda inner, key: {key: inner}, reversed(keys), leaf)


def put(tree: dict, keys, leaf) -> None:
  """tree[keys[0]][keys[1]]... = leaf, making the dicts on the way."""
  functools.reduce(lambda inner, key: inner.setdefault(key, {}), keys[:-1], tree)[keys[-1]] = leaf


def check_param(name: str, got, want, source: str, missing: str) -> None:
  """A parameter read from `source` (got) against the model's own (want): both there, else
  UserError(missing); of one shape, else a UserError naming both shapes."""
  if got is None or want is None:
    raise UserError(missing)
  if tuple(got.shape) != tuple(want.shape):
    raise UserError(f'parameter {name} has shape {tuple(got.shape)} in {source}; the model config '
                    f'gives {tuple(want.shape)}.')


def stack_layers(layers: list[dict]) -> dict:
  """Per-block trees -> one tree of [L, ...] arrays (the nn.scan layout).

  Fills preallocated arrays block by block, so the peak is the result plus the
  inputs, never a second copy of the whole stack."""
  def stack(*leaves):
    out = np.empty((len(leaves),) + leaves[0].shape, leaves[0].dtype)
    for i, leaf in enumerate(leaves):
      out[i] = leaf
    return out
  return jax.tree.map(stack, *layers)


def config_to_json(cfg: BackboneConfig) -> dict:
  r = cfg.rope_scaling
  return dict(vocab_size=cfg.vocab_size, width=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads,
              num_kv_heads=cfg.num_kv_heads, mlp_dim=cfg.mlp_dim, rope_theta=cfg.rope_theta,
              norm_eps=cfg.norm_eps, head_width=cfg.head_width, attention_bias=cfg.attention_bias,
              rope_scaling=None if r is None else dict(
                  kind=r.kind.value, factor=r.factor, low_freq_factor=r.low_freq_factor,
                  high_freq_factor=r.high_freq_factor, original_max_position=r.original_max_position))


def config_from_json(d: Mapping) -> BackboneConfig:
  d = dict(d)
  r = d.pop('rope_scaling')
  scaling = None if r is None else RopeScaling(**dict(r, kind=RopeKind(r['kind'])))
  return BackboneConfig(rope_scaling=scaling, **d)


def read_meta(path: str, meta_file: str = MODEL_JSON, kind: str = 'llama') -> dict:
  """The JSON description of a directory `convert KIND` wrote."""
  meta_path = os.path.join(path, meta_file)
  if not files.isfile(meta_path):
    raise UserError(f'{path} is not a converted {kind} directory (no {meta_file}); create one '
                    f'with `python -m monoformer_jax convert {kind}`.')
  return files.read_json(meta_path)


def read_converted(path: str, meta_file: str, kind: str) -> tuple[dict, dict]:
  """(the JSON description, params as host arrays) of a directory `convert KIND` wrote."""
  meta = read_meta(path, meta_file, kind)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(os.path.join(files.absolute(path), PARAMS))
  except (ValueError, KeyError, FileNotFoundError, OSError) as e:
    raise UserError(f'the params in {path} cannot be read ({type(e).__name__}).') from e
  return meta, jax.tree.map(np.asarray, params)


def load_llm(path: str) -> tuple[dict, BackboneConfig, bool]:
  """(params as host arrays, backbone config, tie_embeddings) of a converted LLM directory."""
  meta, params = read_converted(path, MODEL_JSON, 'llama')
  cfg = config_from_json(meta['backbone'])
  blocks = params['decoder']['layers']
  params['decoder']['layers'] = stack_layers([blocks[str(i)] for i in range(cfg.depth)])
  return params, cfg, bool(meta['tie_embeddings'])


def leaf_reader(path: str) -> tuple[BackboneConfig, bool, np.dtype, Callable[..., np.ndarray]]:
  """(backbone config, tie_embeddings, stored dtype, param) of a converted LLM directory, where
  param(*path) reads one parameter in our layout (a decoder parameter stacked over its blocks,
  which the directory stores one by one), so that memory holds one parameter at a time."""
  meta = read_meta(path)
  cfg = config_from_json(meta['backbone'])
  params_dir = os.path.join(files.absolute(path), PARAMS)
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      stored = ckptr.metadata(params_dir)
  except (ValueError, KeyError, FileNotFoundError, OSError) as e:
    raise UserError(f'the params in {path} cannot be read ({type(e).__name__}).') from e
  stored = getattr(stored, 'item_metadata', stored)  # orbax versions differ in the wrapping
  stored = getattr(stored, 'tree', stored)
  dtype = np.dtype(stored['norm']['scale'].dtype)

  def restore(item):
    with ocp.PyTreeCheckpointer() as ckptr:
      return ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True))

  def abstract(node, keys):  # the stored leaf at keys, as the restore item it takes
    leaf = get(node, keys)
    return nest(keys, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))

  def param(*keys):
    if keys[:2] != ('decoder', 'layers'):
      return np.asarray(get(restore(abstract(stored, keys)), keys))
    blocks, sub = range(cfg.depth), keys[2:]
    layers = stored['decoder']['layers']
    item = {'decoder': {'layers': {str(i): abstract(layers[str(i)], sub) for i in blocks}}}
    out = restore(item)['decoder']['layers']
    return np.stack([np.asarray(get(out[str(i)], sub)) for i in blocks])

  return cfg, bool(meta['tie_embeddings']), dtype, param
