"""Starting from a converted LLM: the config's model section described from it (model.size
'auto'), the check that it fits a model, and its weights grafted into a fresh MonoFormer
(MonoFormer's own parameters keep their initialization).
"""

import copy
import hashlib
import json
import os
from typing import Optional

import jax
import ml_collections
import numpy as np

from monoformer_jax.base import files
from monoformer_jax.base.errors import UserError
from monoformer_jax.data import tokenizer as tokenizer_lib
from monoformer_jax.nn import converted
from monoformer_jax.nn.layers import BackboneConfig


def describe(model: ml_collections.ConfigDict, cfg: BackboneConfig, tie: bool) -> None:
  """Writes a backbone's shape, rope and norm settings into a config's model section
  (size 'custom')."""
  model.size = 'custom'
  model.width, model.depth, model.mlp_dim = cfg.width, cfg.depth, cfg.mlp_dim
  model.num_heads, model.num_kv_heads, model.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  model.rope_theta, model.norm_eps, model.tie_embeddings = cfg.rope_theta, cfg.norm_eps, tie
  model.attention_bias = cfg.attention_bias
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
  meta = converted.read_meta(path)
  cfg = converted.config_from_json(meta['backbone'])
  tok = tokenizer_lib.of_llm(path)
  resolved = copy.deepcopy(config)
  with resolved.unlocked():
    describe(resolved.model, cfg, bool(meta['tie_embeddings']))
    resolved.model.vocab_size = max(cfg.vocab_size, tok.vocab_size)
    resolved.data.tokenizer_vocab_size = tok.num_pieces
    resolved.model.context_length = (meta.get('hf_config') or {}).get(
        'max_position_embeddings', config.model.context_length)
  return resolved


def check_compatible(path: str, model_cfg: BackboneConfig, tie: bool) -> None:
  """The converted LLM at `path` fits the model: shape, rope, norm and tying agree, and the
  model's vocabulary holds the LLM's. Reads model.json only, so it costs nothing."""
  meta = converted.read_meta(path)
  cfg = converted.config_from_json(meta['backbone'])
  # These settings leave no trace in the parameter shapes, so they are compared here.
  for field in ('width', 'depth', 'num_heads', 'num_kv_heads', 'mlp_dim', 'head_dim', 'rope_theta',
                'rope_scaling', 'norm_eps', 'attention_bias'):
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


def llm_params(path: str, model_cfg: BackboneConfig, tie: bool) -> dict:
  """The converted LLM at `path` as the model's backbone parameters (host arrays): vocabulary
  rows beyond the LLM's (the special tokens and any padding) set to the mean of its rows."""
  check_compatible(path, model_cfg, tie)
  pretrained, _, _ = converted.load_llm(path)
  for keys in VOCABULARY_AXIS:
    if keys[0] in pretrained:
      converted.put(pretrained, keys, with_vocabulary(keys, converted.get(pretrained, keys),
                                                      model_cfg.vocab_size))
  return pretrained


# The LLM's parameters with a vocabulary axis, and that axis.
VOCABULARY_AXIS = {('embed_tokens', 'embedding'): 0, ('lm_head', 'kernel'): 1}


def with_vocabulary(keys: tuple[str, ...], value: np.ndarray, vocab_size: int) -> np.ndarray:
  """A converted LLM's parameter at `keys` with its vocabulary axis extended to vocab_size, the
  new rows (the special tokens and any padding) the mean of its rows, in float32."""
  axis = VOCABULARY_AXIS.get(keys)
  if axis is None:
    return value
  rows = value.astype(np.float32)
  mean = rows.mean(axis=axis, keepdims=True)
  extra = vocab_size - rows.shape[axis]
  return np.concatenate([rows, np.repeat(mean, extra, axis=axis)], axis=axis)


def pretrained_backbone(target: dict, path: str, model_cfg: BackboneConfig, tie: bool) -> dict:
  """The converted LLM at `path` as the model's backbone modules (host arrays), checked leaf by
  leaf against `target` (the model's parameters or their shapes) and cast to its dtypes.
  MonoFormer's own modules are not in it: they keep their initialization."""
  flat_target = dict(jax.tree_util.tree_flatten_with_path(target)[0])

  def checked(full_path, value):  # the model may hold more (LoRA adapters) than the LLM
    name = '/'.join(str(getattr(p, 'key', p)) for p in full_path)
    want = flat_target.get(tuple(full_path))
    converted.check_param(name, value, want, path,
                          f'parameter {name} of {path} has no counterpart in the model.')
    return np.asarray(value).astype(want.dtype)
  return jax.tree_util.tree_map_with_path(checked, llm_params(path, model_cfg, tie))


def reference(path: str) -> dict:
  """What a run with a frozen backbone records of the converted LLM it reads at every start:
  the directory and a fingerprint of its files (their CRC32Cs, which a bucket lists without a
  download, and its model.json)."""
  crcs = files.checksums(os.path.join(path, converted.PARAMS))
  meta = files.read_bytes(os.path.join(path, converted.MODEL_JSON))
  digest = hashlib.sha256(json.dumps(crcs, sort_keys=True).encode() + meta).hexdigest()
  return dict(path=path, fingerprint=digest)


def check_reference(recorded: Optional[dict], current: dict, workdir: str) -> None:
  """The converted LLM reference() described as `current` is the one `recorded` describes (a
  checkpoint saved before references were recorded passes)."""
  if recorded and recorded['fingerprint'] != current['fingerprint']:
    raise UserError(f'the converted LLM {current["path"]} has changed since the checkpoints of '
                    f'{workdir} '
                    'were trained on it (its files differ from those recorded), and their frozen '
                    'backbone is read from there; restore that directory or train anew.')
