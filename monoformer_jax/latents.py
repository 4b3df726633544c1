"""Pre-extracted SD-VAE latents: `extract_latents` writes them, a grain source reads them.

A latents directory holds ArrayRecord shards `latents-SSSSS-of-NNNNN.array_record`
(one msgpack record per image: the posterior `mean` and `std` [h, w, Z] float32,
unscaled, and the `label` or the `prompt`) and `latents.json` (source records,
shapes, origin; pictures skipped as unreadable have no record). Shard s is
written by host s mod (number of hosts) under a temporary name and renamed when
complete, so a rerun skips finished shards and redoes only the rest. Training draws z = (mean + std * noise) x LATENT_SCALE, a sample
of the posterior, or the scaled mean when data.latents_from_posterior is False.
Dimension letters: B batch, R resolution, h/w latent grid, Z latent channels.
"""

import json
import math
import os
from typing import Any, Optional

import flax.serialization
import grain
import jax
import ml_collections
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from jax.experimental import multihost_utils

from monoformer_jax import imagenet, jsonl, sharding
from monoformer_jax import tokenizer as tokenizer_lib
from monoformer_jax.config_lib import LatentsSource
from monoformer_jax.convert import vae as convert_vae
from monoformer_jax.errors import UserError
from monoformer_jax.vae import LATENT_SCALE, AutoencoderKL

INFO_FILE = 'latents.json'


def shard_path(directory: str, shard: int, num_shards: int) -> str:
  return os.path.join(directory, f'latents-{shard:05d}-of-{num_shards:05d}.array_record')


def on_the_fly_encoder(config: ml_collections.ConfigDict, layout):
  """fn(pixels [B, R, R, 3] global array, key) -> scaled posterior samples [B, h, w, Z], on the
  devices of the train mesh (the official on-the-fly path samples the posterior too)."""
  model, params = convert_vae.load_vae(config.model.vae)
  params = jax.device_put(params, sharding.replicated(layout))
  r = config.data.image_resolution
  shape = jax.eval_shape(lambda p, x: model.apply({'params': p}, x, method=AutoencoderKL.moments)[0],
                         params, jax.ShapeDtypeStruct((1, r, r, 3), np.float32)).shape[1:]
  expected = tuple(config.model.image_size) + (config.model.image_channels,)
  if shape != expected:
    raise UserError(f'the VAE in {config.model.vae} turns {r} x {r} pixels into latents of shape '
                    f'{shape}; config keys model.image_size and model.image_channels expect '
                    f'{expected}.')
  rows, replicated = sharding.batch_sharding(layout), sharding.replicated(layout)
  encode = jax.jit(lambda p, x, key: model.apply({'params': p}, x, key, method=AutoencoderKL.encode),
                   in_shardings=(replicated, rows, replicated), out_shardings=rows)
  return lambda pixels, key: encode(params, pixels, key)


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


class PictureFiles:
  """Text-to-image JSONL records as a source of {'image' uint8 [H, W, 3], 'prompt'}; an
  unreadable picture gives None when bad records may be skipped."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.records = jsonl.read(jsonl.files(config.data.t2i_files, 'data.t2i_files'), 't2i',
                              config.data.skip_bad_records)
    self.skip_bad = config.data.skip_bad_records

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int):
    record = self.records[index]
    pixels = jsonl.read_picture(record, self.skip_bad)
    return None if pixels is None else dict(image=pixels, prompt=record['prompt'])


def pictures(config: ml_collections.ConfigDict):
  """What `extract_latents` encodes: data.latents_source's training images."""
  if LatentsSource(config.data.latents_source) == LatentsSource.IMAGENET:
    return imagenet.data_source(config)
  return PictureFiles(config)


def _write_shard(path: str, source, indices: range, encode, batch_size: int, resolution: int):
  writer = ArrayRecordWriter(path, 'group_size:1')
  for start in range(0, len(indices), batch_size):
    chunk = [source[i] for i in indices[start:start + batch_size]]
    chunk = [r for r in chunk if r is not None]  # unreadable pictures, when skipping is asked
    if not chunk:
      continue
    images = np.stack([imagenet.center_crop(np.asarray(r['image']), resolution) for r in chunk])
    images = images.astype(np.float32) / 127.5 - 1.0
    padded = np.pad(images, [(0, batch_size - len(chunk)), (0, 0), (0, 0), (0, 0)])
    mean, std = encode(padded)
    for k, record in enumerate(chunk):
      meta = (dict(prompt=record['prompt']) if 'prompt' in record
              else dict(label=np.int32(record['label'])))
      writer.write(flax.serialization.msgpack_serialize(dict(mean=mean[k], std=std[k], **meta)))
  writer.close()


def extract(config: ml_collections.ConfigDict, vae_dir: str, out_dir: str, source=None,
            batch_size: int = 64) -> dict:
  """Encodes data.latents_source into out_dir; returns latents.json's content."""
  source = pictures(config) if source is None else source
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
    indices = range(shard * per_shard, min(count, (shard + 1) * per_shard))
    try:
      _write_shard(path + '.tmp', source, indices, encode, batch_size, resolution)
    except BaseException:
      if os.path.exists(path + '.tmp'):  # nothing half-written stays behind
        os.remove(path + '.tmp')
      raise
    os.replace(path + '.tmp', path)
  multihost_utils.sync_global_devices('latent shards written')
  latent = _read(shard_path(out_dir, 0, num_shards), 0)['mean'].shape
  info = dict(source_records=count, num_shards=num_shards, records_per_shard=per_shard,
              resolution=resolution, latent_shape=list(latent), vae=os.path.abspath(vae_dir),
              source=config.data.latents_source)
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
  """Record bytes -> {'tokens' [P], 'valid' [P], 'image' [h, w, Z] scaled latents}.

  A labelled record takes a random template with its class name (from prompts); a
  record with a prompt takes a random template with the prompt (truncated to fit).
  """

  def __init__(self, prompts: Optional[tokenizer_lib.PromptTable], tok,
               config: ml_collections.ConfigDict):
    self.prompts, self.tok = prompts, tok
    self.templates, self.prompt_len = config.data.templates, config.data.prompt_len
    self.null_prompt = tok.image_prompt('', config.data.prompt_len)
    self.cfg_dropout = config.data.cfg_dropout
    self.from_posterior = config.data.latents_from_posterior

  def random_map(self, record: bytes, rng: np.random.Generator) -> dict[str, Any]:
    item = _decode(record)
    z = item['mean']
    if self.from_posterior:
      z = z + item['std'] * rng.standard_normal(z.shape, np.float32)
    if 'prompt' not in item:
      tokens, valid = self.prompts.pick(rng, int(item['label']), self.cfg_dropout)
    elif rng.random() < self.cfg_dropout:
      tokens, valid = self.null_prompt
    else:
      template = self.templates[rng.integers(len(self.templates))]
      tokens, valid = self.tok.image_prompt(template.format(name=item['prompt']),
                                            self.prompt_len, truncate=True)
    return dict(tokens=tokens, valid=valid, image=(z * LATENT_SCALE).astype(np.float32))


def examples(config: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer) -> grain.MapDataset:
  """Infinite shuffled prompted latents (not yet batched)."""
  table = None
  if LatentsSource(config.data.latents_source) == LatentsSource.IMAGENET:
    table = imagenet.prompt_table(tok, config)
  transform = PromptedLatent(table, tok, config)
  ds = grain.MapDataset.source(open_source(config)).shuffle(seed=config.seed).repeat()
  return ds.random_map(transform, seed=config.seed)
