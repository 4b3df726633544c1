"""`python -m monoformer_jax convert KIND --src=... --dst=...`.

llama         HF LlamaForCausalLM directory -> converted directory (Orbax + model.json)
export-llama  converted directory or training workdir -> HF LlamaForCausalLM directory
official      official MonoFormer checkpoint (+ --vae=converted VAE) -> workdir for `sample`
vae           diffusers AutoencoderKL directory (e.g. sd-vae-ft-mse) -> converted VAE directory
synthetic-llama  --dst only: a random bf16 HF checkpoint of the TinyLlama-1.1B shape, to
              measure conversion (see README)
"""

import os

from monoformer_jax import train
from monoformer_jax.convert import official, pretrained, synthetic, vae
from monoformer_jax.errors import UserError
from monoformer_jax.tokenizer import Tokenizer

KINDS = ('llama', 'export-llama', 'official', 'vae', 'synthetic-llama')
BACKBONE_KEYS = ('embed_tokens', 'decoder', 'norm', 'lm_head')


def export_llama(src: str, dst: str, use_ema: bool) -> None:
  if os.path.isfile(os.path.join(src, pretrained.MODEL_JSON)):
    params, cfg, tie = pretrained.load(src)
    tokenizer_file = os.path.join(src, pretrained.TOKENIZER)
    special = (1, 2, 0)
    if os.path.exists(tokenizer_file):
      tok = Tokenizer(tokenizer_file)
      special = (tok.bos_id, tok.eos_id, tok.pad_id)
  else:
    _, tok, model, all_params, _ = train.restore_for_inference(src, use_ema)
    params = {k: v for k, v in all_params.items() if k in BACKBONE_KEYS}
    cfg, tie = model.backbone, model.tie_embeddings
    tokenizer_file = os.path.join(src, pretrained.TOKENIZER)
    special = (tok.bos_id, tok.eos_id, tok.pad_id)
  pretrained.export_llama(params, cfg, tie, dst, tokenizer_file, special)


def run(kind: str, src: str, dst: str, use_ema: bool, vae_dir: str = '') -> None:
  if kind == 'synthetic-llama':
    if not dst:
      raise UserError('convert synthetic-llama needs --dst.')
    size = synthetic.write_synthetic_llama(dst, 'tinyllama-1.1b')
    print(f'wrote {dst}: {size / 2**30:.2f} GiB of bf16 weights')
    return
  if not src or not dst:
    raise UserError(f'convert {kind} needs --src and --dst.')
  if kind == 'llama':
    pretrained.convert_llama(src, dst)
  elif kind == 'vae':
    vae.convert_vae(src, dst)
  elif kind == 'official':
    official.convert_official(src, dst, vae_dir)
  else:
    export_llama(src, dst, use_ema)
  print(f'wrote {dst}')
