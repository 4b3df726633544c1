r"""The official main branch's run (its configs/train_llava_journeydb.py): JourneyDB generation
plus LLaVA-1.5 instruction tuning (llava_v1_5_mix665k), the pictures read by CLIP ViT-L/14
through the im_embedder, TinyLlama-1.1B; `get_config(platform)`: 'v5p-32' or 'h100x8'.

The official reader concatenates the two datasets and draws from them in proportion to their
sizes (its weights are unused): about 4.2M JourneyDB pictures to 665k conversations, so 6
diffusion steps to 1 understanding step here; it has no separate text source (LLaVA's text-only
conversations are its text). Conversations are read untemplated, every token learned, human turns
cut to 128 tokens, 512 in all.

Inputs are yours to fetch: JourneyDB as in configs/t2i_chat.py; LLaVA's JSON and pictures as
data/llava/llava_v1_5_mix665k.json with the picture folders (coco/, gqa/, ocr_vqa/, textvqa/,
vg/) beside it.

  python -m monoformer_jax convert llama --src=hf/tinyllama --dst=checkpoints/tinyllama-1.1b-chat
  python -m monoformer_jax convert vae --src=hf/sd-vae-ft-mse --dst=checkpoints/sd-vae-ft-mse
  python -m monoformer_jax convert clip --src=hf/clip-vit-large-patch14 \
      --dst=checkpoints/clip-vit-large-patch14
  python -m monoformer_jax extract_latents --config=configs/llava_journeydb.py:h100x8 \
      --vae=checkpoints/sd-vae-ft-mse --dst=data/journeydb256-latents
  python -m monoformer_jax train --config=configs/llava_journeydb.py:h100x8 \
      --workdir=workdirs/llava_journeydb
  python -m monoformer_jax generate --workdir=workdirs/llava_journeydb --image=cat.jpg \
      --prompt="What is the cat doing?"
"""

from configs import t2i_chat

PLATFORMS = t2i_chat.PLATFORMS


def get_config(platform: str = 'h100x8'):
  config = t2i_chat.get_config(platform)
  config.model.vision_encoder = 'clip'
  config.model.clip = 'checkpoints/clip-vit-large-patch14'
  config.data.text_source = 'corpus'  # built but never read: no `ar` steps
  config.data.chat_files = ''
  config.data.understanding_source = 'llava_json'
  config.data.llava_files = 'data/llava/llava_v1_5_mix665k.json'
  config.data.llava_image_dir = 'data/llava'
  config.data.images_per_sample = 1
  config.data.understanding_seq_len = 512
  config.data.understanding_batch_size = config.data.image_batch_size
  config.train.ar_weight, config.train.diffusion_weight = 0.0, 6.0
  config.train.understanding_weight = 1.0
  return config
