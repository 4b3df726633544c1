"""HF `tokenizer.json` tokenizers (byte-level BPE: SmolLM2, Llama-3, Qwen2) through `tokenizers`.

The special tokens come from the files transformers reads beside tokenizer.json:
tokenizer_config.json, then special_tokens_map.json, then generation_config.json. BOS is what
tokenizer.json's post-processor puts before a text, as transformers encodes it (Llama-3: its
<|begin_of_text|>; Qwen2: nothing). MonoFormer's tokens are added as special tokens after the
source's entries, so text that spells one (or one of the source's) encodes to its id, as
transformers does; export writes them into tokenizer.json, so HF tools read the same ids back.
"""

import json
import os
from typing import Any, Optional

import tokenizers

from monoformer_jax.base import files
from monoformer_jax.base.errors import UserError
from monoformer_jax.base.workdir_layout import (HF_CHAT_TEMPLATE, HF_GENERATION_CONFIG,
                                                HF_SPECIAL_TOKENS_MAP, HF_TOKENIZER_CONFIG,
                                                TOKENIZER_JSON)
from monoformer_jax.data import tokenizer as tokenizer_lib


PAD = '<pad>'


def _content(value: Any) -> Optional[str]:
  """A special token as the config files write it: a string or an AddedToken dict."""
  return value.get('content') if isinstance(value, dict) else value


def _read_json(directory: str, name: str) -> dict:
  path = os.path.join(directory, name)
  if not files.exists(path):
    return {}
  try:
    return dict(json.loads(files.read_text(path)))
  except (ValueError, TypeError) as e:
    raise UserError(f'{path} is not a JSON object ({e}).') from e


class HuggingFace(tokenizer_lib.Tokenizer):
  """The tokenizer.json of `directory`, with MonoFormer's tokens added."""

  def __init__(self, directory: str):
    self.directory = directory
    self.path = path = os.path.join(directory, TOKENIZER_JSON)
    try:
      self.tk = tokenizers.Tokenizer.from_str(files.read_text(path))
    except Exception as e:  # the library raises a bare Exception for a malformed file
      raise UserError(f'{path} is not a tokenizer.json that the tokenizers library reads '
                      f'({str(e)[:200]}).') from e
    self.config = _read_json(directory, HF_TOKENIZER_CONFIG)
    special_map = _read_json(directory, HF_SPECIAL_TOKENS_MAP)
    generation = _read_json(directory, HF_GENERATION_CONFIG)
    self.num_pieces = max(self.tk.get_vocab(with_added_tokens=True).values()) + 1

    def special(name: str) -> Optional[int]:
      """The id of the bos/eos/pad token the files name, or None (also where the tokenizer's
      files set it to null, as Qwen2's does for BOS, whatever generation_config.json says)."""
      key = f'{name}_token'
      content = _content(self.config.get(key)) or _content(special_map.get(key))
      if content is None and (key in self.config or key in special_map):
        return None
      if content is not None:
        token_id = self.tk.token_to_id(content)
        if token_id is None:
          raise UserError(f'{directory} names {content!r} as its {name} token, which '
                          f'{TOKENIZER_JSON} does not hold.')
        return token_id
      value = generation.get(f'{name}_token_id')
      return value[0] if isinstance(value, list) and value else value

    self.bos_id, self.eos_id, pad_id = special('bos'), special('eos'), special('pad')
    if self.eos_id is None:
      raise UserError(f'{directory} names no EOS token (eos_token in {HF_TOKENIZER_CONFIG} or '
                      f'{HF_SPECIAL_TOKENS_MAP}, eos_token_id in {HF_GENERATION_CONFIG}); '
                      'expected one.')
    self._stops = self._end_of_turn_ids(generation.get('eos_token_id'))
    self.bos = self._prefix()
    self.im_start_id = self._own_or_added(tokenizer_lib.IM_START)
    self.im_end_id = self._own_or_added(tokenizer_lib.IM_END)
    self.pad_id = pad_id if pad_id is not None else self._own_or_added(PAD)
    self.vocab_size = max(self.tk.get_vocab(with_added_tokens=True).values()) + 1

  def _end_of_turn_ids(self, named) -> tuple[int, ...]:
    """EOS, then the ids generation_config.json's eos_token_id gives (one id or a list, as
    Llama-3-Instruct ends a turn with <|eot_id|> as well as <|end_of_text|>)."""
    extra = named if isinstance(named, list) else [] if named is None else [named]
    for i in extra:
      if not isinstance(i, int) or not 0 <= i < self.num_pieces:
        raise UserError(f'{self.directory}/{HF_GENERATION_CONFIG} gives eos_token_id {named!r}; '
                        f'expected ids below {self.num_pieces}.')
    return tuple(dict.fromkeys([self.eos_id] + extra))

  @property
  def stop_ids(self) -> tuple[int, ...]:
    return self._stops

  def _prefix(self) -> list[int]:
    """What the post-processor adds before a text; it may add nothing after one."""
    plain = self.tk.encode('a', add_special_tokens=False).ids
    full = self.tk.encode('a', add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
      if full[start:start + len(plain)] == plain and start + len(plain) == len(full):
        return full[:start]
    raise UserError(f'{self.path} adds tokens after a text (its post_processor); expected '
                    'at most a prefix such as BOS.')

  def _own_or_added(self, content: str) -> int:
    if self.tk.token_to_id(content) is None:
      self.tk.add_special_tokens([tokenizers.AddedToken(content, special=True, normalized=False)])
    return self.tk.token_to_id(content)

  def encode(self, text: str) -> list[int]:
    return self.tk.encode(text, add_special_tokens=False).ids

  def encode_with_starts(self, text: str) -> tuple[list[int], list[int]]:
    """(ids of text, the character where each token's text starts)."""
    encoding = self.tk.encode(text, add_special_tokens=False)
    return encoding.ids, [start for start, _ in encoding.offsets]

  def special_token_strings(self) -> dict[str, str]:
    """bos_token, eos_token, ... as strings, for a chat template (those the source names)."""
    named = {'bos_token': self.bos_id, 'eos_token': self.eos_id, 'pad_token': self.pad_id}
    out = {k: self.tk.id_to_token(i) for k, i in named.items() if i is not None}
    unk = _content(self.config.get('unk_token'))
    return dict(out, unk_token=unk) if unk else out

  def decode_pieces(self, ids: list[int]) -> str:
    return self.tk.decode(ids, skip_special_tokens=True)

  def chat_template(self) -> Optional[str]:
    """The source's Jinja chat template: chat_template.jinja, or tokenizer_config.json's (a
    string, or the one named 'default' of a list)."""
    path = os.path.join(self.directory, HF_CHAT_TEMPLATE)
    if files.exists(path):
      return files.read_text(path)
    template = self.config.get('chat_template')
    if isinstance(template, list):
      named = {t.get('name'): t.get('template') for t in template if isinstance(t, dict)}
      template = named.get('default')
    return template

  def write(self, directory: str, context: int) -> None:
    """tokenizer.json with MonoFormer's tokens, and tokenizer_config.json saying which are
    special, as transformers and lm-eval-harness read them; the chat template and generation
    config as the source has them."""
    for name in (HF_CHAT_TEMPLATE, HF_GENERATION_CONFIG):
      if files.exists(os.path.join(self.directory, name)):
        files.copy(os.path.join(self.directory, name), os.path.join(directory, name))
    config = dict(self.config)
    decoder = dict(config.get('added_tokens_decoder') or {})
    for token_id, token in self.tk.get_added_tokens_decoder().items():
      decoder.setdefault(str(token_id), dict(
          content=token.content, lstrip=token.lstrip, rstrip=token.rstrip,
          normalized=token.normalized, single_word=token.single_word, special=token.special))
    config['added_tokens_decoder'] = decoder
    if config.get('pad_token') is None:
      config['pad_token'] = self.tk.id_to_token(self.pad_id)
    config.setdefault('eos_token', self.tk.id_to_token(self.eos_id))
    config['model_max_length'] = context
    files.write_text(os.path.join(directory, HF_TOKENIZER_CONFIG), json.dumps(config, indent=1))
    files.write_text(os.path.join(directory, TOKENIZER_JSON), self.tk.to_str())
