"""What `evaluate` does with a workdir (or with sample files): the default's metrics, FID-N,
or the text benchmarks, each returned as the text to print and merged into WORKDIR/eval.json
(FID-N into WORKDIR/fidN.json).
"""

import dataclasses
import json
import os

import jax

from monoformer_jax.base import files, sharding, workdir_layout
from monoformer_jax.base.workdir_layout import Workdir
from monoformer_jax.base.errors import UserError
from monoformer_jax.config import schema
from monoformer_jax.evaluation import default_eval, fid_eval, text_tasks
from monoformer_jax.run import workdir as workdir_lib
from monoformer_jax.run.inference import Run, SamplingChoice, prompts


def default(workdir: str, choice: SamplingChoice, use_ema: bool) -> str:
  """The default's metrics (prompt accuracy, digit FD, held-out perplexity, ...) as a table."""
  restored = workdir_lib.for_inference(workdir, use_ema)
  spec, _ = choice.resolve(restored.setup)
  metrics, _ = default_eval.evaluate(restored.setup, restored.params, workdir, restored.step, spec)
  return (f'{workdir}, step {restored.step} ({spec.sampler.value}, {spec.steps} steps, cfg '
          f'{spec.guidance.scale}; also in {workdir_layout.EVAL_JSON}):\n'
          + default_eval.table(metrics))


@dataclasses.dataclass(frozen=True)
class FidRequest:
  """evaluate's FID: the reference, Inception ('' = the config's eval.inception), batch and
  statistics file, and what to measure: a sample file, or `num` samples of the workdir's model
  prompted as `prompt_file` says."""
  spec: fid_eval.FidSpec
  sample_file: str = ''
  num: int = 0
  prompt_file: str = ''


def fid(run: Run, request: FidRequest, choice: SamplingChoice) -> str:
  """FID-N of the workdir's samples or of a sample file; with neither, the reference's
  statistics alone (written to the spec's stats_out)."""
  workdir, reference = run.workdir, request.spec.reference
  restored = run.restore() if workdir else None
  config = restored.setup.config if restored else schema.base_config()
  layout = restored.setup.layout if restored else sharding.make_layout(config.mesh)
  spec = dataclasses.replace(request.spec, inception=request.spec.inception or config.eval.inception)
  meter = fid_eval.FidMeter(spec, layout)
  if request.sample_file:
    result = meter.of_file(request.sample_file)
    return fid_eval.describe(result, request.sample_file, reference)
  if not restored:
    return f'wrote {spec.stats_out}: the statistics of {meter.reference.count} reference images'
  sampled, vae_dir = choice.resolve(restored.setup)
  result = meter.of_model(restored.setup, restored.params, request.num,
                          prompts(restored.setup, request.prompt_file), sampled, run.key(),
                          vae_dir)
  if jax.process_index() == 0:
    files.write_text(Workdir(workdir).fid_json(request.num), json.dumps(
        dict(result, step=restored.step, reference=reference, steps=sampled.steps,
             cfg_scale=sampled.guidance.scale), indent=1))
  what = f'{workdir} (step {restored.step}, {sampled.steps} steps, cfg {sampled.guidance.scale})'
  return fid_eval.describe(result, what, reference)


def tasks(workdir: str, names: str, limit: int, tfds_data_dir: str, use_ema: bool) -> str:
  """The text benchmarks' table (names comma-separated), also merged into eval.json."""
  chosen = text_tasks.parse(names)
  if limit < 0:
    raise UserError(f'--limit is {limit}; expected 0 (all items) or more.')
  restored = workdir_lib.for_inference(workdir, use_ema)
  if tfds_data_dir:
    restored.setup.config.data.tfds_data_dir = tfds_data_dir
  rows = text_tasks.score(restored.setup, restored.params, chosen, limit)
  default_eval.merge_saved(workdir, dict(text_tasks.metrics_of(rows), tasks=rows,
                                         tasks_step=restored.step))
  return text_tasks.table(rows)
