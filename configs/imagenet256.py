r"""The paper's class-conditional ImageNet 256 run (FID 2.57): TinyLlama-1.1B, SD-VAE latents.

Settings of the official run: backbone from TinyLlama-1.1B-Chat, sd-vae-ft-mse
latents 32 x 32 x 4, patch 2, lr 1e-4 (constant), global batch 256, grad clip
2.0, EMA 0.9999, loss weights lm 0.01 / diffusion 1.0 (ImageNet alone: every
step is a diffusion step), 500k steps, bf16 compute with fp32 parameters.
`get_config(platform)`: 'v5p-32' (16 TPU v5p chips) or 'h100x8' (8 NVIDIA H100s).

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

from monoformer_jax import config_lib, imagenet

PLATFORMS = {
    # 1.1B parameters, fp32 with AdamW and EMA: 1.1e9 x 16 bytes = 18 GB of state, fully sharded
    # over every chip (fsdp = all devices); the batch is split over the same axis.
    'v5p-32': dict(fsdp=-1, data=1, attention='xla', remat='dots'),
    'h100x8': dict(fsdp=-1, data=1, attention='cudnn', remat='dots'),
}


def get_config(platform: str = 'h100x8'):
  if platform not in PLATFORMS:
    raise ValueError(f'imagenet256 platform {platform!r}; expected one of {sorted(PLATFORMS)}')
  preset = PLATFORMS[platform]
  config = config_lib.base_config()
  config.seed = 0

  config.model.size = 'tinyllama-1.1b'
  config.model.init_from = 'checkpoints/tinyllama-1.1b-chat'
  config.model.vae = 'checkpoints/sd-vae-ft-mse'
  config.model.vocab_size = 32003  # 32000 + <im_start>, <im_end>, padding
  config.model.norm_eps = 1e-5
  config.model.rope_theta = 10000.0
  config.model.patch_size = 2
  config.model.image_size = (32, 32)
  config.model.image_channels = 4
  config.model.learn_sigma = True
  config.model.image_mask = 'hybrid'
  config.model.dtype = 'bfloat16'
  config.model.param_dtype = 'float32'
  config.model.remat = preset['remat']
  config.model.attention = preset['attention']
  config.model.layer_loop = 'scan'

  config.data.image_source = 'latents'
  config.data.latents_dir = 'data/imagenet256-latents'
  config.data.image_resolution = 256
  config.data.latents_from_posterior = True
  config.data.tokenizer_vocab_size = 32000
  config.data.templates = imagenet.TEMPLATES
  config.data.prompt_len = 32
  config.data.cfg_dropout = 0.1
  config.data.image_batch_size = 256  # global
  config.data.text_batch_size = 256
  config.data.text_seq_len = 512

  config.optim.learning_rate = 1e-4
  config.optim.weight_decay = 0.0
  config.optim.grad_clip = 2.0

  config.train.num_steps = 500_000
  config.train.ar_weight = 0.0
  config.train.diffusion_weight = 1.0
  config.train.lm_loss_weight = 0.01
  config.train.diffusion_loss_weight = 1.0
  config.train.ema_decay = 0.9999
  config.train.log_every = 100
  config.train.checkpoint_every = 50_000
  config.train.eval_at_end = False

  config.sample.sampler = 'ddpm'
  config.sample.steps = 250
  config.sample.cfg_scale = 1.5
  config.sample.guidance_channels = 'first_three'  # the official sampler's guidance
  config.eval.prompt_template = imagenet.SAMPLING_TEMPLATE

  config.mesh.data = preset['data']
  config.mesh.fsdp = preset['fsdp']
  return config
