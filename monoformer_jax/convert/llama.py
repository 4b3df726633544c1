"""HF LLaMA tensors <-> this project's backbone params.

HF stores Linear weights as [out, in]; ours are [in, ...out axes] with the L
layers stacked on a leading axis (nn.scan). Heads are contiguous blocks of the
HF output dimension, so a reshape recovers the [H, E] axes.
"""

from typing import Mapping

import numpy as np

from monoformer_jax.errors import UserError
from monoformer_jax.layers import BackboneConfig

_LINEARS = {  # our path under a layer -> (HF name under model.layers.i, kind)
    ('self_attn', 'q_proj'): 'self_attn.q_proj',
    ('self_attn', 'k_proj'): 'self_attn.k_proj',
    ('self_attn', 'v_proj'): 'self_attn.v_proj',
    ('self_attn', 'o_proj'): 'self_attn.o_proj',
    ('mlp', 'gate_proj'): 'mlp.gate_proj',
    ('mlp', 'up_proj'): 'mlp.up_proj',
    ('mlp', 'down_proj'): 'mlp.down_proj',
}


def _get(tensors: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
  if name not in tensors:
    raise UserError(f'tensor {name} is missing from the LLaMA checkpoint.')
  value = np.asarray(tensors[name], np.float32)
  if value.shape != shape:
    raise UserError(f'tensor {name} has shape {value.shape}; the model config expects {shape}.')
  return value


def _kernel(cfg: BackboneConfig, ours: tuple[str, str], weight: np.ndarray) -> np.ndarray:
  """HF [out, in] -> our kernel layout."""
  h, k, e, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.width
  if ours[1] == 'q_proj':
    return weight.T.reshape(d, h, e)
  if ours[1] in ('k_proj', 'v_proj'):
    return weight.T.reshape(d, k, e)
  if ours[1] == 'o_proj':
    return weight.T.reshape(h, e, d)
  return weight.T


def _hf_shape(cfg: BackboneConfig, ours: tuple[str, str]) -> tuple[int, int]:
  h, k, e, d, f = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.width, cfg.mlp_dim
  return {'q_proj': (h * e, d), 'k_proj': (k * e, d), 'v_proj': (k * e, d), 'o_proj': (d, h * e),
          'gate_proj': (f, d), 'up_proj': (f, d), 'down_proj': (d, f)}[ours[1]]


def backbone_from_hf(tensors: Mapping[str, np.ndarray], cfg: BackboneConfig,
                     tie_embeddings: bool) -> dict:
  """The text-model params ('embed_tokens', 'decoder', 'norm', 'lm_head') from HF tensors."""
  d, v = cfg.width, cfg.vocab_size
  layer = {}
  for ours, hf in _LINEARS.items():
    stacked = [_kernel(cfg, ours, _get(tensors, f'model.layers.{i}.{hf}.weight', _hf_shape(cfg, ours)))
               for i in range(cfg.depth)]
    layer.setdefault(ours[0], {})[ours[1]] = {'kernel': np.stack(stacked)}
  for norm in ('input_layernorm', 'post_attention_layernorm'):
    layer[norm] = {'scale': np.stack([_get(tensors, f'model.layers.{i}.{norm}.weight', (d,))
                                      for i in range(cfg.depth)])}
  params = {
      'embed_tokens': {'embedding': _get(tensors, 'model.embed_tokens.weight', (v, d))},
      'decoder': {'layers': layer},
      'norm': {'scale': _get(tensors, 'model.norm.weight', (d,))},
  }
  if not tie_embeddings:
    params['lm_head'] = {'kernel': _get(tensors, 'lm_head.weight', (v, d)).T}
  return params
