"""HF LLaMA checkpoints <-> converted directories (see converted.py) and backbone params.

HF stores Linear weights as [out, in]; ours are [in, ...out axes] with the L
layers stacked on a leading axis (nn.scan). Heads are contiguous blocks of the
HF output dimension, so a reshape recovers the [H, E] axes. Directories are
written through files.atomic_directory, so a crash leaves no DST.
"""

import json
import os
from typing import Callable, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from monoformer_jax.base import files, workdir_layout
from monoformer_jax.base.errors import UserError
from monoformer_jax.convert import hf_config, safetensors_io, torch_bin
from monoformer_jax.data import tokenizer as tokenizer_lib
from monoformer_jax.nn import converted
from monoformer_jax.nn.layers import BackboneConfig


# Our path under a layer -> HF's name under model.layers.i (the same path, dotted).
LINEARS = {(group, name): f'{group}.{name}' for group, names in (
    ('self_attn', ('q_proj', 'k_proj', 'v_proj', 'o_proj')),
    ('mlp', ('gate_proj', 'up_proj', 'down_proj'))) for name in names}


BIASED = (('self_attn', 'q_proj'), ('self_attn', 'k_proj'), ('self_attn', 'v_proj'))  # Qwen2


def _bias_shape(cfg: BackboneConfig, ours: tuple[str, str]) -> tuple[int, int]:
  return (cfg.num_heads if ours[1] == 'q_proj' else cfg.num_kv_heads, cfg.head_dim)


def _get(tensors: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
  """One tensor in its stored dtype, checked against the shape the config implies."""
  if name not in tensors:
    raise UserError(f'tensor {name} is missing from the LLaMA checkpoint.')
  value = np.asarray(tensors[name])
  if value.shape != shape:
    raise UserError(f'tensor {name} has shape {value.shape}; the model config expects {shape}.')
  return value


def _kernel(cfg: BackboneConfig, ours: tuple[str, str], weight: np.ndarray) -> np.ndarray:
  """HF [out, in] -> our kernel layout (attention kernels with their head axes apart)."""
  h, k, e, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.width
  heads = {'q_proj': (d, h, e), 'k_proj': (d, k, e), 'v_proj': (d, k, e), 'o_proj': (h, e, d)}
  return weight.T.reshape(heads.get(ours[1], weight.T.shape))


def hf_shape(cfg: BackboneConfig, ours: tuple[str, str]) -> tuple[int, int]:
  h, k, e, d, f = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.width, cfg.mlp_dim
  return {'q_proj': (h * e, d), 'k_proj': (k * e, d), 'v_proj': (k * e, d), 'o_proj': (d, h * e),
          'gate_proj': (f, d), 'up_proj': (f, d), 'down_proj': (d, f)}[ours[1]]


def layer_from_hf(tensors: Mapping[str, np.ndarray], cfg: BackboneConfig, i: int) -> dict:
  """Block i's params (our layout, without the layer axis) from HF tensors, stored dtype."""
  layer = {}
  for ours, hf in LINEARS.items():
    weight = _get(tensors, f'model.layers.{i}.{hf}.weight', hf_shape(cfg, ours))
    layer.setdefault(ours[0], {})[ours[1]] = {'kernel': np.ascontiguousarray(_kernel(cfg, ours, weight))}
  if cfg.attention_bias:
    for ours in BIASED:
      bias = _get(tensors, f'model.layers.{i}.{LINEARS[ours]}.bias', (hf_shape(cfg, ours)[0],))
      layer[ours[0]][ours[1]]['bias'] = bias.reshape(_bias_shape(cfg, ours))
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


def device_backbone(tensors: Mapping[str, np.ndarray], cfg: BackboneConfig, tie: bool) -> dict:
  """The backbone params as device arrays in the source's dtype, the decoder's blocks apart
  (under decoder/layers/{i}): each tensor is moved as soon as it is read, so memory holds the
  weights about once."""
  put = lambda tree: jax.tree.map(jax.device_put, tree)  # noqa: E731
  params = put(outer_from_hf(tensors, cfg, tie))
  params['decoder'] = {'layers': {str(i): put(layer_from_hf(tensors, cfg, i))
                                  for i in range(cfg.depth)}}
  return params


def kernel_to_hf(cfg: BackboneConfig, ours: tuple[str, str], kernel: np.ndarray) -> np.ndarray:
  """One block's kernel in our layout -> HF's [out, in] weight."""
  return np.ascontiguousarray(np.asarray(kernel).reshape(hf_shape(cfg, ours)[::-1]).T)


def read_hf_config(src: str) -> dict:
  path = os.path.join(src, 'config.json')
  if not files.isfile(path):
    raise UserError(f'{path} does not exist; expected a HF checkpoint directory with config.json.')
  return files.read_json(path)


def convert_llama(src: str, dst: str) -> None:
  """HF LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM directory (safetensors) and its
  tokenizer -> converted directory.

  Memory stays near the checkpoint's size: each tensor is read, moved into a
  jax array (the numpy copy dropped), and Orbax writes with a bounded number of
  bytes in flight; blocks are kept apart so no [L, ...] stack is ever built."""
  source = read_hf_config(src)
  cfg, tie = hf_config.config_from_hf(source, os.path.join(src, 'config.json'))
  tensors = torch_bin.open_weights(src)
  tok = tokenizer_lib.load(src, f'the HF checkpoint {src}')
  if tok.num_pieces > cfg.vocab_size:
    raise UserError(f'{tok.path} has {tok.num_pieces} entries, but {src}/config.json gives '
                    f'vocab_size {cfg.vocab_size} embedding rows; expected at most as many entries '
                    'as rows (the tokenizer of another model?).')
  params = device_backbone(tensors, cfg, tie)
  largest = max(x.nbytes for x in jax.tree.leaves(params))
  # Each leaf in its own files, in chunks of at most 64 MiB: the writer's buffers stay a small
  # part of the checkpoint (one whole-leaf chunk would add a copy of the largest leaf).
  handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=max(0.15, 1.1 * largest / 1e9),
                                        use_ocdbt=False)
  save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=64 * 2**20), params)
  with files.atomic_directory(dst, last=converted.MODEL_JSON) as tmp:
    with ocp.Checkpointer(handler) as ckptr:
      ckptr.save(os.path.join(tmp, converted.PARAMS),
                 args=ocp.args.PyTreeSave(params, save_args=save_args))
    tokenizer_lib.copy_files(src, tmp)
    files.write_text(os.path.join(tmp, converted.MODEL_JSON), json.dumps(
        {'backbone': converted.config_to_json(cfg), 'tie_embeddings': tie, 'hf_config': source,
         'source': files.absolute(src)}, indent=1))


def export_llama(tensors: list, cfg: BackboneConfig, tie: bool, dst: str, tokenizer_dir: str,
                 source: Optional[Mapping], max_positions: int,
                 special_ids: Optional[tuple[Optional[int], int, int]]) -> None:
  """(name, LazyTensor) pairs of backbone_tensors -> a HF checkpoint directory (config.json +
  model.safetensors, and the tokenizer of tokenizer_dir), written one tensor at a time. The
  tokenizer's model_max_length is config.json's max_position_embeddings (the source's, when there
  is one; else max_positions), so the two never disagree."""
  dtype = np.dtype(tensors[0][1].dtype)
  torch_dtype = dtype.name if dtype in (np.float32, np.float16) else 'bfloat16'
  with files.atomic_directory(dst, last='config.json') as tmp:
    safetensors_io.write(os.path.join(tmp, safetensors_io.SINGLE_FILE), tensors, {'format': 'pt'})
    config = hf_config.hf_config(cfg, tie, torch_dtype, source, max_positions, special_ids)
    files.write_text(os.path.join(tmp, 'config.json'), json.dumps(config, indent=1))
    if tokenizer_lib.kind_file(tokenizer_dir):
      write_tokenizer(tmp, tokenizer_lib.load(tokenizer_dir),
                      config.get('max_position_embeddings', max_positions))


def write_tokenizer(directory: str, tok: tokenizer_lib.Tokenizer, context: int) -> None:
  """The tokenizer files HF's AutoTokenizer reads, encoding as training did."""
  if isinstance(tok, tokenizer_lib.SentencePiece):
    files.copy(tok.path, os.path.join(directory, workdir_layout.TOKENIZER_MODEL))
    write_tokenizer_config(directory, tok, context)
  else:
    tok.write(directory, context)


def write_tokenizer_config(directory: str, tok: tokenizer_lib.SentencePiece, context: int,
                           extra_special=None, added_tokens_decoder=None,
                           tokenizer_class: str = '') -> dict:
  """special_tokens_map.json and tokenizer_config.json beside tokenizer.model, so HF's
  AutoTokenizer adds BOS and not EOS, as LLaMA does (and lm-eval-harness then scores with
  BOS). Without a tokenizer_class, HF reads the sentencepiece model as it is; 'LlamaTokenizer'
  would re-read it as BPE, which a unigram model trained here is not."""
  piece = tok.sp.id_to_piece
  special = dict(bos_token=piece(tok.bos_id), eos_token=piece(tok.eos_id),
                 unk_token=piece(tok.sp.unk_id()), **(extra_special or {}))
  config = dict(special, add_bos_token=True, add_eos_token=False, model_max_length=context)
  if tokenizer_class:
    config['tokenizer_class'] = tokenizer_class
  if added_tokens_decoder:
    config['added_tokens_decoder'] = added_tokens_decoder
  for name, content in ((workdir_layout.HF_SPECIAL_TOKENS_MAP, special),
                        (workdir_layout.HF_TOKENIZER_CONFIG, config)):
    files.write_text(os.path.join(directory, name), json.dumps(content, indent=1))
  return special


def with_rows(matrix: np.ndarray, new_rows: Mapping[int, int]) -> np.ndarray:
  """[V, D] -> [V', D]: rows appended, each a copy of a row or (-1) the mean row."""
  if not new_rows:
    return matrix
  out = np.empty((max(new_rows) + 1, matrix.shape[1]), matrix.dtype)
  out[:len(matrix)] = matrix
  mean = matrix.astype(np.float32).mean(0).astype(matrix.dtype)
  for row, source in new_rows.items():
    out[row] = mean if source < 0 else matrix[source]
  return out


def backbone_tensors(cfg: BackboneConfig, tie: bool, param: Callable[..., np.ndarray],
                     dtype: np.dtype, new_rows: Optional[Mapping[int, int]] = None) -> list:
  """The backbone as (HF name, LazyTensor) pairs, read through param(*path) one parameter at
  a time (decoder parameters stacked [L, ...]); vocabulary rows appended as with_rows says."""
  new_rows, cache = new_rows or {}, {}
  vocab, d = cfg.vocab_size + len(new_rows), cfg.width

  def read(*path):  # the last parameter read is kept: the layers of a stack share it
    if path not in cache:
      cache.clear()
      cache[path] = param(*path)
    return cache[path]

  def lazy(shape, make):
    return safetensors_io.LazyTensor(shape, dtype, lambda: make().astype(dtype, copy=False))

  out = [('model.embed_tokens.weight', lazy(
      (vocab, d), lambda: with_rows(read('embed_tokens', 'embedding'), new_rows)))]
  for ours, hf in LINEARS.items():
    for i in range(cfg.depth):
      out.append((f'model.layers.{i}.{hf}.weight', lazy(hf_shape(cfg, ours), lambda o=ours, i=i: (
          kernel_to_hf(cfg, o, read('decoder', 'layers', *o, 'kernel')[i])))))
  for ours in BIASED if cfg.attention_bias else ():
    for i in range(cfg.depth):
      out.append((f'model.layers.{i}.{LINEARS[ours]}.bias', lazy(
          hf_shape(cfg, ours)[:1],
          lambda o=ours, i=i: read('decoder', 'layers', *o, 'bias')[i].reshape(-1))))
  for norm in ('input_layernorm', 'post_attention_layernorm'):
    for i in range(cfg.depth):
      out.append((f'model.layers.{i}.{norm}.weight', lazy(
          (d,), lambda n=norm, i=i: read('decoder', 'layers', n, 'scale')[i])))
  out.append(('model.norm.weight', lazy((d,), lambda: read('norm', 'scale'))))
  if not tie:
    out.append(('lm_head.weight', lazy((vocab, d), lambda: with_rows(
        np.ascontiguousarray(read('lm_head', 'kernel').T), new_rows))))
  return out
