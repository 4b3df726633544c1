"""`python -m monoformer_jax convert KIND --src=... --dst=...`: the kinds and their dispatch."""

import os

from monoformer_jax.base import files
from monoformer_jax.base.errors import UserError
from monoformer_jax.convert import clip, inception, llama, official, official_export, synthetic, vae
from monoformer_jax.data import tokenizer as tokenizer_lib
from monoformer_jax.nn import converted
from monoformer_jax.run import workdir as workdir_lib
from monoformer_jax.training import checkpoint


KINDS = {
    'llama': 'HF LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM directory (safetensors, '
             'tokenizer.model or tokenizer.json) -> converted directory (Orbax params, model.json, '
             'the tokenizer files)',
    'hf': 'the same as llama',
    'export-llama': 'converted directory or training workdir -> HF directory of the source\'s '
                    'architecture, with its tokenizer (--ema=false for the raw params)',
    'official': 'official MonoFormer checkpoint, safetensors or .bin, or its ema/ folder (--ema) '
                '(+ --vae=converted VAE, --clip=converted CLIP for an understanding model, '
                '--tokenizer=FILE if it has none) -> workdir',
    'export-official': 'workdir -> the whole MonoFormer as the official code loads it (--ema=false '
                       'for the raw params)',
    'inception': 'the FID Inception weights file (pytorch-fid\'s pt_inception-2015-12-05-*.pth) '
                 '-> converted Inception directory, for evaluate --fid_ref',
    'vae': 'diffusers AutoencoderKL directory (e.g. sd-vae-ft-mse) -> converted VAE directory',
    'clip': 'HF CLIPModel or CLIPVisionModel directory (e.g. openai/clip-vit-large-patch14) -> '
            'converted CLIP vision tower, for model.vision_encoder=clip',
    'synthetic-llama': '--dst and --shape only: a random bf16 HF checkpoint with a small '
                       'tokenizer of its family\'s kind, of a named shape (tinyllama-1.1b, '
                       'smollm2-135m, llama-3.2-1b, qwen2.5-0.5b) or '
                       'WIDTH,DEPTH,HEADS,KV_HEADS,MLP,VOCAB; '
                       'with --official, an official MonoFormer checkpoint around it',
}


def usage() -> str:
  """What `convert --help` prints: each kind on one line."""
  width = max(map(len, KINDS))
  return '\n'.join(['kinds:'] + [f'  {kind:{width}s}  {text}' for kind, text in KINDS.items()])


def export_llama(src: str, dst: str, use_ema: bool) -> None:
  """The text half of a converted directory or a workdir as a HF checkpoint, read and written one
  parameter at a time; the config.json the backbone came from (when there is one) carried over."""
  source = converted.hf_source(src)
  if files.isfile(os.path.join(src, converted.MODEL_JSON)):
    cfg, tie, dtype, param = converted.leaf_reader(src)
    max_positions, special = 2048, None  # the context counts only without a source config
    if source is None:  # converted before the source's config was kept
      tok = tokenizer_lib.load(src) if tokenizer_lib.kind_file(src) else None
      special = (tok.bos_id, tok.eos_id, tok.pad_id) if tok else (1, 2, 0)
    llama.export_llama(llama.backbone_tensors(cfg, tie, param, dtype), cfg, tie, dst,
                       src, source, max_positions, special)
    return
  restored = workdir_lib.for_inference(src, use_ema, params=False)
  setup = restored.setup
  cfg, tie = setup.model.backbone, setup.model.tie_embeddings
  dtype = official_export.stored_dtype(src)
  ckpt = checkpoint.open_existing(src)
  shapes = workdir_lib.param_shapes(setup.model)
  param = lambda *path: ckpt.read_leaf(restored.step, path, shapes[path], dtype, use_ema)  # noqa: E731
  llama.export_llama(llama.backbone_tensors(cfg, tie, param, dtype), cfg, tie, dst, src,
                     source, setup.config.model.context_length,
                     (setup.tok.bos_id, setup.tok.eos_id, setup.tok.pad_id))
  ckpt.close()


def run(kind: str, src: str, dst: str, use_ema: bool, vae_dir: str = '', tokenizer: str = '',
        shape: str = 'tinyllama-1.1b', official_layout: bool = False, clip_dir: str = '') -> None:
  if kind not in KINDS:
    raise UserError(f'convert kind {kind!r} is unknown; expected one of {", ".join(KINDS)}.')
  if kind == 'synthetic-llama':
    if not dst:
      raise UserError('convert synthetic-llama needs --dst.')
    size = synthetic.write_synthetic(dst, shape, official_layout)
    print(f'wrote {dst}: {size / 2**30:.2f} GiB of bf16 weights')
    return
  if not src or not dst:
    raise UserError(f'convert {kind} needs --src and --dst.')
  if kind in ('llama', 'hf'):
    llama.convert_llama(src, dst)
  elif kind == 'vae':
    vae.convert_vae(src, dst)
  elif kind == 'clip':
    clip.convert_clip(src, dst)
  elif kind == 'inception':
    inception.convert_inception(src, dst)
  elif kind == 'official':
    official.convert_official(src, dst, vae_dir, use_ema, tokenizer, clip_dir)
  elif kind == 'export-official':
    official_export.export_official(src, dst, use_ema)
  else:
    export_llama(src, dst, use_ema)
  print(f'wrote {dst}')
