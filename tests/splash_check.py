"""Splash attention against the XLA path, printed as JSON; run by nn/test_splash.py.

Run with 4 forced CPU devices: on one device, and under a data 2 x tensor 2 mesh of all four.
"""

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np


sys.path.insert(0, os.path.dirname(__file__))
from helpers import signal_params, tiny_config  # pylint: disable=wrong-import-position

from monoformer_jax.base import sharding  # pylint: disable=wrong-import-position
from monoformer_jax.nn.layers import (AttentionImpl,  # pylint: disable=wrong-import-position
                                      BackboneConfig, MaskType)
from monoformer_jax.nn.model import ImageConfig, MonoFormer  # pylint: disable=wrong-import-position


# 110 prompt tokens + time token + 16 patches + <im_end> = 128: one splash tile.
XLA = MonoFormer(BackboneConfig(vocab_size=64, width=32, depth=2, num_heads=4, num_kv_heads=2,
                                mlp_dim=48), ImageConfig(patch_size=2, height=8, width=8,
                                                         channels=1))
SPLASH = XLA.clone(backbone=dataclasses.replace(XLA.backbone, attention=AttentionImpl.SPLASH))


def compare(devices: list) -> dict:
  key = jax.random.key(0)
  prompt = jax.random.randint(key, (4, 110), 1, 64)
  valid = jnp.ones(prompt.shape, bool).at[0, :30].set(False)  # a left-padded row
  text = jax.random.randint(jax.random.key(1), (4, 128), 1, 64)
  text_valid = jnp.ones(text.shape, bool).at[1, :7].set(False)
  image = jax.random.normal(jax.random.key(2), (4, 8, 8, 1))
  t = jnp.array([3, 300, 600, 999])
  suffix = jnp.full((4, 1), 2)
  params = signal_params(XLA, noise=0.05)

  def losses(model, params):
    img = model.apply({'params': params}, prompt, valid, mask_type=MaskType.HYBRID, image=image,
                      t=t, suffix=suffix).image
    logits = model.apply({'params': params}, text, text_valid, mask_type=MaskType.CAUSAL).logits
    return (img**2).mean() + (logits**2 * text_valid[..., None]).mean(), (img, logits)

  mesh_config = tiny_config().mesh
  mesh_config.update(dict(data=2, fsdp=1, tensor=2) if len(devices) > 1 else
                     dict(data=1, fsdp=1, tensor=1))
  layout = sharding.make_layout(mesh_config, devices)
  results = {}
  with sharding.activate(layout):
    for name, model in (('xla', XLA), ('splash', SPLASH)):
      fn = jax.jit(jax.value_and_grad(lambda p, m=model: losses(m, p), has_aux=True))
      (loss, (img, logits)), grads = fn(params)
      results[name] = (np.asarray(img), np.asarray(logits)[np.asarray(text_valid)],
                       [np.asarray(g) for g in jax.tree.leaves(grads)])
  (xi, xl, xg), (si, sl, sg) = results['xla'], results['splash']
  rel = lambda a, b: float(np.abs(a - b).max() / np.abs(b).max())  # noqa: E731
  return dict(image=rel(si, xi), logits=rel(sl, xl),
              grads=max(rel(a, b) for a, b in zip(sg, xg)), image_scale=float(np.abs(xi).max()))


if __name__ == '__main__':
  assert jax.device_count() == 4, jax.devices()
  print(json.dumps({n: compare(jax.devices()[:n]) for n in (1, 4)}))
