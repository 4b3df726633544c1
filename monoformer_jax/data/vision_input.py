"""Pictures to understand, read from files and made what the vision encoder takes.

- CLIP: as CLIPImageProcessor prepares them: RGB, the short side resized to the tower's size
  (bicubic), the center cropped, [0, 1] normalized by the CLIP mean and std.
- VAE (the official encoder): letterboxed as its resize_and_pad_image does (the long side to the
  resolution, bicubic, centered on black), [-1, 1]; a pixel-space model's own [H, W, C] (grey for
  one channel).
Dimension letters: R resolution, H/W/C a pixel-space model's image.
"""

import enum
import io
import math

import numpy as np
from PIL import Image, UnidentifiedImageError

from monoformer_jax.base import files
from monoformer_jax.base.errors import UserError

# CLIPImageProcessor's normalization of [0, 1] pixels (the OpenAI CLIP statistics).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class PictureFormat(enum.Enum):
  """What a vision encoder takes (nn.vision says which)."""
  CLIP = 'clip'
  DIFFUSION = 'diffusion'  # the diffusion's own pixels, or pixels a VAE encodes


def read_picture(path: str) -> Image.Image:
  """The picture in a file (local or in a bucket) as RGB; a UserError naming it otherwise."""
  if not files.isfile(path):
    raise UserError(f'image file {path} does not exist.')
  try:
    picture = Image.open(io.BytesIO(files.read_bytes(path)))
    return picture.convert('RGB')
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise UserError(f'{path} is not an image file that can be read ({type(e).__name__}).') from e


def letterbox(picture: Image.Image, size: int) -> Image.Image:
  """The official resize_and_pad_image: aspect kept, the long side to `size`, centered on black."""
  width, height = picture.size
  if size / width < size / height:
    new = (size, min(math.ceil(height * size / width), size))
  else:
    new = (min(math.ceil(width * size / height), size), size)
  canvas = Image.new('RGB', (size, size))
  canvas.paste(picture.resize(new, Image.Resampling.BICUBIC),
               ((size - new[0]) // 2, (size - new[1]) // 2))
  return canvas


def clip_pixels(picture: Image.Image, size: int) -> np.ndarray:
  """[R, R, 3] float32, as CLIPImageProcessor (shortest_edge and crop both `size`) makes it."""
  width, height = picture.size
  short, long = min(width, height), max(width, height)
  scaled = (size, int(size * long / short))
  picture = picture.resize(scaled if width <= height else scaled[::-1], Image.Resampling.BICUBIC)
  array = np.asarray(picture, np.float32) / 255.0
  top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
  array = array[top:top + size, left:left + size]
  return (array - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)


def encoder_input(picture: Image.Image, kind: PictureFormat, shape: tuple[int, ...]) -> np.ndarray:
  """The picture as the encoder takes it; shape: nn.vision.VisionSpec.input_shape's [R, R, 3]
  or [H, W, C]."""
  if kind == PictureFormat.CLIP:
    return clip_pixels(picture, shape[0])
  height, width, channels = shape
  if height != width:
    picture = picture.resize((width, height), Image.Resampling.BICUBIC)
  else:
    picture = letterbox(picture, height)
  if channels == 1:
    picture = picture.convert('L')
  array = np.asarray(picture, np.float32).reshape(height, width, channels)
  return array / 127.5 - 1.0
