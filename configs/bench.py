r"""The official code's model at small scale, for `bench` (speed, not quality).

LLaMA width 256, MLP 688, 4 layers, 4 heads, vocabulary 8192, fp32; AR batches
of 8 x 256 tokens; diffusion batches of 8 latents 32 x 32 x 4 (patch 2, 256
image tokens) behind 18 prompt tokens. Batches are random; nothing is read.

  python -m monoformer_jax bench --config=configs/bench.py --bench_out=bench.json
  python -m monoformer_jax bench --config=configs/bench.py --compare_torch
"""

from monoformer_jax.config import schema


def get_config():
  config = schema.base_config()
  config.model.size = 'bench'
  config.model.vocab_size = 8192
  config.model.image_size = (32, 32)
  config.model.image_channels = 4
  config.model.patch_size = 2
  config.model.dtype = 'float32'
  config.model.param_dtype = 'float32'
  config.data.prompt_len = 18
  config.data.text_seq_len = 256
  config.data.text_batch_size = 8
  config.data.image_batch_size = 8
  config.sample.steps = 250
  config.model.layer_loop = 'unrolled'  # 4 blocks: faster on CPU, compile time is small
  config.train.loss_chunk = 512
  config.sample.cfg_scale = 1.5
  # 250 DDPM steps per image: one image (two sequences with CFG) keeps a CPU run short.
  config.bench.sample_images = 1
  return config
