"""The LLMs users start from today, in and out: SmolLM2-, Llama-3.2- and Qwen2.5-shaped sources
(odd widths, heads and kv heads; llama3 scaling; tied; q/k/v bias; theta 1e6; a padded embedding)
with byte-level BPE tokenizer.json files trained here, converted, trained 3 text steps with
model.size 'auto' and exported: transformers' logits and tokenization equal ours, and
lm-eval-harness scores the Qwen2.5-shaped export as we do."""

import json
import os

import numpy as np
import pytest
import torch
import transformers
from helpers import MIXED, tiny_config

from monoformer_jax import train
from monoformer_jax.base.errors import UserError
from monoformer_jax.convert import commands, safetensors_io
from monoformer_jax.convert.synthetic_tokenizer import TokenizerFamily, train_bpe
from monoformer_jax.data import tokenizer as tokenizer_lib
from monoformer_jax.evaluation import multiple_choice as mc
from monoformer_jax.nn.layers import MaskType
from monoformer_jax.run import workdir as workdir_lib


ENTRIES = 400  # the trained tokenizers' size
LLAMA3 = dict(rope_type='llama3', factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=32)
# SmolLM2 itself is tests/tools/test_gguf_to_hf.py's: the real weights, tokenizer and template.
SOURCES = {  # name: (tokenizer family, transformers class, config, embedding rows)
    'llama3.2': (TokenizerFamily.LLAMA3, transformers.LlamaForCausalLM, transformers.LlamaConfig(
        hidden_size=40, num_attention_heads=5, num_key_value_heads=1, head_dim=12,
        intermediate_size=56, num_hidden_layers=2, rope_theta=500000.0, rope_scaling=LLAMA3,
        rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=256), ENTRIES),
    'qwen2.5': (TokenizerFamily.QWEN2, transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
        hidden_size=56, num_attention_heads=7, num_key_value_heads=1, intermediate_size=72,
        num_hidden_layers=2, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        use_sliding_window=False, sliding_window=64, max_position_embeddings=256),
                ENTRIES + 37),  # rows past the tokenizer's entries, as Qwen2.5 pads its matrix
}


def _sharpen(model: torch.nn.Module) -> None:
  """Attention far from uniform and norms off 1, so a wrong mask, RoPE or bias shows."""
  with torch.no_grad():
    for name, weight in model.named_parameters():
      if 'norm' in name:
        weight.normal_(1.0, 0.1)
      elif name.endswith(('q_proj.weight', 'k_proj.weight')):
        weight.mul_(5.0)
      elif name.endswith('bias'):
        weight.normal_(0.0, 0.5)


def _relative(got, want) -> float:
  return float(np.abs(np.asarray(got) - np.asarray(want)).max() / np.abs(np.asarray(want)).max())


_MADE = {}


def _export(name: str, tmp_path_factory):
  """(name, HF source dir, workdir trained 3 steps from it, its export-llama directory), made
  once per test file."""
  if name not in _MADE:
    _MADE[name] = _make(name, tmp_path_factory)
  return _MADE[name]


@pytest.fixture(scope='module', params=sorted(SOURCES))
def exported(request, tmp_path_factory):
  return _export(request.param, tmp_path_factory)


@pytest.fixture(scope='module')
def qwen(tmp_path_factory):
  return _export('qwen2.5', tmp_path_factory)


@pytest.fixture(scope='module')
def llama3(tmp_path_factory):
  return _export('llama3.2', tmp_path_factory)


def _make(name: str, tmp_path_factory):
  family, model_class, config, rows = SOURCES[name]
  root = tmp_path_factory.mktemp(name.replace('.', '_'))
  src = root / 'hf'
  tk, tokenizer_config = train_bpe(family, ENTRIES)
  config.vocab_size = rows
  config.bos_token_id = tk.token_to_id(tokenizer_config['bos_token'] or '<|endoftext|>')
  config.eos_token_id = tk.token_to_id(tokenizer_config['eos_token'])
  torch.manual_seed(0)
  model = model_class(config)
  _sharpen(model)
  model.save_pretrained(src, safe_serialization=True)
  (src / 'tokenizer.json').write_text(tk.to_str())
  (src / 'tokenizer_config.json').write_text(json.dumps(tokenizer_config))
  commands.run('llama', str(src), str(root / 'llm'))
  run_config = tiny_config(num_steps=3, diffusion_weight=0.0)  # export-llama writes the LLM alone
  run_config.model.size, run_config.model.init_from = 'auto', str(root / 'llm')
  run_config.data.prompt_len = 24
  train.train_and_evaluate(run_config, str(root / 'work'))
  commands.run('export-llama', str(root / 'work'), str(root / 'out'), ema=True)
  return name, src, str(root / 'work'), root / 'out'


def test_transformers_logits_equal_ours_and_every_source_key_is_kept(exported):
  name, src, work, out = exported
  restored = workdir_lib.for_inference(work, use_ema=True)
  setup = restored.setup
  assert setup.config.model.attention_bias == (name == 'qwen2.5')
  tok = setup.tok
  rows = SOURCES[name][3]
  # MonoFormer's tokens come after the tokenizer's entries, inside Qwen's padding rows.
  assert (tok.num_pieces, tok.im_start_id, tok.im_end_id) == (ENTRIES, ENTRIES, ENTRIES + 1)
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert type(hf).__name__ == SOURCES[name][1].__name__
  assert hf.config.vocab_size == setup.model.backbone.vocab_size >= rows
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, setup.model.backbone.vocab_size, (2, 40))
  tokens[:, 5] = tok.im_start_id
  with torch.no_grad():
    want = hf(torch.tensor(tokens)).logits.numpy()
  got = setup.model.apply({'params': restored.params}, tokens, np.ones(tokens.shape, bool),
                          mask_type=MaskType.CAUSAL).logits
  assert _relative(got, want) < 1e-5, name
  source = json.loads((src / 'config.json').read_text())
  exported_config = json.loads((out / 'config.json').read_text())
  assert set(source) <= set(exported_config)
  changed = {'vocab_size', 'dtype', 'torch_dtype', 'transformers_version'}
  if source.get('pad_token_id') is None:  # the pad token MonoFormer appended
    changed.add('pad_token_id')
    assert exported_config['pad_token_id'] == tok.pad_id
  assert {k: v for k, v in source.items() if k not in changed} == {
      k: exported_config[k] for k in source if k not in changed}


def test_transformers_tokenizes_as_we_do(exported):
  name, src, work, out = exported
  ours = tokenizer_lib.load(work)
  assert isinstance(ours, tokenizer_lib.SentencePiece) is False
  theirs = transformers.AutoTokenizer.from_pretrained(out)
  source = transformers.AutoTokenizer.from_pretrained(src)
  assert len(MIXED) == 50
  for text in MIXED:
    want = theirs(text).input_ids
    assert ours.bos + ours.encode(text) == want, (name, text)
    if '<im_' not in text and '<pad>' not in text:  # the source has no MonoFormer tokens
      assert source(text).input_ids == want, (name, text)
  assert ours.bos == ([theirs.bos_token_id] if name == 'llama3.2' else [])
  assert ours.decode(ours.encode('naïve café 123')) == 'naïve café 123'


def test_lm_eval_harness_scores_the_qwen_export_as_we_do(qwen):
  """Requests as the harness's HF backend tokenizes them (no BOS for Qwen2.5): the same tokens
  and per-request log-likelihoods to 1e-4."""
  _, _, work, out = qwen
  from lm_eval.api.instance import Instance  # pylint: disable=g-import-not-at-top
  from lm_eval.models.huggingface import HFLM  # pylint: disable=g-import-not-at-top
  lm = HFLM(pretrained=str(out), dtype='float32', device='cpu', batch_size=8)
  restored = workdir_lib.for_inference(work, use_ema=True)
  setup = restored.setup
  items = [mc.Item.shared_context('The capital of the country is', ['Paris', 'a river', 'ten'], 0),
           mc.Item.shared_context('Question: 2 + 2 = ?\nAnswer:', [' 4', ' 22', ' four'], 0, ''),
           mc.Item.shared_context('naïve café, dé', ['jà vu', 'j\u00e0 vu!'], 1, ''),
           mc.Item.shared_context('Code: print(', ['"hi")', "'hi')"], 0, ''),
           mc.Item.shared_context('She said  ', ['yes.', 'no <im_start> way'], 0),
           mc.Item.shared_context('', ['Once upon a time', '<|im_end|> starts'], 0, '')]
  requests = [(c, x) for item in items for c, x in zip(item.contexts, item.continuations)]
  for context, continuation in requests[:-2]:  # the harness encodes an empty context apart
    ids, n = mc.encode_request(setup.tok, context, continuation, 256)
    want = lm._encode_pair(context, continuation)  # pylint: disable=protected-access
    assert (ids[:len(ids) - n], ids[len(ids) - n:]) == want, (context, continuation)
  theirs = lm.loglikelihood([Instance('loglikelihood', {}, r, i) for i, r in enumerate(requests)])
  ours = np.concatenate(mc.loglikelihoods(setup.model, restored.params, setup.tok, items, batch=8,
                                          max_length=256, layout=setup.layout))
  np.testing.assert_allclose(ours, [ll for ll, _ in theirs], rtol=1e-4, atol=1e-4)


def test_bad_sources_are_one_sentence(llama3, tmp_path):
  src = llama3[1]

  def variant(label, config_changes=None, tokenizer=None):
    path = tmp_path / label
    path.mkdir()
    for f in os.listdir(src):
      (path / f).write_bytes((src / f).read_bytes())
    config = json.loads((path / 'config.json').read_text())
    config.update(config_changes or {})
    (path / 'config.json').write_text(json.dumps(config))
    if tokenizer is not None:
      (path / 'tokenizer.json').write_text(tokenizer)
    return path

  bigger, _ = train_bpe(TokenizerFamily.LLAMA3, ENTRIES + 50)
  cases = [
      (variant('too_many_entries', tokenizer=bigger.to_str()),
       rf'has {ENTRIES + 50} entries, but .* gives vocab_size {ENTRIES} embedding rows'),
      (variant('broken', tokenizer='{"not": "a tokenizer"}'),
       r'is not a tokenizer\.json that the tokenizers library reads'),
      (variant('moe', dict(num_local_experts=8)), r'sets num_local_experts = 8: a mixture of experts'),
      (variant('window', dict(model_type='mistral', architectures=['MistralForCausalLM'],
                              sliding_window=64)),
       r'sets sliding_window \(a window of 64 tokens, shorter than its max_position_embeddings '
       r'256\); only full attention'),
      (variant('rope', dict(rope_scaling=dict(rope_type='yarn', factor=4.0))),
       r"uses rope scaling 'yarn'; supported: linear, dynamic, llama3"),
      (variant('llama_bias', dict(attention_bias=True)),
       r"sets attention_bias = True; only False is supported for model_type 'llama'"),
      (variant('gelu', dict(hidden_act='gelu')), r"sets hidden_act = 'gelu'"),
  ]
  for path, message in cases:
    dst = tmp_path / f'out_{path.name}'
    with pytest.raises(UserError, match=message):
      commands.run('llama', str(path), str(dst))
    assert not dst.exists()
  # A Mistral whose window covers its whole context is full attention: accepted.
  mistral = variant('mistral', dict(model_type='mistral', architectures=['MistralForCausalLM'],
                                    sliding_window=256))
  commands.run('llama', str(mistral), str(tmp_path / 'out_mistral'))


def test_a_qwen2_source_round_trips_bit_identical(qwen, tmp_path):
  """HF -> converted -> HF: every tensor (the q/k/v biases and the padding rows included) and
  every config key come back as they were."""
  _, src, work, _ = qwen
  out = tmp_path / 'back'
  commands.run('export-llama', os.path.join(os.path.dirname(work), 'llm'), str(out), ema=True)
  a, b = safetensors_io.SafetensorsDir(str(src)), safetensors_io.SafetensorsDir(str(out))
  assert sorted(a.keys()) == sorted(b.keys()) and sum('bias' in k for k in a.keys()) == 6
  for name in a.keys():
    np.testing.assert_array_equal(a[name].view(np.uint8), b[name].view(np.uint8))
  source = json.loads((src / 'config.json').read_text())
  assert {k: v for k, v in json.loads((out / 'config.json').read_text()).items()
          if k in source} == source
