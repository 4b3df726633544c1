"""`study --llm`: both arms and the LLM itself, in miniature, on a small converted LLM."""

import json
import math

import numpy as np
import pytest

from monoformer_jax.base.errors import UserError
from monoformer_jax.convert import commands
from monoformer_jax.run import workdir as workdir_lib
from monoformer_jax.tools import llm_study


TINY = {'train.num_steps': 2, 'sample.steps': 2, 'eval.samples_per_class': 1,
        'eval.text_questions': 4, 'eval.text_batches': 1, 'train.log_every': 1,
        'data.image_batch_size': 4, 'data.text_batch_size': 2,
        'data.prompt_len': 32}  # the small tokenizer spells the prompts in many pieces


@pytest.mark.slow
def test_a_tiny_llm_study_compares_the_arms_and_the_llm_itself(tmp_path):
  hf, llm, out = (str(tmp_path / n) for n in ('hf', 'llm', 'study'))
  commands.run('synthetic-llama', dst=hf, shape='32,2,4,2,64,512')
  commands.run('hf', hf, llm)
  arms = ('llm', 'llm_scratch')  # the frozen arms' modes are tested in test_finetune.py
  summary = llm_study.run(out, 1, llm, overrides=TINY, arms=arms)
  assert json.loads(open(f'{out}/llm_study.json').read()) == json.loads(json.dumps(summary))
  variants = summary['variants']
  assert set(variants[llm_study.ORIGINAL]) == set(llm_study.TEXT)  # no images: text figures
  for arm in arms:
    assert set(variants[arm]) >= {'fd/overall', 'accuracy/overall', *llm_study.TEXT}
    assert all(math.isfinite(m['mean']) for m in variants[arm].values())
  assert len(summary['findings']) == 6  # those between the arms run and the LLM
  for arm, mode in (('llm_lora', 'lora'), ('llm_frozen_text', 'frozen_text')):
    config = llm_study.arm_config(arm, llm, 1, TINY)
    assert (config.train.finetune, config.model.init_from, config.seed) == (mode, llm, 1)
  table = open(f'{out}/llm_study.md').read()
  assert '| llm_itself | - | - |' in table and table.count('\n| llm_scratch |') == 1

  # The arms differ in their start alone: one shape and tokenizer, the LLM's weights in one.
  runs = {arm: workdir_lib.for_inference(f'{out}/{arm}_seed0', use_ema=False)
          for arm in arms}
  assert runs['llm'].setup.model.backbone == runs['llm_scratch'].setup.model.backbone
  assert runs['llm'].setup.tok.vocab_size == runs['llm_scratch'].setup.tok.vocab_size
  itself = workdir_lib.for_converted_llm(llm).params['decoder']['layers']['mlp']['up_proj']
  for arm, near in (('llm', True), ('llm_scratch', False)):
    got = np.asarray(runs[arm].params['decoder']['layers']['mlp']['up_proj']['kernel'])
    assert np.allclose(got, itself['kernel'], atol=1e-2) == near, arm  # two small steps away

  again = llm_study.run(out, 1, llm, overrides=TINY, arms=arms)
  assert again['variants'] == summary['variants']  # finished runs are read, not redone
  with pytest.raises(UserError, match=r'is not a converted llama directory \(no model\.json\)'):
    llm_study.command(out, 1, hf)
