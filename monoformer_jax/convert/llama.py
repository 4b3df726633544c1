"""HF LLaMA tensors <-> this project's backbone params.

HF stores Linear weights as [out, in]; ours are [in, ...out axes] with the L
layers stacked on a leading axis (nn.scan). Heads are contiguous blocks of the
HF output dimension, so a reshape recovers the [H, E] axes.
"""

from typing import Mapping

import jax
import numpy as np

from monoformer_jax.errors import UserError
from monoformer_jax.layers import BackboneConfig, RopeKind, RopeScaling

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
  """One tensor in its stored dtype, checked against the shape the config implies."""
  if name not in tensors:
    raise UserError(f'tensor {name} is missing from the LLaMA checkpoint.')
  value = np.asarray(tensors[name])
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


def layer_from_hf(tensors: Mapping[str, np.ndarray], cfg: BackboneConfig, i: int) -> dict:
  """Block i's params (our layout, without the layer axis) from HF tensors, stored dtype."""
  layer = {}
  for ours, hf in _LINEARS.items():
    weight = _get(tensors, f'model.layers.{i}.{hf}.weight', _hf_shape(cfg, ours))
    layer.setdefault(ours[0], {})[ours[1]] = {'kernel': np.ascontiguousarray(_kernel(cfg, ours, weight))}
  for norm in ('input_layernorm', 'post_attention_layernorm'):
    layer[norm] = {'scale': _get(tensors, f'model.layers.{i}.{norm}.weight', (cfg.width,))}
  return layer


def outer_from_hf(tensors: Mapping[str, np.ndarray], cfg: BackboneConfig,
                  tie_embeddings: bool) -> dict:
  """Everything but the blocks: 'embed_tokens', 'norm' and (untied) 'lm_head'."""
  d, v = cfg.width, cfg.vocab_size
  params = {'embed_tokens': {'embedding': _get(tensors, 'model.embed_tokens.weight', (v, d))},
            'norm': {'scale': _get(tensors, 'model.norm.weight', (d,))}}
  if not tie_embeddings:
    params['lm_head'] = {'kernel': _get(tensors, 'lm_head.weight', (v, d)).T}
  return params


def stack_layers(layers: list[dict]) -> dict:
  """Per-block trees -> one tree of [L, ...] arrays (the nn.scan layout).

  Fills preallocated arrays block by block, so the peak is the result plus the
  inputs, never a second copy of the whole stack.
  """
  def stack(*leaves):
    out = np.empty((len(leaves),) + leaves[0].shape, leaves[0].dtype)
    for i, leaf in enumerate(leaves):
      out[i] = leaf
    return out
  return jax.tree.map(stack, *layers)


def backbone_from_hf(tensors: Mapping[str, np.ndarray], cfg: BackboneConfig,
                     tie_embeddings: bool) -> dict:
  """The text-model params ('embed_tokens', 'decoder', 'norm', 'lm_head') from HF tensors.

  Arrays keep the checkpoint's dtype; the caller casts when it builds a model.
  """
  params = outer_from_hf(tensors, cfg, tie_embeddings)
  params['decoder'] = {'layers': stack_layers([layer_from_hf(tensors, cfg, i)
                                               for i in range(cfg.depth)])}
  return params


def backbone_to_hf(params: Mapping, cfg: BackboneConfig, tie_embeddings: bool) -> dict[str, np.ndarray]:
  """The inverse of backbone_from_hf: HF tensor names -> [out, in] arrays."""
  h, k, e, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.width
  layer = params['decoder']['layers']
  out = {'model.embed_tokens.weight': np.asarray(params['embed_tokens']['embedding'])}
  for i in range(cfg.depth):
    for ours, hf in _LINEARS.items():
      kernel = np.asarray(layer[ours[0]][ours[1]]['kernel'][i])
      flat = {'q_proj': (d, h * e), 'k_proj': (d, k * e), 'v_proj': (d, k * e),
              'o_proj': (h * e, d)}.get(ours[1], kernel.shape)
      out[f'model.layers.{i}.{hf}.weight'] = np.ascontiguousarray(kernel.reshape(flat).T)
    for norm in ('input_layernorm', 'post_attention_layernorm'):
      out[f'model.layers.{i}.{norm}.weight'] = np.asarray(layer[norm]['scale'][i])
  out['model.norm.weight'] = np.asarray(params['norm']['scale'])
  if not tie_embeddings:
    out['lm_head.weight'] = np.ascontiguousarray(np.asarray(params['lm_head']['kernel']).T)
  return out


def config_from_hf(hf: Mapping, source: str) -> tuple[BackboneConfig, bool]:
  """(BackboneConfig, tie_embeddings) from a HF config.json dict; refuses what we cannot match."""
  arch = (hf.get('architectures') or ['LlamaForCausalLM'])[0]
  if hf.get('model_type') != 'llama' or arch != 'LlamaForCausalLM':
    raise UserError(f'{source} describes {arch} (model_type {hf.get("model_type")!r}); only '
                    'LlamaForCausalLM checkpoints are supported.')
  for key, wanted in (('hidden_act', 'silu'), ('attention_bias', False), ('mlp_bias', False)):
    if hf.get(key, wanted) != wanted:
      raise UserError(f'{source} sets {key} = {hf[key]!r}; only {wanted!r} is supported.')
  width, heads = hf['hidden_size'], hf['num_attention_heads']
  if hf.get('head_dim') not in (None, width // heads):
    raise UserError(f'{source} sets head_dim = {hf["head_dim"]}; expected hidden_size / heads.')
  scaling = None
  rs = hf.get('rope_scaling') or hf.get('rope_parameters')
  kind = (rs or {}).get('rope_type', (rs or {}).get('type', 'default'))
  if kind in ('linear', 'llama3'):
    scaling = RopeScaling(RopeKind(kind), float(rs['factor']), float(rs.get('low_freq_factor', 1.0)),
                          float(rs.get('high_freq_factor', 4.0)),
                          int(rs.get('original_max_position_embeddings', 8192)))
  elif kind != 'default':
    raise UserError(f'{source} uses rope scaling {kind!r}; supported: linear, llama3.')
  theta = float((rs or {}).get('rope_theta', hf.get('rope_theta', 10000.0)))
  cfg = BackboneConfig(vocab_size=hf['vocab_size'], width=width, depth=hf['num_hidden_layers'],
                       num_heads=heads, num_kv_heads=hf.get('num_key_value_heads') or heads,
                       mlp_dim=hf['intermediate_size'], rope_theta=theta, rope_scaling=scaling,
                       norm_eps=float(hf.get('rms_norm_eps', 1e-6)))
  return cfg, bool(hf.get('tie_word_embeddings', False))


def hf_config(cfg: BackboneConfig, tie_embeddings: bool, dtype: str, bos_id: int, eos_id: int,
              pad_id: int) -> dict:
  """A LlamaForCausalLM config.json dict for an exported backbone."""
  out = dict(architectures=['LlamaForCausalLM'], model_type='llama', vocab_size=cfg.vocab_size,
             hidden_size=cfg.width, intermediate_size=cfg.mlp_dim,
             num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
             num_key_value_heads=cfg.num_kv_heads, hidden_act='silu', rms_norm_eps=cfg.norm_eps,
             rope_theta=cfg.rope_theta, tie_word_embeddings=tie_embeddings,
             attention_bias=False, mlp_bias=False, max_position_embeddings=4096,
             bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, torch_dtype=dtype)
  if cfg.rope_scaling is not None:
    r = cfg.rope_scaling
    out['rope_scaling'] = dict(rope_type=r.kind.value, factor=r.factor,
                               low_freq_factor=r.low_freq_factor,
                               high_freq_factor=r.high_freq_factor,
                               original_max_position_embeddings=r.original_max_position)
  return out


def config_to_json(cfg: BackboneConfig) -> dict:
  r = cfg.rope_scaling
  return dict(vocab_size=cfg.vocab_size, width=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads,
              num_kv_heads=cfg.num_kv_heads, mlp_dim=cfg.mlp_dim, rope_theta=cfg.rope_theta,
              norm_eps=cfg.norm_eps,
              rope_scaling=None if r is None else dict(
                  kind=r.kind.value, factor=r.factor, low_freq_factor=r.low_freq_factor,
                  high_freq_factor=r.high_freq_factor, original_max_position=r.original_max_position))


def config_from_json(d: Mapping) -> BackboneConfig:
  d = dict(d)
  r = d.pop('rope_scaling')
  scaling = None if r is None else RopeScaling(**dict(r, kind=RopeKind(r['kind'])))
  return BackboneConfig(rope_scaling=scaling, **d)
