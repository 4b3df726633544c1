r"""The paper's three ablations in miniature, on the embedded default (configs/digits.py).

get_config('VARIANT'):
  pretrain  the "pretrained LLM": the same backbone trained on the text corpus alone
            (diffusion weight 0), then exported and converted as a user converts TinyLlama;
  scratch   the default's training (alternating steps, 1,000 of them) from a random
            initialization, bidirectional attention inside the image (the hybrid mask);
  init      the same budget starting from the converted pretrain backbone (model.init_from,
            which the study sets);
  causal    scratch with a causal mask inside the image.
Findings: init against scratch (image FD, text ability), scratch against causal (image FD).

  python -m monoformer_jax study --workdir=workdirs/ablations --seeds=3
  python -m monoformer_jax train --config=configs/ablations.py:causal --workdir=workdirs/causal
"""

from configs import digits

VARIANTS = ('pretrain', 'scratch', 'init', 'causal')


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
  if variant == 'causal':
    config.model.image_mask = 'causal'
  return config
