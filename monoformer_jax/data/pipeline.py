"""From the config's data section to this host's batches of the two step kinds.

`image_dataset` feeds `diffusion` steps ({'tokens', 'valid', 'image'}, plus 'label' for
class-conditional sources), `text_dataset` feeds `ar` steps ({'tokens', 'valid', 'loss_mask'}); both
are infinite, shuffled by the run's seed and cut into this host's rows of every global batch.
"""

import enum

import grain
import ml_collections

from monoformer_jax.data import (chat, common, corpus, digits, digits_vqa, imagenet, latents,
                                 llava, t2i, tokenizer as tokenizer_lib)
from monoformer_jax.data.understanding import Reading, UnderstandingSource


class ImageSource(enum.Enum):
  """Where diffusion steps get their images."""
  DIGITS = 'digits'  # scikit-learn's bundled 8x8 digits (the embedded default)
  IMAGENET = 'imagenet'  # TFDS imagenet2012, ADM center crop to data.image_resolution
  LATENTS = 'latents'  # SD-VAE latents from `extract_latents` (data.latents_dir)
  T2I_JSONL = 't2i_jsonl'  # {"image", "prompt"} lines of data.t2i_files
  # LLaVA records of data.llava_files that draw a picture (interleaved: they read some first)
  LLAVA_JSON = 'llava_json'

  @property
  def pixels(self) -> bool:
    """Whether the source gives RGB pixels at data.image_resolution (for a VAE to encode)."""
    return self in (ImageSource.IMAGENET, ImageSource.T2I_JSONL, ImageSource.LLAVA_JSON)


class TextSource(enum.Enum):
  """Where `ar` steps get their text."""
  CORPUS = 'corpus'  # data.text_file, or the English text bundled with CPython
  CHAT_JSONL = 'chat_jsonl'  # {"messages": [...]} lines of data.chat_files; assistant turns learned


class LatentsSource(enum.Enum):
  """What `extract_latents` encodes."""
  IMAGENET = 'imagenet'  # TFDS imagenet2012 (labels)
  T2I_JSONL = 't2i_jsonl'  # data.t2i_files (prompts)


def image_dataset(data: ml_collections.ConfigDict, source: ImageSource,
                  tok: tokenizer_lib.Tokenizer, seed: int, image_shape: tuple[int, ...],
                  reading: Reading | None = None) -> grain.MapDataset:
  """This host's batches of prompted training images; image_shape [H, W, C] is the
  model's (what latents must have); reading: how the prompts of interleaved sources read
  pictures."""
  if source == ImageSource.LLAVA_JSON:
    examples = llava.drawing_examples(data, tok, seed, reading)
  elif source == ImageSource.IMAGENET:
    examples = imagenet.examples(data, tok, seed)
  elif source == ImageSource.LATENTS:
    examples = latents.examples(data, tok, seed, image_shape)
  elif source == ImageSource.T2I_JSONL:
    examples = t2i.examples(data, tok, seed)
  else:
    examples = digits.examples(data, tok, seed)
  return common.host_batches(examples, data.image_batch_size)


def text_dataset(data: ml_collections.ConfigDict, source: TextSource, tok: tokenizer_lib.Tokenizer,
                 seed: int, chat_format: chat.ChatFormat) -> grain.MapDataset:
  """This host's batches of training text (chat data rendered as chat_format says)."""
  if source == TextSource.CHAT_JSONL:
    examples = chat.examples(data, tok, seed, chat_format)
  else:
    examples = corpus.examples(data, tok, seed)
  return common.host_batches(examples, data.text_batch_size)


def understanding_dataset(data: ml_collections.ConfigDict, source: UnderstandingSource,
                          tok: tokenizer_lib.Tokenizer, seed: int,
                          reading: Reading) -> grain.MapDataset:
  """This host's batches of samples that read images ({'tokens', 'valid', 'loss_mask', 'slot',
  'offset', 'images' [I, ...]}), read as `reading` says."""
  if source == UnderstandingSource.LLAVA_JSON:
    examples = llava.examples(data, tok, seed, reading)
  else:
    examples = digits_vqa.examples(data, tok, seed, reading.tokens_per_image)
  return common.host_batches(examples, data.understanding_batch_size)


def class_names(source: ImageSource) -> list[str]:
  """The classes of a class-conditional source (digits; ImageNet and its latents)."""
  return list(digits.CLASS_NAMES) if source == ImageSource.DIGITS else imagenet.class_names()


def tokenizer_texts(data: ml_collections.ConfigDict) -> list[str]:
  """What a tokenizer trained here learns from: the corpus and the digit prompts."""
  return corpus.documents(data) + digits.prompts(data) * 20
