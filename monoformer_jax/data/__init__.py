"""The tokenizer and the input pipelines. `tokenizer` (sentencepiece with the special tokens,
made once per workdir); one module per source (`digits`, `corpus`, `chat`, `t2i`, `imagenet`,
`latents`, `digits_vqa`, `llava`, with `jsonl` and `common`); `understanding` (samples that read
images) and `vision_input` (pictures for a vision encoder); `pipeline` turns the config's data
section into this host's batch streams. Imports base and config.
"""
