"""Small tokenizers of the real families' kinds, trained offline on the English text bundled with
CPython, for synthetic checkpoints and tests: a LLaMA-style sentencepiece model (TinyLlama), and
byte-level BPE `tokenizer.json`s with the pipelines, special tokens and chat templates of SmolLM2,
Llama-3 and Qwen2 (the settings are the families' published ones; the vocabularies are tiny).
"""

import enum
import json
import os
import tempfile

import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from monoformer_jax.base import files, workdir_layout


class TokenizerFamily(enum.Enum):
  SENTENCEPIECE = 'sentencepiece'  # LLaMA-2 / TinyLlama: <unk> <s> </s>, byte fallback
  SMOLLM2 = 'smollm2'  # GPT-2 byte-level BPE, digits apart, no BOS added
  LLAMA3 = 'llama3'  # tiktoken-style split, <|begin_of_text|> added before a text
  QWEN2 = 'qwen2'  # NFC, single digits, no BOS


_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}"
                 r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Chat templates in each family's layout: role headers, end-of-turn tokens, the generation prompt.
_CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
           "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
_QWEN2_CHAT = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful "
               "assistant.<|im_end|>\\n' }}{% endif %}" + _CHATML)
_LLAMA3_CHAT = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + "
                "message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
                "'<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")

# family: (special tokens, tokenizer_config.json fields)
_SPECIALS = {
    TokenizerFamily.SMOLLM2: (['<|endoftext|>', '<|im_start|>', '<|im_end|>'], dict(
        tokenizer_class='GPT2Tokenizer', bos_token='<|im_start|>', eos_token='<|im_end|>',
        pad_token='<|im_end|>', unk_token='<|endoftext|>', add_prefix_space=False,
        chat_template=_CHATML)),
    TokenizerFamily.LLAMA3: (['<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>',
                              '<|end_header_id|>', '<|eot_id|>'], dict(
        tokenizer_class='PreTrainedTokenizerFast', bos_token='<|begin_of_text|>',
        eos_token='<|eot_id|>', chat_template=_LLAMA3_CHAT)),
    TokenizerFamily.QWEN2: (['<|endoftext|>', '<|im_start|>', '<|im_end|>'], dict(
        tokenizer_class='Qwen2Tokenizer', bos_token=None, eos_token='<|im_end|>',
        pad_token='<|endoftext|>', unk_token=None, errors='replace', add_prefix_space=False,
        chat_template=_QWEN2_CHAT)),
}


def corpus() -> list[str]:
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  return [topics.topics[k] for k in sorted(topics.topics)]


def _pipeline(family: TokenizerFamily, tk: tokenizers.Tokenizer) -> None:
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  if family == TokenizerFamily.SMOLLM2:
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
  else:
    split = _LLAMA3_SPLIT if family == TokenizerFamily.LLAMA3 else _QWEN2_SPLIT
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(split), behavior='isolated', invert=False),
        byte_level])
  if family == TokenizerFamily.QWEN2:
    tk.normalizer = normalizers.NFC()
  tk.decoder = decoders.ByteLevel()


def train_bpe(family: TokenizerFamily, vocab_size: int = 512) -> tuple[tokenizers.Tokenizer, dict]:
  """(a trained byte-level BPE tokenizer, its tokenizer_config.json dict); the special tokens
  come after the learned entries, as in the real files."""
  specials, config = _SPECIALS[family]
  tk = tokenizers.Tokenizer(models.BPE())
  _pipeline(family, tk)
  trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tk.train_from_iterator(corpus(), trainer)
  tk.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False)
                         for s in specials])
  if family == TokenizerFamily.LLAMA3:
    bos = config['bos_token']
    tk.post_processor = processors.TemplateProcessing(
        single=f'{bos} $A', pair=f'{bos} $A {bos} $B', special_tokens=[(bos, tk.token_to_id(bos))])
  else:
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
  decoder = {str(tk.token_to_id(s)): dict(content=s, lstrip=False, rstrip=False, normalized=False,
                                          single_word=False, special=True) for s in specials}
  return tk, dict(config, added_tokens_decoder=decoder, model_max_length=2048)


def write(dst: str, family: TokenizerFamily, vocab_size: int = 512) -> None:
  """The tokenizer files of `family` into the directory dst (which exists)."""
  if family == TokenizerFamily.SENTENCEPIECE:
    with tempfile.TemporaryDirectory() as tmp:  # the trainer writes local files only
      text = os.path.join(tmp, 'corpus.txt')
      with open(text, 'w', encoding='utf-8') as f:  # local: the trainer's scratch input
        f.write('\n'.join(corpus()))
      prefix = os.path.join(tmp, 'tokenizer')  # the trainer writes PREFIX.model
      spm.SentencePieceTrainer.train(input=text, model_prefix=prefix, vocab_size=vocab_size,
                                     byte_fallback=True, minloglevel=2, num_threads=1)
      files.write_bytes(os.path.join(dst, workdir_layout.TOKENIZER_MODEL),
                        files.read_bytes(prefix + '.model'))
    return
  tk, config = train_bpe(family, vocab_size)
  files.write_text(os.path.join(dst, workdir_layout.HF_TOKENIZER_CONFIG),
                   json.dumps(config, indent=1))
  files.write_text(os.path.join(dst, workdir_layout.TOKENIZER_JSON), tk.to_str())
