r"""The paper's TinyLlama-1.1B model on one accelerator, for `bench` (speed, not quality).

Width 2048, 22 layers, 32 heads (4 KV heads), MLP 5632, vocabulary 32,003; bf16 compute,
fp32 parameters, cuDNN attention on NVIDIA GPUs (XLA elsewhere), blocks scanned and
rematerialized keeping matmul outputs. Per-device batches: 32 image sequences of 290
tokens (32 prompt tokens, the time token, 256 latent patches, <im_end>) and 8 text
sequences of 2,048 tokens. As configs/imagenet256.py otherwise: the sampler draws 32 images by DDPM in 250 steps with
guidance 1.5; decoding is timed at batch 1 and 32. Nothing is read: batches are random.
Parameters, AdamW moments and EMA take 1.1e9 x 16 bytes = 18 GB; one 80 GB GPU holds it.

  python -m monoformer_jax bench --config=configs/bench_1b.py --bench_out=bench_1b.json
  python -m monoformer_jax bench --config=configs/bench_1b.py --config.model.remat=full \
      --config.bench.parts="('diffusion',)"

launch/gpu_check.sh runs these and the default main job on a GPU machine.
"""

from configs import imagenet256


def get_config():
  config = imagenet256.get_config('h100x8')  # the paper's model, sampler and prompt length
  config.model.init_from = config.model.vae = ''  # fresh parameters, random latents
  config.mesh.fsdp, config.mesh.data = 1, -1  # one device (or data parallel over several)
  config.data.image_batch_size = 32
  config.data.text_batch_size = 8
  config.data.text_seq_len = 2048
  config.bench.repeats, config.bench.warmup = 10, 2
  config.bench.sample_images, config.bench.sample_repeats = 32, 1
  config.bench.sampler_baselines = False  # two more full 250-step runs at 1.1B
  config.bench.decode_batches = (1, 32)
  config.bench.decode_tokens = 128
  return config
