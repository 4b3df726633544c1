"""Random checkpoints of real shapes, for measuring conversion and trying the path without a
download: a HF LLaMA, SmolLM2, Llama-3.2 or Qwen2.5 with a small tokenizer of its family's kind,
or (--official) an official MonoFormer checkpoint around a LLaMA.

Written tensor by tensor in bf16 (names, shapes and dtype as transformers saves them), so a
billion-parameter checkpoint needs no model in memory to create.
"""

import json
import os

import ml_dtypes
import numpy as np

from monoformer_jax.base import files
from monoformer_jax.base.errors import UserError
from monoformer_jax.convert import hf_config, llama, official, safetensors_io, synthetic_tokenizer
from monoformer_jax.convert.synthetic_tokenizer import TokenizerFamily
from monoformer_jax.data import tokenizer as tokenizer_lib
from monoformer_jax.convert.safetensors_io import LazyTensor
from monoformer_jax.nn.layers import BackboneConfig
from monoformer_jax.nn.rope import RopeKind, RopeScaling


# Named shapes: (BackboneConfig, tied embeddings, max_position_embeddings, tokenizer family).
SHAPES = {
    'tinyllama-1.1b': (BackboneConfig(vocab_size=32000, width=2048, depth=22, num_heads=32,
                                      num_kv_heads=4, mlp_dim=5632, norm_eps=1e-5), False, 2048,
                       TokenizerFamily.SENTENCEPIECE),
    'smollm2-135m': (BackboneConfig(vocab_size=49152, width=576, depth=30, num_heads=9,
                                    num_kv_heads=3, mlp_dim=1536, rope_theta=100000.0,
                                    norm_eps=1e-5), True, 8192, TokenizerFamily.SMOLLM2),
    'llama-3.2-1b': (BackboneConfig(vocab_size=128256, width=2048, depth=16, num_heads=32,
                                    num_kv_heads=8, mlp_dim=8192, rope_theta=500000.0,
                                    rope_scaling=RopeScaling(RopeKind.LLAMA3, 32.0, 1.0, 4.0, 8192),
                                    norm_eps=1e-5), True, 131072, TokenizerFamily.LLAMA3),
    'qwen2.5-0.5b': (BackboneConfig(vocab_size=151936, width=896, depth=24, num_heads=14,
                                    num_kv_heads=2, mlp_dim=4864, rope_theta=1000000.0,
                                    norm_eps=1e-6, attention_bias=True), True, 32768,
                     TokenizerFamily.QWEN2),
}
PATCH, CHANNELS, LATENT = 2, 4, 32  # MonoFormer's modules for 256-pixel SD-VAE latents


def parse_shape(shape: str) -> tuple[BackboneConfig, bool, int, TokenizerFamily]:
  """A name of SHAPES, or WIDTH,DEPTH,HEADS,KV_HEADS,MLP,VOCAB (untied, 2,048 positions, a
  sentencepiece tokenizer)."""
  if shape in SHAPES:
    return SHAPES[shape]
  try:
    width, depth, heads, kv_heads, mlp, vocab = (int(x) for x in shape.split(','))
  except ValueError:
    raise UserError(f'--shape is {shape!r}; expected one of {", ".join(SHAPES)} or '
                    'WIDTH,DEPTH,HEADS,KV_HEADS,MLP,VOCAB.') from None
  return BackboneConfig(vocab_size=vocab, width=width, depth=depth, num_heads=heads,
                        num_kv_heads=kv_heads, mlp_dim=mlp), False, 2048, TokenizerFamily.SENTENCEPIECE


def _random(shape: tuple[int, ...], seed: int):
  def make():
    if len(shape) == 1:
      return np.ones(shape, ml_dtypes.bfloat16)
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
  return LazyTensor(shape, np.dtype(ml_dtypes.bfloat16), make)


def write_synthetic(dst: str, shape: str, with_monoformer: bool) -> int:
  """Writes DST/config.json + model.safetensors (bf16); returns the weights' bytes. With
  with_monoformer, also MonoFormer's modules, its config fields and the official token ids
  (the last four vocabulary rows)."""
  cfg, tie, positions, family = parse_shape(shape)
  d, v = cfg.width, cfg.vocab_size
  shapes = {'model.embed_tokens.weight': (v, d)}
  for i in range(cfg.depth):
    p = f'model.layers.{i}.'
    shapes.update({f'{p}{hf}.weight': llama.hf_shape(cfg, ours) for ours, hf in llama.LINEARS.items()})
    shapes.update({p + 'input_layernorm.weight': (d,), p + 'post_attention_layernorm.weight': (d,)})
    if cfg.attention_bias:
      shapes.update({f'{p}{llama.LINEARS[ours]}.bias': llama.hf_shape(cfg, ours)[:1]
                     for ours in llama.BIASED})
  shapes['model.norm.weight'] = (d,)
  if not tie:
    shapes['lm_head.weight'] = (v, d)
  config = hf_config.hf_config(cfg, tie, 'bfloat16', max_positions=positions)
  if with_monoformer:
    if family != TokenizerFamily.SENTENCEPIECE:
      raise UserError(f'--official builds on a LLaMA with a sentencepiece tokenizer, as the '
                      f'official checkpoints do; --shape {shape} has a {family.value} one.')
    patch_in, patch_out = PATCH * PATCH * CHANNELS, PATCH * PATCH * 2 * CHANNELS
    modules = {'t_embedder.mlp.0': (d, 256), 't_embedder.mlp.2': (d, d), 't_projector.0': (d, d),
               't_projector.2': (d, d), 'x_embedder': (d, patch_in),
               'final_layer.linear': (patch_out, d), 'final_layer.adaLN_modulation.1': (2 * d, d)}
    assert set(modules) == set(official.MODULES)
    for name, (out_features, in_features) in modules.items():
      shapes.update({f'{name}.weight': (out_features, in_features), f'{name}.bias': (out_features,)})
    config.update(architectures=['MonoFormerForCausalLM'], patch_size=PATCH,
                  in_channels=CHANNELS, learn_sigma=True, image_size=LATENT * 8,
                  use_pos_embed=True, decoder_t_embed='add_before_image_tokens',
                  use_adaln_final_layer=True, add_pos_embed_each_layer=False,
                  use_bi_attn_img_tokens=True, image_token_index=v - 3, pad_token_id=v - 4)
  tensors = [(name, _random(s, i)) for i, (name, s) in enumerate(shapes.items())]
  with files.atomic_directory(dst, last='config.json') as tmp:
    safetensors_io.write(os.path.join(tmp, safetensors_io.SINGLE_FILE), tensors, {'format': 'pt'})
    synthetic_tokenizer.write(tmp, family)
    tok = tokenizer_lib.load(tmp)
    config.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    config.setdefault('pad_token_id', tok.pad_id if tok.pad_id < tok.num_pieces else None)
    files.write_text(os.path.join(tmp, 'config.json'), json.dumps(config, indent=1))
  return sum(t.nbytes for _, t in tensors)
