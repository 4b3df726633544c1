"""Run by evaluation/test_multiple_choice.py with 8 forced CPU devices: the next-line scores of a workdir on 1 device
and under an fsdp mesh of 8 (parameters split as the rules say). Prints one JSON object."""

import functools
import json
import os
import sys

import jax
import numpy as np


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from monoformer_jax.base import sharding
from monoformer_jax.evaluation import multiple_choice as mc, text_tasks
from monoformer_jax.nn import model as model_lib
from monoformer_jax.run import workdir as workdir_lib  # pylint: disable=wrong-import-position


def main(workdir: str) -> None:
  restored = workdir_lib.for_inference(workdir, use_ema=True)
  setup, params = restored.setup, jax.device_get(restored.params)
  items = text_tasks.TASKS['next_line'].items(setup.config, 24)
  boxed = jax.eval_shape(functools.partial(model_lib.init_params, setup.model), jax.random.key(0))
  scores = {}
  for name, mesh, devices in (('one', dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
                              ('fsdp8', dict(data=1, fsdp=8, tensor=1), None)):
    config = setup.config.mesh.copy_and_resolve_references()
    config.update(mesh)
    layout = sharding.make_layout(config, devices)
    placed = jax.device_put(params, sharding.logical_shardings(boxed, layout))
    scores[name] = mc.loglikelihoods(setup.model, placed, setup.tok, items, 8,
                                     setup.config.model.context_length, layout)
  diff = max(float(np.abs(a - b).max()) for a, b in zip(scores['one'], scores['fsdp8']))
  accuracies = [mc.metrics(items, s)['acc'] for s in scores.values()]
  print(json.dumps(dict(max_abs_diff=diff, acc=accuracies,
                                     items=len(items))))


if __name__ == '__main__':
  main(sys.argv[1])
