"""The config schema: every key a config file may set, with its default.

Config files start from `base_config()` (a locked ConfigDict), so a typo in a file or in a
`--config.x.y=` override fails at once instead of being ignored. The string-valued choices are
parsed into their owners' enums by `choice`, once, in `settings.validate`.
"""

import difflib
import enum
from typing import Any, TypeVar

import ml_collections

from monoformer_jax.base.errors import UserError


def base_config() -> ml_collections.ConfigDict:
  """Every key with a default; config files override what they need."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.text_file = ''  # '' = the English text bundled with CPython
  c.data.image_source = 'digits'
  c.data.text_source = 'corpus'
  c.data.chat_files = ''  # chat_jsonl: a glob of JSONL files
  # 'template': every turn, '### Human:'/'### Assistant:', assistant tokens learned; 'official':
  # the official training's reading (last exchange, no template, every token learned)
  c.data.chat_format = 'template'  # 'template', 'official', or 'model' (the source's chat template)
  c.data.t2i_files = ''  # t2i_jsonl: a glob of JSONL files
  c.data.skip_bad_records = False  # skip (and count) unusable JSONL lines and images
  c.data.tfds_data_dir = ''  # '' = TFDS's default (~/tensorflow_datasets)
  c.data.imagenet_manual_dir = ''  # the ILSVRC2012 tars, to prepare imagenet2012 once
  c.data.image_resolution = 256  # ImageNet pixels per side after the center crop
  c.data.random_flip = True  # ImageNet and text-to-image pixels: horizontal flips (official: none)
  c.data.latents_dir = ''  # latents source: the output of `extract_latents`
  c.data.latents_source = 'imagenet'  # what extract_latents encodes: 'imagenet' or 't2i_jsonl'
  c.data.latents_shard_size = 10000  # extract_latents: records per ArrayRecord shard
  c.data.latents_from_posterior = True  # sample z from N(mean, std^2); False: the mean
  c.data.tokenizer_vocab_size = 1024
  c.data.prompt_len = 16  # tokens before the time token, left-padded
  c.data.text_seq_len = 64
  c.data.image_batch_size = 64
  c.data.text_batch_size = 32
  c.data.heldout_fraction = 0.15
  c.data.cfg_dropout = 0.1
  # Images to understand: 'none', 'digits' (questions on the bundled digits, one and two images),
  # 'llava_json' (LLaVA conversation JSON: data.llava_files, `<image>` placeholders).
  c.data.understanding_source = 'none'
  c.data.llava_files = ''  # llava_json: a glob of JSON files (a list of conversations each)
  c.data.llava_image_dir = ''  # where their `image` paths start ('' = beside each JSON file)
  c.data.images_per_sample = 2  # the most images a sample reads (a static shape)
  c.data.understanding_seq_len = 128  # tokens of an understanding sample, image slots included
  c.data.understanding_batch_size = 32
  c.data.learn_questions = True  # cross-entropy on the human turns too (official train_on_source)
  c.data.templates = ('a handwritten digit {name}', '{name}', 'an image of the digit {name}.',
                      'Please draw the number {name}.')

  c.model = ml_collections.ConfigDict()
  # A named size (model.SIZES), 'custom' (width ... head_dim below), or 'auto': the shape, rope,
  # norm, tying, vocabulary and context of model.init_from, resolved when training starts.
  c.model.size = 'digits'
  c.model.width = 0
  c.model.depth = 0
  c.model.num_heads = 0
  c.model.num_kv_heads = 0
  c.model.mlp_dim = 0
  c.model.head_dim = 0  # 0 = width / num_heads
  c.model.init_from = ''  # a converted LLM directory (convert llama) for the backbone
  c.model.vae = ''  # a converted VAE directory (convert vae); '' = diffusion in pixel space
  c.model.vocab_size = 1024
  c.model.rope_theta = 10000.0
  c.model.rope_scaling = ml_collections.ConfigDict()  # HF's rope_scaling
  c.model.rope_scaling.kind = 'none'  # 'none', 'linear', 'dynamic' or 'llama3'
  c.model.rope_scaling.factor = 1.0
  c.model.rope_scaling.low_freq_factor = 1.0  # llama3
  c.model.rope_scaling.high_freq_factor = 4.0  # llama3
  c.model.rope_scaling.original_max_position = 8192  # llama3; dynamic: max_position_embeddings
  c.model.norm_eps = 1e-6
  c.model.tie_embeddings = False
  c.model.attention_bias = False  # q/k/v projections with a bias (Qwen2)
  c.model.patch_size = 2
  c.model.image_size = (8, 8)  # (H, W) of the diffused array
  c.model.image_channels = 1
  c.model.learn_sigma = True
  c.model.use_pos_embed = True
  c.model.image_mask = 'hybrid'
  # What reads images to understand: 'none', 'vae' (the image in the diffusion space, patchified
  # like the generation input: SD-VAE latents, or the pixels of a pixel-space model) or 'clip'.
  c.model.vision_encoder = 'none'
  c.model.clip = ''  # a converted CLIP vision tower (convert clip), for vision_encoder 'clip'
  c.model.dtype = 'float32'  # compute
  c.model.param_dtype = 'float32'
  c.model.remat = 'none'
  c.model.layer_loop = 'scan'  # 'scan': one compiled block looped; 'unrolled': L copies
  c.model.attention = 'xla'  # 'cudnn' on NVIDIA GPUs (bf16/fp16); 'splash' on TPU
  c.model.context_length = 2048  # longest sequence (prompt + generated) the model is used at

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.num_timesteps = 1000
  # 'ddpm' (the paper's: eps and a learned variance) or 'flow' (flow matching: velocity of the
  # straight line from data to noise; no learned variance, so model.learn_sigma is not used).
  c.diffusion.process = 'ddpm'
  c.diffusion.flow_time = 'logit_normal'  # flow: how training draws t ('uniform', 'logit_normal')

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-4
  c.optim.warmup_steps = 0
  c.optim.cosine_decay = False
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.grad_clip = 2.0

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1000
  # 'alternate': each step is `ar` or `diffusion`, by the seeded schedule of the two weights
  # below; 'joint' (the official code): each update sees a text and an image batch.
  c.train.objective = 'alternate'
  c.train.ar_weight = 1.0  # how often a step is an AR step ...
  c.train.diffusion_weight = 1.0  # ... or a diffusion step
  c.train.understanding_weight = 0.0  # ... or an understanding step (data.understanding_source)
  c.train.prompt_lm_loss = False  # cross-entropy on image samples' prompts, <im_start> included
  c.train.grad_accum = 1  # microbatches per update (each batch size must divide by it)
  c.train.lm_loss_weight = 0.01
  c.train.diffusion_loss_weight = 1.0
  c.train.ema_decay = 0.9999
  c.train.log_every = 50
  c.train.checkpoint_every = 500
  c.train.checkpoint_minutes = 0.0  # also save when this much time has passed; 0 = steps only
  c.train.keep_checkpoints = 2
  c.train.async_checkpoints = 'auto'  # 'auto': on accelerators, not on CPU; 'on'; 'off'
  c.train.max_skipped_steps = 10  # consecutive non-finite steps (skipped) that stop the run
  c.train.eval_every = 0  # held-out losses every this many steps; 0 = never
  c.train.text_eval_every = 0  # eval.tasks scored every this many steps; 0 = never
  c.train.fid_every = 0  # FID of train.fid_num samples every this many steps; 0 = never
  c.train.understanding_eval_every = 0  # digit questions answered every this many steps; 0 = never
  c.train.fid_num = 10000  # samples per FID during training (FID-10K, the paper's ablations)
  c.train.profile_start = 10  # first step of the profiler trace (after compilation)
  c.train.profile_steps = 0  # steps traced into WORKDIR/plugins/profile; 0 = none
  c.train.eval_at_end = True
  c.train.loss_chunk = 512  # tokens per cross-entropy chunk (bounds the fp32 logits); 0 = all

  c.sample = ml_collections.ConfigDict()
  # 'auto' (the process's own: ddpm, or euler for flow), 'ddpm', 'ddim', 'dpmpp_2m' (DPM-Solver++
  # 2M) for ddpm models; 'euler', 'heun' for flow models.
  c.sample.sampler = 'auto'
  c.sample.steps = 250
  c.sample.cfg_scale = 1.5
  c.sample.guidance_channels = 'all'
  c.sample.time_spacing = 'time'  # dpmpp_2m's steps: evenly in 'time' or in 'logsnr'
  c.sample.use_ema = True

  c.eval = ml_collections.ConfigDict()
  c.eval.samples_per_class = 20
  c.eval.prompt_template = 'a handwritten digit {name}'  # one of data.templates
  c.eval.text_batches = 8
  c.eval.text_questions = 200  # next-line multiple-choice questions from held-out text; 0 = none
  c.eval.tasks = 'next_line'  # what train.text_eval_every scores (comma-separated, see --tasks)
  c.eval.task_limit = 0  # ... on each task's first this many items (a fixed subset); 0 = all
  c.eval.inception = ''  # converted FID Inception (convert inception), for train.fid_every
  c.eval.fid_ref = ''  # FID reference .npz: ADM images (arr_0) or statistics (mu, sigma)
  c.eval.fid_batch = 256  # global batch of FID sampling and Inception features

  c.bench = ml_collections.ConfigDict()
  c.bench.repeats = 20  # timed runs per train step (the median is reported)
  c.bench.warmup = 3
  c.bench.sample_repeats = 5  # timed runs of the sampler and of decoding
  c.bench.sample_images = 16  # DDPM with CFG, sample.steps steps
  # Also time the sampler without the prefix cache and as a Python loop (two more full runs).
  c.bench.sampler_baselines = True
  c.bench.parts = ('ar', 'diffusion', 'sampling', 'decode')  # what is measured (bench.Part)
  c.bench.decode_batches = (1,)  # decoding is timed at each of these batch sizes
  c.bench.decode_tokens = 256

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1 takes the devices the other axes leave (within a slice)
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.dcn_data = 1  # slices (multi-slice TPU): each axis is dcn_x * x devices long
  c.mesh.dcn_fsdp = 1
  c.mesh.dcn_tensor = 1
  # Logical axis -> mesh axes (a name, a tuple of names, or None for replicated).
  c.mesh.rules = (('batch', ('data', 'fsdp')), ('length', None), ('embed', 'fsdp'),
                  ('heads', 'tensor'), ('kv_heads', 'tensor'), ('head_dim', None),
                  ('mlp', 'tensor'), ('vocab', 'tensor'), ('layers', None))
  c.lock()
  return c


EnumT = TypeVar('EnumT', bound=enum.Enum)


def choice(kind: type[EnumT], value: str, key: str) -> EnumT:
  """The member of `kind` named by config key `key`; an error naming the choices otherwise."""
  try:
    return kind(value)
  except ValueError:
    choices = ', '.join(repr(m.value) for m in kind)
    raise UserError(f'config key {key} is {value!r}; expected one of {choices}.') from None


def _as_config_value(value):
  return tuple(_as_config_value(v) for v in value) if isinstance(value, list) else value


def config_from_dict(saved: dict[str, Any]) -> ml_collections.ConfigDict:
  """Rebuilds a saved config (a checkpoint's JSON) on the current schema (lists -> tuples)."""
  config = base_config()
  for section, values in saved.items():
    if isinstance(values, dict):
      for key, value in values.items():
        config[section][key] = _as_config_value(value)
    else:
      config[section] = values
  return config


def _key_paths(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  paths = []
  for key, value in config.items():
    path = f'{prefix}{key}'
    paths += _key_paths(value, path + '.') if isinstance(value, ml_collections.ConfigDict) else [path]
  return paths


def unknown_overrides(argv: list[str]) -> str:
  """A sentence for the first `--config.KEY=` override whose key is not in the schema, with
  the likely intended key ('' when every override names a key)."""
  known = _key_paths(base_config())
  for arg in argv:
    if arg.startswith('--config.'):
      key = arg[len('--config.'):].split('=', 1)[0]
      if key not in known:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f'; did you mean {close[0]}?' if close else '.'
        return f'config key {key} (--config.{key}) does not exist{hint}'
  return ''
