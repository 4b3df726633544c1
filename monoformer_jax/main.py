"""Command line: python -m monoformer_jax COMMAND [FLAGS]; the commands, what each does and
the flags each reads are in usage.py (`--help`, `COMMAND --help`). Inference commands read the
config saved in the workdir's newest checkpoint. Multi-host runs add
--coordinator_address/--num_processes/--process_id, or --multihost (see launch/).
"""

import json
import os
import sys

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from monoformer_jax import (bench, checkpoint, config_lib, extract_latents, fid_eval, fid_samples,
                            files, guards, mixed_modal, progress, sampling, settings, sharding,
                            text_tasks, vae)
from monoformer_jax import evaluate as evaluate_lib
from monoformer_jax import study, train, usage
from monoformer_jax import workdir as workdir_lib
from monoformer_jax.convert import commands as convert_commands
from monoformer_jax.data import benchmarks
from monoformer_jax.diffusion import Sampler
from monoformer_jax.layers import MaskType
from monoformer_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (train and bench).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Work directory: checkpoints, logs, tokenizer.')
_PROMPT = flags.DEFINE_string('prompt', '', 'Text prompt for sample / generate.')
_NUM = flags.DEFINE_integer('num', 16, 'Number of images to sample.')
_OUT = flags.DEFINE_string('out', 'samples.png', 'PNG grid to write; FILE.npz is written beside.')
_STEPS = flags.DEFINE_integer('steps', None, 'Sampling steps (default: the config).')
_SAMPLER = flags.DEFINE_enum_class('sampler', None, Sampler, 'Sampler (default: the config).',
                                   case_sensitive=False)
_CFG_SCALE = flags.DEFINE_float('cfg_scale', None, 'Guidance scale (default: the config).')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_EMA = flags.DEFINE_bool('ema', True, 'Use the EMA parameters (else the raw ones).')
_MAX_TOKENS = flags.DEFINE_integer('max_tokens', 64, 'Tokens to generate.')
_SEEDS = flags.DEFINE_integer('seeds', 3, 'study: seeds per variant.')
_MAX_IMAGES = flags.DEFINE_integer('max_images', 1, 'generate --out: images per row at most.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, 'Sampling temperature; 0 is greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Keep the k most likely tokens; 0 keeps all.')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass; 1 keeps all.')
_FID_NPZ = flags.DEFINE_string('fid_npz', '', 'sample: write --num class-conditional samples, '
                                'classes spread uniformly, to this ADM-format .npz instead; '
                                'evaluate: the sample file whose FID to measure.')
_FID_BATCH = flags.DEFINE_integer('fid_batch', 256, 'sample --fid_npz, evaluate --fid_ref: global '
                                  'batch (divisible by the device and host counts).')
_FID_REF = flags.DEFINE_string('fid_ref', '', 'evaluate: the FID reference .npz: ADM reference '
                                'images (arr_0) or statistics (mu, sigma).')
_INCEPTION = flags.DEFINE_string('inception', '', 'evaluate: the converted FID Inception '
                                 '(default: the config\'s eval.inception).')
_FID_STATS_OUT = flags.DEFINE_string('fid_stats_out', '', 'evaluate: also write the reference\'s '
                                     'statistics (mu, sigma) here, a --fid_ref for later runs.')
_PROMPT_FILE = flags.DEFINE_string('prompt_file', '', 'evaluate --fid_ref, sample --fid_npz: '
                                   'prompts, one per line, instead of the class prompts.')
_TASKS = flags.DEFINE_string('tasks', '', 'evaluate: text benchmarks to score as multiple choice, '
                             'comma-separated: next_line, hellaswag, openbookqa, winogrande, '
                             'arc_easy, arc_challenge, boolq, piqa; prepare: those to download.')
_LIMIT = flags.DEFINE_integer('limit', 0, 'evaluate --tasks: at most this many items per task '
                              '(0 = all).')
_TFDS_DATA_DIR = flags.DEFINE_string('tfds_data_dir', '', 'prepare, evaluate --tasks: the TFDS '
                                     'data_dir of the benchmarks (default: evaluate reads the '
                                     'config\'s data.tfds_data_dir, prepare TFDS\'s own).')
_BENCH_OUT = flags.DEFINE_string('bench_out', '', 'bench: JSON report to write.')
_COMPARE_TORCH = flags.DEFINE_bool('compare_torch', False, 'bench: also time the HF transformers '
                                   'PyTorch steps of the same shapes.')
_SRC = flags.DEFINE_string('src', None, 'convert: source directory.')
_DST = flags.DEFINE_string('dst', None, 'convert: destination directory (must not exist); '
                           'extract_latents: the shard directory (reruns finish it).')
_VAE = flags.DEFINE_string('vae', '', 'A converted VAE directory: the decoder for sample (default: '
                           'the config\'s model.vae), the encoder for extract_latents, the one '
                           'convert official records.')
_TOKENIZER = flags.DEFINE_string('tokenizer', '', 'convert official: the LLM\'s sentencepiece model, '
                                 'for a checkpoint without tokenizer.model.')
_SHAPE = flags.DEFINE_string('shape', 'tinyllama-1.1b', 'convert synthetic-llama: a named shape '
                             'or WIDTH,DEPTH,HEADS,KV_HEADS,MLP,VOCAB.')
_OFFICIAL = flags.DEFINE_bool('official', False, 'convert synthetic-llama: an official MonoFormer '
                              'checkpoint around the LLaMA.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', '', 'Multi-process: HOST:PORT of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 1, 'Multi-process: how many processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', 0, 'Multi-process: this process\'s index.')
_MULTIHOST = flags.DEFINE_bool('multihost', False, 'Let JAX find the cluster by itself (TPU pod '
                               'slices, SLURM) and join it.')



def _sampling(setup) -> tuple[sampling.ImageSampling, str]:
  """The sampler the flags ask for (the config's where they are silent) and the VAE directory
  that decodes its latents ('' for pixel models)."""
  config = setup.config
  spec = setup.settings.sampling.but(_SAMPLER.value, _STEPS.value, _CFG_SCALE.value)
  if spec.steps > config.diffusion.num_timesteps or spec.steps < 1:
    raise UserError(f'--steps is {spec.steps}; expected 1..{config.diffusion.num_timesteps}.')
  vae_dir = _VAE.value or config.model.vae
  if vae_dir and not os.path.isdir(vae_dir):
    raise UserError(f'the VAE directory {vae_dir} (--vae, else config key model.vae) does not '
                    'exist; pass --vae=DIR with the converted VAE that decodes the samples.')
  if not vae_dir and settings.draws_latents(config, setup.settings):
    raise UserError(f'this model draws {config.model.image_channels}-channel VAE latents and its '
                    'config names no VAE (model.vae); pass --vae=DIR with the converted VAE '
                    '(`convert vae`) that turns them into pictures.')
  return spec, vae_dir


def _fid_prompts(setup) -> list[str]:
  if _PROMPT_FILE.value:
    return fid_samples.file_prompts(_PROMPT_FILE.value)
  return fid_samples.class_prompts(setup)


def sample_command(workdir: str) -> None:
  if _NUM.value < 1:
    raise UserError(f'--num is {_NUM.value}; expected at least 1.')
  if not _FID_NPZ.value and not _OUT.value.endswith('.png'):
    raise UserError(f'--out is {_OUT.value}; expected a .png path.')
  restored = workdir_lib.for_inference(workdir, _EMA.value)
  setup, params = restored.setup, restored.params
  config, tok = setup.config, setup.tok
  tok.image_prompt(_PROMPT.value, config.data.prompt_len)  # rejects long prompts before any work
  spec, vae_dir = _sampling(setup)
  if _FID_NPZ.value:
    batches = fid_samples.sample_batches(setup, params, _fid_prompts(setup), _NUM.value,
                                         _FID_BATCH.value, spec, jax.random.key(_SEED.value),
                                         vae_dir)
    with progress.phase(f'sampling {_NUM.value} images ({spec.sampler.value}, {spec.steps} '
                        'steps)', _NUM.value, 'images') as p:
      fid_samples.write(progress.counted(batches, p), _FID_NPZ.value, _NUM.value)
    if jax.process_index() == 0:
      print(f'wrote {_FID_NPZ.value}: {_NUM.value} samples, prompts spread uniformly')
    return
  decode = vae.pixel_decoder(vae_dir, setup.layout) if vae_dir else None  # latent diffusion
  images = sampling.images_for_prompts(setup.model, params, tok, [_PROMPT.value] * _NUM.value,
                                       config.data.prompt_len, spec, jax.random.key(_SEED.value))
  if decode is not None:
    images = decode(images)
  images = sampling.to_uint8(images)
  grid = sampling.image_grid(images, columns=int(np.ceil(np.sqrt(len(images)))))
  from PIL import Image  # pylint: disable=g-import-not-at-top
  picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  npz = _OUT.value[:-len('.png')] + '.npz'
  if jax.process_index() != 0:  # every host sampled the same images; one writes them
    return
  with files.atomic_file(npz) as tmp, open(tmp, 'wb') as f:
    np.savez(f, images=images)
  with files.atomic_file(_OUT.value) as tmp:
    picture.save(tmp, format='PNG')
  print(f'wrote {_OUT.value} and {npz}: {len(images)} images of {images.shape[1:]}')


def generate_command(workdir: str) -> None:
  if _MAX_TOKENS.value < 1:
    raise UserError(f'--max_tokens is {_MAX_TOKENS.value}; expected at least 1.')
  if not 0.0 < _TOP_P.value <= 1.0 or _TOP_K.value < 0 or _TEMPERATURE.value < 0:
    raise UserError('--top_p must be in (0, 1], --top_k and --temperature non-negative.')
  if flags.FLAGS['out'].present:
    return mixed_command(workdir)
  restored = workdir_lib.for_inference(workdir, _EMA.value)
  setup = restored.setup
  tok, model = setup.tok, setup.model
  tokens, valid = tok.text_prompt(_PROMPT.value, setup.config.data.text_seq_len)
  _check_context(setup, int(valid.sum()) + _MAX_TOKENS.value)
  out = sampling.generate(model, restored.params, tokens[None], valid[None],
                          jax.random.key(_SEED.value), max_tokens=_MAX_TOKENS.value,
                          temperature=_TEMPERATURE.value,
                          top_k=min(_TOP_K.value, model.backbone.vocab_size), top_p=_TOP_P.value,
                          eos_id=tok.eos_id, pad_id=tok.pad_id)
  # Decode prompt and continuation together so the piece boundary keeps its space.
  print(tok.decode(tok.encode(_PROMPT.value) + np.asarray(out[0]).tolist()))


def _check_context(setup, tokens: int) -> None:
  context = setup.config.model.context_length
  if tokens > context:
    raise UserError(f'--max_tokens {_MAX_TOKENS.value} with the prompt (and --max_images images) '
                    f'comes to {tokens} tokens, past the model\'s context of {context} tokens '
                    '(model.context_length).')


def mixed_command(workdir: str) -> None:
  """generate --out=DIR: text and the images the model starts by itself (mixed_modal), as
  DIR/generation.json, DIR/<row>_<k>.png, and the text printed with image placeholders."""
  if _NUM.value < 1 or _MAX_IMAGES.value < 0:
    raise UserError(f'--num is {_NUM.value} and --max_images {_MAX_IMAGES.value}; expected at '
                    'least 1 and 0.')
  if os.path.exists(_OUT.value) and not os.path.isdir(_OUT.value):
    raise UserError(f'--out {_OUT.value} is a file; generate --out expects a directory (new or '
                    'existing) for generation.json and the pictures.')
  restored = workdir_lib.for_inference(workdir, _EMA.value)
  setup = restored.setup
  tok, model = setup.tok, setup.model
  if model.image_mask == MaskType.BIDIRECTIONAL:
    raise UserError('generate --out needs a model whose prompt does not attend to its image '
                    '(model.image_mask \'hybrid\' or \'causal\'); this one is bidirectional.')
  spec, vae_dir = _sampling(setup)
  tokens, valid = tok.text_prompt(_PROMPT.value, setup.config.data.text_seq_len)
  _check_context(setup, int(valid.sum()) + _MAX_TOKENS.value
                 + _MAX_IMAGES.value * (model.image.num_patches + 1))
  decoding = mixed_modal.Decoding(_MAX_TOKENS.value, _TEMPERATURE.value,
                                  min(_TOP_K.value, model.backbone.vocab_size), _TOP_P.value)
  rows = mixed_modal.generate(model, restored.params, np.repeat(tokens[None], _NUM.value, 0),
                              np.repeat(valid[None], _NUM.value, 0), jax.random.key(_SEED.value),
                              tok=tok, spec=spec, decoding=decoding, max_images=_MAX_IMAGES.value)
  decode = vae.pixel_decoder(vae_dir, setup.layout) if vae_dir else None  # latent diffusion
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(_OUT.value, exist_ok=True)
  record = []
  for r, row in enumerate(rows):
    names = [f'{r}_{k}.png' for k in range(len(row.images))]
    for name, image in zip(names, row.images):
      pixels = sampling.to_uint8(decode(image[None]) if decode else image[None])
      grid = sampling.image_grid(pixels, columns=1)
      with files.atomic_file(os.path.join(_OUT.value, name)) as tmp:
        Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(tmp, format='PNG')
    text = mixed_modal.describe(row, tok, names)
    record.append(dict(prompt=_PROMPT.value, text=text, tokens=row.tokens, images=names))
    print(f'{r}: {_PROMPT.value} {text}')
  files.write_text(os.path.join(_OUT.value, 'generation.json'), json.dumps(record, indent=1))


def fid_command(workdir: str) -> None:
  """evaluate with --fid_ref: FID-N of the workdir's samples, or of --fid_npz; with only
  --fid_stats_out, the reference's statistics alone."""
  restored = workdir_lib.for_inference(workdir, _EMA.value) if workdir else None
  config = restored.setup.config if restored else config_lib.base_config()
  layout = restored.setup.layout if restored else sharding.make_layout(config.mesh)
  spec = fid_eval.FidSpec(_FID_REF.value, _INCEPTION.value or config.eval.inception,
                          _FID_BATCH.value, _FID_STATS_OUT.value)
  meter = fid_eval.FidMeter(spec, layout)
  if _FID_NPZ.value:
    result, what = meter.of_file(_FID_NPZ.value), _FID_NPZ.value
  elif restored:
    sampler, vae_dir = _sampling(restored.setup)
    result = meter.of_model(restored.setup, restored.params, _NUM.value,
                            _fid_prompts(restored.setup), sampler, jax.random.key(_SEED.value),
                            vae_dir)
    what = f'{workdir} (step {restored.step}, {sampler.steps} steps, cfg {sampler.guidance.scale})'
    if jax.process_index() == 0:
      files.write_text(os.path.join(workdir, f'fid{_NUM.value}.json'), json.dumps(
          dict(result, step=restored.step, reference=_FID_REF.value, steps=sampler.steps,
               cfg_scale=sampler.guidance.scale), indent=1))
  else:
    reference = meter.reference
    if jax.process_index() == 0:
      print(f'wrote {_FID_STATS_OUT.value}: the statistics of {reference.count} reference images')
    return
  if jax.process_index() == 0:
    print(fid_eval.describe(result, what, _FID_REF.value))


def tasks_command(workdir: str) -> None:
  """evaluate --tasks: the text benchmarks' table, also merged into WORKDIR/eval.json."""
  names = text_tasks.parse(_TASKS.value)
  if _LIMIT.value < 0:
    raise UserError(f'--limit is {_LIMIT.value}; expected 0 (all items) or more.')
  restored = workdir_lib.for_inference(workdir, _EMA.value)
  if _TFDS_DATA_DIR.value:
    restored.setup.config.data.tfds_data_dir = _TFDS_DATA_DIR.value
  rows = text_tasks.score(restored.setup, restored.params, names, _LIMIT.value)
  if jax.process_index() == 0:
    print(text_tasks.table(rows))
  evaluate_lib.merge_saved(workdir, dict(text_tasks.metrics_of(rows), tasks=rows,
                                         tasks_step=restored.step))


def evaluate_command(workdir: str) -> None:
  if _FID_REF.value or _FID_NPZ.value or _FID_STATS_OUT.value:
    fid_command(workdir)
    return
  if not workdir:
    raise UserError('--workdir is required.')
  if _TASKS.value:
    tasks_command(workdir)
    return
  restored = workdir_lib.for_inference(workdir, _EMA.value)
  spec, _ = _sampling(restored.setup)
  metrics, _ = evaluate_lib.evaluate(restored.setup, restored.params, workdir, restored.step, spec)
  if jax.process_index() == 0:
    print(f'{workdir}, step {restored.step} ({spec.sampler.value}, {spec.steps} steps, cfg '
          f'{spec.guidance.scale}; also in {evaluate_lib.EVAL_FILE}):')
    print(evaluate_lib.table(metrics))


def prepare_command() -> None:
  """prepare --tasks: the benchmarks' TFDS datasets, downloaded and prepared once."""
  names = [n.strip() for n in _TASKS.value.split(',') if n.strip()]
  for name, directory in benchmarks.prepare(names, _TFDS_DATA_DIR.value).items():
    print(f'{name}: prepared in {directory}')


def extract_latents_command(config) -> None:
  if not _VAE.value or not os.path.isdir(_VAE.value):
    raise UserError(f'--vae is {_VAE.value!r}; expected a converted VAE directory (convert vae).')
  if not _DST.value:
    raise UserError('--dst is required: the directory for the latent shards.')
  latents_source = settings.validate(config).latents_source
  info = extract_latents.extract(config.data, latents_source, _VAE.value, _DST.value)
  if jax.process_index() == 0:
    print(f'wrote the latents of {info["source_records"]} source records, shape '
          f'{info["latent_shape"]}, in {info["num_shards"]} shards to {_DST.value}')


def init_distributed() -> None:
  """Joins the other processes of a multi-host run, before any device is touched."""
  if _NUM_PROCESSES.value > 1:
    if not _COORDINATOR.value or not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
      raise UserError(f'--num_processes={_NUM_PROCESSES.value} needs --coordinator_address and a '
                      f'--process_id in [0, {_NUM_PROCESSES.value}).')
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # no effect off CPU
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _MULTIHOST.value:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize()


def _fail(message: str, code: int = 2) -> None:
  print(message, file=sys.stderr, flush=True)
  sys.exit(code)


def main(argv) -> None:
  problem = usage.command_line_error(argv, convert_commands.KINDS)
  if problem:
    _fail(f'error: {problem}')
  command, workdir = argv[1], _WORKDIR.value
  if not flags.FLAGS['verbosity'].present:  # library INFO logs drown the progress lines
    logging.set_verbosity(logging.WARNING)
  checkpoint.quiet_save_threads()
  try:
    usage.check_flags(command, flags.FLAGS)
    init_distributed()
    if command in ('train', 'bench', 'extract_latents') and _CONFIG.value is None:
      raise UserError(f'{command} needs --config=configs/FILE.py.')
    config = _CONFIG.value
    if command == 'extract_latents':
      extract_latents_command(config)
      return
    if command == 'bench':
      bench.run(config, _BENCH_OUT.value, _COMPARE_TORCH.value)
      return
    if command == 'prepare':
      prepare_command()
      return
    if command == 'convert':
      convert_commands.run(argv[2], _SRC.value, _DST.value, _EMA.value, _VAE.value,
                           _TOKENIZER.value, _SHAPE.value, _OFFICIAL.value)
      return
    if not workdir and command != 'evaluate':
      raise UserError('--workdir is required.')
    if command == 'train':
      train.train_and_evaluate(config, workdir)
    elif command == 'study':
      if _SEEDS.value < 1:
        raise UserError(f'--seeds is {_SEEDS.value}; expected at least 1.')
      summary = study.run_study(workdir, _SEEDS.value)
      print(study.markdown(summary, _SEEDS.value), end='')
    elif command == 'sample':
      sample_command(workdir)
    elif command == 'generate':
      generate_command(workdir)
    else:
      evaluate_command(workdir)
  except UserError as e:
    _fail(f'error: {e}')
  except guards.Preempted as e:
    _fail(str(e), guards.PREEMPTED_EXIT_CODE)
  except KeyboardInterrupt:  # a second Ctrl-C in training, or one anywhere else
    _fail('interrupted: stopped at once; nothing more was saved.', guards.INTERRUPTED_EXIT_CODE)
  except OSError as e:  # a full disk, a file that cannot be written or read
    _fail(f'error: {e.strerror or e}: {e.filename or "(no file named)"}.')


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with config errors (a key the config lacks, a bad value) as one sentence;
  `COMMAND --help` lists that command's flags, `--help` alone the commands."""
  command = argv[1] if len(argv) > 1 else ''
  if {'--help', '-h', '-?', '--helpshort', '--helpfull'} & set(argv):
    if command in usage.COMMANDS:
      extra = convert_commands.usage() if command == 'convert' else ''
      print(usage.command_help(command, flags.FLAGS, extra))
    else:
      print(usage.overview())
    sys.exit(0)
  problem = usage.config_file_problem(argv) or config_lib.unknown_overrides(argv)
  if problem:
    _fail(f'error: {problem}')
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # an unknown flag, a value of the wrong type
    _fail(f'error: {usage.flag_error(str(e), command)}')
  except Exception as e:  # pylint: disable=broad-except
    # The config file runs at parsing: anything it raises (a syntax error, no get_config)
    # is the file's fault.
    detail = ' '.join(str(e).replace('\\n', ' ').replace("\\", '').replace("'", '').split())
    _fail(f'error: the config (file or --config.* override) is invalid: {type(e).__name__}: '
          f'{detail}.')


def run() -> None:
  app.run(main, flags_parser=_parse_flags)
