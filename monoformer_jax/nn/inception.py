"""InceptionV3 as FID measures with it: the network of the TF FID graph (2015-12-05), in the
layout of pytorch-fid's port, returning the 2,048 pool features.

It differs from the ImageNet classifier InceptionV3 in three places, all kept: the average
pools inside Mixed_5*, Mixed_6b..e and Mixed_7b leave the zero padding out of the mean, and
Mixed_7c pools with a max instead. Inputs in [0, 1] are resized to 299 x 299 (bilinear, half
pixel centres, no anti-aliasing) and scaled to [-1, 1] first, as pytorch-fid does. Module and
parameter names follow the torch ones, so conversion is a rename and a transpose.
Dimension letters: B batch, H/W image, C channels, F features (2,048).
"""

import enum
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from monoformer_jax.nn import converted


INPUT_SIZE = 299
FEATURES = 2048
INCEPTION_JSON = 'inception.json'


class Pool(enum.Enum):
  """How a block's pooling branch pools before its 1x1 convolution."""
  AVERAGE = 'average'  # 3x3, stride 1, the padding left out of the mean
  MAX = 'max'  # 3x3, stride 1 (Mixed_7c only)


class BasicConv(nn.Module):
  """Convolution without bias, batch norm with the running statistics (eps 1e-3), ReLU."""
  features: int
  kernel: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, self.kernel, self.strides, padding=[(p, p) for p in self.padding],
                use_bias=False, precision=jax.lax.Precision.HIGHEST, name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
    return nn.relu(x)


def _pooled(x, pool: Pool):
  if pool == Pool.MAX:
    return nn.max_pool(x, (3, 3), padding=((1, 1), (1, 1)))
  return nn.avg_pool(x, (3, 3), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_2(x):
  """3x3 max pool with stride 2 and no padding, the grid reductions."""
  return nn.max_pool(x, (3, 3), strides=(2, 2))


class InceptionA(nn.Module):
  """Mixed_5b..5d: 1x1, 5x5, double 3x3 and pooling branches."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name='branch1x1')(x)
    b5 = BasicConv(48, (1, 1), name='branch5x5_1')(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
    b3 = BasicConv(64, (1, 1), name='branch3x3dbl_1')(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
    bp = BasicConv(self.pool_features, (1, 1), name='branch_pool')(_pooled(x, Pool.AVERAGE))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: the 35 -> 17 grid reduction."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), strides=2, name='branch3x3')(x)
    bd = BasicConv(64, (1, 1), name='branch3x3dbl_1')(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = BasicConv(96, (3, 3), strides=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_2(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..6e: factorized 7x7 branches of width channels_7x7."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c = self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = BasicConv(192, (1, 1), name='branch1x1')(x)
    b7 = BasicConv(c, (1, 1), name='branch7x7_1')(x)
    b7 = BasicConv(c, **row, name='branch7x7_2')(b7)
    b7 = BasicConv(192, **col, name='branch7x7_3')(b7)
    bd = BasicConv(c, (1, 1), name='branch7x7dbl_1')(x)
    for i, (width, shape) in enumerate([(c, col), (c, row), (c, col), (192, row)], start=2):
      bd = BasicConv(width, **shape, name=f'branch7x7dbl_{i}')(bd)
    bp = BasicConv(192, (1, 1), name='branch_pool')(_pooled(x, Pool.AVERAGE))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: the 17 -> 8 grid reduction."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, (1, 1), name='branch3x3_1')(x)
    b3 = BasicConv(320, (3, 3), strides=2, name='branch3x3_2')(b3)
    b7 = BasicConv(192, (1, 1), name='branch7x7x3_1')(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = BasicConv(192, (3, 3), strides=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b / 7c: the expanded 8x8 blocks, each 3x3 split into 1x3 and 3x1 halves."""
  pool: Pool

  @nn.compact
  def __call__(self, x):
    def split(y, prefix):
      return [BasicConv(384, (1, 3), padding=(0, 1), name=f'{prefix}a')(y),
              BasicConv(384, (3, 1), padding=(1, 0), name=f'{prefix}b')(y)]
    b1 = BasicConv(320, (1, 1), name='branch1x1')(x)
    b3 = split(BasicConv(384, (1, 1), name='branch3x3_1')(x), 'branch3x3_2')
    bd = BasicConv(448, (1, 1), name='branch3x3dbl_1')(x)
    bd = split(BasicConv(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd), 'branch3x3dbl_3')
    bp = BasicConv(192, (1, 1), name='branch_pool')(_pooled(x, self.pool))
    return jnp.concatenate([b1, *b3, *bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """images [B, H, W, 3] in [0, 1] -> pool features [B, F]."""

  @nn.compact
  def __call__(self, images):
    b = images.shape[0]
    x = jax.image.resize(images.astype(jnp.float32), (b, INPUT_SIZE, INPUT_SIZE, 3), 'bilinear',
                         antialias=False)
    x = 2.0 * x - 1.0
    x = BasicConv(32, (3, 3), strides=2, name='Conv2d_1a_3x3')(x)
    x = BasicConv(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = _max_pool_2(BasicConv(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x))
    x = BasicConv(80, (1, 1), name='Conv2d_3b_1x1')(x)
    x = _max_pool_2(BasicConv(192, (3, 3), name='Conv2d_4a_3x3')(x))
    for name, pool_features in (('5b', 32), ('5c', 64), ('5d', 64)):
      x = InceptionA(pool_features, name=f'Mixed_{name}')(x)
    x = InceptionB(name='Mixed_6a')(x)
    for name, channels in (('6b', 128), ('6c', 160), ('6d', 160), ('6e', 192)):
      x = InceptionC(channels, name=f'Mixed_{name}')(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = InceptionE(Pool.AVERAGE, name='Mixed_7b')(x)
    x = InceptionE(Pool.MAX, name='Mixed_7c')(x)
    return x.mean(axis=(1, 2))


def abstract_variables() -> dict:
  """{'params': ..., 'batch_stats': ...} as shapes, for checking a conversion."""
  images = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), np.float32)
  return jax.eval_shape(InceptionV3().init, jax.random.key(0), images)


def feature_fn(path: str, shardings: Sequence = ()):
  """Jitted fn(images [B, H, W, 3] in [0, 1]) -> features [B, F] of the converted Inception in
  `path`; with (replicated, rows) shardings, the weights are copied to every device and the
  batch stays split over them."""
  _, variables = converted.read_converted(path, INCEPTION_JSON, 'inception')
  model = InceptionV3()
  if shardings:
    replicated, rows = shardings
    variables = jax.device_put(variables, replicated)
    apply = jax.jit(model.apply, in_shardings=(replicated, rows), out_shardings=rows)
  else:
    apply = jax.jit(model.apply)
  return lambda images: apply(variables, images)
