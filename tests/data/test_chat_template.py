"""data.chat_format 'model': conversations rendered and tokenized as transformers'
apply_chat_template does for a Llama-3-style and a Qwen-style template, learning only the
assistant turns."""

import pytest
import transformers

from monoformer_jax.base.errors import UserError
from monoformer_jax.convert import synthetic_tokenizer
from monoformer_jax.convert.synthetic_tokenizer import TokenizerFamily
from monoformer_jax.data import chat, tokenizer as tokenizer_lib


CONVERSATIONS = [
    [{'role': 'user', 'content': 'What is 2 + 2?'}, {'role': 'assistant', 'content': 'It is 4.'}],
    [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Name a colour.'},
     {'role': 'assistant', 'content': 'Blue'}, {'role': 'user', 'content': 'Another, naïvely?'},
     {'role': 'assistant', 'content': ' Green  \n with spaces '}],
]


@pytest.mark.parametrize('family', [TokenizerFamily.LLAMA3, TokenizerFamily.QWEN2])
def test_conversations_render_and_tokenize_as_transformers(family, tmp_path):
  synthetic_tokenizer.write(str(tmp_path), family)
  ours = tokenizer_lib.load(str(tmp_path))
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
  for messages in CONVERSATIONS:
    want_text = theirs.apply_chat_template(messages, tokenize=False)
    want_ids = theirs.apply_chat_template(messages, tokenize=True, return_dict=True)['input_ids']
    tokens, valid, learned = chat.chat_tokens(messages, ours, 256, chat.ChatFormat.MODEL)
    assert list(tokens[valid]) == list(want_ids)
    assert theirs.decode(tokens[valid]) == want_text
    # The learned tokens are the assistant contents and their end-of-turn markers, nothing else.
    end_of_turn = '<|eot_id|>' if family == TokenizerFamily.LLAMA3 else '<|im_end|>\n'
    answers = [m['content'].strip() if family == TokenizerFamily.LLAMA3 else m['content']
               for m in messages if m['role'] == 'assistant']
    assert theirs.decode(tokens[learned]) == ''.join(a + end_of_turn for a in answers)
    assert not learned[~valid].any()
  # Truncation keeps the mask aligned with the tokens.
  tokens, valid, learned = chat.chat_tokens(CONVERSATIONS[1], ours, 12, chat.ChatFormat.MODEL)
  assert valid.all() and len(learned) == 12


def test_model_format_needs_a_template_and_a_tokenizer_json(tmp_path, tokenizer_file):
  synthetic_tokenizer.write(str(tmp_path), TokenizerFamily.SMOLLM2)
  config = (tmp_path / 'tokenizer_config.json')
  config.write_text(config.read_text().replace('"chat_template"', '"no_template"'))
  tok = tokenizer_lib.load(str(tmp_path))
  with pytest.raises(UserError, match=r'has no chat template \(chat_template in '
                                      r"tokenizer_config\.json or chat_template\.jinja beside a "
                                      r"tokenizer\.json\); data\.chat_format 'model' needs one"):
    chat.chat_tokens(CONVERSATIONS[0], tok, 64, chat.ChatFormat.MODEL)
  data = type('Data', (), dict(chat_files='x.jsonl', skip_bad_records=False, text_seq_len=64))
  with pytest.raises(UserError, match=r"data\.chat_format is 'model', which renders chats with "
                                      r'the chat template of a tokenizer\.json source'):
    chat.examples(data, tokenizer_lib.SentencePiece(tokenizer_file), 0, chat.ChatFormat.MODEL)
