"""Any LLaMA-family backbone in, the whole MonoFormer out: a tiny LLaMA of a shape in no
table (head width 16 beside a width of 48 over 4 heads), llama3 rope scaling and tied
embeddings is converted, trained from with model.size 'auto', and exported both ways;
HF transformers and the official forward (tests/official_reference.py) agree with JAX."""

import json

import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers
from helpers import tiny_config
from official_reference import OfficialExtras, official_forward

from monoformer_jax import train
from monoformer_jax.convert import commands, torch_bin
from monoformer_jax.nn.layers import MaskType
from monoformer_jax.run import workdir as workdir_lib


VOCAB, WIDTH = 300, 48
LLAMA3 = dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=16)


def _relative(got, want) -> float:
  return float(np.abs(np.asarray(got) - np.asarray(want)).max() / np.abs(np.asarray(want)).max())


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(workdir, HF source dir): the LLM converted and trained from for 3 steps."""
  root = tmp_path_factory.mktemp('any_backbone')
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=WIDTH, num_attention_heads=4, head_dim=16,
      num_key_value_heads=2, intermediate_size=80, num_hidden_layers=2, rms_norm_eps=1e-5,
      rope_theta=50000.0, rope_scaling=LLAMA3, tie_word_embeddings=True,
      max_position_embeddings=64))
  with torch.no_grad():  # sharp attention (q/k std ~0.1) and norms off 1: a wrong RoPE shows
    for name, weight in hf.named_parameters():
      if 'norm' in name:
        weight.normal_(1.0, 0.1)
      elif name.endswith(('q_proj.weight', 'k_proj.weight')):
        weight.mul_(5.0)
  hf.save_pretrained(root / 'hf', safe_serialization=True)
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  (root / 'corpus.txt').write_text('\n'.join(topics.topics[k] for k in sorted(topics.topics)[:30]))
  spm.SentencePieceTrainer.train(input=str(root / 'corpus.txt'), model_prefix=str(root / 'hf' / 'tokenizer'),
                                 vocab_size=VOCAB, minloglevel=2)
  commands.run('llama', str(root / 'hf'), str(root / 'llm'))
  config = tiny_config(num_steps=3)
  config.model.size, config.model.init_from = 'auto', str(root / 'llm')
  config.data.prompt_len = 24
  train.train_and_evaluate(config, str(root / 'work'))
  return str(root / 'work'), root


def test_the_shape_and_rope_come_from_the_checkpoint(trained):
  workdir, _ = trained
  setup = workdir_lib.for_inference(workdir, use_ema=False).setup
  cfg = setup.model.backbone
  assert (cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim) == (48, 4, 2, 16, 80)
  assert cfg.rope_scaling.kind.value == 'llama3' and cfg.rope_theta == 50000.0
  assert setup.model.tie_embeddings and setup.config.model.context_length == 64
  assert (setup.tok.im_start_id, setup.tok.im_end_id, setup.tok.pad_id) == (300, 301, 302)
  assert cfg.vocab_size == 303  # the specials appended by themselves


def test_export_llama_gives_the_trained_logits(trained):
  workdir, root = trained
  restored = workdir_lib.for_inference(workdir, use_ema=False)
  commands.run('export-llama', workdir, str(root / 'out_llama'), ema=False)
  hf = transformers.LlamaForCausalLM.from_pretrained(root / 'out_llama').eval()
  tokens = np.random.default_rng(0).integers(3, VOCAB, (2, 40))  # past the llama3 original 16
  with torch.no_grad():
    want = hf(torch.tensor(tokens)).logits.numpy()
  got = restored.setup.model.apply({'params': restored.params}, tokens, np.ones(tokens.shape, bool),
                                   mask_type=MaskType.CAUSAL).logits
  assert _relative(got, want) < 1e-5


def test_export_official_runs_in_the_official_forward(trained):
  workdir, root = trained
  restored = workdir_lib.for_inference(workdir, use_ema=True)
  model, params = restored.setup.model, restored.params
  commands.run('export-official', workdir, str(root / 'out_official'), ema=True)
  out = root / 'out_official'
  config = json.loads((out / 'config.json').read_text())
  added = json.loads((out / 'added_tokens.json').read_text())
  assert config['architectures'] == ['MonoFormerForCausalLM'] and config['head_dim'] == 16
  assert config['image_token_index'] == added['<image>'] == 303 and config['vocab_size'] == 304
  llm = transformers.LlamaForCausalLM.from_pretrained(out).eval()
  extras = OfficialExtras(D=WIDTH, P=2, C=1)
  tensors = torch_bin.open_weights(str(out))
  extras.load_state_dict({k: torch.from_numpy(np.array(tensors[k]))
                          for k in extras.state_dict()})

  prompts = [[1, 17, 42, 9, 200], [1]]
  im_start, image, im_end, pad = (added[t] for t in ('<|im_start|>', '<image>', '<|im_end|>', '<PAD>'))
  official_ids = torch.full((2, 8), pad)
  for b, p in enumerate(prompts):
    official_ids[b, :len(p) + 3] = torch.tensor(p + [im_start, image, im_end])
  x_t = torch.randn(2, 1, 8, 8)
  t = torch.tensor([999, 3])
  with torch.no_grad():
    want, _ = official_forward(llm, extras, official_ids, x_t, t, pad=pad, image=image)
  length = restored.setup.config.data.prompt_len
  tokens, valid = np.full((2, length), pad, np.int32), np.zeros((2, length), bool)
  for b, p in enumerate(prompts):
    tokens[b, -len(p) - 1:], valid[b, -len(p) - 1:] = p + [im_start], True
  got = model.apply({'params': params}, tokens, valid, mask_type=MaskType.HYBRID,
                    image=x_t.numpy().transpose(0, 2, 3, 1), t=t.numpy(),
                    suffix=np.full((2, 1), im_end, np.int32)).image
  assert _relative(got, want.numpy().transpose(0, 2, 3, 1)) < 1e-5  # eps and sigma

  text = np.random.default_rng(1).integers(3, VOCAB, (1, 40))
  with torch.no_grad():
    want_logits = llm(torch.tensor(text)).logits.numpy()[..., :303]
  logits = model.apply({'params': params}, text, np.ones(text.shape, bool),
                       mask_type=MaskType.CAUSAL).logits
  assert _relative(logits, want_logits) < 1e-5
