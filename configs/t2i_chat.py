r"""The paper's text-to-image plus chat run: JourneyDB : UltraChat at 9 : 1, TinyLlama-1.1B.

The official run's settings (common.paper_config) with a mixed schedule: 9 of
10 steps are diffusion steps on JourneyDB pictures (SD-VAE latents, prompts as
"Please generate an image of {prompt}", up to 128 prompt tokens), 1 of 10 is a
language-model step on UltraChat conversations (512 tokens, the official
"### Human: / ### Assistant:" template, loss on assistant tokens).
`get_config(platform)`: 'v5p-32' or 'h100x8'.

Inputs are yours to fetch: JourneyDB as data/journeydb/train.jsonl lines
{"image": "imgs/....jpg", "prompt": "..."} (paths relative to the file), UltraChat
as data/ultrachat/*.jsonl lines {"messages": [{"role": ..., "content": ...}, ...]}.

  python -m monoformer_jax convert llama --src=hf/tinyllama --dst=checkpoints/tinyllama-1.1b-chat
  python -m monoformer_jax convert vae --src=hf/sd-vae-ft-mse --dst=checkpoints/sd-vae-ft-mse
  python -m monoformer_jax extract_latents --config=configs/t2i_chat.py:h100x8 \
      --vae=checkpoints/sd-vae-ft-mse --dst=data/journeydb256-latents
  python -m monoformer_jax train --config=configs/t2i_chat.py:h100x8 --workdir=workdirs/t2i_chat
  python -m monoformer_jax sample --workdir=workdirs/t2i_chat \
      --prompt="Please generate an image of a lighthouse at dawn" \
      --num=16 --out=lighthouse.png
  python -m monoformer_jax generate --workdir=workdirs/t2i_chat --prompt="### Human: Hi ### Assistant:"
"""

from configs import common

PLATFORMS = common.PLATFORMS
TEMPLATE = 'Please generate an image of {name}'  # the official JourneyDB prompt (no period)


def get_config(platform: str = 'h100x8'):
  config = common.paper_config(platform)
  config.data.latents_source = 't2i_jsonl'
  config.data.t2i_files = 'data/journeydb/train.jsonl'
  config.data.latents_dir = 'data/journeydb256-latents'
  config.data.text_source = 'chat_jsonl'
  config.data.chat_files = 'data/ultrachat/*.jsonl'
  config.data.skip_bad_records = True  # JourneyDB lists many pictures that are missing
  config.data.templates = (TEMPLATE,)
  config.data.prompt_len = 128
  config.data.text_seq_len = 512
  config.train.ar_weight, config.train.diffusion_weight = 1.0, 9.0
  config.sample.cfg_scale = 4.0
  config.eval.prompt_template = TEMPLATE
  return config
