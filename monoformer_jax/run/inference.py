"""What `sample` and `generate` do with a workdir: its newest restorable checkpoint loaded for
inference, then pictures or text written (process 0 writes; every host computes).
"""

import dataclasses
import os
from typing import Optional, Sequence

import jax
import numpy as np

from monoformer_jax.base import files, images as images_lib, progress, workdir_layout
from monoformer_jax.base.errors import UserError
from monoformer_jax.diffusion import Sampler, TimeSpacing
from monoformer_jax.data import chat_template, vision_input
from monoformer_jax.data.understanding import (PLACEHOLDER, check_placeholders,
                                               conversation_ids)
from monoformer_jax.evaluation import fid_samples, understanding_eval
from monoformer_jax.generation import mixed_modal, sampling
from monoformer_jax.nn import vae
from monoformer_jax.nn.layers import MaskType
from monoformer_jax.run import settings, workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class SamplingChoice:
  """What the command line says of sampling; None keeps the config's value. `vae` is a
  converted VAE directory ('' = the config's model.vae)."""
  sampler: Optional[Sampler] = None
  steps: Optional[int] = None
  cfg_scale: Optional[float] = None
  vae: str = ''
  spacing: Optional[TimeSpacing] = None

  def resolve(self, setup: workdir_lib.Setup) -> tuple[sampling.ImageSampling, str]:
    """The sampling spec and the VAE directory that decodes its latents ('' for pixels)."""
    config = setup.config
    spec = setup.settings.sampling.but(self.sampler, self.steps, self.cfg_scale, self.spacing)
    if spec.steps > config.diffusion.num_timesteps or spec.steps < 1:
      raise UserError(f'--steps is {spec.steps}; expected 1..{config.diffusion.num_timesteps}.')
    sampling.check_fits(spec, setup.settings.diffusion.process,
                        '--sampler and --steps, else the config\'s sample.sampler and sample.steps')
    vae_dir = self.vae or config.model.vae
    if vae_dir and not files.isdir(vae_dir):
      raise UserError(f'the VAE directory {vae_dir} (--vae, else config key model.vae) does not '
                      'exist; pass --vae=DIR with the converted VAE that decodes the samples.')
    if not vae_dir and settings.draws_latents(config, setup.settings):
      raise UserError(f'this model draws {config.model.image_channels}-channel VAE latents and '
                      'its config names no VAE (model.vae); pass --vae=DIR with the converted '
                      'VAE (`convert vae`) that turns them into pictures.')
    return spec, vae_dir


def _decoder(vae_dir: str, setup: workdir_lib.Setup):
  return vae.pixel_decoder(vae_dir, setup.layout) if vae_dir else None  # latent diffusion


@dataclasses.dataclass(frozen=True)
class Run:
  """One inference command's model and randomness: the workdir whose newest checkpoint it loads
  (the EMA parameters, else the raw ones) and the seed it draws with."""
  workdir: str
  seed: int = 0
  use_ema: bool = True

  def restore(self, text_only: bool = False) -> workdir_lib.Restored:
    """The workdir's model; with text_only, also a converted LLM directory's (`convert hf`),
    which continues text and has no image modules."""
    if workdir_lib.is_converted_llm(self.workdir):
      if not text_only:
        raise UserError(f'{self.workdir} is a converted LLM, which has no image modules: it '
                        'continues text (`generate` without --image or --out) and nothing else; '
                        'train a workdir from it (config key model.init_from) for pictures.')
      return workdir_lib.for_converted_llm(self.workdir)
    return workdir_lib.for_inference(self.workdir, self.use_ema)

  def key(self) -> jax.Array:
    return jax.random.key(self.seed)


@dataclasses.dataclass(frozen=True)
class MixedRows:
  """generate --out: the directory the rows go to, how many rows, and images per row at most."""
  out: str
  num: int
  max_images: int


def sample(run: Run, prompt: str, num: int, out: str, choice: SamplingChoice) -> None:
  """OUT.png, a grid of `num` samples of the prompt, and OUT.npz with their uint8 images."""
  if num < 1:
    raise UserError(f'--num is {num}; expected at least 1.')
  if not out.endswith('.png'):
    raise UserError(f'--out is {out}; expected a .png path.')
  restored = run.restore()
  setup = restored.setup
  setup.tok.image_prompt(prompt, setup.config.data.prompt_len)  # rejects long prompts first
  spec, vae_dir = choice.resolve(setup)
  decode = _decoder(vae_dir, setup)
  images = sampling.images_for_prompts(setup.model, restored.params, setup.tok, [prompt] * num,
                                       setup.config.data.prompt_len, spec, run.key())
  images = images_lib.to_uint8(decode(images) if decode is not None else images)
  npz = out[:-len('.png')] + '.npz'
  if jax.process_index() != 0:  # every host sampled the same images; one writes them
    return
  images_lib.write_npz(npz, images=images)
  images_lib.write_png(out, images, columns=int(np.ceil(np.sqrt(len(images)))))
  print(f'wrote {out} and {npz}: {len(images)} images of {images.shape[1:]}')


def prompts(setup: workdir_lib.Setup, prompt_file: str) -> list[str]:
  """The lines of prompt_file, else the class prompts of the workdir's source."""
  return fid_samples.file_prompts(prompt_file) if prompt_file else fid_samples.class_prompts(setup)


def sample_fid(run: Run, npz: str, num: int, batch: int, prompt_file: str,
               choice: SamplingChoice) -> None:
  """`num` samples, prompts spread uniformly, as an ADM-format .npz for FID evaluators."""
  if num < 1:
    raise UserError(f'--num is {num}; expected at least 1.')
  restored = run.restore()
  setup = restored.setup
  spec, vae_dir = choice.resolve(setup)
  batches = fid_samples.sample_batches(setup, restored.params, prompts(setup, prompt_file), num,
                                       batch, spec, run.key(), vae_dir)
  with progress.phase(f'sampling {num} images ({spec.sampler.value}, {spec.steps} steps)', num,
                      'images') as p:
    fid_samples.write(progress.counted(batches, p), npz, num)
  if jax.process_index() == 0:
    print(f'wrote {npz}: {num} samples, prompts spread uniformly')


def _check_context(setup: workdir_lib.Setup, tokens: int, max_tokens: int) -> None:
  context = setup.config.model.context_length
  if tokens > context:
    raise UserError(f'--max_tokens {max_tokens} with the prompt (and --max_images images) comes '
                    f'to {tokens} tokens, past the model\'s context of {context} tokens '
                    '(model.context_length).')


def _check_decoding(decoding: mixed_modal.Decoding) -> None:
  if decoding.max_tokens < 1:
    raise UserError(f'--max_tokens is {decoding.max_tokens}; expected at least 1.')
  if not 0.0 < decoding.top_p <= 1.0 or decoding.top_k < 0 or decoding.temperature < 0:
    raise UserError('--top_p must be in (0, 1], --top_k and --temperature non-negative.')


def _text_prompt(tok, prompt: str, chat: bool, least: int) -> tuple[np.ndarray, np.ndarray]:
  """The prompt's ids left-padded to `least` tokens or the next multiple of 64 (few shapes to
  compile): `BOS prompt`, or with chat the user's message in the model's chat template, its
  generation prompt opening the answer."""
  ids = (tok.encode(chat_template.render(tok, [{'role': 'user', 'content': prompt}], True,
                                         'generate --chat')) if chat
         else tok.bos + tok.encode(prompt))
  return tok.left_pad(ids, max(least, -(-len(ids) // 64) * 64))


def generate(run: Run, prompt: str, decoding: mixed_modal.Decoding,
             pictures: Sequence[str] = (), chat: bool = False) -> str:
  """The prompt and its continuation, decoded with the KV cache, or with chat the model's
  answer alone, which ends at the first of the tokenizer's end-of-turn ids. With pictures,
  the prompt reads them (at its `<image>` placeholders, or all before the text)."""
  _check_decoding(decoding)
  if chat and pictures:
    raise UserError('generate --chat reads text only; drop --image, or --chat to ask about '
                    'pictures in the understanding format.')
  restored = run.restore(text_only=not pictures)
  setup = restored.setup
  if pictures:
    return _generate_reading(restored, prompt, decoding, run.key(), pictures)
  tok, model = setup.tok, setup.model
  tokens, valid = _text_prompt(tok, prompt, chat, setup.config.data.text_seq_len)
  _check_context(setup, int(valid.sum()) + decoding.max_tokens, decoding.max_tokens)
  out = sampling.generate(model, restored.params, tokens[None], valid[None], run.key(),
                          max_tokens=decoding.max_tokens, temperature=decoding.temperature,
                          top_k=min(decoding.top_k, model.backbone.vocab_size),
                          top_p=decoding.top_p, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
  if chat:
    return tok.decode(np.asarray(out[0]).tolist())
  # Decode prompt and continuation together so the piece boundary keeps its space.
  return tok.decode(tok.encode(prompt) + np.asarray(out[0]).tolist())


def _reading(setup, prompt: str, pictures: Sequence[str]) -> tuple[str, list[dict], np.ndarray]:
  """(the prompt with its placeholders, its conversation, the pictures [1, I, ...] as the
  vision encoder takes them) for --image."""
  if not setup.settings.vision.reads_images:
    raise UserError('generate --image needs a model that reads images (model.vision_encoder); '
                    'this workdir\'s is \'none\'.')
  if PLACEHOLDER not in prompt:
    prompt = PLACEHOLDER * len(pictures) + '\n' + prompt
  turns = [{'from': 'human', 'value': prompt}, {'from': 'gpt', 'value': ''}]
  check_placeholders(turns, len(pictures), len(pictures), 'the prompt (--prompt)')
  r = setup.settings.vision.reading()
  images = np.stack([vision_input.encoder_input(vision_input.read_picture(p), r.picture, r.shape)
                     for p in pictures])[None]
  return prompt, turns, images


def _generate_reading(restored, prompt: str, decoding: mixed_modal.Decoding, key: jax.Array,
                      pictures: Sequence[str]) -> str:
  setup = restored.setup
  prompt, turns, images = _reading(setup, prompt, pictures)
  _check_context(setup, len(conversation_ids(turns[:1], setup.tok)[0]) + decoding.max_tokens
                 + len(pictures) * setup.model.understanding.tokens_per_image,
                 decoding.max_tokens)
  ids = understanding_eval.answers(setup, restored.params, [turns], images, decoding.max_tokens,
                                   decoding.temperature, decoding.top_k, decoding.top_p, key)[0]
  return prompt + setup.tok.decode(ids)


def generate_mixed(run: Run, prompt: str, pictures: Sequence[str], decoding: mixed_modal.Decoding,
                   rows: MixedRows, choice: SamplingChoice) -> str:
  """generate --out=DIR: `rows.num` rows of text with the images the model starts by itself, as
  DIR/generation.json and DIR/<row>_<k>.png; returns what to print: each row's text with
  placeholders, then a line naming what was written. With pictures, the prompt reads them
  first (--image)."""
  _check_decoding(decoding)
  out, num, max_images = rows.out, rows.num, rows.max_images
  if num < 1 or max_images < 0:
    raise UserError(f'--num is {num} and --max_images {max_images}; expected at least 1 and 0.')
  if files.isfile(out):
    raise UserError(f'--out {out} is a file; generate --out expects a directory (new or '
                    'existing) for generation.json and the pictures.')
  restored = run.restore()
  setup = restored.setup
  tok, model = setup.tok, setup.model
  if model.image_mask == MaskType.BIDIRECTIONAL:
    raise UserError('generate --out needs a model whose prompt does not attend to its image '
                    '(model.image_mask \'hybrid\' or \'causal\'); this one is bidirectional.')
  spec, vae_dir = choice.resolve(setup)
  read = None
  if pictures:
    prompt, turns, images = _reading(setup, prompt, pictures)
    given, read = understanding_eval.reading(setup, [turns] * num, np.repeat(images, num, 0),
                                             run.key())
    tokens, valid = np.asarray(given['tokens'][0]), np.asarray(given['valid'][0])
  else:
    tokens, valid = tok.text_prompt(prompt, setup.config.data.text_seq_len)
  _check_context(setup, int(valid.sum()) + decoding.max_tokens
                 + max_images * (model.image.num_patches + 1), decoding.max_tokens)
  decoding = dataclasses.replace(decoding, top_k=min(decoding.top_k, model.backbone.vocab_size))
  made = mixed_modal.generate(model, restored.params, np.repeat(tokens[None], num, 0),
                              np.repeat(valid[None], num, 0), run.key(), tok=tok,
                              spec=spec, decoding=decoding, max_images=max_images,
                              understand=read)
  texts = mixed_modal.write_record(out, prompt, made, tok, _decoder(vae_dir, setup))
  drawn = sum(len(row.images) for row in made)
  return '\n'.join([f'{r}: {prompt} {text}' for r, text in enumerate(texts)] + [
      f'wrote {workdir_layout.generation_record(out)} and {drawn} picture(s) beside it.'])
