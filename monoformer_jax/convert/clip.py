"""HF CLIP directory (CLIPModel or CLIPVisionModel) -> a converted CLIP vision tower (params/,
clip.json); and the tower's tensors under any prefix, both ways (official checkpoints hold it
under vision_encoder.vision_tower.vision_model.)."""

import dataclasses
import json
import os
import re

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from monoformer_jax.base import files
from monoformer_jax.base.errors import UserError
from monoformer_jax.convert import torch_bin, vae as vae_convert
from monoformer_jax.nn import clip, converted

HF_PREFIX = 'vision_model.'
# transformers' CLIPVisionConfig defaults: config.json files list only what differs from them.
_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, image_size=224, patch_size=32, num_channels=3,
                 layer_norm_eps=1e-5, hidden_act='quick_gelu')


def config_from_hf(d: dict, source: str) -> clip.ClipConfig:
  """The tower's shape from a CLIPModel's vision_config or a CLIPVisionModel's config."""
  if 'vision_config' in d:
    d = d['vision_config'] or {}
  elif d.get('model_type', 'clip_vision_model') != 'clip_vision_model':
    raise UserError(f'{source} describes a {d.get("model_type")!r} model; expected a CLIP '
                    '(CLIPModel or CLIPVisionModel) config.json.')
  d = {**_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
  if d['hidden_act'] not in [a.value for a in clip.Activation]:
    raise UserError(f'{source} sets hidden_act {d["hidden_act"]!r}; expected one of '
                    f'{", ".join(a.value for a in clip.Activation)}.')
  if d['num_channels'] != 3 or d['hidden_size'] % d['num_attention_heads']:
    raise UserError(f'{source}: a CLIP tower of 3 channels with heads dividing hidden_size is '
                    'expected.')
  return clip.ClipConfig(width=d['hidden_size'], mlp_dim=d['intermediate_size'],
                         depth=d['num_hidden_layers'], num_heads=d['num_attention_heads'],
                         image_size=d['image_size'], patch_size=d['patch_size'],
                         norm_eps=d['layer_norm_eps'], activation=d['hidden_act'])


def _flax_path(name: str) -> tuple[str, ...]:
  """'encoder.layers.3.self_attn.q_proj.weight' -> ('layers_3', 'q_proj', 'weight')."""
  name = re.sub(r'^encoder\.layers\.(\d+)\.(?:self_attn\.|mlp\.)?', r'layers_\1.', name)
  name = re.sub(r'^embeddings\.(patch_embedding|position_embedding)\.weight$', r'\1', name)
  name = name.replace('embeddings.class_embedding', 'class_embedding')
  return tuple(name.split('.'))


def params_from_tensors(tensors, prefix: str = HF_PREFIX) -> dict:
  """The tower's params (float32) from the tensors named prefix + the HF names."""
  params = {}
  for name in tensors.keys():
    if not name.startswith(prefix) or name.endswith('position_ids'):  # a buffer, not a weight
      continue
    path, value = _flax_path(name[len(prefix):]), np.asarray(tensors[name], np.float32)
    if path[0] == 'patch_embedding':
      path, value = ('patch_embedding', 'kernel'), value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif path[-1] == 'weight':
      path = path[:-1] + (('kernel',) if value.ndim == 2 else ('scale',))
      value = value.T if value.ndim == 2 else value
    converted.put(params, list(path), value)
  return params


def tensors_from_params(params: dict, prefix: str = HF_PREFIX) -> list[tuple[str, np.ndarray]]:
  """The inverse of params_from_tensors: (HF name, float32 array) pairs."""
  out = []
  for keys, value in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = [k.key for k in keys]
    value = np.asarray(value, np.float32)
    if path[0] in ('class_embedding', 'position_embedding', 'patch_embedding'):
      name = f'embeddings.{path[0]}' + ('' if path[0] == 'class_embedding' else '.weight')
      value = value.transpose(3, 2, 0, 1) if path[0] == 'patch_embedding' else value
    else:
      module, leaf = path[:-1], path[-1]
      if module[0].startswith('layers_'):
        sub = module[1]
        group = 'self_attn.' if sub.endswith('_proj') else ('mlp.' if sub.startswith('fc') else '')
        module = [f'encoder.layers.{module[0][len("layers_"):]}.{group}{sub}']
      hf_leaf = {'kernel': 'weight', 'scale': 'weight'}.get(leaf, leaf)
      name = '.'.join(module + [hf_leaf])
      value = value.T if leaf == 'kernel' else value
    out.append((prefix + name, value))
  return out


def abstract_params(cfg: clip.ClipConfig) -> dict:
  pixels = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), np.float32)
  return jax.eval_shape(clip.VisionTower(cfg).init, jax.random.key(0), pixels)['params']


def convert_clip(src: str, dst: str) -> None:
  config_path = os.path.join(src, 'config.json')
  if not files.isdir(src):
    raise UserError(f'CLIP directory {src} does not exist; expected a HF CLIPModel or '
                    'CLIPVisionModel directory (e.g. openai/clip-vit-large-patch14).')
  if not files.isfile(config_path):
    raise UserError(f'{config_path} does not exist; expected a HF CLIPModel or CLIPVisionModel '
                    'directory.')
  cfg = config_from_hf(files.read_json(config_path), config_path)
  tensors = torch_bin.open_weights(src)
  # CLIPModel files (and older CLIPVisionModel ones) name the tower vision_model.*; newer
  # CLIPVisionModel files name it from its embeddings on.
  prefix = HF_PREFIX if any(k.startswith(HF_PREFIX) for k in tensors.keys()) else ''
  params = params_from_tensors(tensors, prefix)
  vae_convert.check_against(params, nn.unbox(abstract_params(cfg)), src, 'the CLIP vision tower')
  with files.atomic_directory(dst, last=clip.CLIP_JSON) as tmp:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, converted.PARAMS), params)
    files.write_text(os.path.join(tmp, clip.CLIP_JSON),
                     json.dumps(dataclasses.asdict(cfg), indent=1))

