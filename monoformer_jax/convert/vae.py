"""diffusers AutoencoderKL directory -> a converted VAE directory (params/ and vae.json)."""

import json
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp

from monoformer_jax.base import files
from monoformer_jax.base.errors import UserError
from monoformer_jax.convert import safetensors_io
from monoformer_jax.nn import converted
from monoformer_jax.nn.vae import VAE_JSON, AutoencoderKL, VAEConfig


_DIFFUSERS_FILE = 'diffusion_pytorch_model.safetensors'


def config_from_diffusers(d: dict, source: str) -> VAEConfig:
  if d.get('_class_name', 'AutoencoderKL') != 'AutoencoderKL':
    raise UserError(f'{source} describes {d.get("_class_name")}; only AutoencoderKL is supported.')
  for key, wanted in (('act_fn', 'silu'), ('mid_block_add_attention', True),
                      ('use_quant_conv', True), ('use_post_quant_conv', True)):
    if d.get(key, wanted) != wanted:
      raise UserError(f'{source} sets {key} = {d[key]!r}; only {wanted!r} is supported.')
  for key in ('down_block_types', 'up_block_types'):
    kinds = set(d.get(key, []))
    if kinds - {'DownEncoderBlock2D', 'UpDecoderBlock2D'}:
      raise UserError(f'{source} uses {key} {sorted(kinds)}; only DownEncoderBlock2D / '
                      'UpDecoderBlock2D are supported.')
  return VAEConfig(block_out_channels=tuple(d['block_out_channels']),
                   layers_per_block=d.get('layers_per_block', 2),
                   in_channels=d.get('in_channels', 3), latent_channels=d.get('latent_channels', 4),
                   norm_groups=d.get('norm_num_groups', 32))


def flax_path(name: str) -> tuple[str, ...]:
  """'encoder.down_blocks.0.resnets.1.conv1.weight' -> ('encoder', 'down_blocks_0_resnets_1', 'conv1', 'kernel')."""
  key = re.sub(r'\.(\d+)', r'_\1', name)
  key = re.sub(r'((?:down|up)_blocks_\d+)\.', r'\1_', key)
  key = re.sub(r'(samplers_0)\.conv', r'\1_conv', key)
  *modules, leaf = key.split('.')
  return tuple(modules) + (leaf,)


def params_from_diffusers(tensors) -> dict:
  params = {}
  for name in tensors.keys():
    value = np.asarray(tensors[name], np.float32)
    *modules, leaf = flax_path(name)
    if leaf == 'weight':
      if value.ndim == 4:
        leaf, value = 'kernel', value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
      elif value.ndim == 2:
        leaf, value = 'kernel', value.T
      else:
        leaf = 'scale'
    converted.put(params, modules + [leaf], value)
  return params


def tensors_from_params(params: dict, prefix: str = '') -> list[tuple[str, np.ndarray]]:
  """The inverse of params_from_diffusers: (diffusers name, float32 array) pairs."""
  out = []
  for keys, value in jax.tree_util.tree_flatten_with_path(params)[0]:
    *modules, leaf = [k.key for k in keys]
    name = re.sub(r'(\.\d+)_', r'\1.', re.sub(r'_(\d+)', r'.\1', '.'.join(modules)))
    value = np.asarray(value, np.float32)
    if leaf == 'kernel':
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T  # HWIO -> OIHW
    out.append((f'{prefix}{name}.{"bias" if leaf == "bias" else "weight"}', value))
  return out


def check_against(params: dict, abstract: dict, source: str, model_name: str = 'the VAE') -> None:
  """Every parameter of the Flax model present with its shape, and nothing else."""
  want = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  got = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  for name in sorted(set(want) - set(got)):
    raise UserError(f'{source} lacks the tensor for parameter {name}.')
  for name in sorted(set(got) - set(want)):
    raise UserError(f'{source} has a tensor for {name}, which {model_name} does not use.')
  for name, shape in want.items():
    if tuple(got[name]) != tuple(shape):
      raise UserError(f'parameter {name} has shape {tuple(got[name])} in {source}; '
                      f'{model_name} expects {tuple(shape)}.')


def convert_vae(src: str, dst: str) -> None:
  config_path = os.path.join(src, 'config.json')
  if not files.isfile(config_path):
    raise UserError(f'{config_path} does not exist; expected a diffusers AutoencoderKL directory.')
  cfg = config_from_diffusers(files.read_json(config_path), config_path)
  weights = os.path.join(src, _DIFFUSERS_FILE)
  params = params_from_diffusers(safetensors_io.SafetensorsDir(src, _DIFFUSERS_FILE))
  model = AutoencoderKL(cfg)
  images = jax.ShapeDtypeStruct((1, 8, 8, cfg.in_channels), np.float32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), images)['params']
  check_against(params, abstract, weights)
  with files.atomic_directory(dst, last=VAE_JSON) as tmp:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, converted.PARAMS), params)
    files.write_text(os.path.join(tmp, VAE_JSON), json.dumps(dict(cfg.__dict__), indent=1))
