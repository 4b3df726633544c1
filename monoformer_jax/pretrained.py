"""Converted directories at run time: the LLM a backbone starts from, and the params of any
directory `convert` wrote.

A converted LLM directory holds
  params/          Orbax checkpoint of the backbone params (the source's dtype), with
                   the blocks stored one by one under decoder/layers/{0..L-1}
  model.json       {'backbone': the BackboneConfig, 'tie_embeddings', 'hf_config': the
                   source's config.json, 'source'}
  tokenizer.model  the source's sentencepiece model, when it has one
Dimension letters: L layers.
"""

import copy
import json
import os
from typing import Callable, Mapping, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from monoformer_jax import tokenizer as tokenizer_lib
from monoformer_jax.errors import UserError
from monoformer_jax.layers import BackboneConfig
from monoformer_jax.rope import RopeKind, RopeScaling

PARAMS, MODEL_JSON, TOKENIZER = 'params', 'model.json', 'tokenizer.model'
SOURCE_JSON = 'llm_source.json'  # a workdir's copy of the model.json its backbone started from


def hf_source(directory: str) -> Optional[dict]:
  """The HF config.json a converted directory, or a workdir trained from one, came from."""
  for name in (MODEL_JSON, SOURCE_JSON):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      with open(path) as f:
        return json.load(f).get('hf_config')
  return None


def stack_layers(layers: list[dict]) -> dict:
  """Per-block trees -> one tree of [L, ...] arrays (the nn.scan layout).

  Fills preallocated arrays block by block, so the peak is the result plus the
  inputs, never a second copy of the whole stack.
  """
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
              norm_eps=cfg.norm_eps, head_width=cfg.head_width,
              rope_scaling=None if r is None else dict(
                  kind=r.kind.value, factor=r.factor, low_freq_factor=r.low_freq_factor,
                  high_freq_factor=r.high_freq_factor, original_max_position=r.original_max_position))


def config_from_json(d: Mapping) -> BackboneConfig:
  d = dict(d)
  r = d.pop('rope_scaling')
  scaling = None if r is None else RopeScaling(**dict(r, kind=RopeKind(r['kind'])))
  return BackboneConfig(rope_scaling=scaling, **d)


def describe(model: ml_collections.ConfigDict, cfg: BackboneConfig, tie: bool) -> None:
  """Writes a backbone's shape, rope and norm settings into a config's model section
  (size 'custom')."""
  model.size = 'custom'
  model.width, model.depth, model.mlp_dim = cfg.width, cfg.depth, cfg.mlp_dim
  model.num_heads, model.num_kv_heads, model.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  model.rope_theta, model.norm_eps, model.tie_embeddings = cfg.rope_theta, cfg.norm_eps, tie
  r = cfg.rope_scaling
  model.rope_scaling.kind = 'none' if r is None else r.kind.value
  if r is not None:
    model.rope_scaling.factor, model.rope_scaling.original_max_position = r.factor, r.original_max_position
    model.rope_scaling.low_freq_factor = r.low_freq_factor
    model.rope_scaling.high_freq_factor = r.high_freq_factor


def resolve_auto(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config, or with model.size 'auto' a copy whose model section describes the converted
  LLM of model.init_from: shape, rope, norm, tying, its context, and a vocabulary with room for
  the special tokens its tokenizer gets appended."""
  if config.model.size != 'auto':
    return config
  path = config.model.init_from
  if not path:
    raise UserError('config key model.size is \'auto\', which takes the shape of model.init_from; '
                    'set model.init_from to a converted LLM directory.')
  meta = read_meta(path)
  cfg = config_from_json(meta['backbone'])
  tok = tokenizer_lib.Tokenizer(tokenizer_lib.llm_model_file(path))
  resolved = copy.deepcopy(config)
  with resolved.unlocked():
    describe(resolved.model, cfg, bool(meta['tie_embeddings']))
    resolved.model.vocab_size = max(cfg.vocab_size, tok.vocab_size)
    resolved.data.tokenizer_vocab_size = tok.num_pieces
    resolved.model.context_length = (meta.get('hf_config') or {}).get(
        'max_position_embeddings', config.model.context_length)
  return resolved


def read_meta(path: str, meta_file: str = MODEL_JSON, kind: str = 'llama') -> dict:
  """The JSON description of a directory `convert KIND` wrote."""
  meta_path = os.path.join(path, meta_file)
  if not os.path.isfile(meta_path):
    raise UserError(f'{path} is not a converted {kind} directory (no {meta_file}); create one '
                    f'with `python -m monoformer_jax convert {kind}`.')
  with open(meta_path) as f:
    return json.load(f)


def read_converted(path: str, meta_file: str, kind: str) -> tuple[dict, dict]:
  """(the JSON description, params as host arrays) of a directory `convert KIND` wrote."""
  meta = read_meta(path, meta_file, kind)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(os.path.join(os.path.abspath(path), PARAMS))
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
  params_dir = os.path.join(os.path.abspath(path), PARAMS)
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

  def param(*keys):
    if keys[:2] != ('decoder', 'layers'):
      node = stored
      for key in keys:
        node = node[key]
      item = jax.ShapeDtypeStruct(node.shape, node.dtype)
      for key in reversed(keys):
        item = {key: item}
      out = restore(item)
      for key in keys:
        out = out[key]
      return np.asarray(out)
    blocks = {}
    for i in range(cfg.depth):
      node = stored['decoder']['layers'][str(i)]
      for key in keys[2:]:
        node = node[key]
      leaf = jax.ShapeDtypeStruct(node.shape, node.dtype)
      for key in reversed(keys[2:]):
        leaf = {key: leaf}
      blocks[str(i)] = leaf
    out = restore({'decoder': {'layers': blocks}})['decoder']['layers']
    parts = []
    for i in range(cfg.depth):
      node = out[str(i)]
      for key in keys[2:]:
        node = node[key]
      parts.append(np.asarray(node))
    return np.stack(parts)

  return cfg, bool(meta['tie_embeddings']), dtype, param


def check_compatible(path: str, model_cfg: BackboneConfig, tie: bool) -> None:
  """The converted LLM at `path` fits the model: shape, rope, norm and tying agree, and the
  model's vocabulary holds the LLM's. Reads model.json only, so it costs nothing."""
  meta = read_meta(path)
  cfg = config_from_json(meta['backbone'])
  # These settings leave no trace in the parameter shapes, so they are compared here.
  for field in ('width', 'depth', 'num_heads', 'num_kv_heads', 'mlp_dim', 'head_dim', 'rope_theta',
                'rope_scaling', 'norm_eps'):
    got, want = getattr(cfg, field), getattr(model_cfg, field)
    if got != want:
      raise UserError(f'{path} has {field} = {got}, but the model config gives {want}; set '
                      '--config.model.size=auto to take the shape from the converted LLM.')
  if model_cfg.vocab_size < cfg.vocab_size:
    raise UserError(f'{path} has {cfg.vocab_size} vocabulary rows; config key model.vocab_size '
                    f'is only {model_cfg.vocab_size}.')
  if bool(meta['tie_embeddings']) != tie:
    raise UserError(f'{path} has tie_embeddings = {bool(meta["tie_embeddings"])}; config key '
                    f'model.tie_embeddings is {tie}.')


def graft_backbone(params: dict, path: str, model_cfg: BackboneConfig, tie: bool) -> dict:
  """`params` with the backbone replaced by the converted LLM at `path` (host arrays).

  Shapes are checked leaf by leaf; vocabulary rows beyond the LLM's (the special
  tokens and any padding) are set to the mean of its rows. MonoFormer's own
  parameters keep their initialization.
  """
  check_compatible(path, model_cfg, tie)
  pretrained, cfg, _ = load_llm(path)
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
