"""Pre-extracted SD-VAE latents: `extract_latents` writes them, a grain source reads them.

A latents directory holds ArrayRecord shards `latents-SSSSS-of-NNNNN.array_record`
(one msgpack record per image: the posterior `mean` and `std` [h, w, Z] float32,
unscaled, and the `label`) and `latents.json` (count, shapes, where they came
from). Shard s is written by host s mod (number of hosts) under a temporary
name and renamed when complete, so a rerun skips finished shards and redoes
only the rest. Training draws z = (mean + std * noise) x LATENT_SCALE, a sample
of the posterior, or the scaled mean when data.latents_from_posterior is False.
Dimension letters: B batch, R resolution, h/w latent grid, Z latent channels.
"""

import json
import math
import os
from typing import Any

import flax.serialization
import grain
import jax
import ml_collections
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from jax.experimental import multihost_utils

from monoformer_jax import imagenet
from monoformer_jax import tokenizer as tokenizer_lib
from monoformer_jax.convert import vae as convert_vae
from monoformer_jax.errors import UserError
from monoformer_jax.vae import LATENT_SCALE, AutoencoderKL

INFO_FILE = 'latents.json'


def shard_path(directory: str, shard: int, num_shards: int) -> str:
  return os.path.join(directory, f'latents-{shard:05d}-of-{num_shards:05d}.array_record')


def _encoder(vae_dir: str):
  """fn(uint8-derived float images [B, R, R, 3]) -> (mean, std) [B, h, w, Z] on this host's devices."""
  model, params = convert_vae.load_vae(vae_dir)
  devices = jax.local_devices()
  mesh = jax.sharding.Mesh(np.array(devices), ('data',))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = jax.device_put(params, replicated)
  moments = jax.jit(lambda p, x: model.apply({'params': p}, x, method=AutoencoderKL.moments),
                    in_shardings=(replicated, rows), out_shardings=(rows, rows))
  return lambda images: jax.device_get(moments(params, jax.device_put(images, rows))), len(devices)


def extract(config: ml_collections.ConfigDict, vae_dir: str, out_dir: str, source=None,
            batch_size: int = 64) -> dict:
  """Encodes the image source's train split into out_dir; returns latents.json's content."""
  source = imagenet.data_source(config) if source is None else source
  resolution, per_shard = config.data.image_resolution, config.data.latents_shard_size
  count = len(source)
  num_shards = math.ceil(count / per_shard)
  os.makedirs(out_dir, exist_ok=True)
  encode, num_devices = _encoder(vae_dir)
  batch_size = math.ceil(batch_size / num_devices) * num_devices
  for shard in range(jax.process_index(), num_shards, jax.process_count()):
    path = shard_path(out_dir, shard, num_shards)
    if os.path.exists(path):
      continue  # finished by an earlier run
    writer = ArrayRecordWriter(path + '.tmp', 'group_size:1')
    indices = range(shard * per_shard, min(count, (shard + 1) * per_shard))
    for start in range(0, len(indices), batch_size):
      chunk = [source[i] for i in indices[start:start + batch_size]]
      images = np.stack([imagenet.center_crop(np.asarray(r['image']), resolution) for r in chunk])
      images = images.astype(np.float32) / 127.5 - 1.0
      padded = np.pad(images, [(0, batch_size - len(chunk)), (0, 0), (0, 0), (0, 0)])
      mean, std = encode(padded)
      for k, record in enumerate(chunk):
        writer.write(flax.serialization.msgpack_serialize(
            dict(mean=mean[k], std=std[k], label=np.int32(record['label']))))
    writer.close()
    os.replace(path + '.tmp', path)
  multihost_utils.sync_global_devices('latent shards written')
  latent = _read(shard_path(out_dir, 0, num_shards), 0)['mean'].shape
  info = dict(count=count, num_shards=num_shards, records_per_shard=per_shard,
              resolution=resolution, latent_shape=list(latent), vae=os.path.abspath(vae_dir),
              source=config.data.image_source)
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, INFO_FILE + '.tmp'), 'w') as f:
      json.dump(info, f, indent=1)
    os.replace(os.path.join(out_dir, INFO_FILE + '.tmp'), os.path.join(out_dir, INFO_FILE))
  return info


def _decode(record: bytes) -> dict[str, Any]:
  return flax.serialization.msgpack_restore(record)


def _read(path: str, index: int) -> dict[str, Any]:
  return _decode(grain.sources.ArrayRecordDataSource([path])[index])


def open_source(config: ml_collections.ConfigDict) -> grain.sources.ArrayRecordDataSource:
  """The records of data.latents_dir, after checking they fit the model's image shape."""
  directory = config.data.latents_dir
  info_path = os.path.join(directory, INFO_FILE)
  if not os.path.isfile(info_path):
    raise UserError(f'config key data.latents_dir ({directory!r}) has no {INFO_FILE}; expected '
                    'the output of a finished `extract_latents`.')
  with open(info_path) as f:
    info = json.load(f)
  expected = list(config.model.image_size) + [config.model.image_channels]
  if info['latent_shape'] != expected:
    raise UserError(f'{directory} holds latents of shape {info["latent_shape"]}; config keys '
                    f'model.image_size and model.image_channels expect {expected}.')
  paths = [shard_path(directory, s, info['num_shards']) for s in range(info['num_shards'])]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise UserError(f'{len(missing)} latent shards are missing, e.g. {missing[0]}; rerun '
                    '`extract_latents` to finish them.')
  return grain.sources.ArrayRecordDataSource(paths)


class PromptedLatent(grain.transforms.RandomMap):
  """Record bytes -> {'tokens' [P], 'valid' [P], 'image' [h, w, Z] scaled latents, 'label'}."""

  def __init__(self, prompt_table, null_prompt, cfg_dropout: float, from_posterior: bool):
    self.prompt_table, self.null_prompt = prompt_table, null_prompt
    self.cfg_dropout, self.from_posterior = cfg_dropout, from_posterior

  def random_map(self, record: bytes, rng: np.random.Generator) -> dict[str, Any]:
    item = _decode(record)
    z = item['mean']
    if self.from_posterior:
      z = z + item['std'] * rng.standard_normal(z.shape, np.float32)
    label = int(item['label'])
    if rng.random() < self.cfg_dropout:
      tokens, valid = self.null_prompt
    else:
      k = rng.integers(self.prompt_table[0].shape[1])
      tokens, valid = self.prompt_table[0][label, k], self.prompt_table[1][label, k]
    return dict(tokens=tokens, valid=valid, image=(z * LATENT_SCALE).astype(np.float32),
                label=np.int32(label))


def examples(config: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer) -> grain.MapDataset:
  """Infinite shuffled prompted latents (not yet batched)."""
  transform = PromptedLatent(
      imagenet.prompt_table(tok, config.data.templates, config.data.prompt_len),
      tok.image_prompt('', config.data.prompt_len), config.data.cfg_dropout,
      config.data.latents_from_posterior)
  ds = grain.MapDataset.source(open_source(config)).shuffle(seed=config.seed).repeat()
  return ds.random_map(transform, seed=config.seed)
