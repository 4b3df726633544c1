"""The backbone against HF transformers' LlamaForCausalLM on tiny random configs (fp32)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from monoformer_jax.convert import hf_config as hf_config_lib, llama
from monoformer_jax.nn import converted
from monoformer_jax.nn.layers import MaskType
from monoformer_jax.nn.model import ImageConfig, MonoFormer


LLAMA3 = dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=16)
CASES = {  # name: (heads, kv heads, tied, rope_theta, rope_scaling)
    'mha_untied': (4, 4, False, 10000.0, None),
    'gqa_tied_theta': (4, 2, True, 500000.0, None),
    'gqa_llama3_scaling': (4, 1, False, 500000.0, LLAMA3),
    'linear_scaling': (4, 2, False, 10000.0, dict(rope_type='linear', factor=4.0)),
    # NTK scaling grows the base past max_position_embeddings (16 here, 40 tokens long).
    'dynamic_scaling': (4, 2, False, 10000.0, dict(rope_type='dynamic', factor=2.0)),
}


def _backbone_from_hf(tensors, cfg, tie_embeddings: bool) -> dict:
  """The text-model params ('embed_tokens', 'decoder', 'norm', 'lm_head') from HF tensors."""
  params = llama.outer_from_hf(tensors, cfg, tie_embeddings)
  layers = [llama.layer_from_hf(tensors, cfg, i) for i in range(cfg.depth)]
  return dict(params, decoder={'layers': converted.stack_layers(layers)})


def _models(heads, kv_heads, tied, theta, scaling):
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(
      vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
      num_attention_heads=heads, num_key_value_heads=kv_heads, rope_theta=theta,
      rope_scaling=scaling, rms_norm_eps=1e-5, tie_word_embeddings=tied,
      max_position_embeddings=16 if scaling and scaling['rope_type'] == 'dynamic' else 128,
      attn_implementation='eager')
  hf = transformers.LlamaForCausalLM(hf_config).eval()
  with torch.no_grad():  # sharp attention and norms off 1, so a wrong RoPE or norm cannot pass
    for name, weight in hf.named_parameters():
      if 'norm' in name:
        weight.normal_(1.0, 0.1)
      elif name.endswith(('q_proj.weight', 'k_proj.weight')):
        weight.mul_(10.0)
  cfg, tie = hf_config_lib.config_from_hf(hf_config.to_dict(), 'test config')
  assert tie == tied
  model = MonoFormer(cfg, ImageConfig(patch_size=2, height=4, width=4, channels=1), tied)
  tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  ours = model.init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 3), bool),
                    jnp.zeros((1, 4, 4, 1)), jnp.zeros((1,), jnp.int32), method=model.init_all)
  params = dict(nn.unbox(ours['params']))
  params.update(_backbone_from_hf(tensors, cfg, tied))
  return hf, model, params


@pytest.mark.parametrize('case', [pytest.param(c, marks=pytest.mark.slow) if c == 'gqa_llama3_scaling'
                                  else c for c in sorted(CASES)])
def test_logits_match_transformers(case):
  hf, model, params = _models(*CASES[case])
  tokens = np.random.default_rng(1).integers(0, 97, (2, 40))  # past the llama3 original length
  with torch.no_grad():
    expected = hf(torch.tensor(tokens)).logits.numpy()
  got = model.apply({'params': params}, jnp.asarray(tokens), jnp.ones(tokens.shape, bool),
                    mask_type=MaskType.CAUSAL).logits
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)


def test_left_padding_matches_transformers_unpadded():
  """A left-padded row gets exactly the logits of the same tokens without padding."""
  hf, model, params = _models(*CASES['gqa_tied_theta'])
  tokens = np.random.default_rng(2).integers(0, 97, (1, 7))
  with torch.no_grad():
    expected = hf(torch.tensor(tokens)).logits.numpy()[0]
  padded = np.concatenate([np.zeros((1, 4), np.int64), tokens], axis=1)
  valid = np.concatenate([np.zeros((1, 4), bool), np.ones((1, 7), bool)], axis=1)
  got = model.apply({'params': params}, jnp.asarray(padded), jnp.asarray(valid),
                    mask_type=MaskType.CAUSAL).logits
  np.testing.assert_allclose(np.asarray(got)[0, 4:], expected, atol=1e-4, rtol=0)


def test_missing_and_misshapen_tensors_are_named():
  hf, model, _ = _models(*CASES['mha_untied'])
  tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  cfg = model.backbone
  broken = dict(tensors)
  del broken['model.layers.1.mlp.up_proj.weight']
  with pytest.raises(Exception, match=r'model\.layers\.1\.mlp\.up_proj\.weight is missing'):
    _backbone_from_hf(broken, cfg, False)
  broken = dict(tensors, **{'model.norm.weight': np.ones(3, np.float32)})
  with pytest.raises(Exception, match=r'model\.norm\.weight has shape \(3,\)'):
    _backbone_from_hf(broken, cfg, False)
