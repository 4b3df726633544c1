"""`extract_latents`: the SD-VAE posterior of every training image, in resumable shards.

Encodes data.latents_source (ImageNet with labels, or text-to-image pictures with prompts) into the
directory layout `data/latents.py` reads, local or in a bucket: shard s is written by host s mod
(number of hosts) on that host's devices into a local file, which becomes the shard (renamed, or
uploaded as one object) when complete, so a rerun skips finished shards and redoes only the rest;
`latents.json` is written last.
Dimension letters: B batch, R resolution, h/w latent grid, Z latent channels.
"""

import json
import math
import os

import flax.serialization
import jax
import ml_collections
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from jax.experimental import multihost_utils

from monoformer_jax.base import files
from monoformer_jax.base.errors import UserError
from monoformer_jax.data import common, imagenet, latents, t2i
from monoformer_jax.data.pipeline import LatentsSource
from monoformer_jax.nn import vae
from monoformer_jax.run import settings


def _encoder(vae_dir: str):
  """fn(images [B, R, R, 3] in [-1, 1]) -> host (mean, std) [B, h, w, Z], on this host's
  devices; and the number of those devices."""
  model, params = vae.load_vae(vae_dir)
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ('data',))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = jax.device_put(params, replicated)
  moments = jax.jit(lambda p, x: model.apply({'params': p}, x, method=vae.AutoencoderKL.moments),
                    in_shardings=(replicated, rows), out_shardings=(rows, rows))
  encode = lambda images: jax.device_get(moments(params, jax.device_put(images, rows)))  # noqa: E731
  return encode, mesh.size


def pictures(data: ml_collections.ConfigDict, source: LatentsSource):
  """What is encoded: the training images of data.latents_source."""
  if source == LatentsSource.IMAGENET:
    return imagenet.data_source(data)
  return t2i.PictureFiles(data)


def _write_shard(path: str, source, indices: range, encode, batch_size: int, resolution: int):
  writer = ArrayRecordWriter(path, 'group_size:1')
  for start in range(0, len(indices), batch_size):
    chunk = [source[i] for i in indices[start:start + batch_size]]
    chunk = [r for r in chunk if r is not None]  # unreadable pictures, when skipping is asked
    if not chunk:
      continue
    images = common.to_unit_range(np.stack([common.center_crop(np.asarray(r['image']), resolution)
                                            for r in chunk]))
    padded = np.pad(images, [(0, batch_size - len(chunk)), (0, 0), (0, 0), (0, 0)])
    mean, std = encode(padded)
    for k, record in enumerate(chunk):
      meta = (dict(prompt=record['prompt']) if 'prompt' in record
              else dict(label=np.int32(record['label'])))
      writer.write(flax.serialization.msgpack_serialize(dict(mean=mean[k], std=std[k], **meta)))
  writer.close()


def extract(data: ml_collections.ConfigDict, source_kind: LatentsSource, vae_dir: str,
            out_dir: str, source=None, batch_size: int = 64) -> dict:
  """Encodes the pictures (default: `pictures(data, source_kind)`) into out_dir; returns
  latents.json's content."""
  source = pictures(data, source_kind) if source is None else source
  resolution, per_shard = data.image_resolution, data.latents_shard_size
  count = len(source)
  num_shards = math.ceil(count / per_shard)
  files.makedirs(out_dir)
  encode, num_devices = _encoder(vae_dir)
  batch_size = math.ceil(batch_size / num_devices) * num_devices
  for shard in range(jax.process_index(), num_shards, jax.process_count()):
    path = latents.shard_path(out_dir, shard, num_shards)
    if files.exists(path):
      continue  # finished by an earlier run
    with files.atomic_file(path) as tmp:
      _write_shard(tmp, source, range(shard * per_shard, min(count, (shard + 1) * per_shard)),
                   encode, batch_size, resolution)
  multihost_utils.sync_global_devices('latent shards written')
  shape = latents.read_record(latents.shard_path(out_dir, 0, num_shards), 0)['mean'].shape
  info = dict(source_records=count, num_shards=num_shards, records_per_shard=per_shard,
              resolution=resolution, latent_shape=list(shape), latent_scale=vae.LATENT_SCALE,
              vae=files.absolute(vae_dir), source=source_kind.value)
  if jax.process_index() == 0:
    files.write_text(os.path.join(out_dir, latents.INFO_FILE), json.dumps(info, indent=1))
  return info


def command(config: ml_collections.ConfigDict, vae_dir: str, out_dir: str) -> str:
  """`extract_latents`: the config's pictures encoded by the VAE in vae_dir into out_dir."""
  if not vae_dir or not files.isdir(vae_dir):
    raise UserError(f'--vae is {vae_dir!r}; expected a converted VAE directory (convert vae).')
  if not out_dir:
    raise UserError('--dst is required: the directory for the latent shards.')
  info = extract(config.data, settings.validate(config).latents_source, vae_dir, out_dir)
  return (f'wrote the latents of {info["source_records"]} source records, shape '
          f'{info["latent_shape"]}, in {info["num_shards"]} shards to {out_dir}')
