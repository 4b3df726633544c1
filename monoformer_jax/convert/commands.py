"""`python -m monoformer_jax convert KIND --src=... --dst=...`: each kind declared once, with
its flags and what it runs (the command line and `run` both read KINDS)."""

import os
from typing import Callable

from monoformer_jax.base import command_spec as spec, files
from monoformer_jax.base.command_spec import Args, Kind
from monoformer_jax.base.errors import UserError
from monoformer_jax.convert import (clip, inception, llama, official, official_export, peft_export,
                                    synthetic, vae)
from monoformer_jax.data import tokenizer as tokenizer_lib
from monoformer_jax.nn import converted
from monoformer_jax.run import workdir as workdir_lib


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
  with workdir_lib.parameter_reader(setup, src, restored.step, dtype, use_ema) as param:
    llama.export_llama(llama.backbone_tensors(cfg, tie, param, dtype), cfg, tie, dst, src,
                       source, setup.config.model.context_length,
                       (setup.tok.bos_id, setup.tok.eos_id, setup.tok.pad_id))




SRC = spec.string('src', None, 'convert: source directory.')
DST = spec.string('dst', None, 'convert: destination directory (must not exist).')
EMA = spec.boolean('ema', True, 'The EMA parameters (else the raw ones): those exported, or those '
                   'read from an official checkpoint.')
VAE = spec.string('vae', '', 'The converted VAE directory the checkpoint\'s latents belong to, '
                  'recorded in the workdir\'s config.')
CLIP = spec.string('clip', '', 'convert official: the converted CLIP tower (convert clip) of a '
                   'checkpoint that reads images with CLIP.')
TOKENIZER = spec.string('tokenizer', '', 'convert official: the LLM\'s sentencepiece model, for a '
                        'checkpoint without tokenizer.model.')
SHAPE = spec.string('shape', 'tinyllama-1.1b', 'convert synthetic-llama: a named shape '
                    '(tinyllama-1.1b, smollm2-135m, llama-3.2-1b, qwen2.5-0.5b) or '
                    'WIDTH,DEPTH,HEADS,KV_HEADS,MLP,VOCAB.')
OFFICIAL = spec.boolean('official', False, 'convert synthetic-llama: an official MonoFormer '
                        'checkpoint around the LLaMA.')


def _from_src(convert: Callable[[Args], None]) -> spec.Action:
  """A conversion of --src into --dst, which needs both."""
  def run(a: Args) -> str:
    if not a.src or not a.dst:
      raise UserError(f'convert {a.kind} needs --src and --dst.')
    convert(a)
    return f'wrote {a.dst}'
  return run


def _synthetic(a: Args) -> str:
  if not a.dst:
    raise UserError('convert synthetic-llama needs --dst.')
  size = synthetic.write_synthetic(a.dst, a.shape, a.official)
  return f'wrote {a.dst}: {size / 2**30:.2f} GiB of bf16 weights'


_LLAMA = Kind('HF LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM directory (safetensors, '
              'tokenizer.model or tokenizer.json) -> converted directory (Orbax params, '
              'model.json, the tokenizer files)', (SRC, DST),
              _from_src(lambda a: llama.convert_llama(a.src, a.dst)))
KINDS = {
    'llama': _LLAMA,
    'hf': Kind('the same as llama', _LLAMA.flags, _LLAMA.run),
    'export-llama': Kind('converted directory or training workdir -> HF directory of the '
                         'source\'s architecture, with its tokenizer (--ema=false for the raw '
                         'params)', (SRC, DST, EMA),
                         _from_src(lambda a: export_llama(a.src, a.dst, a.ema))),
    'official': Kind('official MonoFormer checkpoint, safetensors or .bin, or its ema/ folder '
                     '(--ema) (+ --vae=converted VAE, --clip=converted CLIP for an understanding '
                     'model, --tokenizer=FILE if it has none) -> workdir',
                     (SRC, DST, EMA, VAE, TOKENIZER, CLIP),
                     _from_src(lambda a: official.convert_official(a.src, a.dst, a.vae, a.ema,
                                                                   a.tokenizer, a.clip))),
    'export-official': Kind('workdir -> the whole MonoFormer as the official code loads it '
                            '(--ema=false for the raw params)', (SRC, DST, EMA),
                            _from_src(lambda a: official_export.export_official(a.src, a.dst,
                                                                                a.ema))),
    'export-peft': Kind('workdir trained with train.finetune=lora -> its text backbone\'s LoRA '
                        'adapters as the PEFT library loads them onto the HF LLM of '
                        'model.init_from (--ema=false for the raw params)', (SRC, DST, EMA),
                        _from_src(lambda a: peft_export.export_peft(a.src, a.dst, a.ema))),
    'inception': Kind('the FID Inception weights file (pytorch-fid\'s '
                      'pt_inception-2015-12-05-*.pth) -> converted Inception directory, for '
                      'evaluate --fid_ref', (SRC, DST),
                      _from_src(lambda a: inception.convert_inception(a.src, a.dst))),
    'vae': Kind('diffusers AutoencoderKL directory (e.g. sd-vae-ft-mse) -> converted VAE '
                'directory', (SRC, DST), _from_src(lambda a: vae.convert_vae(a.src, a.dst))),
    'clip': Kind('HF CLIPModel or CLIPVisionModel directory (e.g. openai/clip-vit-large-patch14) '
                 '-> converted CLIP vision tower, for model.vision_encoder=clip', (SRC, DST),
                 _from_src(lambda a: clip.convert_clip(a.src, a.dst))),
    'synthetic-llama': Kind('--dst and --shape only: a random bf16 HF checkpoint with a small '
                            'tokenizer of its family\'s kind, of a named shape (tinyllama-1.1b, '
                            'smollm2-135m, llama-3.2-1b, qwen2.5-0.5b) or '
                            'WIDTH,DEPTH,HEADS,KV_HEADS,MLP,VOCAB; with --official, an official '
                            'MonoFormer checkpoint around it', (DST, SHAPE, OFFICIAL), _synthetic),
}


def run(kind: str, src: str = '', dst: str = '', **flags) -> str:
  """Converts as `convert KIND --src=SRC --dst=DST --FLAG=VALUE ...` does, every flag the kind
  reads and is not given at its default; returns the line the command prints."""
  if kind not in KINDS:
    raise UserError(f'convert kind {kind!r} is unknown; expected one of {", ".join(KINDS)}.')
  declared = {f.name: f.default for f in KINDS[kind].flags}
  unknown = set(flags) - set(declared)
  if unknown:
    raise TypeError(f'convert {kind} reads no flag {", ".join(sorted(unknown))}')
  return KINDS[kind].run(Args(dict(declared, src=src, dst=dst, kind=kind, **flags)))
