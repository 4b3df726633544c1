"""A random HF LLaMA checkpoint of any size in the table, for measuring conversion.

Written tensor by tensor (names, shapes and dtype as transformers saves them),
so a 1.1B-parameter checkpoint needs no model in memory to create.
"""

import json
import os

import ml_dtypes
import numpy as np

from monoformer_jax import files
from monoformer_jax import model as model_lib
from monoformer_jax.convert import llama, safetensors_io
from monoformer_jax.layers import BackboneConfig


def write_synthetic_llama(dst: str, size: str, vocab_size: int = 32000) -> int:
  """Writes DST/config.json + model.safetensors (bf16); returns the weights' bytes."""
  cfg = BackboneConfig(vocab_size=vocab_size, **model_lib.SIZES[size])
  h, k, e, d, f = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.width, cfg.mlp_dim
  shapes = {'model.embed_tokens.weight': (vocab_size, d)}
  for i in range(cfg.depth):
    p = f'model.layers.{i}.'
    shapes.update({p + 'self_attn.q_proj.weight': (h * e, d), p + 'self_attn.k_proj.weight': (k * e, d),
                   p + 'self_attn.v_proj.weight': (k * e, d), p + 'self_attn.o_proj.weight': (d, h * e),
                   p + 'mlp.gate_proj.weight': (f, d), p + 'mlp.up_proj.weight': (f, d),
                   p + 'mlp.down_proj.weight': (d, f), p + 'input_layernorm.weight': (d,),
                   p + 'post_attention_layernorm.weight': (d,)})
  shapes.update({'model.norm.weight': (d,), 'lm_head.weight': (vocab_size, d)})

  class Lazy:
    """(name, array) pairs made on demand, so only one tensor exists at a time."""

    def __iter__(self):
      rng = np.random.default_rng(0)
      for name, shape in shapes.items():
        array = rng.standard_normal(shape, np.float32) * 0.02 if len(shape) == 2 else np.ones(shape)
        yield name, array.astype(ml_dtypes.bfloat16)

  with files.atomic_directory(dst) as tmp:
    safetensors_io.write(os.path.join(tmp, safetensors_io.SINGLE_FILE), Lazy(), {'format': 'pt'})
    with open(os.path.join(tmp, 'config.json'), 'w') as f_out:
      json.dump(llama.hf_config(cfg, False, 'bfloat16', special_ids=(1, 2, 0)), f_out, indent=1)
  return 2 * sum(int(np.prod(s)) for s in shapes.values())
