"""Chat data in the source model's own template (data.chat_format 'model').

The Jinja template of the tokenizer's directory is rendered as transformers' apply_chat_template
renders it (a sandboxed environment that trims blocks, loop controls, a `tojson` filter,
`raise_exception` and `strftime_now`, the special tokens as strings), then tokenized whole. A
token is learned when its text starts inside an assistant turn: from where the template's
generation prompt for that turn ends to where the turn's rendering ends (its end-of-turn marker
included). Turns are found by rendering the conversation's prefixes, which a template must render
as prefixes of the whole.
Dimension letters: S text length.
"""

import datetime
import functools
import json

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np

from monoformer_jax.base.errors import UserError


def _raise(message: str):
  raise UserError(f'the chat template refused a conversation: {message}')


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


@functools.lru_cache(maxsize=4)
def _compiled(template: str) -> jinja2.Template:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
  env.filters['tojson'] = _tojson
  env.globals.update(raise_exception=_raise,
                     strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
  try:
    return env.from_string(template)
  except jinja2.TemplateError as e:
    raise UserError(f'the source tokenizer\'s chat template does not compile ({e}).') from e


def render(tok, messages: list[dict], add_generation_prompt: bool = False,
           needed_by: str = 'data.chat_format \'model\'') -> str:
  """The conversation as the template of `tok` (a HuggingFace tokenizer) writes it."""
  template = tok.chat_template()
  if not template:
    raise UserError(f'the tokenizer {tok.path} has no chat template (chat_template in '
                    'tokenizer_config.json or chat_template.jinja beside a tokenizer.json); '
                    f'{needed_by} needs one.')
  return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    **tok.special_token_strings())


def assistant_spans(tok, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
  """(the rendered conversation, [start, end) character spans of its assistant turns)."""
  text = render(tok, messages)
  spans = []
  for i, message in enumerate(messages):
    if message['role'] != 'assistant':
      continue
    prompt = render(tok, messages[:i], add_generation_prompt=True)
    turn = render(tok, messages[:i + 1])
    if not (text.startswith(turn) and turn.startswith(prompt)):
      raise UserError('the source tokenizer\'s chat template renders the start of a '
                      'conversation differently from the whole; data.chat_format \'model\' needs '
                      'a template whose turns stay as they are when more follow.')
    spans.append((len(prompt), len(turn)))
  return text, spans


def chat_tokens(messages: list[dict], tok, length: int):
  """tokens [S] int32 (right-padded, truncated), valid [S] bool, loss_mask [S] bool."""
  text, spans = assistant_spans(tok, messages)
  ids, starts = tok.encode_with_starts(text)
  n = min(len(ids), length)
  tokens = np.full(length, tok.pad_id, np.int32)
  tokens[:n] = ids[:n]
  loss_mask = np.zeros(length, bool)
  loss_mask[:n] = [any(a <= s < b for a, b in spans) for s in starts[:n]]
  return tokens, np.arange(length) < n, loss_mask
