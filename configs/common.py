"""Config pieces the paper-scale configs share: the platform presets and the paper's settings.

Not a runnable config itself; imagenet256.py and t2i_chat.py start from `paper_config`.
"""

import ml_collections

from monoformer_jax.config import schema


# Mesh and kernels of the paper-scale configs. 1.1B parameters in fp32 with AdamW moments and
# EMA are 1.1e9 x 16 bytes = 18 GB of state: fully sharded over every device (fsdp = all) with
# the batch split over the same axis.
PLATFORMS = {
    'v5p-32': dict(fsdp=-1, data=1, attention='xla', remat='dots'),  # 16 TPU v5p chips
    'h100x8': dict(fsdp=-1, data=1, attention='cudnn', remat='dots'),  # 8 NVIDIA H100s
}


def paper_config(platform: str) -> ml_collections.ConfigDict:
  """The paper's shared settings: TinyLlama-1.1B backbone, SD-VAE latents 32 x 32 x 4,
  patch 2, lr 1e-4, global batch 256, clip 2.0, EMA 0.9999, lm 0.01 / diffusion 1.0,
  500k steps, bf16 compute; the platform's mesh. Config files add their data."""
  if platform not in PLATFORMS:
    raise ValueError(f'platform {platform!r}; expected one of {sorted(PLATFORMS)}')
  preset = PLATFORMS[platform]
  c = schema.base_config()
  m = c.model
  m.size, m.vocab_size, m.norm_eps, m.rope_theta = 'tinyllama-1.1b', 32003, 1e-5, 10000.0
  m.init_from, m.vae = 'checkpoints/tinyllama-1.1b-chat', 'checkpoints/sd-vae-ft-mse'
  m.patch_size, m.image_size, m.image_channels, m.learn_sigma = 2, (32, 32), 4, True
  m.dtype, m.param_dtype, m.layer_loop = 'bfloat16', 'float32', 'scan'
  m.remat, m.attention = preset['remat'], preset['attention']
  c.data.image_source, c.data.image_resolution = 'latents', 256
  c.data.tokenizer_vocab_size = 32000  # TinyLlama's; <im_start>, <im_end>, padding appended
  # As the official training reads its data: no flips (its stored latents are unflipped too),
  # chat as the last exchange without a template, every token learned.
  c.data.random_flip, c.data.chat_format = False, 'official'
  c.data.image_batch_size = c.data.text_batch_size = 256  # global
  c.optim.learning_rate, c.optim.weight_decay, c.optim.grad_clip = 1e-4, 0.0, 2.0
  c.train.num_steps, c.train.ema_decay = 500_000, 0.9999
  c.train.lm_loss_weight, c.train.diffusion_loss_weight = 0.01, 1.0
  c.train.log_every, c.train.checkpoint_every, c.train.eval_at_end = 100, 50_000, False
  # 2,048-token cross-entropy chunks (0.26 GB of fp32 logits): the 8 x 2,048 text step took
  # 329.8 ms against 341.1 with 512 on one H200 (docs/performance.md).
  c.train.loss_chunk = 2048
  c.sample.sampler, c.sample.steps = 'auto', 250  # ddpm (or euler with diffusion.process=flow)
  c.mesh.data, c.mesh.fsdp = preset['data'], preset['fsdp']
  return c
