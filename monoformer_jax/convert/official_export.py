"""`convert export-official`: a workdir -> a directory the official code loads with
`MonoFormerForCausalLM.from_pretrained` (and its tokenizer with `AutoTokenizer`).

Weights: the LLaMA backbone and MonoFormer's modules under the official names, in safetensors shards
with an index. They are read from the checkpoint one parameter at a time and written one tensor at a
time, so memory holds about one stacked parameter.
The official vocabulary has <PAD>, <image>, <|im_start|> and <|im_end|> above the LLM's pieces: a
workdir converted from official keeps its ids and its source config.json and dtype (so official ->
here -> official gives back the same tensors); a workdir trained here gets an <image> row, or four
new rows copied from its own special tokens when those are pieces of its tokenizer.
"""

import json
import os
from typing import Callable

import numpy as np

from monoformer_jax.base import files
from monoformer_jax.base.errors import UserError
from monoformer_jax.base.workdir_layout import TOKENIZER_MODEL, Workdir
from monoformer_jax.diffusion import Process
from monoformer_jax.convert import (clip as clip_convert, hf_config, llama, official,
                                    safetensors_io, vae as vae_convert)
from monoformer_jax.convert.safetensors_io import LazyTensor
from monoformer_jax.data.tokenizer import SentencePiece
from monoformer_jax.nn import clip, vae
from monoformer_jax.nn.layers import MaskType
from monoformer_jax.nn.vision import VisionEncoder
from monoformer_jax.run import workdir as workdir_lib


def _recorded(src: str) -> dict:
  """What `convert official` recorded of a workdir's source ({} for a workdir trained here)."""
  path = Workdir(src).official_source
  return files.read_json(path) if files.exists(path) else {}


def stored_dtype(src: str) -> np.dtype:
  """The dtype exports write a workdir's parameters in: its official source's, else float32."""
  return np.dtype(_recorded(src).get('dtype', 'float32'))


def _official_ids(setup, src: str) -> tuple[dict[str, int], dict[int, int]]:
  """({token: id} in the official names, {new row: row it copies}) for the exported vocabulary."""
  tok, vocab = setup.tok, setup.model.backbone.vocab_size
  ids = dict(pad=tok.pad_id, image=None, im_start=tok.im_start_id, im_end=tok.im_end_id)
  specials = Workdir(src).special_tokens
  if files.exists(specials):
    ids['image'] = files.read_json(specials).get('image')
  if all(i >= tok.num_pieces for i in ids.values() if i is not None):
    new_rows = {}
    if ids['image'] is None:
      ids['image'], new_rows = vocab, {vocab: -1}  # -1: the mean row
    return ids, new_rows
  # Special tokens that are pieces of the tokenizer cannot carry the official names: give
  # the four tokens new rows, in the official order, copying ours.
  order = ('pad', 'image', 'im_start', 'im_end')
  new_rows = {vocab + k: (-1 if name == 'image' else ids[name]) for k, name in enumerate(order)}
  return {name: vocab + k for k, name in enumerate(order)}, new_rows


def _tensors(setup, shapes, param: Callable, dtype: np.dtype, new_rows: dict[int, int]) -> list:
  """(official name, LazyTensor) for every tensor: the backbone, then MonoFormer's modules."""
  model = setup.model
  out = llama.backbone_tensors(model.backbone, model.tie_embeddings, param, dtype, new_rows)
  modules = dict(official.MODULES)
  if model.understanding.features:
    modules.update(official.UNDERSTANDING_MODULES)
  for name, path in modules.items():
    shape = shapes[path + ('kernel',)]
    out.append((f'{name}.weight', LazyTensor(
        shape[::-1], dtype, lambda p=path: np.ascontiguousarray(param(*p, 'kernel').T))))
    out.append((f'{name}.bias', LazyTensor((shape[1],), dtype, lambda p=path: param(*p, 'bias'))))
  return out + _vision_tower(setup, dtype)


# Where the official model keeps its vision encoder's own weights (they load with it).
TOWER = 'vision_encoder.vision_tower.'


def _vision_tower(setup, dtype: np.dtype) -> list:
  """The frozen encoder's tensors under the official names: CLIP's (model.clip) or the
  SD-VAE's (model.vae)."""
  vision = setup.settings.vision
  if vision.encoder == VisionEncoder.CLIP:
    pairs = clip_convert.tensors_from_params(clip.load(vision.clip_dir)[1],
                                             TOWER + clip_convert.HF_PREFIX)
  elif vision.encoder == VisionEncoder.VAE:
    if not vision.vae_dir:
      raise UserError('the official VAE encoder reads pictures through the SD-VAE; this '
                      'workdir reads the pixels of a pixel-space model, which export-official '
                      'cannot carry.')
    pairs = vae_convert.tensors_from_params(vae.load_vae(vision.vae_dir)[1], TOWER)
  else:
    return []
  return [(name, LazyTensor(value.shape, dtype, lambda v=value: v.astype(dtype)))
          for name, value in pairs]


def _config(setup, source, ids: dict[str, int], vocab: int, dtype: str) -> dict:
  """config.json: the source's (a workdir converted from official), else the LLaMA fields of
  the backbone and the MonoFormer fields of the config."""
  model, config = setup.model, setup.config
  if model.backbone.attention_bias or not isinstance(setup.tok, SentencePiece):
    raise UserError('the official code builds a LlamaForCausalLM with a sentencepiece tokenizer; '
                    'export-official needs a workdir without attention bias and with '
                    f'{TOKENIZER_MODEL} (this one started from another family: use export-llama).')
  if model.image_mask == MaskType.BIDIRECTIONAL:
    raise UserError('the official code has no fully bidirectional image mask; export-official '
                    'needs model.image_mask \'hybrid\' or \'causal\'.')
  if setup.settings.diffusion.process != Process.DDPM:
    raise UserError('the official code trains and samples DDPM models; this workdir\'s '
                    f'diffusion.process is {setup.settings.diffusion.process.value!r}, which '
                    'export-official cannot carry (export-llama takes its backbone).')
  special = None if source is not None else (setup.tok.bos_id, setup.tok.eos_id, ids['pad'])
  out = hf_config.hf_config(model.backbone, model.tie_embeddings, dtype, source,
                        config.model.context_length, special)
  img = model.image
  out.update(architectures=['MonoFormerForCausalLM'], vocab_size=vocab,
             image_token_index=ids['image'], patch_size=img.patch_size,
             in_channels=img.channels, learn_sigma=img.learn_sigma, use_pos_embed=img.use_pos_embed,
             image_size=img.height * 8,  # the official code decodes with the SD-VAE (factor 8)
             decoder_t_embed='add_before_image_tokens', use_adaln_final_layer=True,
             add_pos_embed_each_layer=False,
             use_bi_attn_img_tokens=model.image_mask == MaskType.HYBRID)
  if source is None:
    out.update(tokenizer_max_length=config.data.prompt_len, tokenizer_padding_side='right',
               use_flash_attn=False)
  vision = setup.settings.vision
  if vision.reads_images and not (source or {}).get('vision_encoder'):
    reads_clip = vision.encoder == VisionEncoder.CLIP
    out.update(vision_encoder=vision.encoder.value,
               vision_encoder_path=vision.clip_dir if reads_clip else vision.vae_dir,
               vision_encoder_args={} if reads_clip else dict(
                   patch_size=model.image.patch_size, resolution=vision.resolution))
  return out


def _tokenizer(tmp: str, src: str, tok, ids: dict[str, int], context: int) -> None:
  """tokenizer.model and the files HF's AutoTokenizer reads for the official added tokens."""
  files.copy(Workdir(src).tokenizer_model, os.path.join(tmp, TOKENIZER_MODEL))
  added = {official.OFFICIAL_TOKENS[k]: i for k, i in ids.items()}
  decoder = {str(i): dict(content=t, special=True, lstrip=False, rstrip=False, normalized=False,
                          single_word=False) for t, i in added.items()}
  llama.write_tokenizer_config(tmp, tok, context, dict(pad_token=official.OFFICIAL_TOKENS['pad']),
                               decoder, tokenizer_class='LlamaTokenizer')
  files.write_text(os.path.join(tmp, 'added_tokens.json'), json.dumps(added, indent=1))


def export_official(src: str, dst: str, use_ema: bool, shard_bytes: int = 2 * 2**30) -> None:
  """Writes dst (which must not exist) from the workdir src's newest restorable checkpoint."""
  restored = workdir_lib.for_inference(src, use_ema, params=False)
  setup = restored.setup
  source = _recorded(src).get('config')
  dtype = stored_dtype(src)
  ids, new_rows = _official_ids(setup, src)
  with workdir_lib.parameter_reader(setup, src, restored.step, dtype, use_ema) as param:
    _write(setup, src, dst, _tensors(setup, workdir_lib.param_shapes(setup.model), param, dtype,
                                     new_rows), source, ids, new_rows, dtype, shard_bytes)


def _write(setup, src: str, dst: str, tensors: list, source, ids: dict, new_rows: dict,
           dtype: np.dtype, shard_bytes: int) -> None:
  """The tensors (read as they are written) in safetensors shards, with the index, config.json
  and the tokenizer files."""
  shards, size = [[]], 0
  for entry in tensors:
    if shards[-1] and size + entry[1].nbytes > shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(entry)
    size += entry[1].nbytes
  vocab = setup.model.backbone.vocab_size + len(new_rows)
  torch_dtype = dtype.name if dtype in (np.float32, np.float16) else 'bfloat16'
  with files.atomic_directory(dst, last='config.json') as tmp:
    weight_map = {}
    for k, shard in enumerate(shards):
      name = f'model-{k + 1:05d}-of-{len(shards):05d}.safetensors'
      safetensors_io.write(os.path.join(tmp, name), shard, {'format': 'pt'})
      weight_map.update({tensor: name for tensor, _ in shard})
    index = dict(metadata=dict(total_size=sum(t.nbytes for _, t in tensors)), weight_map=weight_map)
    files.write_text(os.path.join(tmp, safetensors_io.INDEX_FILE), json.dumps(index, indent=1))
    config = _config(setup, source, ids, vocab, torch_dtype)
    files.write_text(os.path.join(tmp, 'config.json'), json.dumps(config, indent=1))
    _tokenizer(tmp, src, setup.tok, ids, config.get('max_position_embeddings',
                                                    setup.config.model.context_length))
