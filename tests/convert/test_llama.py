"""HF LLaMA <-> converted directory <-> HF, training init from it, and bad checkpoints."""

import json
import os
import re

import jax
import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers
from helpers import tiny_config

from monoformer_jax import train
from monoformer_jax.base.errors import UserError
from monoformer_jax.convert import commands, safetensors_io
from monoformer_jax.data.tokenizer import SentencePiece
from monoformer_jax.nn import converted
from monoformer_jax.nn.layers import MaskType
from monoformer_jax.nn.model import SIZES
from monoformer_jax.run import backbone, workdir as workdir_lib
from monoformer_jax.training import steps


TINY = SIZES['tiny']
VOCAB = 300


def hf_model(dtype=torch.float32, **overrides):
  torch.manual_seed(0)
  kwargs = dict(vocab_size=VOCAB, hidden_size=TINY['width'], intermediate_size=TINY['mlp_dim'],
                num_hidden_layers=TINY['depth'], num_attention_heads=TINY['num_heads'],
                num_key_value_heads=TINY['num_kv_heads'], rms_norm_eps=1e-6,
                max_position_embeddings=256)
  kwargs.update(overrides)
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).to(dtype)


@pytest.fixture(scope='module')
def llm_dir(tmp_path_factory):
  """A tiny HF LLaMA in two safetensors shards, with a plain sentencepiece model (no pad)."""
  path = tmp_path_factory.mktemp('llm')
  hf_model().save_pretrained(path, safe_serialization=True, max_shard_size='60KB')
  text = path / 'corpus.txt'
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  text.write_text('\n'.join(topics.topics[k] for k in sorted(topics.topics)[:20]))
  spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(path / 'tokenizer'),
                                 vocab_size=VOCAB, minloglevel=2)
  assert os.path.exists(path / safetensors_io.INDEX_FILE)
  return str(path)


def with_tokenizer(path, llm_dir):
  """The sentencepiece model of llm_dir beside a saved HF model."""
  (path / 'tokenizer.model').write_bytes(open(os.path.join(llm_dir, 'tokenizer.model'), 'rb').read())


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_identical(tmp_path, dtype, llm_dir):
  src, conv, out = tmp_path / 'hf', tmp_path / 'conv', tmp_path / 'out'
  hf_model(dtype, tie_word_embeddings=True).save_pretrained(src, safe_serialization=True)
  with_tokenizer(src, llm_dir)
  commands.run('llama', str(src), str(conv))
  commands.run('export-llama', str(conv), str(out), ema=True)
  a, b = safetensors_io.SafetensorsDir(str(src)), safetensors_io.SafetensorsDir(str(out))
  assert sorted(a.keys()) == sorted(b.keys())
  for name in a.keys():
    assert a[name].dtype == b[name].dtype
    np.testing.assert_array_equal(a[name].view(np.uint8), b[name].view(np.uint8))
  _, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  # Every key of the source's config.json survives, max_position_embeddings (256) included.
  source = json.loads((src / 'config.json').read_text())
  exported = json.loads((out / 'config.json').read_text())
  assert {k: exported.get(k) for k in source} == source


def test_init_from_converted_llm(llm_dir, tmp_path):
  conv = str(tmp_path / 'conv')
  commands.run('llama', llm_dir, conv)
  config = tiny_config(num_steps=1)
  config.model.init_from = conv
  config.model.vocab_size = VOCAB + 5  # the three specials and two rows of padding
  config.data.tokenizer_vocab_size = VOCAB
  workdir = str(tmp_path / 'work')
  setup = workdir_lib.for_training(config, workdir)
  tok, model, tx, mesh = setup.tok, setup.model, setup.tx, setup.layout
  assert (tok.im_start_id, tok.im_end_id, tok.pad_id, tok.vocab_size) == (VOCAB, VOCAB + 1,
                                                                         VOCAB + 2, VOCAB + 3)
  abstract, shardings = steps.abstract_state(model, tx, mesh)
  fresh = steps.init_state(model, tx, mesh, jax.random.key(0))
  state = train.init_backbone(setup, shardings, jax.random.key(0))

  hf = hf_model()
  embed = hf.model.embed_tokens.weight.detach().numpy()
  got = np.asarray(state.params['embed_tokens']['embedding'])
  np.testing.assert_array_equal(got[:VOCAB], embed)
  np.testing.assert_allclose(got[VOCAB:], np.repeat(embed.mean(0, keepdims=True), 5, 0), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(state.params['decoder']['layers']['mlp']['up_proj']['kernel'][1]),
                                hf.model.layers[1].mlp.up_proj.weight.detach().numpy().T)
  # MonoFormer's own parameters keep the official initialization, drawn as from scratch.
  assert not np.asarray(state.params['x_embedder']['kernel']).any()
  assert not np.asarray(state.params['t_projector']['fc2']['kernel']).any()
  for own in ('t_embedder', 'final_layer'):
    jax.tree.map(np.testing.assert_array_equal, state.params[own], fresh.params[own])
  jax.tree.map(np.testing.assert_array_equal, state.params, state.ema_params)

  # The text logits are the LLM's.
  tokens = np.array([[1, 17, 42, 99, 7]])
  with torch.no_grad():
    want = hf(torch.tensor(tokens)).logits.numpy()
  logits = model.apply({'params': state.params}, tokens, np.ones(tokens.shape, bool),
                       mask_type=MaskType.CAUSAL).logits
  np.testing.assert_allclose(np.asarray(logits)[..., :VOCAB], want, atol=1e-4)

  # A model of another shape is refused before anything is created in a new workdir.
  config.unlock()
  config.model.size = 'digits'
  fresh_workdir = str(tmp_path / 'never_created')
  with pytest.raises(UserError, match=r'conv has width = 32, but the model config gives 128; set '
                                      r'--config.model.size=auto to take the shape'):
    train.train_and_evaluate(config, fresh_workdir)
  assert not os.path.exists(fresh_workdir)
  # A parameter whose shape differs is named, with both shapes.
  params = jax.device_get(fresh.params)
  params['decoder']['layers']['mlp']['up_proj']['kernel'] = np.zeros((2, 32, 80), np.float32)
  with pytest.raises(UserError, match=r'parameter decoder/layers/mlp/up_proj/kernel has shape '
                                      r'\(2, 32, 64\) in .*model config gives \(2, 32, 80\)'):
    backbone.pretrained_backbone(params, conv, model.backbone, False)


def test_export_gives_the_tokenizer_the_source_context(llm_dir, tmp_path):
  """export-llama of a converted directory: the tokenizer's model_max_length is the source's
  max_position_embeddings (256), as HF reads both back, not a default of 2048."""
  conv, out = tmp_path / 'conv', tmp_path / 'out'
  commands.run('llama', llm_dir, str(conv))
  commands.run('export-llama', str(conv), str(out), ema=True)
  want = transformers.AutoConfig.from_pretrained(llm_dir).max_position_embeddings
  assert want == 256
  assert transformers.AutoConfig.from_pretrained(out).max_position_embeddings == want
  assert transformers.AutoTokenizer.from_pretrained(out).model_max_length == want


def test_a_source_without_a_tokenizer_is_refused(tmp_path, llm_dir):
  """convert llama of a checkpoint with neither tokenizer file: one sentence, nothing written;
  training from a converted directory that lost its tokenizer names the config key."""
  src, conv = tmp_path / 'hf', tmp_path / 'conv'
  hf_model().save_pretrained(src, safe_serialization=True)
  with pytest.raises(UserError, match=rf'^the HF checkpoint {re.escape(str(src))} has no '
                                      r"tokenizer\.model or tokenizer\.json; copy the LLM's "
                                      r'tokenizer files into it\.$'):
    commands.run('llama', str(src), str(conv))
  assert not conv.exists()
  with_tokenizer(src, llm_dir)
  commands.run('llama', str(src), str(conv))
  os.remove(conv / 'tokenizer.model')
  for size in ('auto', 'tiny'):
    config = tiny_config(num_steps=1)
    config.model.init_from, config.model.size = str(conv), size
    config.model.vocab_size, config.data.tokenizer_vocab_size = VOCAB + 5, VOCAB
    with pytest.raises(UserError, match=rf"^{re.escape(str(conv))} \(config key model.init_from\) "
                                        r"has no tokenizer\.model or tokenizer\.json; copy the "
                                        r"LLM's tokenizer files into it\.$"):
      train.train_and_evaluate(config, str(tmp_path / f'work_{size}'))


def test_tokenizer_of_an_llm_gets_appended_specials(llm_dir):
  tok = SentencePiece(os.path.join(llm_dir, 'tokenizer.model'))
  ids, valid = tok.image_prompt('an image of seven', 16)
  assert ids[valid][-1] == VOCAB and ids[valid][0] == tok.bos_id and ids[0] == VOCAB + 2
  assert max(tok.encode('an image of seven <im_start>')) < VOCAB


def _write_config(path, **changes):
  config = json.loads((path / 'config.json').read_text())
  config.update(changes)
  (path / 'config.json').write_text(json.dumps(config))


def test_bad_checkpoints_are_named(tmp_path, llm_dir):
  src = tmp_path / 'hf'
  hf_model().save_pretrained(src, safe_serialization=True)
  cases = []

  missing_config = tmp_path / 'no_config'
  missing_config.mkdir()
  cases.append((missing_config, r'no_config/config\.json does not exist'))

  unsupported = tmp_path / 'mistral'
  hf_model().save_pretrained(unsupported, safe_serialization=True)
  _write_config(unsupported, model_type='gpt_neox', architectures=['GPTNeoXForCausalLM'])
  cases.append((unsupported, r'GPTNeoXForCausalLM \(model_type .gpt_neox.\); supported: '
                             r'LlamaForCausalLM \(llama\), MistralForCausalLM'))

  misshapen = tmp_path / 'misshapen'
  hf_model().save_pretrained(misshapen, safe_serialization=True)
  _write_config(misshapen, intermediate_size=80)
  with_tokenizer(misshapen, llm_dir)
  cases.append((misshapen, r'tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape \(64, 32\); '
                           r'the model config expects \(80, 32\)'))

  missing_tensor = tmp_path / 'missing_tensor'
  missing_tensor.mkdir()
  (missing_tensor / 'config.json').write_text((src / 'config.json').read_text())
  with_tokenizer(missing_tensor, llm_dir)
  tensors = safetensors_io.SafetensorsDir(str(src))
  safetensors_io.write(str(missing_tensor / 'model.safetensors'),
                       [(k, tensors[k]) for k in tensors.keys() if k != 'model.norm.weight'], {})
  cases.append((missing_tensor, r'tensor model\.norm\.weight is missing'))

  pickled = tmp_path / 'pickled'
  pickled.mkdir()
  (pickled / 'config.json').write_text((src / 'config.json').read_text())
  (pickled / 'pytorch_model.bin').write_bytes(b'not opened')
  cases.append((pickled, r'pytorch_model\.bin cannot be read as tensors only .* objects other than '
                         r'tensors are never unpickled'))

  for path, message in cases:
    dst = tmp_path / f'out_{path.name}'
    with pytest.raises(UserError, match=message):
      commands.run('llama', str(path), str(dst))
    assert not dst.exists() and not os.path.exists(f'{dst}.partial')


class _Trap:
  """Unpickling this would create the file `path`: a stand-in for arbitrary code."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, 'w'))


def test_torch_bin_weights_are_read_as_tensors_only(tmp_path, llm_dir):
  model = hf_model(torch.bfloat16)
  model.save_pretrained(tmp_path / 'st', safe_serialization=True)
  (tmp_path / 'bin').mkdir()  # what transformers 4 writes with safe_serialization=False
  for name in ('st', 'bin'):
    with_tokenizer(tmp_path / name, llm_dir)
  (tmp_path / 'bin' / 'config.json').write_text((tmp_path / 'st' / 'config.json').read_text())
  torch.save(model.state_dict(), tmp_path / 'bin' / 'pytorch_model.bin')
  for name in ('bin', 'st'):
    commands.run('llama', str(tmp_path / name), str(tmp_path / f'conv_{name}'))
  a = converted.load_llm(str(tmp_path / 'conv_bin'))[0]
  b = converted.load_llm(str(tmp_path / 'conv_st'))[0]
  assert jax.tree.leaves(a)[0].dtype == jax.numpy.bfloat16
  jax.tree.map(np.testing.assert_array_equal, a, b)

  trap = tmp_path / 'trap'
  trap.mkdir()
  (trap / 'config.json').write_text((tmp_path / 'st' / 'config.json').read_text())
  torch.save({'model.norm.weight': _Trap(str(tmp_path / 'sprung'))}, trap / 'pytorch_model.bin')
  with pytest.raises(UserError, match='cannot be read as tensors only'):
    commands.run('llama', str(trap), str(tmp_path / 'conv_trap'))
  assert not (tmp_path / 'sprung').exists() and not (tmp_path / 'conv_trap').exists()
