"""`study --llm=DIR`: the paper's two claims about a pretrained LLM, in miniature, with a real one
(a converted directory, such as SmolLM2-135M-Instruct's) on the embedded digits and English text
(configs/ablations.py:llm):
  (a) MonoFormer started from the LLM draws the prompted digits better than the same shape
      trained from scratch (prompt accuracy by the independent classifier, digit FD);
  (b) it keeps the LLM's language ability: held-out perplexity and next-line answers of the LLM
      itself against both trained arms.
Both arms share the data, steps, seeds and the LLM's tokenizer; only the initialization differs.
Two more arms start from the LLM with its backbone frozen (train.finetune, docs/fine-tuning.md):
`llm_lora` trains LoRA adapters beside MonoFormer's own modules, `llm_frozen_text` those modules
alone; what each costs in images and keeps of the text beside `llm` (every weight trained).
OUT/llm_study.json and OUT/llm_study.md hold the table; finished runs are not run again, so a
stopped study resumes.
"""

import json
import math
import os
import time

from monoformer_jax.base import files
from monoformer_jax.evaluation import default_eval, text_tasks
from monoformer_jax.nn import converted
from monoformer_jax.run import backbone, workdir as workdir_lib
from monoformer_jax.tools import study


ARMS = ('llm', 'llm_scratch', 'llm_lora', 'llm_frozen_text')
FINETUNE = {'llm_lora': 'lora', 'llm_frozen_text': 'frozen_text'}  # the frozen arms' modes
ORIGINAL = 'llm_itself'
TEXT = ('text/perplexity', 'next_line/acc')
FINDINGS = (
    dict(name='(a) LLM initialization helps image generation', better='llm', worse='llm_scratch',
         metric='fd/overall', lower_is_better=True),
    dict(name='(a) ... prompt accuracy', better='llm', worse='llm_scratch',
         metric='accuracy/overall', lower_is_better=False),
    dict(name='(b) the LLM\'s perplexity kept', better='llm', worse=ORIGINAL,
         metric='text/perplexity', lower_is_better=True, same=True),
    dict(name='(b) the LLM\'s next-line answers kept', better='llm', worse=ORIGINAL,
         metric='next_line/acc', lower_is_better=False, same=True),
    dict(name='(b) LLM initialization keeps more text ability than scratch', better='llm',
         worse='llm_scratch', metric='text/perplexity', lower_is_better=True),
    dict(name='(b) ... next-line answers', better='llm', worse='llm_scratch',
         metric='next_line/acc', lower_is_better=False),
) + tuple(finding for arm in FINETUNE for finding in (
    dict(name=f'{arm} draws as well as llm', better=arm, worse='llm', metric='fd/overall',
         lower_is_better=True, same=True),
    dict(name='... prompt accuracy', better=arm, worse='llm', metric='accuracy/overall',
         lower_is_better=False, same=True),
    dict(name=f'{arm} keeps the LLM\'s perplexity', better=arm, worse=ORIGINAL,
         metric='text/perplexity', lower_is_better=True, same=True),
    dict(name='... next-line answers', better=arm, worse=ORIGINAL, metric='next_line/acc',
         lower_is_better=False, same=True)))


def arm_config(arm: str, llm: str, seed: int, overrides: dict):
  """configs/ablations.py:llm for one arm: from the LLM, or its shape (read from it) from
  scratch."""
  config = study.config_file('ablations', 'llm', overrides=overrides)
  config.seed = seed
  config.model.init_from = llm
  config.train.finetune = FINETUNE.get(arm, 'full')
  if arm == 'llm_scratch':
    config = backbone.resolve_auto(config)  # the LLM's shape, context and vocabulary, written out
    config.model.init_from = ''
  return config


def llm_itself(out: str, llm: str, overrides: dict) -> dict:
  """The text figures of the LLM itself, measured as the arms' evaluation measures them."""
  path = os.path.join(out, f'{ORIGINAL}.json')
  if files.exists(path):
    return files.read_json(path)
  restored = workdir_lib.for_converted_llm(llm, arm_config('llm', llm, 0, overrides))
  setup, params = restored.setup, restored.params
  metrics = {'text/perplexity': math.exp(default_eval.heldout_text_loss(setup, params))}
  metrics.update(text_tasks.metrics_of(text_tasks.score(setup, params, ['next_line'])))
  files.write_text(path, json.dumps(metrics, indent=1))
  return metrics


def run(out: str, seeds: int, llm: str, overrides: dict | None = None,
        arms: tuple[str, ...] = ARMS) -> dict:
  """The arms for seeds 0..seeds-1 and the LLM itself; writes and returns the summary.
  overrides ({'section.key': value}) apply to every run (the tests shrink the budget)."""
  overrides = overrides or {}
  files.makedirs(out)
  start = time.monotonic()
  results = {ORIGINAL: [llm_itself(out, llm, overrides)]}
  for arm in arms:
    results[arm] = [study.run_once(os.path.join(out, f'{arm}_seed{seed}'),
                                   arm_config(arm, llm, seed, overrides),
                                   llm if arm == 'llm_scratch' else '')
                    for seed in range(seeds)]
  summary = study.summarize(results, FINDINGS)
  summary.update(seeds=seeds, llm=llm, overrides=overrides,
                 minutes=(time.monotonic() - start) / 60)
  study.write_summary(out, 'llm_study', summary, study.markdown(summary, seeds))
  return summary


def command(out: str, seeds: int, llm: str) -> str:
  """`study --llm=DIR`: the study in `out`; its markdown table."""
  study.check_seeds(seeds)
  converted.read_meta(llm)  # a converted LLM directory, or one sentence saying what is expected
  return study.markdown(run(out, seeds, llm), seeds).rstrip('\n')
