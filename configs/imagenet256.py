r"""The paper's class-conditional ImageNet 256 run (FID 2.57): TinyLlama-1.1B, SD-VAE latents.

The official run's settings (common.paper_config): backbone from
TinyLlama-1.1B-Chat, sd-vae-ft-mse latents 32 x 32 x 4, patch 2, lr 1e-4, global
batch 256, grad clip 2.0, EMA 0.9999, 500k steps, bf16 compute; ImageNet alone, so
every step is a diffusion step. `get_config(platform)`: 'v5p-32' or 'h100x8'.

Downloads are yours to do (nothing here reaches the network):
  huggingface-cli download TinyLlama/TinyLlama-1.1B-Chat-v1.0 --local-dir hf/tinyllama
  huggingface-cli download stabilityai/sd-vae-ft-mse --local-dir hf/sd-vae-ft-mse
  ImageNet: ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in ~/imagenet-tars

  python -m monoformer_jax convert llama --src=hf/tinyllama --dst=checkpoints/tinyllama-1.1b-chat
  python -m monoformer_jax convert vae --src=hf/sd-vae-ft-mse --dst=checkpoints/sd-vae-ft-mse
  python -m monoformer_jax extract_latents --config=configs/imagenet256.py:h100x8 \
      --vae=checkpoints/sd-vae-ft-mse --dst=data/imagenet256-latents \
      --config.data.imagenet_manual_dir=$HOME/imagenet-tars
  python -m monoformer_jax train --config=configs/imagenet256.py:h100x8 --workdir=workdirs/imagenet256
  python -m monoformer_jax sample --workdir=workdirs/imagenet256 --fid_npz=imagenet256-50k.npz \
      --num=50000 --steps=250 --cfg_scale=1.5
  (then the ADM evaluator: evaluator.py VIRTUAL_imagenet256_labeled.npz imagenet256-50k.npz)

(On a TPU pod slice, run the same commands on every worker through launch/tpu_pod.sh with
configs/imagenet256.py:v5p-32.)
"""

from configs import common
from monoformer_jax.data import imagenet

PLATFORMS = common.PLATFORMS


def get_config(platform: str = 'h100x8'):
  config = common.paper_config(platform)
  config.data.latents_source = 'imagenet'
  config.data.latents_dir = 'data/imagenet256-latents'
  config.data.templates = imagenet.TEMPLATES
  config.data.prompt_len = 32
  config.train.ar_weight, config.train.diffusion_weight = 0.0, 1.0
  config.sample.cfg_scale = 1.5
  config.sample.guidance_channels = 'first_three'  # the official sampler's guidance
  config.eval.prompt_template = imagenet.SAMPLING_TEMPLATE
  return config
