"""`convert export-peft`: the LoRA adapters of a train.finetune 'lora' (or 'qlora') run on the
text backbone, as the PEFT library loads them onto the HF LLM they were trained on (the one
`convert hf` read for model.init_from; a qlora run's were trained on its quantized kernels).

PEFT keeps a Linear's adapter as lora_A [r, in] and lora_B [out, r] and adds
x A^T B^T alpha / r; ours (qwix's) are A [L, in, r] and B [L, r, out] over the stacked blocks,
with the kernel's input and output axes flattened in HF's order, so each block's pair is a
transpose away. MonoFormer's own modules, which text never reaches, are not part of it.
"""

import json
import os

import numpy as np

from monoformer_jax.base import files
from monoformer_jax.base.errors import UserError
from monoformer_jax.convert import official_export, safetensors_io
from monoformer_jax.nn import converted
from monoformer_jax.run import workdir as workdir_lib
from monoformer_jax.training.finetune import ADAPTER_SUFFIXES, TARGETS

CONFIG, WEIGHTS = 'adapter_config.json', 'adapter_model.safetensors'


def export_peft(src: str, dst: str, use_ema: bool) -> None:
  """Writes dst (which must not exist) from the workdir src's newest restorable checkpoint."""
  restored = workdir_lib.for_inference(src, use_ema, params=False)
  setup, spec = restored.setup, restored.setup.settings.finetune
  if not spec.adapters:
    raise UserError(f'convert export-peft writes LoRA adapters, and {src} has none (it was '
                    f'trained with train.finetune {spec.mode.value!r}, not \'lora\' or '
                    '\'qlora\'); convert export-llama writes its weights.')
  dtype = official_export.stored_dtype(src)
  tensors = []
  with workdir_lib.parameter_reader(setup, src, restored.step, dtype, use_ema) as param:
    for target in spec.targets:
      group = TARGETS[target]
      a, b = (param('decoder', 'layers', group, target, 'kernel' + s) for s in ADAPTER_SUFFIXES)
      for i in range(len(a)):
        name = f'base_model.model.model.layers.{i}.{group}.{target}'
        tensors += [(f'{name}.lora_A.weight', np.ascontiguousarray(a[i].T)),
                    (f'{name}.lora_B.weight', np.ascontiguousarray(b[i].T))]
  source = converted.source_meta(src).get('source', '')  # the workdir's copy: the LLM may be gone
  config = dict(peft_type='LORA', task_type='CAUSAL_LM', base_model_name_or_path=source,
                r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                target_modules=list(spec.targets), bias='none', fan_in_fan_out=False,
                inference_mode=True, use_rslora=False, use_dora=False, init_lora_weights=True,
                modules_to_save=None, layers_to_transform=None)
  with files.atomic_directory(dst, last=CONFIG) as tmp:
    safetensors_io.write(os.path.join(tmp, WEIGHTS), tensors, {'format': 'pt'})
    files.write_text(os.path.join(tmp, CONFIG), json.dumps(config, indent=1))
