"""FID inside the project against pytorch-fid: the Flax Inception, the streamed statistics and
the distance; the CLI end to end; statistics from two processes; the digit FD's ranking."""

import json
import os

import fid_reference
import numpy as np
import pytest
from helpers import cli, error_line, one_and_two_processes, tiny_config

from monoformer_jax import train
from monoformer_jax.base import files, sharding
from monoformer_jax.base.errors import UserError
from monoformer_jax.config import schema
from monoformer_jax.convert import inception as convert_inception
from monoformer_jax.data import digits
from monoformer_jax.evaluation import digit_fd, fid, fid_eval, fid_samples
from monoformer_jax.nn import inception


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
  """(the .pth file in the published layout, its `convert inception` directory)."""
  tmp = tmp_path_factory.mktemp('inception')
  path = str(tmp / 'pt_inception-random.pth')
  fid_reference.write_random_weights(path)
  result = cli('convert', 'inception', f'--src={path}', f'--dst={tmp / "converted"}')
  assert result.returncode == 0, result.stderr[-2000:]
  return path, str(tmp / 'converted')


def _relative(got, want) -> float:
  return float(np.abs(got - want).max() / np.abs(want).max())


def test_inception_matches_pytorch_fid(weights):
  path, converted = weights
  features = inception.feature_fn(converted)
  rng = np.random.default_rng(1)
  reference = fid_reference.pytorch_fid_model(path)
  stock = fid_reference.pytorch_fid_model(path, fid_variant=False)
  for shape in ((3, 40, 40, 3), (2, 320, 288, 3)):  # resized up, and down without anti-aliasing
    images = rng.integers(0, 256, shape).astype(np.uint8)
    want = fid_reference.pool_features(reference, images)
    got = np.asarray(features(images.astype(np.float32) / 255.0))
    assert got.shape == (shape[0], inception.FEATURES)
    assert _relative(got, want) < 1e-4, _relative(got, want)
    # The pooling quirks matter: the classifier's blocks on the same weights are far off.
    assert _relative(fid_reference.pool_features(stock, images), want) > 1e-2


def test_conversion_refuses_a_wrong_file(weights, tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  state = torch.load(weights[0], weights_only=True)
  del state['Mixed_6b.branch7x7_2.conv.weight']
  torch.save(state, tmp_path / 'short.pth')
  with pytest.raises(UserError, match=r'lacks the tensor for parameter .*Mixed_6b.*branch7x7_2'):
    convert_inception.convert_inception(str(tmp_path / 'short.pth'), str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()


def test_streamed_statistics_and_distance_match_pytorch_fid():
  _, fid_score = fid_reference.import_pytorch_fid()
  rng = np.random.default_rng(0)
  mixing = rng.standard_normal((48, 48))
  a = rng.standard_normal((700, 48)) @ mixing + 3.0
  b = rng.standard_normal((500, 48)) @ (mixing + 0.3 * rng.standard_normal((48, 48)))
  streamed = fid.StreamingStats()
  for start in range(0, len(a), 64):  # uneven batches, the last one short
    streamed.add(a[start:start + 64].astype(np.float32))
  sa = streamed.result()
  a32 = a.astype(np.float32).astype(np.float64)
  np.testing.assert_allclose(sa.mu, a32.mean(0), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(sa.sigma, np.cov(a32, rowvar=False), rtol=1e-10, atol=1e-9)
  sb = fid.Stats(b.mean(0), np.cov(b, rowvar=False), len(b))
  want = fid_score.calculate_frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
  assert fid.frechet_distance(sa, sb) == pytest.approx(want, rel=1e-9)
  # Fewer images than features: the covariances are singular; the symmetric form is exact.
  few = fid.Stats(b[:20].mean(0), np.cov(b[:20], rowvar=False), 20)
  assert fid.frechet_distance(sa, few) == pytest.approx(_exact_distance(a32, b[:20]), rel=1e-12)


def _exact_distance(x: np.ndarray, y: np.ndarray) -> float:
  """The Fréchet distance of the statistics of features x [N, F] and y [M, F] through another
  identity: with X, Y centred, the nonzero eigenvalues of S_x S_y are the squared singular
  values of X Y^T / ((N - 1) (M - 1))^1/2, so tr (S_x S_y)^1/2 is their sum, taken from an
  N x M matrix without the F - N rounding eigenvalues of an F x F one."""
  xc, yc = x - x.mean(0), y - y.mean(0)
  cross = xc @ yc.T / np.sqrt((len(x) - 1) * (len(y) - 1))
  diff = x.mean(0) - y.mean(0)
  return float(diff @ diff + (xc**2).sum() / (len(x) - 1) + (yc**2).sum() / (len(y) - 1)
               - 2 * np.linalg.svd(cross, compute_uv=False).sum())


def test_distance_of_fewer_images_than_features_is_exact():
  """N <= F, as in a quick FID: a set against itself is 0 (not below it) and two sets give the
  exact distance, where the rounding eigenvalues of the singular covariances used to take
  about 4e-8 of the trace off both. (pytorch-fid cannot be the reference here: its sqrtm of
  the singular product is off by as much, 1e-4 below for a set against itself.)"""
  rng = np.random.default_rng(5)
  f = 512
  mixing = rng.standard_normal((f, f)) / np.sqrt(f)
  other = mixing + 0.2 * rng.standard_normal((f, f)) / np.sqrt(f)
  a = np.maximum(rng.standard_normal((200, f)) @ mixing + 0.5, 0) * 3  # rectified, as pool features
  b = np.maximum(rng.standard_normal((300, f)) @ other + 0.5, 0) * 3
  streamed = fid.StreamingStats()
  for start in range(0, len(a), 64):
    streamed.add(a[start:start + 64])
  sa, sb = streamed.result(), fid.Stats(b.mean(0), np.cov(b, rowvar=False), len(b))
  scale = np.trace(sa.sigma)
  assert 0 <= fid.frechet_distance(sa, sa) < 1e-11 * scale
  assert fid.frechet_distance(sa, sb) == pytest.approx(_exact_distance(a, b), abs=1e-11 * scale)
  assert fid.frechet_distance(sb, sa) == pytest.approx(_exact_distance(a, b), abs=1e-11 * scale)


def _uint8_npz(path, images) -> str:
  np.savez(path, arr_0=images)
  return str(path)


@pytest.fixture(scope='module')
def reference_model(weights):
  return fid_reference.pytorch_fid_model(weights[0])


def _torch_stats(model, path) -> fid.Stats:
  with np.load(path) as d:
    x = fid_reference.pool_features(model, d['arr_0']).astype(np.float64)
  return fid.Stats(x.mean(0), np.cov(x, rowvar=False), len(x))


@pytest.mark.slow
def test_evaluate_fid_end_to_end(weights, reference_model, trained, tmp_path, bucket):
  """Reference statistics equal pytorch-fid's (the reference, the Inception and the statistics
  in a bucket); FID-N of a workdir; the FID of a sample file equals the distance of
  pytorch-fid's features."""
  converted = weights[1]
  # Processes that only run the Inception at 299 px: LLVM's optimizations (off for the
  # session's tiny programs) make it twice as fast.
  optimized = dict(os.environ, XLA_FLAGS='')
  rng = np.random.default_rng(2)
  # Every file at the trained model's 8 x 8, so the three processes compile one Inception.
  ref = _uint8_npz(tmp_path / 'ref.npz', rng.integers(0, 256, (10, 8, 8, 3)).astype(np.uint8))
  for name in files.files_under(converted):
    files.copy(os.path.join(converted, name), f'{bucket}/inception/{name}')
  files.copy(ref, f'{bucket}/ref.npz')
  stats_out = f'{bucket}/ref_stats.npz'
  result = cli('evaluate', f'--fid_ref={bucket}/ref.npz', f'--inception={bucket}/inception',
               '--fid_batch=4', f'--fid_stats_out={stats_out}', env=optimized)
  assert result.returncode == 0, result.stderr[-2000:]
  want = _torch_stats(reference_model, ref)
  with files.local_copy(stats_out) as local, np.load(local) as s:
    assert _relative(s['mu'], want.mu) < 1e-4 and _relative(s['sigma'], want.sigma) < 1e-4
    assert int(s['count']) == 10

  result = cli('evaluate', f'--workdir={trained}', f'--fid_ref={stats_out}', '--num=6',
               '--fid_batch=4', '--steps=3', f'--inception={converted}')
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'FID-6 of' in result.stdout
  with open(os.path.join(trained, 'fid6.json')) as f:
    assert json.load(f)['num'] == 6

  samples = _uint8_npz(tmp_path / 'samples.npz', rng.integers(0, 256, (7, 8, 8, 3)).astype(np.uint8))
  result = cli('evaluate', f'--fid_npz={samples}', f'--fid_ref={ref}', '--fid_batch=4',
               f'--inception={converted}', env=optimized)
  assert result.returncode == 0, result.stderr[-2000:]
  printed = float(result.stdout.strip().split()[-1])
  assert printed == pytest.approx(fid.frechet_distance(_torch_stats(reference_model, samples), want),
                                  rel=1e-3)
  result = cli('evaluate', f'--fid_npz={samples}', f'--fid_ref={ref}')
  assert result.returncode == 2 and 'Inception directory' in error_line(result)


def test_bad_fid_inputs_are_named(weights, tmp_path):
  images = _uint8_npz(tmp_path / 'images.npz', np.zeros((3, 8, 8, 3), np.uint8))
  np.savez(tmp_path / 'floats.npz', arr_0=np.zeros((3, 8, 8, 3), np.float32))
  np.savez(tmp_path / 'other.npz', x=np.zeros(3))
  (tmp_path / 'text.npz').write_text('not a zip')
  layout = sharding.make_layout(schema.base_config().mesh)
  encoder = fid_samples.encoder(weights[1], layout, 4)
  for path, named in ((tmp_path / 'none.npz', 'does not exist'), (tmp_path / 'text.npz', 'not an .npz'),
                      (tmp_path / 'floats.npz', 'expected uint8 images'),
                      (tmp_path / 'other.npz', 'neither arr_0')):
    with pytest.raises(UserError, match=named):
      encoder.npz_stats(str(path), '--fid_ref')
  with pytest.raises(UserError, match='--fid_batch is 0'):
    fid.Encoder(encoder.features, layout, 0)
  with pytest.raises(UserError, match='at least 2 images'):
    fid.StreamingStats().result()
  with pytest.raises(UserError, match='--fid_stats_out'):
    fid_eval.FidSpec(images, weights[1], 4, 'stats.txt').checked()


@pytest.mark.multiprocess
def test_statistics_from_two_processes_equal_one(weights, tmp_path):
  _, converted = weights
  rng = np.random.default_rng(3)
  ref = _uint8_npz(tmp_path / 'ref.npz', rng.integers(0, 256, (7, 16, 16, 3)).astype(np.uint8))
  flags = ['evaluate', f'--fid_ref={ref}', f'--inception={converted}', '--fid_batch=4']
  one, two = one_and_two_processes(flags, 'fid_stats_out', tmp_path, devices_per_process=1)
  with np.load(one) as a, np.load(two) as b:
    assert int(a['count']) == int(b['count']) == 7
    np.testing.assert_allclose(a['mu'], b['mu'], rtol=1e-6)
    np.testing.assert_allclose(a['sigma'], b['sigma'], rtol=1e-5, atol=1e-6 * np.abs(a['sigma']).max())


@pytest.mark.slow
def test_digit_fd_ranks_real_digits_below_a_trained_model_below_noise(workdir):
  """The evaluation at the end of a short run: held-out digits (floor) < the trained model's
  samples < the untrained model's samples (ceiling) < uniform noise."""
  config = tiny_config(num_steps=400, eval_at_end=True, checkpoint_every=400, log_every=100)
  config.eval.samples_per_class = 10
  config.sample.sampler, config.sample.steps = 'ddim', 25
  config.train.ema_decay = 0.99
  metrics = train.train_and_evaluate(config, workdir)
  floor, trained_fd, ceiling = (metrics[f'{k}/overall'] for k in ('fd_floor', 'fd', 'fd_ceiling'))
  labels = np.repeat(np.arange(10), 10)
  noise = np.random.default_rng(0).uniform(-1, 1, (100, 8, 8, 1))
  noise_fd = digit_fd.distances(config.data, noise, labels)['overall']
  assert floor < trained_fd < ceiling < noise_fd, (floor, trained_fd, ceiling, noise_fd)
  assert floor < 0.25 * trained_fd and trained_fd < 0.9 * ceiling
  for name in digits.CLASS_NAMES:
    assert metrics[f'fd_floor/{name}'] < metrics[f'fd_ceiling/{name}'], name
  # The same evaluation scores the next-line questions of the held-out text (chance 25%).
  assert metrics['next_line/chance'] == 0.25 and metrics['next_line/acc'] > 0.4, metrics


@pytest.mark.slow
def test_fid_during_training(weights, workdir, tmp_path):
  """train.fid_every logs FID-{train.fid_num} rows to metrics.jsonl; without an Inception and a
  reference, the config is refused by name."""
  rng = np.random.default_rng(4)
  config = tiny_config(num_steps=4, fid_every=2, fid_num=4)
  config.eval.fid_ref = _uint8_npz(tmp_path / 'ref.npz',
                                   rng.integers(0, 256, (5, 8, 8, 3)).astype(np.uint8))
  config.eval.inception, config.eval.fid_batch = weights[1], 4
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f if '"fid"' in line]
  assert [(r['step'], r['num']) for r in rows] == [(2, 4), (4, 4)]
  assert all(np.isfinite(r['fid']) and r['fid'] > 0 for r in rows)
  config.eval.inception = ''
  with pytest.raises(UserError, match='train.fid_every needs eval.inception'):
    train.train_and_evaluate(config, str(tmp_path / 'other'))
