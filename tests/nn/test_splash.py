"""The splash kernel (Pallas interpret mode off TPU) gives the XLA path's numbers."""

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT, TESTS, devices_env


@pytest.mark.slow
def test_splash_matches_xla_attention():
  """On one device and under a data x tensor mesh of four."""
  env = devices_env(4, PYTHONPATH=ROOT)
  run = subprocess.run([sys.executable, os.path.join(TESTS, 'splash_check.py')],
                       capture_output=True, text=True, env=env, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  results = json.loads(run.stdout.strip().splitlines()[-1])
  assert set(results) == {'1', '4'}
  for result in results.values():
    assert result['image_scale'] > 0.1  # a real prediction to compare
    # Image outputs, text logits at real positions, and every parameter gradient.
    assert result['image'] < 1e-5 and result['logits'] < 1e-5 and result['grads'] < 1e-4, result
