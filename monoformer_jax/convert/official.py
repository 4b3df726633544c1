"""Official MonoFormer checkpoints (PyTorch, HF layout) -> a workdir `sample` can use.

The source is what `MonoFormerForCausalLM.save_pretrained` writes: LLaMA weights under `model.*` and
`lm_head`, MonoFormer's modules (`t_embedder.mlp.{0,2}`, `x_embedder`, `t_projector.{0,2}`,
`final_layer.linear`, `final_layer.adaLN_modulation.1`), a config.json with the MonoFormer fields,
in safetensors or torch .bin files; the official training script puts the EMA weights in
`checkpoint-N/ema/` and the tokenizer beside them in `checkpoint-N/`.
Layouts already agree with ours (patch features (c, i, j) in, (i, j, c) out; time token before the
image; sin-cos grid order), so only Linear weights are transposed. The result is a workdir:
tokenizer, special_tokens.json, the source's config.json and dtype (for `export-official`), and a
step-0 checkpoint whose params and EMA params are the official weights.
"""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from monoformer_jax.base import files, sharding
from monoformer_jax.base.errors import UserError
from monoformer_jax.base.workdir_layout import TOKENIZER_JSON, TOKENIZER_MODEL, Workdir
from monoformer_jax.config import schema
from monoformer_jax.convert import hf_config, llama, torch_bin
from monoformer_jax.data.tokenizer import SentencePiece
from monoformer_jax.nn import converted
from monoformer_jax.nn.vision import VisionEncoder
from monoformer_jax.run import backbone, settings as settings_lib
from monoformer_jax.training import checkpoint, steps


MODULES = {  # official Linear -> our Dense path
    't_embedder.mlp.0': ('t_embedder', 'fc1'),
    't_embedder.mlp.2': ('t_embedder', 'fc2'),
    't_projector.0': ('t_projector', 'fc1'),
    't_projector.2': ('t_projector', 'fc2'),
    'x_embedder': ('x_embedder',),
    'final_layer.linear': ('final_layer', 'linear'),
    'final_layer.adaLN_modulation.1': ('final_layer', 'adaLN_modulation'),
}
UNDERSTANDING_MODULES = {  # the main branch's understanding models add these
    'im_embedder.0': ('im_embedder', 'fc1'),
    'im_embedder.2': ('im_embedder', 'fc2'),
}
# The official added tokens, in the order its train.py adds them after the LLM's vocabulary.
OFFICIAL_TOKENS = {'pad': '<PAD>', 'image': '<image>', 'im_start': '<|im_start|>',
                   'im_end': '<|im_end|>'}
# The commit marker of the workdir's step 0 (relative to the workdir): a reader in a bucket
# counts the step (so the workdir) finished once it is there.
_COMMITTED = os.path.join(Workdir('').checkpoint_step(0),
                          ocp.path.atomicity_types.COMMIT_SUCCESS_FILE)


def monoformer_params(tensors, understanding: bool = False) -> dict:
  """MonoFormer's own modules (float32) from the official tensors (with the im_embedder of an
  understanding model)."""
  params = {}
  for name, path in (MODULES | UNDERSTANDING_MODULES if understanding else MODULES).items():
    for leaf, hf_leaf in (('kernel', 'weight'), ('bias', 'bias')):
      key = f'{name}.{hf_leaf}'
      if key not in tensors:
        raise UserError(f'tensor {key} is missing from the official checkpoint.')
      value = np.asarray(tensors[key], np.float32)
      converted.put(params, path + (leaf,), value.T if leaf == 'kernel' else value)
  return params


def locate(src: str, use_ema: bool) -> tuple[str, list[str]]:
  """(the directory holding the weights, the directories to look for the tokenizer in): a
  checkpoint's ema/ folder when use_ema and there is one; the tokenizer there, beside it in
  src, or one level up."""
  if not files.isdir(src):
    raise UserError(f'checkpoint directory {src} does not exist.')
  ema = os.path.join(src, 'ema')
  weights = ema if use_ema and files.isfile(os.path.join(ema, 'config.json')) else src
  here = files.absolute(src).rstrip('/') or '/'
  up = os.path.dirname(here)
  search = [weights, src, here if up.endswith(':') else up]  # a bucket's root has no parent
  return weights, list(dict.fromkeys(files.absolute(d) for d in search))


def special_ids(hf: dict, search: list[str]) -> dict[str, int]:
  """Ids of the official added tokens: from added_tokens.json or tokenizer.json in the search
  directories, else derived from config.json's image_token_index (the official order)."""
  for directory in search:
    listed, full = (os.path.join(directory, n) for n in ('added_tokens.json', TOKENIZER_JSON))
    added = {}
    if files.exists(listed):
      added = files.read_json(listed)
    elif files.exists(full):
      tokens = files.read_json(full).get('added_tokens', [])
      added = {t['content']: t['id'] for t in tokens}
    if all(t in added for t in OFFICIAL_TOKENS.values()):
      return {ours: added[theirs] for ours, theirs in OFFICIAL_TOKENS.items()}
  image = hf.get('image_token_index')
  if isinstance(image, int) and image >= 1 and image + 2 < hf['vocab_size']:
    return dict(pad=image - 1, image=image, im_start=image + 1, im_end=image + 2)
  raise UserError(f'no id for {", ".join(OFFICIAL_TOKENS.values())}: looked in added_tokens.json '
                  f'and tokenizer.json in {", ".join(search)}, and for image_token_index in '
                  'config.json; point --src at the checkpoint folder that holds the tokenizer.')


def find_tokenizer(search: list[str], given: str) -> str:
  if given:
    if not files.isfile(given):
      raise UserError(f'--tokenizer names {given}, which is not a file.')
    return given
  for directory in search:
    if files.isfile(os.path.join(directory, TOKENIZER_MODEL)):
      return os.path.join(directory, TOKENIZER_MODEL)
  raise UserError(f'found no {TOKENIZER_MODEL} in {", ".join(search)}; pass --tokenizer=FILE with '
                  'the LLM\'s sentencepiece model (the official checkpoints start from '
                  'TinyLlama\'s).')


def check_tokenizer(path: str, ids: dict[str, int]) -> None:
  """The tokenizer's pieces end below the official added tokens: a piece at one of their ids
  would make that token text, and `export-official` would then give the four tokens new ids
  and another vocabulary size than the checkpoint's."""
  pieces = SentencePiece(path).num_pieces
  taken = sorted(i for i in ids.values() if i < pieces)
  if taken:
    raise UserError(f'tokenizer {path} has {pieces} pieces, which collide with the official '
                    f'special token ids {", ".join(map(str, taken))}; expected the LLM\'s own '
                    f'tokenizer, with no more pieces than the first special id, '
                    f'{min(ids.values())}.')


def vision_encoder(hf: dict, source: str, vae_dir: str, clip_dir: str) -> VisionEncoder:
  """The encoder an official config.json reads images with (NONE without one), checked against
  the directories the conversion was given."""
  name = hf.get('vision_encoder') or VisionEncoder.NONE.value
  try:
    encoder = VisionEncoder(name)
  except (ValueError, TypeError):
    raise UserError(f'{source} sets vision_encoder = {name!r}; expected \'clip\' or '
                    '\'vae\'.') from None
  if encoder == VisionEncoder.CLIP and not clip_dir:
    raise UserError(f'{source} reads images with a CLIP tower ({hf.get("vision_encoder_path")}); '
                    'pass --clip=DIR with it converted (`convert clip --src=HF_CLIP_DIR`).')
  if encoder == VisionEncoder.VAE and not vae_dir:
    raise UserError(f'{source} reads images with the SD-VAE; pass --vae=DIR with it converted '
                    '(`convert vae`).')
  if clip_dir and not files.isdir(clip_dir):
    raise UserError(f'--clip names {clip_dir}, which does not exist.')
  return encoder


def workdir_config(hf: dict, cfg, tie: bool, vae_dir: str,
                   encoder: VisionEncoder = VisionEncoder.NONE, clip_dir: str = ''):
  config = schema.base_config()
  m = config.model
  backbone.describe(m, cfg, tie)
  m.vocab_size = cfg.vocab_size
  m.patch_size, m.image_channels = hf['patch_size'], hf['in_channels']
  latent = hf['image_size'] // 8  # SD-VAE downsamples by 8
  m.image_size = (latent, latent)
  m.learn_sigma, m.use_pos_embed = hf['learn_sigma'], hf['use_pos_embed']
  m.image_mask = 'hybrid' if hf.get('use_bi_attn_img_tokens', True) else 'causal'
  m.context_length = hf.get('max_position_embeddings', m.context_length)
  m.vae = vae_dir
  m.vision_encoder, m.clip = encoder.value, clip_dir
  config.data.tokenizer_vocab_size = cfg.vocab_size
  config.data.prompt_len = 64
  config.sample.guidance_channels = 'first_three'  # the official sampler's guidance
  config.train.num_steps = 1
  return config


def convert_official(src: str, dst: str, vae_dir: str, use_ema: bool = True,
                     tokenizer: str = '', clip_dir: str = '') -> None:
  weights, search = locate(src, use_ema)
  hf = llama.read_hf_config(weights)
  source = os.path.join(weights, 'config.json')
  for key, value in dict(decoder_t_embed='add_before_image_tokens', use_adaln_final_layer=True,
                         add_pos_embed_each_layer=False).items():
    if hf.get(key, value) != value:
      raise UserError(f'{source} sets {key} = {hf.get(key)!r}; only {value!r} is supported.')
  if vae_dir and not files.isdir(vae_dir):
    raise UserError(f'--vae names {vae_dir}, which does not exist.')
  encoder = vision_encoder(hf, source, vae_dir, clip_dir)
  cfg, tie = hf_config.config_from_hf(dict(hf, architectures=['LlamaForCausalLM']), source)
  ids = special_ids(hf, search)
  tokenizer = find_tokenizer(search, tokenizer)
  check_tokenizer(tokenizer, ids)
  tensors = torch_bin.open_weights(weights)
  params = llama.device_backbone(tensors, cfg, tie)  # the source's dtype; cast when restored
  dtype = np.dtype(params['norm']['scale'].dtype).name
  params.update(monoformer_params(tensors, encoder != VisionEncoder.NONE))
  config = workdir_config(hf, cfg, tie, files.absolute(vae_dir) if vae_dir else '', encoder,
                          files.absolute(clip_dir) if clip_dir else '')

  model = settings_lib.build_model(config)
  tx = steps.make_optimizer(config.optim, config.train.num_steps)
  abstract, _ = steps.abstract_state(model, tx, sharding.make_layout(config.mesh))
  flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  for path, want in jax.tree_util.tree_flatten_with_path(abstract.params)[0]:
    if path[0].key == 'decoder':  # blocks apart: each checked against the config when read
      continue
    name = jax.tree_util.keystr(path)
    converted.check_param(name, flat.get(path), want, weights,
                          f'the official checkpoint gives nothing for parameter {name}.')
  # Bounding what Orbax copies at once to about the largest parameter keeps the conversion
  # near the size of the checkpoint.
  in_flight = max(0.15, 1.1 * max(x.nbytes for x in jax.tree.leaves(params)) / 1e9)
  with files.atomic_directory(dst, last=_COMMITTED) as tmp:
    made = Workdir(tmp)
    files.copy(tokenizer, made.tokenizer_model)
    files.write_text(made.special_tokens, json.dumps(ids))
    files.write_text(made.official_source, json.dumps(dict(config=hf, dtype=dtype), indent=1))
    ckpt = checkpoint.Checkpointer(tmp, bytes_in_flight_gb=in_flight)
    ckpt.save_weights(0, params, config)
    ckpt.close()
