"""FID inside the project: a reference encoded once, then FID-N of a workdir's samples (evaluate,
and train.fid_every during training) or of an existing sample file (ours, ADM-format, or the
official code's), all with the converted FID Inception.
"""

import dataclasses
from typing import Optional

import jax

from monoformer_jax.base import files, progress, sharding
from monoformer_jax.base.errors import UserError
from monoformer_jax.evaluation import fid, fid_samples
from monoformer_jax.generation import sampling


@dataclasses.dataclass(frozen=True)
class FidSpec:
  """What every FID needs: the reference, the Inception, the global batch, and where the
  reference's statistics are also written ('' = nowhere)."""
  reference: str
  inception: str
  batch: int
  stats_out: str = ''

  def checked(self) -> 'FidSpec':
    if not self.reference:
      raise UserError('an FID needs --fid_ref=REF.npz (ADM reference images or mu/sigma '
                      'statistics).')
    if not self.inception or not files.isdir(self.inception):
      raise UserError(f'the Inception directory {self.inception!r} (--inception, else config key '
                      'eval.inception) does not exist; create one with `python -m monoformer_jax '
                      'convert inception --src=pt_inception-2015-12-05-6726825d.pth --dst=DIR`.')
    if self.stats_out and not self.stats_out.endswith('.npz'):
      raise UserError(f'--fid_stats_out is {self.stats_out}; expected a .npz path.')
    return self


class FidMeter:
  """The reference's statistics, encoded once, and the FID of whatever is measured after."""

  def __init__(self, spec: FidSpec, layout: sharding.Layout):
    self.spec = spec.checked()
    self.encoder = fid_samples.encoder(spec.inception, layout, spec.batch)
    self._reference: Optional[fid.Stats] = None

  @property
  def reference(self) -> fid.Stats:
    if self._reference is None:
      with progress.phase(f'fid: the reference statistics of {self.spec.reference}'):
        self._reference = self.encoder.npz_stats(self.spec.reference, '--fid_ref')
      if self.spec.stats_out:
        fid.write_stats(self.spec.stats_out, self._reference)
    return self._reference

  def of_file(self, path: str) -> dict:
    """{'fid', 'num'} of an .npz sample file (arr_0 images, or mu/sigma statistics)."""
    reference = self.reference
    with progress.phase(f'fid: the statistics of {path}'):
      stats = self.encoder.npz_stats(path, '--fid_npz')
    return {'fid': fid.frechet_distance(stats, reference), 'num': stats.count}

  def of_model(self, setup, params, num: int, prompts: list[str], spec: sampling.ImageSampling,
               key: jax.Array, vae_dir: str) -> dict:
    """{'fid', 'num'} of num samples of a workdir.Setup's model, never written to disk."""
    reference = self.reference
    batches = fid_samples.sample_batches(setup, params, prompts, num, self.spec.batch, spec, key,
                                         vae_dir)
    with progress.phase(f'fid: sampling and encoding {num} images ({spec.sampler.value}, '
                        f'{spec.steps} steps)', num, 'images') as p:
      stats = self.encoder.stats_of(progress.counted(batches, p))
    return {'fid': fid.frechet_distance(stats, reference), 'num': stats.count}


def describe(result: dict, what: str, reference: str) -> str:
  return f'FID-{result["num"]} of {what} against {reference}: {result["fid"]:.4f}'
