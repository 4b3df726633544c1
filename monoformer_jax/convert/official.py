"""Official MonoFormer checkpoints (PyTorch, HF layout) -> a workdir `sample` can use.

The source is what `MonoFormerForCausalLM.save_pretrained` writes: LLaMA
weights under `model.*` and `lm_head`, MonoFormer's modules (`t_embedder.mlp.{0,2}`,
`x_embedder`, `t_projector.{0,2}`, `final_layer.linear`,
`final_layer.adaLN_modulation.1`), a config.json with the MonoFormer fields, and
the tokenizer with its added tokens (<PAD>, <image>, <|im_start|>, <|im_end|>).
Layouts already agree with ours (patch features (c, i, j) in, (i, j, c) out;
time token before the image; sin-cos grid order), so only Linear weights are
transposed. The result is a workdir: tokenizer, special_tokens.json, and a
step-0 checkpoint whose params and EMA params are the official weights.
"""

import json
import os
import shutil

import jax
import numpy as np

from monoformer_jax import checkpoint, config_lib, files, pretrained, sharding, steps
from monoformer_jax import model as model_lib
from monoformer_jax.convert import llama, torch_bin
from monoformer_jax.errors import UserError
from monoformer_jax.tokenizer import MODEL_FILE, SPECIALS_FILE

_MODULES = {  # official Linear -> our Dense path
    't_embedder.mlp.0': ('t_embedder', 'fc1'),
    't_embedder.mlp.2': ('t_embedder', 'fc2'),
    't_projector.0': ('t_projector', 'fc1'),
    't_projector.2': ('t_projector', 'fc2'),
    'x_embedder': ('x_embedder',),
    'final_layer.linear': ('final_layer', 'linear'),
    'final_layer.adaLN_modulation.1': ('final_layer', 'adaLN_modulation'),
}
_OFFICIAL_TOKENS = {'im_start': '<|im_start|>', 'im_end': '<|im_end|>', 'pad': '<PAD>'}


def check_supported(hf: dict, source: str) -> None:
  wanted = dict(decoder_t_embed='add_before_image_tokens', use_adaln_final_layer=True,
                add_pos_embed_each_layer=False)
  for key, value in wanted.items():
    if hf.get(key, value) != value:
      raise UserError(f'{source} sets {key} = {hf.get(key)!r}; only {value!r} is supported.')


def monoformer_params(tensors) -> dict:
  """MonoFormer's own modules (float32) from the official tensors."""
  params = {}
  for name, path in _MODULES.items():
    for leaf, hf_leaf in (('kernel', 'weight'), ('bias', 'bias')):
      key = f'{name}.{hf_leaf}'
      if key not in tensors:
        raise UserError(f'tensor {key} is missing from the official checkpoint.')
      value = np.asarray(tensors[key], np.float32)
      node = params
      for part in path:
        node = node.setdefault(part, {})
      node[leaf] = value.T if leaf == 'kernel' else value
  return params


def special_ids(src: str) -> dict[str, int]:
  """Ids of the official added tokens, from added_tokens.json or tokenizer.json."""
  added = {}
  path = os.path.join(src, 'added_tokens.json')
  if os.path.exists(path):
    with open(path) as f:
      added = json.load(f)
  elif os.path.exists(os.path.join(src, 'tokenizer.json')):
    with open(os.path.join(src, 'tokenizer.json')) as f:
      added = {t['content']: t['id'] for t in json.load(f).get('added_tokens', [])}
  missing = [t for t in _OFFICIAL_TOKENS.values() if t not in added]
  if missing:
    raise UserError(f'{src} names no id for {", ".join(missing)} (looked in added_tokens.json and '
                    'tokenizer.json).')
  return {ours: added[theirs] for ours, theirs in _OFFICIAL_TOKENS.items()}


def workdir_config(hf: dict, cfg, tie: bool, vae_dir: str):
  config = config_lib.base_config()
  m = config.model
  pretrained.describe(m, cfg, tie)
  m.vocab_size = cfg.vocab_size
  m.patch_size, m.image_channels = hf['patch_size'], hf['in_channels']
  latent = hf['image_size'] // 8  # SD-VAE downsamples by 8
  m.image_size = (latent, latent)
  m.learn_sigma, m.use_pos_embed = hf['learn_sigma'], hf['use_pos_embed']
  m.image_mask = 'hybrid' if hf.get('use_bi_attn_img_tokens', True) else 'causal'
  m.context_length = hf.get('max_position_embeddings', m.context_length)
  m.vae = vae_dir
  config.data.tokenizer_vocab_size = cfg.vocab_size
  config.data.prompt_len = 64
  config.sample.guidance_channels = 'first_three'  # the official sampler's guidance
  config.train.num_steps = 1
  return config


def convert_official(src: str, dst: str, vae_dir: str) -> None:
  hf = llama.read_hf_config(src)
  source = os.path.join(src, 'config.json')
  check_supported(hf, source)
  if vae_dir and not os.path.isdir(vae_dir):
    raise UserError(f'--vae names {vae_dir}, which does not exist.')
  cfg, tie = llama.config_from_hf(dict(hf, architectures=['LlamaForCausalLM']), source)
  tensors = torch_bin.open_weights(src)
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), llama.backbone_from_hf(tensors, cfg, tie))
  params.update(monoformer_params(tensors))
  ids = special_ids(src)
  if not os.path.exists(os.path.join(src, MODEL_FILE)):
    raise UserError(f'{src} has no {MODEL_FILE} (the sentencepiece model of the LLM).')
  config = workdir_config(hf, cfg, tie, os.path.abspath(vae_dir) if vae_dir else '')

  model = model_lib.build(config.model)
  tx = steps.make_optimizer(config.optim, config.train.num_steps)
  layout = sharding.make_layout(config.mesh)
  abstract, shardings = steps.abstract_state(model, tx, layout)
  converted = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  for path, want in jax.tree_util.tree_flatten_with_path(abstract.params)[0]:
    got = converted.get(path)
    name = jax.tree_util.keystr(path)
    if got is None:
      raise UserError(f'the official checkpoint gives nothing for parameter {name}.')
    if tuple(got.shape) != tuple(want.shape):
      raise UserError(f'parameter {name} has shape {tuple(got.shape)} in {src}; the model '
                      f'config gives {tuple(want.shape)}.')
  params = jax.device_put(params, shardings.params)
  state = steps.TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                           opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(params),
                           ema_params=params)
  with files.atomic_directory(dst) as tmp:
    shutil.copy(os.path.join(src, MODEL_FILE), os.path.join(tmp, MODEL_FILE))
    with open(os.path.join(tmp, SPECIALS_FILE), 'w') as f:
      json.dump(ids, f)
    ckpt = checkpoint.Checkpointer(tmp)
    ckpt.save(0, state, {}, config)
    ckpt.close()
