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
  c.seed = 0  # every random choice of a run: initialization, data order, step kinds, noise

  c.data = ml_collections.ConfigDict()  # what the steps read: sources, tokenizer, lengths, batches
  c.data.text_file = ''  # '' = the English text bundled with CPython
  # What diffusion steps read: 'digits', 'imagenet', 'latents', 't2i_jsonl' or 'llava_json'.
  c.data.image_source = 'digits'
  c.data.text_source = 'corpus'  # `ar` steps: 'corpus' (data.text_file) or 'chat_jsonl'
  c.data.chat_files = ''  # chat_jsonl: a glob of JSONL files
  # 'template': every turn, '### Human:'/'### Assistant:', assistant tokens learned; 'official':
  # the official training's reading (last exchange, no template, every token learned); 'model':
  # the source's chat template.
  c.data.chat_format = 'template'
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
  # Pieces of the sentencepiece model a new workdir trains on its text (with model.init_from,
  # the LLM's tokenizer is copied instead).
  c.data.tokenizer_vocab_size = 1024
  c.data.prompt_len = 16  # tokens before the time token, left-padded
  c.data.text_seq_len = 64  # tokens per text sample: corpus chunks, chats padded or cut
  c.data.image_batch_size = 64  # global batch (all hosts) of diffusion steps
  c.data.text_batch_size = 32  # global batch of `ar` steps
  c.data.heldout_fraction = 0.15  # share of the digits and corpus documents held out, in (0, 1)
  c.data.cfg_dropout = 0.1  # chance a training image's prompt is dropped (for guidance)
  # Images to understand: 'none', 'digits' (questions on the bundled digits, one and two images),
  # 'llava_json' (LLaVA conversation JSON: data.llava_files, `<image>` placeholders).
  c.data.understanding_source = 'none'
  c.data.llava_files = ''  # llava_json: a glob of JSON files (a list of conversations each)
  c.data.llava_image_dir = ''  # where llava_json `image` paths start ('' = beside each JSON file)
  c.data.images_per_sample = 2  # the most images a sample reads (a static shape)
  c.data.understanding_seq_len = 128  # tokens of an understanding sample, image slots included
  c.data.understanding_batch_size = 32  # global batch of understanding steps
  c.data.learn_questions = True  # cross-entropy on the human turns too (official train_on_source)
  # Image prompts: each training image gets one at random, {name} its class name or caption
  # (t2i_jsonl: always the first).
  c.data.templates = ('a handwritten digit {name}', '{name}', 'an image of the digit {name}.',
                      'Please draw the number {name}.')

  c.model = ml_collections.ConfigDict()  # the network: shape, numerics, image layout, encoders
  # A named size (model.SIZES), 'custom' (width ... head_dim below), or 'auto': the shape, rope,
  # norm, tying, vocabulary and context of model.init_from, resolved when training starts.
  c.model.size = 'digits'
  c.model.width = 0  # size 'custom': hidden width
  c.model.depth = 0  # size 'custom': decoder blocks
  c.model.num_heads = 0  # size 'custom': query heads
  c.model.num_kv_heads = 0  # size 'custom': key/value heads (grouped-query; divide num_heads)
  c.model.mlp_dim = 0  # size 'custom': SwiGLU hidden width
  c.model.head_dim = 0  # 0 = width / num_heads
  c.model.init_from = ''  # a converted LLM directory (convert llama) for the backbone
  c.model.vae = ''  # a converted VAE directory (convert vae); '' = diffusion in pixel space
  c.model.vocab_size = 1024  # embedding rows: at least the tokenizer's, special tokens included
  c.model.rope_theta = 10000.0  # RoPE base
  c.model.rope_scaling = ml_collections.ConfigDict()  # HF's rope_scaling
  c.model.rope_scaling.kind = 'none'  # 'none', 'linear', 'dynamic' or 'llama3'
  c.model.rope_scaling.factor = 1.0  # scaling factor (linear, llama3: frequencies divided by it)
  # llama3: frequencies of wavelength over original_max_position / low_freq_factor are divided by
  # factor, with a smooth band down to high_freq_factor's limit.
  c.model.rope_scaling.low_freq_factor = 1.0
  # llama3: frequencies of wavelength under original_max_position / high_freq_factor are kept.
  c.model.rope_scaling.high_freq_factor = 4.0
  # The pretrained context: HF's original_max_position_embeddings (llama3), or
  # max_position_embeddings (dynamic: the base grows for positions past it).
  c.model.rope_scaling.original_max_position = 8192
  c.model.norm_eps = 1e-6  # RMSNorm epsilon
  c.model.tie_embeddings = False  # the output layer reuses the token embedding
  c.model.attention_bias = False  # q/k/v projections with a bias (Qwen2)
  c.model.patch_size = 2  # p: one image token per p x p patch (p divides image_size)
  c.model.image_size = (8, 8)  # (H, W) of the diffused array
  c.model.image_channels = 1  # C of the diffused array (1: digits, 3: pixels, 4: SD-VAE latents)
  c.model.learn_sigma = True  # ddpm: the variance learned too (twice the output channels)
  c.model.use_pos_embed = True  # fixed 2-D sin-cos position embeddings added to the patches
  # Attention of image passes: 'hybrid' (causal, full inside the image), 'causal', 'bidirectional'.
  c.model.image_mask = 'hybrid'
  # What reads images to understand: 'none', 'vae' (the image in the diffusion space, patchified
  # like the generation input: SD-VAE latents, or the pixels of a pixel-space model) or 'clip'.
  c.model.vision_encoder = 'none'
  c.model.clip = ''  # a converted CLIP vision tower (convert clip), for vision_encoder 'clip'
  c.model.dtype = 'float32'  # dtype of the computation (activations), e.g. 'bfloat16'
  c.model.param_dtype = 'float32'  # dtype the parameters are stored in
  # What a block keeps for the backward pass: 'none', 'full', 'dots' or 'dots_with_batch'.
  c.model.remat = 'none'
  c.model.layer_loop = 'scan'  # 'scan': one compiled block looped; 'unrolled': L copies
  c.model.attention = 'xla'  # 'cudnn' on NVIDIA GPUs (bf16/fp16); 'splash' on TPU
  c.model.context_length = 2048  # longest sequence (prompt + generated) the model is used at

  c.diffusion = ml_collections.ConfigDict()  # the diffusion process training learns
  c.diffusion.num_timesteps = 1000  # ddpm: noise levels of the schedule; flow: t is scaled by it
  # 'ddpm' (the paper's: eps and a learned variance) or 'flow' (flow matching: velocity of the
  # straight line from data to noise; no learned variance, so model.learn_sigma is not used).
  c.diffusion.process = 'ddpm'
  c.diffusion.flow_time = 'logit_normal'  # flow: how training draws t ('uniform', 'logit_normal')

  c.optim = ml_collections.ConfigDict()  # AdamW after global-norm clipping
  c.optim.learning_rate = 1e-4  # peak learning rate
  c.optim.warmup_steps = 0  # linear warmup from 0 over this many updates; 0 = none
  c.optim.cosine_decay = False  # after the warmup, cosine decay to 0 at train.num_steps
  c.optim.weight_decay = 0.0  # AdamW's decoupled weight decay, on every parameter
  c.optim.b1 = 0.9  # Adam's first-moment decay
  c.optim.b2 = 0.999  # Adam's second-moment decay
  c.optim.grad_clip = 2.0  # gradients clipped to this global norm

  c.train = ml_collections.ConfigDict()  # the loop: step kinds, losses, logs, checkpoints, evals
  c.train.num_steps = 1000  # updates to train to (a rerun resumes); the cosine decay's length
  # 'alternate': each step is one kind (`ar`, `diffusion`, understanding), by the seeded schedule
  # of the weights below; 'joint' (the official code): each update sees a text and an image batch
  # (and an understanding one with data.understanding_source).
  c.train.objective = 'alternate'
  c.train.ar_weight = 1.0  # alternate: relative share of `ar` steps
  c.train.diffusion_weight = 1.0  # alternate: relative share of `diffusion` steps
  c.train.understanding_weight = 0.0  # alternate: relative share of understanding steps
  c.train.prompt_lm_loss = False  # cross-entropy on image samples' prompts, <im_start> included
  c.train.grad_accum = 1  # microbatches per update (each batch size must divide by it)
  c.train.lm_loss_weight = 0.01  # weight of the cross-entropy in an update's loss
  c.train.diffusion_loss_weight = 1.0  # weight of the diffusion loss in an update's loss
  c.train.ema_decay = 0.9999  # per-update decay of the parameters' EMA
  # What trains of a model started from model.init_from: 'full' (every parameter), 'lora' (the
  # backbone frozen, LoRA adapters on lora.targets), 'qlora' (as lora, the adapted kernels stored
  # quantized: lora.quantize), 'frozen_text' (MonoFormer's own modules only).
  c.train.finetune = 'full'
  # The dtype the frozen backbone of lora, qlora and frozen_text is kept in on the devices:
  # 'float32', or 'bfloat16' (half the memory; lossless for the many LLMs stored in bfloat16).
  c.train.frozen_dtype = 'float32'
  # Whether checkpoints also hold that frozen backbone (as the devices keep it), so that resuming,
  # sampling and exports no longer read model.init_from; else they hold what trains alone.
  c.train.checkpoint_frozen = False
  c.train.log_every = 50  # steps between metric rows (metrics.jsonl, TensorBoard)
  c.train.checkpoint_every = 500  # steps between checkpoints; the last step is always saved
  c.train.checkpoint_minutes = 0.0  # also save when this much time has passed; 0 = steps only
  c.train.keep_checkpoints = 2  # how many of the newest checkpoints are kept
  c.train.async_checkpoints = 'auto'  # 'auto': on accelerators, not on CPU; 'on'; 'off'
  c.train.max_skipped_steps = 10  # consecutive non-finite steps (skipped) that stop the run
  c.train.eval_every = 0  # held-out losses every this many steps; 0 = never
  c.train.text_eval_every = 0  # eval.tasks scored every this many steps; 0 = never
  c.train.fid_every = 0  # FID of train.fid_num samples every this many steps; 0 = never
  c.train.understanding_eval_every = 0  # digit questions answered every this many steps; 0 = never
  c.train.fid_num = 10000  # samples per FID during training (FID-10K, the paper's ablations)
  c.train.profile_start = 10  # first step of the profiler trace (after compilation)
  c.train.profile_steps = 0  # steps traced into WORKDIR/plugins/profile; 0 = none
  c.train.eval_at_end = True  # the digits evaluation after the last step, into eval.json
  c.train.loss_chunk = 512  # tokens per cross-entropy chunk (bounds the fp32 logits); 0 = all

  c.lora = ml_collections.ConfigDict()  # the adapters of train.finetune 'lora' and 'qlora'
  c.lora.rank = 8  # r: the adapters' inner width
  c.lora.alpha = 16.0  # the adapters' output is scaled by alpha / r
  c.lora.dropout = 0.0  # dropout on the adapters' input while training
  # The projections of every decoder block that get adapters (comma-separated).
  c.lora.targets = 'q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj'
  c.lora.quantize = 'nf4'  # qlora: how the adapted kernels are stored: 'nf4', 'int4', 'int8'
  c.lora.block_size = 64  # qlora: inputs per quantization scale; 0 = one scale per output channel

  c.sample = ml_collections.ConfigDict()  # image sampling (commands' flags may override)
  # 'auto' (the process's own: ddpm, or euler for flow), 'ddpm', 'ddim', 'dpmpp_2m' (DPM-Solver++
  # 2M) for ddpm models; 'euler', 'heun' for flow models.
  c.sample.sampler = 'auto'
  c.sample.steps = 250  # denoising steps per image (at most diffusion.num_timesteps)
  c.sample.cfg_scale = 1.5  # guidance: uncond + scale x (cond - uncond); 1 = unguided
  c.sample.guidance_channels = 'all'  # channels guidance moves: 'all' or 'first_three' (official)
  c.sample.time_spacing = 'time'  # dpmpp_2m's steps: evenly in 'time' or in 'logsnr'
  c.sample.use_ema = True  # training's FID, digit questions and final eval use the EMA (else raw)

  c.eval = ml_collections.ConfigDict()  # what the evaluations measure
  c.eval.samples_per_class = 20  # digit samples per class for prompt accuracy and digit FD
  c.eval.prompt_template = 'a handwritten digit {name}'  # evaluation prompts; one of data.templates
  c.eval.text_batches = 8  # held-out text batches (data.text_batch_size) per text loss; 0 = all
  c.eval.text_questions = 200  # next-line multiple-choice questions from held-out text; 0 = none
  c.eval.tasks = 'next_line'  # what train.text_eval_every scores (comma-separated, see --tasks)
  c.eval.task_limit = 0  # train.text_eval_every scores each task's first this many items; 0 = all
  c.eval.inception = ''  # converted FID Inception (convert inception), for train.fid_every
  c.eval.fid_ref = ''  # FID reference .npz: ADM images (arr_0) or statistics (mu, sigma)
  c.eval.fid_batch = 256  # global batch of FID sampling and Inception features

  c.bench = ml_collections.ConfigDict()  # what the `bench` command times
  c.bench.repeats = 20  # timed runs per train step (the median is reported)
  c.bench.warmup = 3  # untimed runs of each train step before the timed ones
  c.bench.sample_repeats = 5  # timed runs of the sampler and of decoding
  c.bench.sample_images = 16  # images per timed run: the process's sampler, guided, sample.steps
  # Also time the sampler without the prefix cache and as a Python loop (two more full runs).
  c.bench.sampler_baselines = True
  c.bench.parts = ('ar', 'diffusion', 'sampling', 'decode')  # what is measured (bench.Part)
  c.bench.decode_batches = (1,)  # decoding is timed at each of these batch sizes
  c.bench.decode_tokens = 256  # new tokens per timed decoding run

  c.mesh = ml_collections.ConfigDict()  # the device mesh ('data', 'fsdp', 'tensor') and its rules
  c.mesh.data = -1  # -1 takes the devices the other axes leave (within a slice)
  c.mesh.fsdp = 1  # devices per slice sharding the batch and the weights (ZeRO-3)
  c.mesh.tensor = 1  # devices per slice sharding heads, MLP and vocabulary (Megatron)
  c.mesh.dcn_data = 1  # slices (multi-slice TPU): each axis is dcn_x * x devices long
  c.mesh.dcn_fsdp = 1  # slices along fsdp
  c.mesh.dcn_tensor = 1  # slices along tensor
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
