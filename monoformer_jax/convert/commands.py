"""`python -m monoformer_jax convert KIND --src=... --dst=...`: the kinds and their dispatch."""

import os

from monoformer_jax import pretrained
from monoformer_jax import workdir as workdir_lib
from monoformer_jax.convert import llama, official, synthetic, vae
from monoformer_jax.errors import UserError
from monoformer_jax.tokenizer import Tokenizer

KINDS = {
    'llama': 'HF LlamaForCausalLM directory (safetensors) -> converted directory (Orbax params, '
             'model.json, tokenizer.model)',
    'export-llama': 'converted directory or training workdir -> HF LlamaForCausalLM directory '
                    '(--ema=false for the raw params)',
    'official': 'official MonoFormer checkpoint (+ --vae=converted VAE) -> workdir for `sample`',
    'vae': 'diffusers AutoencoderKL directory (e.g. sd-vae-ft-mse) -> converted VAE directory',
    'synthetic-llama': '--dst only: a random bf16 HF checkpoint of the TinyLlama-1.1B shape, to '
                       'measure conversion',
}
BACKBONE_KEYS = ('embed_tokens', 'decoder', 'norm', 'lm_head')


def usage() -> str:
  """What `convert --help` prints: each kind on one line."""
  width = max(map(len, KINDS))
  return '\n'.join(['python -m monoformer_jax convert KIND --src=DIR --dst=DIR', 'kinds:']
                   + [f'  {kind:{width}s}  {text}' for kind, text in KINDS.items()])


def export_llama(src: str, dst: str, use_ema: bool) -> None:
  """The text half of a converted directory or a workdir as a HF checkpoint, the
  config.json the backbone came from (when there is one) carried over."""
  source = pretrained.hf_source(src)
  tokenizer_file = os.path.join(src, pretrained.TOKENIZER)
  if os.path.isfile(os.path.join(src, pretrained.MODEL_JSON)):
    params, cfg, tie = pretrained.load_llm(src)
    max_positions, special = 2048, None
    if source is None:  # converted before the source's config was kept
      tok = Tokenizer(tokenizer_file) if os.path.exists(tokenizer_file) else None
      special = (tok.bos_id, tok.eos_id, tok.pad_id) if tok else (1, 2, 0)
  else:
    restored = workdir_lib.for_inference(src, use_ema)
    setup = restored.setup
    params = {k: v for k, v in restored.params.items() if k in BACKBONE_KEYS}
    cfg, tie = setup.model.backbone, setup.model.tie_embeddings
    max_positions = setup.config.model.context_length  # used when there is no source
    special = (setup.tok.bos_id, setup.tok.eos_id, setup.tok.pad_id)
  llama.export_llama(params, cfg, tie, dst, tokenizer_file, source, max_positions, special)


def run(kind: str, src: str, dst: str, use_ema: bool, vae_dir: str = '') -> None:
  if kind not in KINDS:
    raise UserError(f'convert kind {kind!r} is unknown; expected one of {", ".join(KINDS)}.')
  if kind == 'synthetic-llama':
    if not dst:
      raise UserError('convert synthetic-llama needs --dst.')
    size = synthetic.write_synthetic_llama(dst, 'tinyllama-1.1b')
    print(f'wrote {dst}: {size / 2**30:.2f} GiB of bf16 weights')
    return
  if not src or not dst:
    raise UserError(f'convert {kind} needs --src and --dst.')
  if kind == 'llama':
    llama.convert_llama(src, dst)
  elif kind == 'vae':
    vae.convert_vae(src, dst)
  elif kind == 'official':
    official.convert_official(src, dst, vae_dir)
  else:
    export_llama(src, dst, use_ema)
  print(f'wrote {dst}')
