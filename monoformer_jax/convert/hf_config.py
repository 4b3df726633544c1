"""HF config.json <-> BackboneConfig for the decoder families the backbone matches exactly.

LLaMA, Mistral and Qwen2 share one block (RMSNorm, RoPE, GQA, SwiGLU); Qwen2 adds a bias to the
q/k/v projections. What a source sets that the backbone cannot reproduce (another activation,
sliding windows that bite, mixture-of-experts, an unknown rope scaling) is refused by name rather
than dropped.
"""

import dataclasses
from typing import Mapping, Optional

from monoformer_jax.base.errors import UserError
from monoformer_jax.nn.layers import BackboneConfig
from monoformer_jax.nn.rope import RopeKind, RopeScaling


@dataclasses.dataclass(frozen=True)
class Family:
  """A model_type the backbone reproduces: its architecture and whether q/k/v carry a bias."""
  architecture: str
  qkv_bias: bool


FAMILIES = {'llama': Family('LlamaForCausalLM', False),
            'mistral': Family('MistralForCausalLM', False),
            'qwen2': Family('Qwen2ForCausalLM', True)}
# Keys that mean a block the backbone does not have, whatever their model_type says.
MIXTURE_KEYS = ('num_experts', 'num_local_experts', 'num_experts_per_tok', 'moe_intermediate_size',
                'n_routed_experts')


def family_of(hf: Mapping, source: str) -> Family:
  model_type = hf.get('model_type')
  arch = (hf.get('architectures') or [getattr(FAMILIES.get(model_type), 'architecture', '?')])[0]
  family = FAMILIES.get(model_type)
  if family is None or arch != family.architecture:
    supported = ', '.join(f'{f.architecture} ({t})' for t, f in FAMILIES.items())
    raise UserError(f'{source} describes {arch} (model_type {model_type!r}); supported: '
                    f'{supported}.')
  return family


def _refuse_unsupported(hf: Mapping, family: Family, source: str) -> None:
  for key in MIXTURE_KEYS:
    if hf.get(key):
      raise UserError(f'{source} sets {key} = {hf[key]!r}: a mixture of experts, which the '
                      'backbone does not have; expected a dense model.')
  wanted = {'hidden_act': 'silu', 'mlp_bias': False}
  if not family.qkv_bias:  # LLaMA's attention_bias puts a bias on o_proj too
    wanted['attention_bias'] = False
  for key, value in wanted.items():
    if hf.get(key, value) != value:
      raise UserError(f'{source} sets {key} = {hf[key]!r}; only {value!r} is supported for '
                      f'model_type {hf.get("model_type")!r}.')
  _refuse_sliding_window(hf, source)


def _refuse_sliding_window(hf: Mapping, source: str) -> None:
  """A window at least as long as the model's context never masks anything: full attention. A
  shorter one is refused, since the backbone's attention is never windowed."""
  context = hf.get('max_position_embeddings') or 0
  window = hf.get('sliding_window')
  enabled = hf.get('use_sliding_window', window is not None)
  layer_types = hf.get('layer_types') or []
  sliding_layers = any(t != 'full_attention' for t in layer_types)
  if (enabled or sliding_layers) and window is not None and window < context:
    key = 'use_sliding_window' if 'use_sliding_window' in hf else 'sliding_window'
    raise UserError(f'{source} sets {key} (a window of {window} tokens, shorter than its '
                    f'max_position_embeddings {context}); only full attention is supported.')


def _rope(hf: Mapping, source: str) -> tuple[float, Optional[RopeScaling]]:
  rs = hf.get('rope_scaling') or hf.get('rope_parameters') or {}
  kind = rs.get('rope_type', rs.get('type', 'default'))
  scaling = None
  if kind in ('linear', 'llama3', 'dynamic'):
    original = (hf.get('max_position_embeddings', 2048) if kind == 'dynamic'
                else rs.get('original_max_position_embeddings', 8192))
    scaling = RopeScaling(RopeKind(kind), float(rs['factor']), float(rs.get('low_freq_factor', 1.0)),
                          float(rs.get('high_freq_factor', 4.0)), int(original))
  elif kind != 'default':
    raise UserError(f'{source} uses rope scaling {kind!r}; supported: linear, dynamic, llama3.')
  return float(rs.get('rope_theta', hf.get('rope_theta', 10000.0))), scaling


def config_from_hf(hf: Mapping, source: str) -> tuple[BackboneConfig, bool]:
  """(BackboneConfig, tie_embeddings) from a HF config.json dict; refuses what we cannot match."""
  family = family_of(hf, source)
  for key in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
              'num_attention_heads'):
    if not isinstance(hf.get(key), int) or hf[key] < 1:
      raise UserError(f'{source} gives {key} = {hf.get(key)!r}; expected a positive integer.')
  _refuse_unsupported(hf, family, source)
  width, heads = hf['hidden_size'], hf['num_attention_heads']
  head_dim = hf.get('head_dim') or width // heads
  if hf.get('partial_rotary_factor', 1.0) != 1.0 or head_dim % 2:
    raise UserError(f'{source} rotates part of each head, or heads of odd width {head_dim}; only '
                    'full rotary embeddings on even head widths are supported.')
  theta, scaling = _rope(hf, source)
  cfg = BackboneConfig(vocab_size=hf['vocab_size'], width=width, depth=hf['num_hidden_layers'],
                       num_heads=heads, num_kv_heads=hf.get('num_key_value_heads') or heads,
                       mlp_dim=hf['intermediate_size'], rope_theta=theta, rope_scaling=scaling,
                       norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
                       head_width=None if head_dim == width // heads else head_dim,
                       attention_bias=family.qkv_bias)
  return cfg, bool(hf.get('tie_word_embeddings', False))


def hf_config(cfg: BackboneConfig, tie_embeddings: bool, dtype: str,
              source: Optional[Mapping] = None, max_positions: int = 2048,
              special_ids: Optional[tuple[Optional[int], int, int]] = None) -> dict:
  """A config.json dict for an exported backbone.

  Every key of `source` (the config.json the backbone was converted from) is kept, its
  architecture, rope settings and context length included; the shape, vocabulary and dtype are
  the exported tensors'. Without a source it is a LlamaForCausalLM (a Qwen2ForCausalLM with
  q/k/v bias). special_ids (bos, eos, pad) fill in the ids the source does not give."""
  out = dict(source or {})
  if source is None or out.get('model_type') not in FAMILIES:
    model_type = 'qwen2' if cfg.attention_bias else 'llama'
    out.update(model_type=model_type, architectures=[FAMILIES[model_type].architecture])
  out.update(vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_dim,
             num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
             num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, hidden_act='silu',
             rms_norm_eps=cfg.norm_eps, tie_word_embeddings=tie_embeddings)
  # transformers 5 writes `dtype`, earlier versions `torch_dtype`: the source's spelling stays.
  for key in [k for k in ('torch_dtype', 'dtype') if k in out] or ['torch_dtype']:
    out[key] = dtype
  if out['model_type'] == 'llama':
    out.update(attention_bias=False, mlp_bias=False)
  for key, value in zip(('bos_token_id', 'eos_token_id', 'pad_token_id'), special_ids or ()):
    if source is None or out.get(key) is None:  # a source's own ids stay
      out[key] = value
  if source is None:
    r = cfg.rope_scaling
    dynamic = r is not None and r.kind == RopeKind.DYNAMIC  # scaled past max_position_embeddings
    out.update(rope_theta=cfg.rope_theta,
               max_position_embeddings=r.original_max_position if dynamic else max_positions)
    if r is not None:
      out['rope_scaling'] = dict(rope_type=r.kind.value, factor=r.factor,
                                 low_freq_factor=r.low_freq_factor,
                                 high_freq_factor=r.high_freq_factor,
                                 original_max_position_embeddings=r.original_max_position)
  return out
