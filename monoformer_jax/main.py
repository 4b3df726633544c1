"""Command line: python -m monoformer_jax COMMAND [FLAGS]; the commands, what each does and
the flags each reads are in usage.py (`--help`, `COMMAND --help`). Inference commands read the
config saved in the workdir's newest checkpoint. Multi-host runs add
--coordinator_address/--num_processes/--process_id, or --multihost (see launch/).
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from monoformer_jax import train, usage
from monoformer_jax.base import files
from monoformer_jax.base.errors import UserError
from monoformer_jax.config import schema
from monoformer_jax.convert import commands as convert_commands
from monoformer_jax.diffusion import Sampler, TimeSpacing
from monoformer_jax.evaluation import benchmarks
from monoformer_jax.generation.mixed_modal import Decoding
from monoformer_jax.run import inference, scoring
from monoformer_jax.tools import bench, extract_latents, study, sweep
from monoformer_jax.training import checkpoint, guards


_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (train and bench).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Work directory: checkpoints, logs, tokenizer.')
_PROMPT = flags.DEFINE_string('prompt', '', 'Text prompt for sample / generate.')
_NUM = flags.DEFINE_integer('num', 16, 'Number of images to sample.')
_IMAGE = flags.DEFINE_multi_string('image', [], 'generate: a picture the prompt reads, at the '
                                   'prompt\'s <image> placeholders or else before it (repeat the '
                                   'flag for more pictures).')
_OUT = flags.DEFINE_string('out', 'samples.png', 'PNG grid to write; FILE.npz is written beside.')
_STEPS = flags.DEFINE_integer('steps', None, 'Sampling steps (default: the config).')
_SAMPLER = flags.DEFINE_enum_class('sampler', None, Sampler, 'Sampler (default: the config).',
                                   case_sensitive=False)
_TIME_SPACING = flags.DEFINE_enum_class('time_spacing', None, TimeSpacing, 'dpmpp_2m: its steps '
                                        'evenly in time or in log-SNR (default: the config).',
                                        case_sensitive=False)
_CFG_SCALE = flags.DEFINE_float('cfg_scale', None, 'Guidance scale (default: the config).')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_EMA = flags.DEFINE_bool('ema', True, 'Use the EMA parameters (else the raw ones).')
_MAX_TOKENS = flags.DEFINE_integer('max_tokens', 64, 'Tokens to generate.')
_SEEDS = flags.DEFINE_integer('seeds', 3, 'study: seeds per variant; sweep: training seeds.')
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
_STORAGE = flags.DEFINE_string('storage', '', 'bench: directories (local or gs://), comma-separated, '
                               'whose checkpoint and metrics-writer costs to measure instead.')
_SRC = flags.DEFINE_string('src', None, 'convert: source directory.')
_DST = flags.DEFINE_string('dst', None, 'convert: destination directory (must not exist); '
                           'extract_latents: the shard directory (reruns finish it).')
_VAE = flags.DEFINE_string('vae', '', 'A converted VAE directory: the decoder for sample (default: '
                           'the config\'s model.vae), the encoder for extract_latents, the one '
                           'convert official records.')
_CLIP = flags.DEFINE_string('clip', '', 'convert official: the converted CLIP tower (convert clip) '
                            'of a checkpoint that reads images with CLIP.')
_TOKENIZER = flags.DEFINE_string('tokenizer', '', 'convert official: the LLM\'s sentencepiece model, '
                                 'for a checkpoint without tokenizer.model.')
_SHAPE = flags.DEFINE_string('shape', 'tinyllama-1.1b', 'convert synthetic-llama: a named shape '
                             '(tinyllama-1.1b, smollm2-135m, llama-3.2-1b, qwen2.5-0.5b) or '
                             'WIDTH,DEPTH,HEADS,KV_HEADS,MLP,VOCAB.')
_OFFICIAL = flags.DEFINE_bool('official', False, 'convert synthetic-llama: an official MonoFormer '
                              'checkpoint around the LLaMA.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', '', 'Multi-process: HOST:PORT of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 1, 'Multi-process: how many processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', 0, 'Multi-process: this process\'s index.')
_MULTIHOST = flags.DEFINE_bool('multihost', False, 'Let JAX find the cluster by itself (TPU pod '
                               'slices, SLURM) and join it.')


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


def _choice() -> inference.SamplingChoice:
  return inference.SamplingChoice(_SAMPLER.value, _STEPS.value, _CFG_SCALE.value, _VAE.value,
                                  _TIME_SPACING.value)


def _decoding() -> Decoding:
  return Decoding(_MAX_TOKENS.value, _TEMPERATURE.value, _TOP_K.value, _TOP_P.value)


def _evaluate(workdir: str) -> str:
  if _FID_REF.value or _FID_NPZ.value or _FID_STATS_OUT.value:
    if workdir and not _FID_NPZ.value and not flags.FLAGS['num'].present:
      raise UserError('evaluate --fid_ref measures the FID of --num samples of the model; give '
                      '--num=N (50000 for the paper\'s FID-50K: FID over fewer samples reads '
                      'higher).')
    request = scoring.FidRequest(_FID_REF.value, _INCEPTION.value, _FID_BATCH.value,
                                 _FID_STATS_OUT.value, _FID_NPZ.value, _NUM.value,
                                 _PROMPT_FILE.value)
    return scoring.fid(workdir, request, _choice(), _SEED.value, _EMA.value)
  if not workdir:
    raise UserError('--workdir is required.')
  if _TASKS.value:
    return scoring.tasks(workdir, _TASKS.value, _LIMIT.value, _TFDS_DATA_DIR.value, _EMA.value)
  return scoring.default(workdir, _choice(), _EMA.value)


def _run(command: str, argv: list[str]) -> str:
  """Runs one command; returns what it prints when it is done (process 0 prints it)."""
  workdir = _WORKDIR.value
  if workdir and files.is_remote(workdir):
    workdir = files.absolute(workdir)  # one spelling per bucket workdir (one lease)
  if command in ('train', 'bench', 'extract_latents') and _CONFIG.value is None:
    raise UserError(f'{command} needs --config=configs/FILE.py.')
  if command in ('train', 'sample', 'generate', 'study', 'sweep') and not workdir:
    raise UserError('--workdir is required.')
  if command == 'train':
    train.train_and_evaluate(_CONFIG.value, workdir)
  elif command == 'sample' and _FID_NPZ.value:
    inference.sample_fid(workdir, _FID_NPZ.value, _NUM.value, _FID_BATCH.value, _PROMPT_FILE.value,
                         _choice(), _SEED.value, _EMA.value)
  elif command == 'sample':
    inference.sample(workdir, _PROMPT.value, _NUM.value, _OUT.value, _choice(), _SEED.value,
                     _EMA.value)
  elif command == 'generate' and flags.FLAGS['out'].present:
    return inference.generate_mixed(workdir, _PROMPT.value, _OUT.value, _NUM.value,
                                    _MAX_IMAGES.value, _decoding(), _choice(), _SEED.value,
                                    _EMA.value, _IMAGE.value)
  elif command == 'generate':
    return inference.generate(workdir, _PROMPT.value, _decoding(), _SEED.value, _EMA.value,
                              _IMAGE.value)
  elif command == 'evaluate':
    return _evaluate(workdir)
  elif command == 'prepare':
    names = [n.strip() for n in _TASKS.value.split(',') if n.strip()]
    return '\n'.join(f'{name}: prepared in {directory}' for name, directory
                     in benchmarks.prepare(names, _TFDS_DATA_DIR.value).items())
  elif command == 'bench':
    bench.run(_CONFIG.value, _BENCH_OUT.value, _COMPARE_TORCH.value, _STORAGE.value)
  elif command == 'convert':
    convert_commands.run(argv[2], _SRC.value, _DST.value, _EMA.value, _VAE.value,
                         _TOKENIZER.value, _SHAPE.value, _OFFICIAL.value, _CLIP.value)
  elif command == 'extract_latents':
    return extract_latents.command(_CONFIG.value, _VAE.value, _DST.value)
  elif command == 'study':
    return study.command(workdir, _SEEDS.value)
  elif command == 'sweep':
    return sweep.command(workdir, _SEEDS.value)
  return ''


def main(argv) -> None:
  problem = usage.command_line_error(argv, convert_commands.KINDS)
  if problem:
    _fail(f'error: {problem}')
  if not flags.FLAGS['verbosity'].present:  # library INFO logs drown the progress lines
    logging.set_verbosity(logging.WARNING)
  checkpoint.quiet_save_threads()
  try:
    usage.check_flags(argv[1], flags.FLAGS)
    init_distributed()
    said = _run(argv[1], argv)
    if said and jax.process_index() == 0:
      print(said, flush=True)
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
  problem = usage.config_file_problem(argv) or schema.unknown_overrides(argv)
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
