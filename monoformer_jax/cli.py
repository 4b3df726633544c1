"""Every command of `python -m monoformer_jax`, declared once: its usage line and summary, the
flags it reads (name, type, default, help), the ones it needs, and the function it runs. main.py
parses and dispatches from COMMANDS, usage.py writes --help and checks flags from it, and
docs/cli.md is generated from it (`python -m monoformer_jax.usage > docs/cli.md`).

To add a flag to a command, add it to that command's tuple below (a new flag is declared right
there; a shared one is one of the constants); its value reaches the command as `args.NAME`.
"""

from typing import Optional

from monoformer_jax import train
from monoformer_jax.base import command_spec as spec
from monoformer_jax.base.command_spec import Args, Command
from monoformer_jax.base.errors import UserError
from monoformer_jax.convert import commands as convert_commands
from monoformer_jax.diffusion import Sampler, TimeSpacing
from monoformer_jax.evaluation import benchmarks
from monoformer_jax.evaluation.fid_eval import FidSpec
from monoformer_jax.generation.mixed_modal import Decoding
from monoformer_jax.run import inference, scoring
from monoformer_jax.tools import bench, extract_latents, llm_study, study, sweep


CONFIG = spec.Flag('config', spec.FlagType.CONFIG_FILE, None, 'Config file (train and bench).')
WORKDIR = spec.string('workdir', None, 'Work directory: checkpoints, logs, tokenizer.')
PROMPT = spec.string('prompt', '', 'Text prompt for sample / generate.')
NUM = spec.integer('num', 16, 'Number of images to sample.')
OUT = spec.string('out', 'samples.png', 'PNG grid to write; FILE.npz is written beside.')
SEEDS = spec.integer('seeds', 3, 'study: seeds per variant; sweep: training seeds.')
TASKS = spec.string('tasks', '', 'evaluate: text benchmarks to score as multiple choice, '
                    'comma-separated: next_line, hellaswag, openbookqa, winogrande, arc_easy, '
                    'arc_challenge, boolq, piqa; prepare: those to download.')
TFDS_DATA_DIR = spec.string('tfds_data_dir', '', 'prepare, evaluate --tasks: the TFDS data_dir of '
                            'the benchmarks (default: evaluate reads the config\'s '
                            'data.tfds_data_dir, prepare TFDS\'s own).')
FID_NPZ = spec.string('fid_npz', '', 'sample: write --num class-conditional samples, classes '
                      'spread uniformly, to this ADM-format .npz instead; evaluate: the sample file '
                      'whose FID to measure.')
FID_BATCH = spec.integer('fid_batch', 256, 'sample --fid_npz, evaluate --fid_ref: global batch '
                         '(divisible by the device and host counts).')
PROMPT_FILE = spec.string('prompt_file', '', 'evaluate --fid_ref, sample --fid_npz: prompts, one '
                          'per line, instead of the class prompts.')
VAE = spec.string('vae', '', 'A converted VAE directory: the decoder for sample (default: the '
                  'config\'s model.vae), the encoder for extract_latents, the one convert official '
                  'records.')
SEED = spec.integer('seed', 0, 'Sampling seed.')
EMA = spec.boolean('ema', True, 'Use the EMA parameters (else the raw ones).')
# How images are sampled: each None keeps the workdir's config.
SAMPLING = (spec.choice('sampler', Sampler, 'Sampler (default: the config).'),
            spec.integer('steps', None, 'Sampling steps (default: the config).'),
            spec.choice('time_spacing', TimeSpacing, 'dpmpp_2m: its steps evenly in time or in '
                        'log-SNR (default: the config).'),
            spec.real('cfg_scale', None, 'Guidance scale (default: the config).'),
            SEED, EMA, VAE)
# Joining the other processes of a multi-host run (main.init_distributed reads them).
MULTIHOST = (spec.string('coordinator_address', '', 'Multi-process: HOST:PORT of process 0.'),
             spec.integer('num_processes', 1, 'Multi-process: how many processes.'),
             spec.integer('process_id', 0, 'Multi-process: this process\'s index.'),
             spec.boolean('multihost', False, 'Let JAX find the cluster by itself (TPU pod '
                          'slices, SLURM) and join it.'))
NEEDS_CONFIG = {'config': '{command} needs --config=configs/FILE.py.'}
NEEDS_WORKDIR = {'workdir': '--workdir is required.'}


def sampling_choice(a: Args) -> inference.SamplingChoice:
  return inference.SamplingChoice(a.sampler, a.steps, a.cfg_scale, a.vae, a.time_spacing)


def _train(a: Args) -> None:
  train.train_and_evaluate(a.config, a.workdir)


def _sample(a: Args) -> None:
  run = inference.Run(a.workdir, a.seed, a.ema)
  if a.fid_npz:
    inference.sample_fid(run, a.fid_npz, a.num, a.fid_batch, a.prompt_file, sampling_choice(a))
  else:
    inference.sample(run, a.prompt, a.num, a.out, sampling_choice(a))


def _generate(a: Args) -> str:
  run = inference.Run(a.workdir, a.seed, a.ema)
  decoding = Decoding(a.max_tokens, a.temperature, a.top_k, a.top_p)
  if a.given('out'):
    if a.chat:
      raise UserError('generate --chat answers in text only; drop --out, or --chat for text '
                      'with images.')
    rows = inference.MixedRows(a.out, a.num, a.max_images)
    return inference.generate_mixed(run, a.prompt, a.image, decoding, rows, sampling_choice(a))
  return inference.generate(run, a.prompt, decoding, a.image, a.chat)


def _evaluate(a: Args) -> str:
  if a.fid_ref or a.fid_npz or a.fid_stats_out:
    if a.workdir and not a.fid_npz and not a.given('num'):
      raise UserError('evaluate --fid_ref measures the FID of --num samples of the model; give '
                      '--num=N (50000 for the paper\'s FID-50K: FID over fewer samples reads '
                      'higher).')
    request = scoring.FidRequest(FidSpec(a.fid_ref, a.inception, a.fid_batch, a.fid_stats_out),
                                 a.fid_npz, a.num, a.prompt_file)
    return scoring.fid(inference.Run(a.workdir, a.seed, a.ema), request, sampling_choice(a))
  if not a.workdir:
    raise UserError(NEEDS_WORKDIR['workdir'])
  if a.tasks:
    return scoring.tasks(a.workdir, a.tasks, a.limit, a.tfds_data_dir, a.ema)
  return scoring.default(a.workdir, sampling_choice(a), a.ema)


def _prepare(a: Args) -> str:
  names = [n.strip() for n in a.tasks.split(',') if n.strip()]
  return '\n'.join(f'{name}: prepared in {directory}' for name, directory
                   in benchmarks.prepare(names, a.tfds_data_dir).items())


def _convert(a: Args) -> str:
  return convert_commands.KINDS[a.kind].run(a)


COMMANDS = {
    'train': Command(
        '--config=configs/digits.py --workdir=DIR [--config.KEY=VALUE ...]',
        'trains (resuming from the workdir\'s newest checkpoint) and evaluates at the end; Ctrl-C '
        'or SIGTERM saves at the next step and stops (exit 75)',
        (CONFIG, WORKDIR) + MULTIHOST, _train, dict(NEEDS_CONFIG, **NEEDS_WORKDIR)),
    'sample': Command(
        '--workdir=DIR --prompt=TEXT --num=N --out=FILE.png',
        'a PNG grid and FILE.npz of prompted samples; with --fid_npz=FILE.npz, N '
        'class-conditional samples for the ADM FID evaluator',
        (WORKDIR, PROMPT, NUM, OUT, FID_NPZ, FID_BATCH, PROMPT_FILE) + SAMPLING + MULTIHOST, _sample, NEEDS_WORKDIR),
    'generate': Command(
        '--workdir=DIR --prompt=TEXT --max_tokens=N',
        'text continuation with a KV cache, from a workdir or a converted LLM directory (--chat: '
        'the answer to the prompt as a user\'s message in the model\'s chat template; '
        '--image=FILE: pictures the prompt reads); with --out=DIR, text with the images the '
        'model starts by itself',
        (WORKDIR, PROMPT, spec.integer('max_tokens', 64, 'Tokens to generate.'),
         spec.real('temperature', 0.8, 'Sampling temperature; 0 is greedy.'),
         spec.integer('top_k', 0, 'Keep the k most likely tokens; 0 keeps all.'),
         spec.real('top_p', 1.0, 'Nucleus sampling mass; 1 keeps all.'),
         OUT.means('Directory to write generation.json and the drawn images to (mixed-modal '
                   'generation); without it, text only.', False),
         NUM.means('With --out: rows to generate, each from the prompt.'),
         spec.integer('max_images', 1, 'generate --out: images per row at most.'),
         spec.boolean('chat', False, 'generate: the prompt is a user\'s message, rendered in '
                      'the model\'s chat template; prints the answer alone, which ends at the '
                      'model\'s end-of-turn tokens.'),
         spec.repeated('image', 'generate: a picture the prompt reads, at the prompt\'s <image> '
                       'placeholders or else before it (repeat the flag for more pictures).'))
        + SAMPLING + MULTIHOST, _generate, NEEDS_WORKDIR),
    'evaluate': Command(
        '--workdir=DIR',
        'prompt accuracy, digit FD and held-out perplexity (the default); --fid_ref=REF.npz '
        '--num=N: FID-N; --fid_npz=FILE: FID of a sample file; --tasks=LIST: text benchmarks as '
        'multiple choice; all merged into DIR/eval.json',
        (WORKDIR,
         spec.string('fid_ref', '', 'evaluate: the FID reference .npz: ADM reference images '
                     '(arr_0) or statistics (mu, sigma).'),
         NUM.means('With --fid_ref: how many samples the FID is measured on (required; 50000 for '
                   'the paper\'s FID-50K).', False),
         FID_NPZ, FID_BATCH,
         spec.string('inception', '', 'evaluate: the converted FID Inception (default: the '
                     'config\'s eval.inception).'),
         spec.string('fid_stats_out', '', 'evaluate: also write the reference\'s statistics (mu, '
                     'sigma) here, a --fid_ref for later runs.'),
         PROMPT_FILE, TASKS,
         spec.integer('limit', 0, 'evaluate --tasks: at most this many items per task (0 = '
                      'all).'),
         TFDS_DATA_DIR) + SAMPLING + MULTIHOST, _evaluate),
    'prepare': Command(
        '--tasks=LIST [--tfds_data_dir=DIR]',
        'downloads and prepares the TFDS datasets of the text benchmarks that `evaluate --tasks` '
        'scores (the one command here that uses the network)',
        (TASKS, TFDS_DATA_DIR), _prepare),
    'bench': Command(
        '--config=configs/bench.py [--bench_out=FILE.json] [--compare_torch]',
        'step speed, MFU, sampler and decoder throughput, memory; with --storage=DIR,...: '
        'checkpoint and metrics costs in each directory; with --finetune: the memory and step '
        'time of each train.finetune mode',
        (CONFIG, spec.string('bench_out', '', 'bench: JSON report to write.'),
         spec.boolean('compare_torch', False, 'bench: also time the HF transformers PyTorch steps '
                      'of the same shapes.'),
         spec.string('storage', '', 'bench: directories (local or gs://), comma-separated, whose '
                     'checkpoint and metrics-writer costs to measure instead.'),
         spec.boolean('finetune', False, 'bench: instead, per train.finetune mode, the bytes per '
                      'device of the compiled train steps at the TinyLlama-1.1B shape on the '
                      'presets\' meshes and of a 1B and a 7B source on one device, and the step '
                      'times and peak RSS at the config\'s shape on this machine.')) + MULTIHOST,
        lambda a: bench.run(a.config, a.bench_out, a.compare_torch, a.storage, a.finetune),
        NEEDS_CONFIG),
    'convert': Command('KIND --src=DIR --dst=DIR', 'weight conversion; the kinds are listed below',
                       (), _convert, kinds=convert_commands.KINDS),
    'extract_latents': Command(
        '--config=configs/imagenet256.py --vae=DIR --dst=DIR',
        'SD-VAE latents of every training image in resumable shards',
        (CONFIG, VAE, spec.string('dst', None, 'extract_latents: the shard directory (reruns '
                                  'finish it).')) + MULTIHOST,
        lambda a: extract_latents.command(a.config, a.vae, a.dst), NEEDS_CONFIG),
    'study': Command('--workdir=DIR [--seeds=3] [--llm=DIR]',
                     'the paper\'s three ablations in miniature (configs/ablations.py); with '
                     '--llm, its two claims about a pretrained LLM with a real one',
                     (WORKDIR, SEEDS,
                      spec.string('llm', '', 'study: a converted LLM directory (convert hf): '
                                  'MonoFormer from it against its shape from scratch (image '
                                  'quality), and the LLM\'s own text figures against both '
                                  '(language kept).')),
                     lambda a: (llm_study.command(a.workdir, a.seeds, a.llm) if a.llm
                                else study.command(a.workdir, a.seeds)), NEEDS_WORKDIR),
    'sweep': Command('--workdir=DIR [--seeds=3]',
                     'the samplers at equal cost: DDPM and flow models of the default, every '
                     'sampler and step count, accuracy, digit FD and images/s',
                     (WORKDIR, SEEDS), lambda a: sweep.command(a.workdir, a.seeds), NEEDS_WORKDIR),
}


def declared_flags() -> dict[str, spec.Flag]:
  """Each flag name once (its first declaration), checking that every declaration of a name
  agrees on its type and default: they are one absl flag."""
  out: dict[str, spec.Flag] = {}
  for command in COMMANDS.values():
    for flag in command.all_flags():
      first: Optional[spec.Flag] = out.setdefault(flag.name, flag)
      if (first.type, first.default, first.enum_class) != (flag.type, flag.default,
                                                           flag.enum_class):
        raise ValueError(f'--{flag.name} is declared twice with another type or default')
  return out
