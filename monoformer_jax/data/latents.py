"""Pre-extracted SD-VAE latents (the output of `extract_latents`) as a grain source.

A latents directory holds ArrayRecord shards `latents-SSSSS-of-NNNNN.array_record` (one msgpack
record per image: the posterior `mean` and `std` [h, w, Z] float32, unscaled, and the `label` or the
`prompt`) and `latents.json` (source records, shapes, the latent scale, origin; pictures skipped as
unreadable have no record). Training draws z = (mean + std * noise) x latent_scale, a sample of the
posterior, or the scaled mean when data.latents_from_posterior is False. The directory may be in a
bucket: ArrayRecord reads gs:// shards itself (riegeli's GCS reader), record by record.
Dimension letters: P prompt length, h/w latent grid, Z latent channels.
"""

import os
from typing import Any, Optional

import flax.serialization
import grain
import ml_collections
import numpy as np

from monoformer_jax.base import files
from monoformer_jax.base.errors import UserError
from monoformer_jax.data import imagenet, tokenizer as tokenizer_lib


INFO_FILE = 'latents.json'


def shard_path(directory: str, shard: int, num_shards: int) -> str:
  return os.path.join(directory, f'latents-{shard:05d}-of-{num_shards:05d}.array_record')


def decode(record: bytes) -> dict[str, Any]:
  return flax.serialization.msgpack_restore(record)


def read_record(path: str, index: int) -> dict[str, Any]:
  """Record `index` of one shard, decoded."""
  return decode(grain.sources.ArrayRecordDataSource([path])[index])


def open_source(data: ml_collections.ConfigDict,
                latent_shape: tuple[int, ...]) -> tuple[grain.sources.ArrayRecordDataSource, dict]:
  """The records of data.latents_dir and its latents.json, after checking that its latents
  have latent_shape [h, w, Z] (the model's image)."""
  directory = data.latents_dir
  info_path = os.path.join(directory, INFO_FILE)
  if not files.isfile(info_path):
    raise UserError(f'config key data.latents_dir ({directory!r}) has no {INFO_FILE}; expected '
                    'the output of a finished `extract_latents`.')
  info = files.read_json(info_path)
  if info['latent_shape'] != list(latent_shape):
    raise UserError(f'{directory} holds latents of shape {info["latent_shape"]}; config keys '
                    f'model.image_size and model.image_channels expect {list(latent_shape)}.')
  paths = [shard_path(directory, s, info['num_shards']) for s in range(info['num_shards'])]
  present = set(files.listdir(directory))  # one listing, not a request per shard
  missing = [p for p in paths if os.path.basename(p) not in present]
  if missing:
    raise UserError(f'{len(missing)} latent shards are missing, e.g. {missing[0]}; rerun '
                    '`extract_latents` to finish them.')
  return grain.sources.ArrayRecordDataSource(paths), info


class PromptedLatent(grain.transforms.RandomMap):
  """Record bytes -> {'tokens' [P], 'valid' [P], 'image' [h, w, Z] scaled latents}.

  A labelled record takes a random template with its class name (from prompts); a
  record with a prompt takes a random template with the prompt (truncated to fit)."""

  def __init__(self, prompts: Optional[tokenizer_lib.PromptTable], tok,
               data: ml_collections.ConfigDict, latent_scale: float):
    self.prompts, self.tok, self.latent_scale = prompts, tok, latent_scale
    self.templates, self.prompt_len = data.templates, data.prompt_len
    self.null_prompt = tok.image_prompt('', data.prompt_len)
    self.cfg_dropout, self.from_posterior = data.cfg_dropout, data.latents_from_posterior

  def random_map(self, record: bytes, rng: np.random.Generator) -> dict[str, Any]:
    item = decode(record)
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
    return dict(tokens=tokens, valid=valid, image=(z * self.latent_scale).astype(np.float32))


def examples(data: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer, seed: int,
             latent_shape: tuple[int, ...]) -> grain.MapDataset:
  """Infinite shuffled prompted latents (not yet batched)."""
  source, info = open_source(data, latent_shape)
  labelled = 'label' in decode(source[0])  # ImageNet classes, not free prompts
  table = imagenet.prompt_table(tok, data) if labelled else None
  transform = PromptedLatent(table, tok, data, info['latent_scale'])
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  return ds.random_map(transform, seed=seed)
