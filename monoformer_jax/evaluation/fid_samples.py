"""FID samples: N prompted samples of a workdir's model, written in the ADM evaluator's .npz format
or measured against a reference (FID-N) without being written.

Sample i is prompted with prompts[i mod P]: by default the class prompts (class i mod C, C classes:
1,000 for ImageNet, 10 for digits, with eval.prompt_template as the official sampler does), or the
lines of a prompt file. Each global batch is split over the devices of every host; latents are
decoded by the VAE on the same devices. A written file is streamed by process 0 into `arr_0` on its
local disk (then renamed into place, or uploaded as one object), so host memory holds one batch, not
all N images.
Dimension letters: N samples, B global batch, H/W image.
"""

import math
import os
import tempfile
import zipfile
from typing import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from monoformer_jax.base import files, images as images_lib, sharding
from monoformer_jax.base.errors import UserError
from monoformer_jax.data import common, pipeline
from monoformer_jax.evaluation import fid
from monoformer_jax.generation import sampling
from monoformer_jax.nn import inception, vae


def class_prompts(setup) -> list[str]:
  """eval.prompt_template of every class of a class-conditional source."""
  if setup.settings.image_source == pipeline.ImageSource.T2I_JSONL:
    raise UserError('data.image_source \'t2i_jsonl\' has no classes to prompt; pass '
                    '--prompt_file=FILE with the prompts, one per line.')
  names = pipeline.class_names(setup.settings.image_source)
  return [setup.config.eval.prompt_template.format(name=n) for n in names]


def file_prompts(path: str) -> list[str]:
  """The non-empty lines of a prompt file."""
  if not files.isfile(path):
    raise UserError(f'--prompt_file {path} does not exist.')
  prompts = [line.strip() for line in common.text_file(path) if line.strip()]
  if not prompts:
    raise UserError(f'--prompt_file {path} has no prompt; expected one per line.')
  return prompts


def sample_batches(setup, params, prompts: list[str], num: int, global_batch: int,
                   spec: sampling.ImageSampling, key: jax.Array,
                   vae_dir: str) -> Iterator[np.ndarray]:
  """uint8 RGB batches [<= B, H, W, 3] of num samples, each whole on every process; latents
  are decoded by the VAE in vae_dir ('' for pixel models)."""
  config, tok, model, layout = setup.config, setup.tok, setup.model, setup.layout
  fid.check_global_batch(global_batch, layout)
  if num < 1:
    raise UserError(f'--num is {num}; expected at least 1.')
  table = [tok.image_prompt(p, config.data.prompt_len) for p in prompts]
  null = tok.image_prompt('', config.data.prompt_len)
  sampler = sampling.make_image_sampler(model, spec)
  decode = vae.pixel_decoder(vae_dir, layout) if vae_dir else None
  per_host = global_batch // jax.process_count()
  with sharding.activate(layout):
    for b in range(math.ceil(num / global_batch)):
      which = (b * global_batch + np.arange(global_batch)) % len(table)
      rows = which[jax.process_index() * per_host:(jax.process_index() + 1) * per_host]
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
      images = images_lib.to_uint8(multihost_utils.process_allgather(images, tiled=True))
      if images.shape[-1] == 1:  # grayscale: the evaluators expect RGB
        images = np.repeat(images, 3, axis=-1)
      yield images[:min(global_batch, num - b * global_batch)]


def write(batches: Iterator[np.ndarray], path: str, num: int) -> None:
  """Streams the batches of num samples into path, an .npz with arr_0 uint8 [N, H, W, 3]."""
  if not path.endswith('.npz'):
    raise UserError(f'--fid_npz is {path}; expected a .npz path.')
  directory = os.path.dirname(files.absolute(path))
  if files.is_remote(directory):
    files.makedirs(directory)  # checks the bucket before sampling: it has no directories
  elif not files.isdir(directory):
    raise UserError(f'output directory {directory} does not exist.')
  leader = jax.process_index() == 0
  out, done = None, 0
  # local: the array is assembled on disk, beside a local output (an interrupted run leaves none)
  with tempfile.TemporaryDirectory(dir=None if files.is_remote(path) else directory) as scratch:
    npy_path = os.path.join(scratch, 'arr_0.npy')
    for images in batches:
      if leader:
        if out is None:
          out = np.lib.format.open_memmap(npy_path, mode='w+', dtype=np.uint8,
                                          shape=(num,) + images.shape[1:])
        out[done:done + len(images)] = images
      done += len(images)
    if leader:
      out.flush()
      del out
      with files.atomic_file(path) as tmp, zipfile.ZipFile(tmp, 'w', zipfile.ZIP_STORED) as z:
        z.write(npy_path, 'arr_0.npy')
  multihost_utils.sync_global_devices('fid samples written')


def encoder(inception_dir: str, layout: sharding.Layout, global_batch: int) -> fid.Encoder:
  """The converted Inception of inception_dir on the layout's devices, batch split over them."""
  features = inception.feature_fn(inception_dir, (sharding.replicated(layout),
                                                  sharding.batch_sharding(layout)))
  return fid.Encoder(features, layout, global_batch)
