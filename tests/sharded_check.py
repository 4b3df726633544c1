"""Run by base/test_sharding.py in a process with 8 forced CPU devices.

For each mesh: three steps of each kind from the same init and batches as the
1-device run; reports the largest relative differences of losses and params
and how the params are laid out. Prints one JSON object.
"""

import json
import os
import sys

import flax.linen as nn
import jax
import numpy as np


sys.path.insert(0, os.path.dirname(__file__))
from helpers import (image_batches, signal_params,  # pylint: disable=wrong-import-position
                     step_config, text_batches, tiny_config)

from monoformer_jax.base import sharding  # pylint: disable=wrong-import-position
from monoformer_jax.data.tokenizer import SentencePiece  # pylint: disable=wrong-import-position
from monoformer_jax.nn import model as model_lib  # pylint: disable=wrong-import-position
from monoformer_jax.run import settings as settings_lib  # pylint: disable=wrong-import-position
from monoformer_jax.training import checkpoint, steps  # pylint: disable=wrong-import-position
from monoformer_jax.training.finetune import (Finetune,  # pylint: disable=wrong-import-position
                                              FinetuneSpec)
from monoformer_jax.training.steps import StepKind  # pylint: disable=wrong-import-position


# All three axes at once (each alone is what this mesh does along it; the checkpoint's move
# to one device and the samplers use it too), and the official objective: joint steps of two
# microbatches with the prompts' cross-entropy, fsdp at its widest beside data.
MESHES = {
    'data2_fsdp2_tensor2': dict(data=2, fsdp=2, tensor=2),
    'data2_fsdp4_joint': dict(data=2, fsdp=4, tensor=1, joint=True),
}
ALL_AXES = 'data2_fsdp2_tensor2'


def make_config(mesh: dict):
  mesh = dict(mesh)
  joint = mesh.pop('joint', False)
  config = tiny_config()
  config.data.text_batch_size = 8
  if joint:
    config.train.objective, config.train.grad_accum, config.train.prompt_lm_loss = 'joint', 2, True
    config.data.text_batch_size = config.data.image_batch_size = 16
  config.mesh.update(mesh)
  return config


def run(config, workdir, devices, num_steps=3, state=None, finetune=FinetuneSpec()):
  tok = SentencePiece(os.path.join(workdir, 'tokenizer.model'))
  model = settings_lib.build_model(config, finetune)
  tx = steps.make_optimizer(config.optim, config.train.num_steps)
  layout = sharding.make_layout(config.mesh, devices)
  _, shardings = steps.abstract_state(model, tx, layout, finetune)
  frozen = ()
  if finetune.frozen:  # the backbone (random here) frozen, placed as the model's parameters
    # Adapters mid-training (B not zero): from zero, Adam's first updates of A are
    # lr * sign(g) of gradients of rounding size, whose signs any two summation orders flip.
    params = nn.unbox(model_lib.init_params(model, jax.random.key(0)))
    noise = iter(jax.random.split(jax.random.key(2), len(jax.tree.leaves(params))))
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: v + 0.02 * jax.random.normal(next(noise), v.shape)
        if 'lora_b' in jax.tree_util.keystr(path) else v, params)
    trainable, backbone = finetune.split(params)
    placed = finetune.split(steps.abstract_params(model, layout))[1]
    frozen = (jax.device_put(backbone, jax.tree.map(lambda a: a.sharding, placed)),)
    state = steps.fresh_state(jax.device_put(trainable, shardings.params), tx, shardings)
  elif state is None:
    state = steps.init_state(model, tx, layout, jax.random.key(0))
  fns = steps.jit_steps(model, tx, step_config(config, tok.im_end_id), layout, shardings,
                        jax.tree.map(lambda a: a.sharding, frozen[0]) if frozen else None)
  iters = {StepKind.AR: text_batches(config, tok), StepKind.DIFFUSION: image_batches(config, tok)}
  losses = []
  with sharding.activate(layout):
    joint = StepKind.JOINT in fns
    for step in range(num_steps if joint else num_steps * 2):  # a joint step does both kinds
      if joint:
        kind, batch = StepKind.JOINT, dict(text=next(iters[StepKind.AR]),
                                           image=next(iters[StepKind.DIFFUSION]))
        batch['image'].pop('label', None)
      else:
        kind = (StepKind.AR, StepKind.DIFFUSION)[step % 2]
        batch = next(iters[kind])
        batch.pop('label', None)
      state, metrics = fns[kind](state, sharding.global_batch(batch, layout),
                                 jax.random.fold_in(jax.random.key(1), step), *frozen)
      losses.append(float(metrics['loss']))
  return state, losses, model, tx, layout


def rel(a, b):
  """||a - b|| / ||b|| (a scalar or a whole parameter)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-30))


def worst(tree_a, tree_b):
  """(largest relative difference over the leaves, its path)."""
  flat_a = jax.tree_util.tree_flatten_with_path(jax.device_get(tree_a))[0]
  flat_b = jax.tree.leaves(jax.device_get(tree_b))
  return max((rel(a, b), jax.tree_util.keystr(path)) for (path, a), b in zip(flat_a, flat_b))


def compare(workdir):
  """{mesh: its report}, and {mesh: its final state}."""
  devices = jax.devices()
  report, references, states = {}, {}, {}
  for name, mesh in MESHES.items():
    config = make_config(mesh)
    kind = (config.model.size, config.train.objective)
    if kind not in references:  # one 1-device run per model size and objective
      one = make_config(dict(data=1, fsdp=1, tensor=1, joint=mesh.get('joint', False)))
      one.model.size = config.model.size
      references[kind] = run(one, workdir, devices[:1])[:2]
    ref_state, ref_losses = references[kind]
    state, losses, _, _, _ = run(config, workdir, devices)
    states[name] = state
    embed = state.params['embed_tokens']['embedding']
    q = state.params['decoder']['layers']['self_attn']['q_proj']['kernel']
    mu = state.opt_state[1][0].mu['embed_tokens']['embedding']
    report[name] = dict(
        loss=max(rel(a, b) for a, b in zip(losses, ref_losses)),
        params=worst(state.params, ref_state.params),
        ema=worst(state.ema_params, ref_state.ema_params),
        embed_spec=[str(a) for a in embed.sharding.spec],
        embed_shard=list(embed.sharding.shard_shape(embed.shape)),
        q_spec=[str(a) for a in q.sharding.spec],
        q_shard=list(q.sharding.shard_shape(q.shape)),
        mu_shard=list(mu.sharding.shard_shape(mu.shape)),
        full_embed=list(embed.shape), full_q=list(q.shape))
  return report, states


def lora_under_mesh(workdir):
  """train.finetune 'lora' (adapters on every projection, the backbone frozen) under all three
  axes vs 1 device; the adapters' layout."""
  spec = FinetuneSpec(Finetune.LORA, rank=4)
  one = make_config(dict(data=1, fsdp=1, tensor=1))
  ref_state, ref_losses = run(one, workdir, jax.devices()[:1], 2, finetune=spec)[:2]
  state, losses = run(make_config(MESHES[ALL_AXES]), workdir, jax.devices(), 2, finetune=spec)[:2]
  attn = state.params['decoder']['layers']['self_attn']
  return dict(loss=max(rel(a, b) for a, b in zip(losses, ref_losses)),
              params=worst(state.params, ref_state.params),
              trained=float(np.abs(jax.device_get(attn['q_proj']['kernel_lora_b'])).max()),
              specs={f'{name}_{part}': [str(a) for a in
                                        attn[name][f'kernel_lora_{part}'].sharding.spec]
                     for name in ('q_proj', 'o_proj') for part in 'ab'})


def samplers_under_mesh(workdir):
  """The image sampler and KV-cached decoding with params sharded over all axes vs 1 device."""
  from monoformer_jax import diffusion  # pylint: disable=g-import-not-at-top
  from monoformer_jax.generation import sampling  # pylint: disable=g-import-not-at-top
  out = {}
  for name, devices, mesh in (('mesh', jax.devices(), MESHES[ALL_AXES]),
                              ('one', jax.devices()[:1], dict(data=1, fsdp=1, tensor=1))):
    config = make_config(mesh)
    tok = SentencePiece(os.path.join(workdir, 'tokenizer.model'))
    model = settings_lib.build_model(config)
    tx = steps.make_optimizer(config.optim, 1)
    layout = sharding.make_layout(config.mesh, devices)
    _, shardings = steps.abstract_state(model, tx, layout)
    params = jax.device_put(signal_params(model), shardings.params)
    spec = sampling.ImageSampling(diffusion.Sampler.DDPM, steps=3,
                                  guidance=diffusion.Guidance(2.0))
    with sharding.activate(layout):
      images = sampling.images_for_prompts(model, params, tok, ['a handwritten digit two'] * 8,
                                           config.data.prompt_len, spec, jax.random.key(4))
      tokens, valid = tok.text_prompt('The', 8)
      text = sampling.generate(model, params, np.stack([tokens] * 8), np.stack([valid] * 8),
                               jax.random.key(5), max_tokens=4, temperature=0.0, top_k=0,
                               top_p=1.0, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    out[name] = (images, np.asarray(jax.device_get(text)))
  return dict(images=rel(out['mesh'][0], out['one'][0]),
              same_text=bool((out['mesh'][1] == out['one'][1]).all()))


def across_meshes(workdir, state):
  """Save the state trained under all three axes, restore it on 1 device and continue; compare
  with continuing under the mesh."""
  config = make_config(MESHES[ALL_AXES])
  model = settings_lib.build_model(config)
  tx = steps.make_optimizer(config.optim, config.train.num_steps)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'mesh_switch'))
  ckpt.save(3, state, {}, config)
  ckpt.close()
  _, continued, _, _, _ = run(config, workdir, jax.devices(), state=state)

  one = make_config(dict(data=1, fsdp=1, tensor=1))
  layout = sharding.make_layout(one.mesh, jax.devices()[:1])
  abstract, _ = steps.abstract_state(model, tx, layout)
  restored, _ = checkpoint.Checkpointer(os.path.join(workdir, 'mesh_switch')).restore(3, abstract)
  assert restored.params['embed_tokens']['embedding'].sharding.num_devices == 1
  _, resumed, _, _, _ = run(one, workdir, jax.devices()[:1], state=restored)
  return dict(loss=max(rel(a, b) for a, b in zip(resumed, continued)), steps=len(resumed))


if __name__ == '__main__':
  assert jax.device_count() == 8, jax.devices()
  meshes, states = compare(sys.argv[1])
  print(json.dumps({'meshes': meshes, 'restore': across_meshes(sys.argv[1], states[ALL_AXES]),
                    'samplers': samplers_under_mesh(sys.argv[1]),
                    'lora': lora_under_mesh(sys.argv[1])}))
