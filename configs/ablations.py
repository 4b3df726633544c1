r"""The paper's three ablations in miniature, on the embedded default (configs/digits.py).

get_config('VARIANT'):
  pretrain  the "pretrained LLM": the same backbone trained on the text corpus alone
            (diffusion weight 0), then exported and converted as a user converts TinyLlama;
  scratch   the default's training (alternating steps, 1,000 of them) from a random
            initialization, bidirectional attention inside the image (the hybrid mask);
  init      the same budget starting from the converted pretrain backbone (model.init_from,
            which the study sets);
  causal    scratch with a causal mask inside the image;
  llm       `study --llm=DIR`'s arms: a real pretrained LLM's shape (model.size 'auto', the study
            sets model.init_from, or clears it for the arm from scratch), batches and steps cut
            to its size so that 2 seeds of both arms fit in about 3 hours on a 2-core CPU.
Findings: init against scratch (image FD, text ability), scratch against causal (image FD).

  python -m monoformer_jax study --workdir=workdirs/ablations --seeds=3
  python -m monoformer_jax train --config=configs/ablations.py:causal --workdir=workdirs/causal
  python -m monoformer_jax study --workdir=workdirs/llm-study --llm=smollm2-jax --seeds=2
"""

from configs import digits

VARIANTS = ('pretrain', 'scratch', 'init', 'causal', 'llm')


def get_config(variant: str = 'scratch'):
  if variant not in VARIANTS:
    raise ValueError(f'variant {variant!r}; expected one of {", ".join(VARIANTS)}')
  config = digits.get_config()
  t = config.train
  t.log_every, t.checkpoint_every = 100, 100_000  # a checkpoint at the end only
  if variant == 'pretrain':
    t.objective, t.ar_weight, t.diffusion_weight = 'alternate', 1.0, 0.0
    t.num_steps, t.eval_at_end = 800, False
    return config
  # The default's alternating steps: 500 joint steps (about the same compute) learned no
  # digits from scratch at all, the text loss dominating their updates.
  t.num_steps = 1000
  # Fewer and shorter samples than the default's evaluation keep a study under an hour.
  config.sample.steps, config.eval.samples_per_class = 100, 10
  if variant == 'llm':
    # SmolLM2-135M's steps cost ~1,000x the default's on a CPU: 16 images and 8 texts a step,
    # 750 steps, the paper's learning rate for a pretrained LLM (the same for both arms), and
    # the images of the evaluation drawn by DPM-Solver++ in 20 steps.
    config.model.size = 'auto'
    config.data.image_batch_size, config.data.text_batch_size = 16, 8
    config.data.prompt_len = 16  # room for a BPE vocabulary's pieces of the prompts
    config.optim.learning_rate, config.optim.warmup_steps = 1e-4, 50
    t.num_steps, t.ema_decay = 750, 0.99
    config.sample.sampler, config.sample.steps = 'dpmpp_2m', 20
  if variant == 'causal':
    config.model.image_mask = 'causal'
  return config
