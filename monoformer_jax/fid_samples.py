"""FID sample files: N class-conditional samples in the ADM evaluator's .npz format.

Sample i shows class i mod C (C classes: 1,000 for ImageNet, 10 for digits),
prompted with eval.prompt_template as the official sampler does. Each global
batch is split over the devices of every host; latents are decoded by the VAE
on the same devices; process 0 streams the uint8 images [N, H, W, 3] into
`arr_0` of the .npz (written under a temporary name, renamed when complete), so
host memory holds one batch, not all N images.
"""

import math
import os
import zipfile

import jax
import numpy as np
from jax.experimental import multihost_utils

from monoformer_jax import files, sampling, sharding, vae
from monoformer_jax.data import pipeline
from monoformer_jax.errors import UserError


def write(setup, params, path: str, num: int, global_batch: int, spec: sampling.ImageSampling,
          key: jax.Array, vae_dir: str) -> None:
  """Samples num images with a workdir.Setup's model and writes path (an .npz with arr_0
  uint8 [num, H, W, 3]); latents are decoded by the VAE in vae_dir ('' for pixel models)."""
  config, tok, model, layout = setup.config, setup.tok, setup.model, setup.layout
  devices = layout.mesh.size
  if global_batch < 1 or global_batch % devices or global_batch % jax.process_count():
    raise UserError(f'--fid_batch is {global_batch}; expected a positive multiple of the '
                    f'{devices} devices and {jax.process_count()} hosts.')
  if num < 1:
    raise UserError(f'--num is {num}; expected at least 1.')
  if not path.endswith('.npz'):
    raise UserError(f'--fid_npz is {path}; expected a .npz path.')
  if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
    raise UserError(f'output directory {os.path.dirname(os.path.abspath(path))} does not exist.')
  names = pipeline.class_names(setup.settings.image_source)
  table = [tok.image_prompt(config.eval.prompt_template.format(name=n), config.data.prompt_len)
           for n in names]
  null = tok.image_prompt('', config.data.prompt_len)
  sampler = sampling.make_image_sampler(model, spec)
  decode = vae.pixel_decoder(vae_dir, layout) if vae_dir else None

  per_host = global_batch // jax.process_count()
  leader = jax.process_index() == 0
  npy_path = path + '.npy.tmp'
  out = None
  with sharding.activate(layout):
    for b in range(math.ceil(num / global_batch)):
      labels = (b * global_batch + np.arange(global_batch)) % len(names)
      rows = labels[jax.process_index() * per_host:(jax.process_index() + 1) * per_host]
      local = dict(tokens=np.stack([table[c][0] for c in rows]),
                   valid=np.stack([table[c][1] for c in rows]),
                   null_tokens=np.broadcast_to(null[0], (per_host, len(null[0]))),
                   null_valid=np.broadcast_to(null[1], (per_host, len(null[1]))),
                   suffix=np.full((per_host, 1), tok.im_end_id, np.int32))
      g = sharding.global_batch(local, layout)
      images = sampler(params, g['tokens'], g['valid'], g['null_tokens'], g['null_valid'],
                       g['suffix'], jax.random.fold_in(key, b))
      if decode is not None:
        images = decode(images)
      images = sampling.to_uint8(multihost_utils.process_allgather(images, tiled=True))
      if images.shape[-1] == 1:  # grayscale: the evaluator expects RGB
        images = np.repeat(images, 3, axis=-1)
      take = min(global_batch, num - b * global_batch)
      if leader:
        if out is None:
          out = np.lib.format.open_memmap(npy_path, mode='w+', dtype=np.uint8,
                                          shape=(num,) + images.shape[1:])
        out[b * global_batch:b * global_batch + take] = images[:take]
  if leader:
    out.flush()
    del out
    with files.atomic_file(path) as tmp:
      with zipfile.ZipFile(tmp, 'w', zipfile.ZIP_STORED, allowZip64=True) as z:
        z.write(npy_path, 'arr_0.npy')
    os.remove(npy_path)
  multihost_utils.sync_global_devices('fid samples written')
