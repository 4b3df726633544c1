r"""The embedded default: 8x8 digits with text prompts plus CPython's bundled text.

Runs on a laptop CPU in minutes with nothing downloaded:

  python -m monoformer_jax train --config=configs/digits.py --workdir=workdirs/digits
  python -m monoformer_jax sample --workdir=workdirs/digits \
      --prompt="a handwritten digit seven" --num=16 --out=seven.png
"""

from monoformer_jax.config import schema


def get_config():
  config = schema.base_config()
  config.seed = 0
  config.model.size = 'digits'
  config.model.vocab_size = 1024
  config.model.layer_loop = 'unrolled'  # 4 blocks: about 10% faster steps on CPU
  config.data.tokenizer_vocab_size = 1024
  config.data.prompt_len = 12
  config.data.heldout_fraction = 0.25  # also the classifier's data: 449 digits
  config.data.image_batch_size = 64
  config.data.text_batch_size = 32
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 100
  config.optim.cosine_decay = True
  config.train.num_steps = 2000
  config.train.ar_weight = 1.0
  config.train.diffusion_weight = 4.0
  config.train.lm_loss_weight = 0.5
  config.train.ema_decay = 0.998
  config.train.log_every = 200
  config.train.checkpoint_every = 1000
  config.sample.steps = 250
  config.sample.cfg_scale = 3.0
  config.eval.samples_per_class = 20
  return config
