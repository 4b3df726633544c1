"""`bench --storage=DIR,...`: what a run's storage costs, for each directory (a local one, a
gs:// bucket): saving and restoring the bench config's train state (parameters, EMA, AdamW
moments) as a checkpoint, and the metrics writer's time per logged step (its flush, which a
bucket takes at every save, apart). Medians of config.bench.repeats, the directories in turn.

  python -m monoformer_jax bench --config=configs/bench.py --storage=/tmp/b,gs://BUCKET/b
"""

import contextlib
import io
import os
import statistics
import time
import uuid

import jax
import ml_collections
import numpy as np

from monoformer_jax.base import files, sharding
from monoformer_jax.base.workdir_layout import Workdir
from monoformer_jax.run import settings as settings_lib
from monoformer_jax.training import checkpoint, steps
from monoformer_jax.training.metrics_log import MetricsLog


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def _one_round(config, state, abstract, directory: str, rows: int) -> dict:
  workdir = os.path.join(directory, f'bench-{uuid.uuid4().hex[:8]}')
  files.makedirs(workdir)
  ckpt = checkpoint.Checkpointer(workdir, keep=1)
  save = _timed(lambda: ckpt.save(1, state, {}, config))
  restore = _timed(lambda: jax.block_until_ready(ckpt.restore(1, abstract)[0]))
  ckpt.close()
  step_dir = Workdir(workdir).checkpoint_step(1)
  size = sum(len(files.read_bytes(f'{step_dir}/{n}')) for n in files.files_under(step_dir))
  log = MetricsLog(workdir, 0, rows)
  metrics = dict(loss=np.float32(1.0), learning_rate=np.float32(1e-4), grad_norm=np.float32(1.0))
  with contextlib.redirect_stdout(io.StringIO()):  # the progress lines, printed as in a run
    writes = [_timed(lambda s=s: log.write(s, 'ar', metrics, 0)) for s in range(1, rows + 1)]
  flush = _timed(log.flush)
  log.close()
  files.rmtree(workdir)
  return dict(save_s=save, restore_s=restore, checkpoint_bytes=size,
              metrics_write_ms=1e3 * statistics.median(writes), metrics_flush_ms=1e3 * flush)


def measure(config: ml_collections.ConfigDict, directories: list[str], rows: int = 200) -> dict:
  """{directory: medians of save_s, restore_s, metrics_write_ms, metrics_flush_ms}."""
  model = settings_lib.build_model(config)
  tx = steps.make_optimizer(config.optim, config.train.num_steps)
  layout = sharding.make_layout(config.mesh)
  abstract, _ = steps.abstract_state(model, tx, layout)
  state = steps.init_state(model, tx, layout, jax.random.key(config.seed))
  rounds = {d: [] for d in directories}
  for _ in range(config.bench.repeats):
    for directory in directories:
      rounds[directory].append(_one_round(config, state, abstract, directory, rows))
  return {d: {k: statistics.median(r[k] for r in results) for k in results[0]}
          for d, results in rounds.items()}


def print_table(report: dict) -> None:
  print(f'{"storage":40s} {"MB":>7s} {"save s":>7s} {"restore s":>9s} {"row ms":>7s} '
        f'{"flush ms":>8s}')
  for directory, r in report.items():
    print(f'{directory:40s} {r["checkpoint_bytes"] / 1e6:7.1f} {r["save_s"]:7.2f} '
          f'{r["restore_s"]:9.2f} {r["metrics_write_ms"]:7.3f} {r["metrics_flush_ms"]:8.1f}')
