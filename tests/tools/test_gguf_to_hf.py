"""A real pretrained LLM through the project, against transformers: SmolLM2-135M-Instruct, made
from its GGUF file by tools/gguf_to_hf.py (tests/real_llm.py caches it per machine), converted,
decoded greedily (text and chat), tokenized, trained from and exported back.

What real files carry that synthetic ones do not: transformers 5's rope_parameters (rope_theta
100000 inside it, no rope_theta key), a byte-level BPE vocabulary whose BOS is <|im_start|> and
which puts nothing before a text, the chat template as chat_template.jinja, a config written as
`dtype`, and real weights' activations.
"""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from helpers import MIXED, tiny_config
from real_llm import smollm2_dir

from monoformer_jax import train
from monoformer_jax.base.errors import UserError
from monoformer_jax.convert import commands
from monoformer_jax.data import chat_template, tokenizer as tokenizer_lib
from monoformer_jax.generation import sampling
from monoformer_jax.generation.mixed_modal import Decoding
from monoformer_jax.nn.layers import MaskType
from monoformer_jax.run import inference, workdir as workdir_lib
from monoformer_jax.tools import gguf_to_hf


pytestmark = pytest.mark.slow
PROMPTS = ('The capital of France is', 'def fibonacci(n):\n    """Return the n-th Fibonacci')
QUESTIONS = ('What is the capital of France?', 'Name three colours of the rainbow.')
TOKENS = 16


@pytest.fixture(scope='module')
def hf_dir():
  return smollm2_dir()


@pytest.fixture(scope='module')
def hf(hf_dir):
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  return model, transformers.AutoTokenizer.from_pretrained(hf_dir)


@pytest.fixture(scope='module')
def converted(hf_dir, tmp_path_factory):
  path = str(tmp_path_factory.mktemp('smollm2') / 'converted')
  assert commands.run('hf', hf_dir, path) == f'wrote {path}'
  return path


def _hf_greedy(hf, ids: list[int]) -> list[int]:
  model, tok = hf
  with torch.no_grad():
    out = model.generate(torch.tensor([ids]), max_new_tokens=TOKENS, do_sample=False,
                         pad_token_id=tok.pad_token_id)
  return out[0, len(ids):].tolist()


def test_the_directory_is_what_transformers_5_writes(hf_dir):
  config = json.load(open(os.path.join(hf_dir, 'config.json')))
  assert config['rope_parameters']['rope_theta'] == 100000.0 and 'rope_theta' not in config
  assert 'quantization_config' not in config and config['dtype'] == 'float32'
  assert os.path.isfile(os.path.join(hf_dir, 'chat_template.jinja'))
  tok_config = json.load(open(os.path.join(hf_dir, 'tokenizer_config.json')))
  assert tok_config['backend'] == 'tokenizers' and tok_config['bos_token'] == '<|im_start|>'


def test_tokenization_and_chat_rendering_equal_transformers(hf, converted):
  _, theirs = hf
  ours = tokenizer_lib.of_llm(converted)
  texts = PROMPTS + ('Once upon a time, in a small village by the sea,',
                     'Déjà vu: 3.14159 × 2 = 6.28318 — naïve café, 東京, emoji 🙂!',
                     '  two leading spaces\n\n\ttab, then <|im_start|>user and <|im_end|>',
                     'URL https://example.org/a?b=1&c=2 and CamelCaseIdentifiers_with_snake')
  for text in texts + tuple(t for t in MIXED if '<im_' not in t and '<pad>' not in t):
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text
    assert ours.bos + ours.encode(text) == theirs(text)['input_ids'], text
    ids = ours.encode(text)
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids) == text or '<|' in text  # the source's specials are not text
  assert ours.bos == [] and ours.stop_ids == (theirs.eos_token_id,) == (2,)
  chats = ([{'role': 'user', 'content': q}] for q in QUESTIONS)
  conversations = list(chats) + [[{'role': 'system', 'content': 'Answer briefly.'},
                                  {'role': 'user', 'content': 'Hi!'},
                                  {'role': 'assistant', 'content': 'Hello.'},
                                  {'role': 'user', 'content': 'And 2 + 2?'}]]
  for messages in conversations:
    text = chat_template.render(ours, messages, True)
    assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.encode(text) == theirs.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True)['input_ids']


def test_greedy_decoding_and_chat_equal_transformers_generate(hf, converted):
  _, theirs = hf
  restored = workdir_lib.for_converted_llm(converted)
  tok, model = restored.setup.tok, restored.setup.model
  chats = [chat_template.render(tok, [{'role': 'user', 'content': q}], True) for q in QUESTIONS]
  prompts = [tok.bos + tok.encode(p) for p in PROMPTS] + [tok.encode(c) for c in chats]
  tokens, valid = map(np.stack, zip(*[tok.left_pad(ids, 64) for ids in prompts]))
  got = np.asarray(sampling.generate(model, restored.params, tokens, valid, jax.random.key(0),
                                     max_tokens=TOKENS, temperature=0.0, top_k=0, top_p=1.0,
                                     stop_ids=tok.stop_ids, pad_id=tok.pad_id))
  for ids, row in zip(prompts, got.tolist()):
    want = _hf_greedy(hf, ids)
    assert row[:len(want)] == want, theirs.decode(ids)
    assert all(t == tok.pad_id for t in row[len(want):])  # stopped where transformers did

  # The command's chat mode: the answer alone, cut at the end of the turn.
  answer = inference.generate(inference.Run(converted), QUESTIONS[0],
                              Decoding(TOKENS, 0.0, 0, 1.0), chat=True)
  assert answer == theirs.decode(_hf_greedy(hf, tok.encode(chats[0])), skip_special_tokens=True)
  assert answer == 'The capital of France is Paris.'
  with pytest.raises(UserError, match=r'converted is a converted LLM, which has no image '
                                      r'modules: it continues text'):
    inference.Run(converted).restore()


def test_trained_from_and_exported_back_transformers_reads_our_logits(hf_dir, converted,
                                                                       tmp_path):
  config = tiny_config(num_steps=1)
  config.model.size, config.model.init_from = 'auto', converted
  workdir, exported = str(tmp_path / 'work'), str(tmp_path / 'exported')
  train.train_and_evaluate(config, workdir)
  assert commands.run('export-llama', workdir, exported) == f'wrote {exported}'

  source = json.load(open(os.path.join(hf_dir, 'config.json')))
  written = json.load(open(os.path.join(exported, 'config.json')))
  assert set(source) <= set(written)
  assert written['rope_parameters'] == source['rope_parameters']
  assert set(written) - set(source) == set()  # nothing in another format (rope_theta, torch_dtype)
  assert written['vocab_size'] > source['vocab_size']  # MonoFormer's tokens appended

  restored = workdir_lib.for_inference(workdir, use_ema=True)
  tok = restored.setup.tok
  ids = np.array([tok.encode('The capital of France is Paris, and the capital of Italy is')])
  ours = restored.setup.model.apply({'params': restored.params}, ids, np.ones(ids.shape, bool),
                                    mask_type=MaskType.CAUSAL).logits
  model = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
  with torch.no_grad():
    want = model(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  hf_tok = transformers.AutoTokenizer.from_pretrained(exported)
  for text in MIXED:  # MonoFormer's tokens too, as the export's tokenizer.json has them
    assert hf_tok(text).input_ids == tok.bos + tok.encode(text), text
  assert hf_tok.apply_chat_template([{'role': 'user', 'content': 'Hi'}], tokenize=False) == (
      chat_template.render(tok, [{'role': 'user', 'content': 'Hi'}]))


def test_the_tool_refuses_what_it_cannot_read(tmp_path):
  not_a_wheel = tmp_path / 'x.whl'
  not_a_wheel.write_text('plain text')
  with pytest.raises(UserError, match=r'x\.whl is neither a \.gguf file nor a wheel'):
    gguf_to_hf.convert(str(not_a_wheel), str(tmp_path / 'out'))
  with pytest.raises(UserError, match=r'--src .*missing\.gguf is not a file'):
    gguf_to_hf.convert(str(tmp_path / 'missing.gguf'), str(tmp_path / 'out'))
  corrupt = tmp_path / 'corrupt.gguf'
  corrupt.write_bytes(b'GGUF' + bytes(60))
  with pytest.raises(UserError, match=r'corrupt\.gguf could not be read as a GGUF LLM'):
    gguf_to_hf.convert(str(corrupt), str(tmp_path / 'out'))
  assert not os.path.exists(tmp_path / 'out') and not os.path.exists(tmp_path / 'out.partial')
