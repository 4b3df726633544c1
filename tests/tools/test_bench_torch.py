"""`bench --compare_torch` where torchvision's C++ ops do not load, and where torch is missing."""

import os
import subprocess
import sys

import pytest
from helpers import ROOT, cli, error_line


# What a torchvision wheel built for another torch meets: its ops library does not load (and
# torchvision's import swallows that), so registering fake kernels for its ops fails later.
BREAK_TORCHVISION = '''
import torch
def load_library(path):
  if 'torchvision' in str(path):
    raise OSError(f'Could not load this library: {path}')
  return LOAD_LIBRARY(path)
LOAD_LIBRARY, torch.ops.load_library = torch.ops.load_library, load_library
'''

STEPS = BREAK_TORCHVISION + '''
try:
  from transformers import LlamaForCausalLM
except Exception as e:  # transformers words it as its version does; the cause is torchvision's
  print('without the fix:', repr(e.__cause__ or e))
from helpers import tiny_config
from monoformer_jax.nn import model as model_lib
from monoformer_jax.run import settings as settings_lib
from monoformer_jax.tools import bench_torch
config = tiny_config()
steps, about = bench_torch.make_steps(config, settings_lib.build_model(config).backbone)
steps['ar']()
steps['diffusion']()
print('steps ran with torch', about['torch'])
'''


@pytest.mark.slow
def test_torch_steps_run_where_torchvision_ops_do_not_load():
  """A fresh process (the tests' own process has torchvision imported already): the plain
  import fails as in the wild, then bench's torch steps build and run."""
  result = subprocess.run([sys.executable, '-c', STEPS], cwd=os.path.join(ROOT, 'tests'),
                          env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "without the fix: RuntimeError('operator torchvision::nms does not exist" in result.stdout
  assert 'steps ran with torch' in result.stdout, result.stdout


def test_a_missing_torch_is_one_error_line(tmp_path):
  (tmp_path / 'torch.py').write_text(
      "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
  env = dict(os.environ, PYTHONPATH=str(tmp_path))
  result = cli('bench', '--config=configs/bench.py', '--compare_torch', env=env)
  assert result.returncode != 0 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert error_line(result) == (
      "error: --compare_torch needs torch and transformers, which did not import "
      "(ModuleNotFoundError: No module named 'torch'); install them with pip install -r "
      'requirements-test.txt.')
