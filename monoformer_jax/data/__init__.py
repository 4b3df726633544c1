"""The tokenizer and the input pipelines. `tokenizer` (sentencepiece with the special tokens,
made once per workdir); one module per source (`digits`, `corpus`, `chat`, `t2i`, `imagenet`,
`latents`, with `jsonl` and `common`); `pipeline` turns the config's data section into this
host's two batch streams. Imports base and config.
"""
