"""What each command of the command line is for and which flags it reads: its `--help`, and
one sentence for a flag it does not take (instead of ignoring it) or one that does not exist.
"""

import difflib
import os
import re
from typing import Optional

from absl import flags

from monoformer_jax.base.errors import UserError


ENTRY = 'python -m monoformer_jax'
_MULTIHOST = ('coordinator_address', 'num_processes', 'process_id', 'multihost')
_SAMPLER = ('sampler', 'steps', 'time_spacing', 'cfg_scale', 'seed', 'ema', 'vae')


class Command:
  """A command's usage line, what it does, and the flags it reads; `meaning` gives a flag's
  help where this command reads it otherwise than the flag's own help says, and whether the
  flag's default applies to it."""

  def __init__(self, usage: str, summary: str, own_flags: tuple[str, ...], multihost: bool = True,
               meaning: Optional[dict[str, tuple[str, bool]]] = None):
    self.usage, self.summary, self.meaning = usage, summary, meaning or {}
    self.flags = own_flags + (_MULTIHOST if multihost else ())


COMMANDS = {
    'train': Command('--config=configs/digits.py --workdir=DIR [--config.KEY=VALUE ...]',
                     'trains (resuming from the workdir\'s newest checkpoint) and evaluates at '
                     'the end; Ctrl-C or SIGTERM saves at the next step and stops (exit 75)',
                     ('config', 'workdir')),
    'sample': Command('--workdir=DIR --prompt=TEXT --num=N --out=FILE.png',
                      'a PNG grid and FILE.npz of prompted samples; with --fid_npz=FILE.npz, N '
                      'class-conditional samples for the ADM FID evaluator',
                      ('workdir', 'prompt', 'num', 'out', 'fid_npz', 'fid_batch', 'prompt_file')
                      + _SAMPLER),
    'generate': Command('--workdir=DIR --prompt=TEXT --max_tokens=N',
                        'text continuation with a KV cache (--image=FILE: pictures the prompt '
                        'reads); with --out=DIR, text with the images the model starts by itself',
                        ('workdir', 'prompt', 'max_tokens', 'temperature', 'top_k', 'top_p',
                         'out', 'num', 'max_images', 'image') + _SAMPLER,
                        meaning=dict(
                            out=('Directory to write generation.json and the drawn images to '
                                 '(mixed-modal generation); without it, text only.', False),
                            num=('With --out: rows to generate, each from the prompt.', True))),
    'evaluate': Command('--workdir=DIR',
                        'prompt accuracy, digit FD and held-out perplexity (the default); '
                        '--fid_ref=REF.npz --num=N: FID-N; --fid_npz=FILE: FID of a sample file; '
                        '--tasks=LIST: text benchmarks as multiple choice; all merged into '
                        'DIR/eval.json',
                        ('workdir', 'fid_ref', 'num', 'fid_npz', 'fid_batch', 'inception',
                         'fid_stats_out', 'prompt_file', 'tasks', 'limit', 'tfds_data_dir')
                        + _SAMPLER,
                        meaning=dict(num=('With --fid_ref: how many samples the FID is measured '
                                      'on (required; 50000 for the paper\'s FID-50K).', False))),
    'prepare': Command('--tasks=LIST [--tfds_data_dir=DIR]',
                       'downloads and prepares the TFDS datasets of the text benchmarks that '
                       '`evaluate --tasks` scores (the one command here that uses the network)',
                       ('tasks', 'tfds_data_dir'), multihost=False),
    'bench': Command('--config=configs/bench.py [--bench_out=FILE.json] [--compare_torch]',
                     'step speed, MFU, sampler and decoder throughput, memory; with '
                     '--storage=DIR,...: checkpoint and metrics costs in each directory',
                     ('config', 'bench_out', 'compare_torch', 'storage')),
    'convert': Command('KIND --src=DIR --dst=DIR',
                       'weight conversion; the kinds are listed below',
                       ('src', 'dst', 'ema', 'vae', 'tokenizer', 'shape', 'official', 'clip'),
                       multihost=False),
    'extract_latents': Command('--config=configs/imagenet256.py --vae=DIR --dst=DIR',
                               'SD-VAE latents of every training image in resumable shards',
                               ('config', 'vae', 'dst')),
    'study': Command('--workdir=DIR [--seeds=3]',
                     'the paper\'s three ablations in miniature (configs/ablations.py)',
                     ('workdir', 'seeds'), multihost=False),
    'sweep': Command('--workdir=DIR [--seeds=3]',
                     'the samplers at equal cost: DDPM and flow models of the default, every '
                     'sampler and step count, accuracy, digit FD and images/s',
                     ('workdir', 'seeds'), multihost=False),
}


def command_line_error(argv: list[str], convert_kinds) -> str:
  """'' when argv names one command (and convert one kind), else what is wrong."""
  command, rest = (argv[1], argv[2:]) if len(argv) > 1 else ('', [])
  if command not in COMMANDS:
    return (f'expected a command out of {", ".join(COMMANDS)}; got '
            f'{command or "none"} (`python -m monoformer_jax --help` describes them).')
  if command == 'convert' and len(rest) != 1:
    return (f'convert takes one kind out of {", ".join(convert_kinds)}; got '
            f'{" ".join(rest) or "none"}.')
  if command != 'convert' and rest:
    return f'{command} takes flags only; got {" ".join(rest)} besides them.'
  return ''


def config_file_problem(argv: list[str]) -> str:
  """A sentence when the --config file named in argv does not exist, else ''."""
  for i, arg in enumerate(argv):
    path = arg[len('--config='):] if arg.startswith('--config=') else (
        argv[i + 1] if arg == '--config' and i + 1 < len(argv) else None)
    if path is not None and not os.path.isfile(path.split(':')[0]):  # local: a Python module
      return (f'--config file {path.split(":")[0]} does not exist; expected a config file such as '
              'configs/digits.py.')
  return ''


def overview() -> str:
  """What `--help` without a command prints."""
  width = max(map(len, COMMANDS))
  return '\n'.join([f'{ENTRY} COMMAND [FLAGS]; {ENTRY} COMMAND --help lists its flags.', 'commands:']
                   + [f'  {name:{width}s}  {c.summary}' for name, c in COMMANDS.items()])


def command_help(name: str, flag_values: flags.FlagValues, extra: str = '') -> str:
  """A command's `--help`: usage, summary, and each of its flags with help and default."""
  command = COMMANDS[name]
  lines = [f'{ENTRY} {name} {command.usage}', f'  {command.summary}']
  if extra:
    lines.append(extra)
  lines.append('flags:')
  for flag_name in command.flags:
    flag = flag_values[flag_name]
    text = flag.help.split(';\n    repeat this option')[0]  # absl's note on repeatable flags
    text, shown = command.meaning.get(flag_name, (text, True))
    default = ('' if not shown or flag.default in (None, '', [])
               else f' (default: {flag.default_as_str})')
    lines.append(f'  --{flag_name}: {text}{default}')
  return '\n'.join(lines)


def check_flags(name: str, flag_values: flags.FlagValues) -> None:
  """A flag given on the command line that the command does not read is an error."""
  wrong = [f for f in _our_flags(flag_values) if flag_values[f].present
           and f not in COMMANDS[name].flags]
  if wrong:
    raise UserError(f'{", ".join("--" + f for f in wrong)} is not a flag of `{name}`; '
                    f'`{ENTRY} {name} --help` lists the ones it takes.')


def _our_flags(flag_values: flags.FlagValues) -> set[str]:
  return {f for c in COMMANDS.values() for f in c.flags} & set(flag_values)


def flag_error(message: str, command: str) -> str:
  """absl's message for a bad flag as one sentence with the likely intended flag."""
  unknown = re.match(r"Unknown command line flag '([^']+)'", message)
  if not unknown:
    return ' '.join(message.split()).rstrip('.') + '.'
  name = unknown.group(1)
  known = COMMANDS[command].flags if command in COMMANDS else sorted(_our_flags(flags.FLAGS))
  close = difflib.get_close_matches(name, known, n=2)
  hint = f' did you mean {" or ".join("--" + c for c in close)}?' if close else ''
  where = f'`{command}`' if command in COMMANDS else 'any command'
  return (f'--{name} is not a flag of {where};{hint} `{ENTRY} {command or "COMMAND"} --help` '
          'lists them.')
