"""Official MonoFormer checkpoints: converted predictions equal the official forward
(tests/official_reference.py), in both directions; understanding checkpoints of the main branch
too."""

import json
import os
import re

import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers
from helpers import cli, error_line
from official_reference import (IM_END, IM_START, IMAGE, LATENT, PAD, C, D, OfficialExtras, P,
                                converted_vae, multimodal_forward, official_forward)
from torch import nn

from monoformer_jax.base.errors import UserError
from monoformer_jax.convert import commands, official_export, safetensors_io, torch_bin
from monoformer_jax.data import understanding
from monoformer_jax.diffusion import GuidanceChannels
from monoformer_jax.nn import clip, model as model_lib
from monoformer_jax.nn.layers import MaskType
from monoformer_jax.nn.understanding import Understanding
from monoformer_jax.nn.vision import VisionEncoder
from monoformer_jax.run import workdir as workdir_lib


@pytest.fixture(scope='module')
def official_dir(tmp_path_factory, tokenizer_file):
  torch.manual_seed(0)
  llm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=1028, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
      max_position_embeddings=256, attn_implementation='eager')).eval()
  extras = OfficialExtras()
  for p in extras.parameters():  # random weights everywhere (official init zeroes some)
    nn.init.normal_(p, std=0.2)
  path = tmp_path_factory.mktemp('official')
  llm.save_pretrained(path, safe_serialization=True)
  state = {k: v.detach().numpy() for k, v in llm.state_dict().items()}
  state.update({k: v.detach().numpy() for k, v in extras.state_dict().items()})
  safetensors_io.write(str(path / 'model.safetensors'), list(state.items()), {'format': 'pt'})
  config = json.loads((path / 'config.json').read_text())
  config.update(architectures=['MonoFormerForCausalLM'], patch_size=P, in_channels=C,
                learn_sigma=True, decoder_t_embed='add_before_image_tokens',
                use_adaln_final_layer=True, use_pos_embed=True, add_pos_embed_each_layer=False,
                use_bi_attn_img_tokens=True, image_size=LATENT * 8, image_token_index=IMAGE)
  (path / 'config.json').write_text(json.dumps(config))
  (path / 'added_tokens.json').write_text(json.dumps(
      {'<PAD>': PAD, '<image>': IMAGE, '<|im_start|>': IM_START, '<|im_end|>': IM_END}))
  (path / 'tokenizer.model').write_bytes(open(tokenizer_file, 'rb').read())
  return llm, extras, str(path)


@pytest.mark.slow
def test_converted_official_predictions_match(official_dir, tmp_path):
  llm, extras, src = official_dir
  dst = str(tmp_path / 'work')
  commands.run('official', src, dst, ema=True, vae=converted_vae(tmp_path))
  restored = workdir_lib.for_inference(dst, use_ema=True)
  tok, model, params = restored.setup.tok, restored.setup.model, restored.params
  assert restored.step == 0
  assert (tok.im_start_id, tok.im_end_id, tok.pad_id) == (IM_START, IM_END, PAD)
  assert restored.setup.settings.sampling.guidance.channels == GuidanceChannels.FIRST_THREE
  assert model.image_mask == MaskType.HYBRID

  prompts = [[1, 17, 42, 9], [1]]  # a prompt, and the unconditional one
  x_t = torch.randn(2, C, LATENT, LATENT)
  t = torch.tensor([999, 3])
  official_ids = torch.full((2, 7), PAD)
  for b, p in enumerate(prompts):
    row = p + [IM_START, IMAGE, IM_END]
    official_ids[b, :len(row)] = torch.tensor(row)
  with torch.no_grad():
    want, _ = official_forward(llm, extras, official_ids, x_t, t)

  tokens = np.full((2, 6), PAD, np.int32)
  valid = np.zeros((2, 6), bool)
  for b, p in enumerate(prompts):  # ours: left-padded prefix ending with <im_start>
    row = p + [IM_START]
    tokens[b, -len(row):], valid[b, -len(row):] = row, True
  got = model.apply({'params': params}, tokens, valid, mask_type=MaskType.HYBRID,
                    image=x_t.numpy().transpose(0, 2, 3, 1), t=t.numpy(),
                    suffix=np.full((2, 1), IM_END, np.int32)).image
  np.testing.assert_allclose(np.asarray(got), want.numpy().transpose(0, 2, 3, 1), atol=1e-4)

  _sample_through_the_vae(dst, tmp_path)

  text = np.array([[1, 50, 60, 70, 80]])
  with torch.no_grad():
    want_logits = llm(torch.tensor(text)).logits.numpy()
  logits = model.apply({'params': params}, text, np.ones(text.shape, bool),
                       mask_type=MaskType.CAUSAL).logits
  np.testing.assert_allclose(np.asarray(logits), want_logits, atol=1e-4)


def _sample_through_the_vae(workdir, tmp_path):
  """`sample` on the converted workdir decodes latents with the VAE given at conversion."""
  out = tmp_path / 'official.png'
  result = cli('sample', f'--workdir={workdir}', '--prompt=goldfish', '--num=2', '--steps=2',
               f'--out={out}')
  assert result.returncode == 0, result.stderr[-2000:]
  images = np.load(tmp_path / 'official.npz')['images']
  assert images.shape == (2, LATENT * 8, LATENT * 8, 3) and images.dtype == np.uint8
  # DPM-Solver++ takes the official checkpoint as it is (its learned variance channels unused).
  out = tmp_path / 'dpm.png'
  result = cli('sample', f'--workdir={workdir}', '--prompt=goldfish', '--num=2',
               '--sampler=dpmpp_2m', '--steps=20', f'--out={out}')
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'dpmpp_2m' not in result.stderr  # no complaint about the sampler
  dpm = np.load(tmp_path / 'dpm.npz')['images']
  assert dpm.shape == images.shape and not np.array_equal(dpm, images)


def test_unsupported_official_variants_are_refused(official_dir, tmp_path):
  _, _, src = official_dir
  import shutil  # pylint: disable=g-import-not-at-top
  other = tmp_path / 'variant'
  shutil.copytree(src, other)
  config = json.loads((other / 'config.json').read_text())
  (other / 'config.json').write_text(json.dumps(dict(config, decoder_t_embed='add_at_each_layer')))
  with pytest.raises(UserError, match="decoder_t_embed = 'add_at_each_layer'; only "
                                      "'add_before_image_tokens'"):
    commands.run('official', str(other), str(tmp_path / 'out'), ema=True)
  assert not (tmp_path / 'out').exists()


def test_a_tokenizer_reaching_the_special_ids_is_refused(official_dir, tokenizer_file, tmp_path):
  """A checkpoint whose added tokens sit at 1020-1023 with a 1,024-piece tokenizer: refused by
  name (export-official would otherwise give the four tokens other ids and another vocab_size)."""
  _, _, src = official_dir
  import shutil  # pylint: disable=g-import-not-at-top
  other = tmp_path / 'low_ids'
  shutil.copytree(src, other)
  (other / 'added_tokens.json').write_text(json.dumps(
      {'<PAD>': 1020, '<image>': 1021, '<|im_start|>': 1022, '<|im_end|>': 1023}))
  config = json.loads((other / 'config.json').read_text())
  (other / 'config.json').write_text(json.dumps(dict(config, image_token_index=1021)))
  pieces = spm.SentencePieceProcessor(model_file=tokenizer_file).get_piece_size()
  assert pieces == 1024
  with pytest.raises(UserError, match=rf'^tokenizer {re.escape(tokenizer_file)} has {pieces} '
                                      r'pieces, which collide with the official special token ids '
                                      r"1020, 1021, 1022, 1023; expected the LLM's own tokenizer, "
                                      r'with no more pieces than the first special id, 1020\.$'):
    commands.run('official', str(other), str(tmp_path / 'out'), ema=True,
                  tokenizer=tokenizer_file)
  assert not (tmp_path / 'out').exists()


def _tensor_dict(directory):
  tensors = torch_bin.open_weights(str(directory))
  return {name: tensors[name] for name in tensors.keys()}


def test_official_round_trip_gives_the_same_tensors(official_dir, tmp_path):
  _, _, src = official_dir
  commands.run('official', src, str(tmp_path / 'work'), ema=True)
  commands.run('export-official', str(tmp_path / 'work'), str(tmp_path / 'back'), ema=True)
  want, got = _tensor_dict(src), _tensor_dict(tmp_path / 'back')
  assert sorted(want) == sorted(got)
  for name, array in want.items():
    assert got[name].dtype == array.dtype, name
    np.testing.assert_array_equal(got[name], array, err_msg=name)
  source = json.loads(open(f'{src}/config.json').read())
  exported = json.loads((tmp_path / 'back' / 'config.json').read_text())
  assert {k: exported.get(k) for k in source} == source
  tok = transformers.AutoTokenizer.from_pretrained(tmp_path / 'back')
  assert [tok.convert_tokens_to_ids(t) for t in ('<PAD>', '<image>', '<|im_start|>', '<|im_end|>')
          ] == [PAD, IMAGE, IM_START, IM_END]
  # Converted without --vae, the workdir's samples are latents: no picture of them is written.
  out = tmp_path / 'latents.png'
  result = cli('sample', f'--workdir={tmp_path / "work"}', '--prompt=goldfish', '--num=1',
               '--steps=2', f'--out={out}')
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert f'draws {C}-channel VAE latents' in error_line(result) and '--vae=DIR' in error_line(result)
  assert not out.exists() and not (tmp_path / 'latents.npz').exists()


def test_official_training_layout_bin_weights_and_ema_folder(official_dir, tmp_path):
  """checkpoint-N/ as the official train.py leaves it: .bin weights, the EMA in ema/, the
  tokenizer beside (not in) ema/; config.json gives the ids through image_token_index."""
  _, _, src = official_dir
  raw = {k: torch.from_numpy(np.array(v)) for k, v in _tensor_dict(src).items()}
  ema = {k: v * 0.5 for k, v in raw.items()}
  checkpoint_dir = tmp_path / 'checkpoint-100'
  (checkpoint_dir / 'ema').mkdir(parents=True)
  for directory, state in ((checkpoint_dir, raw), (checkpoint_dir / 'ema', ema)):
    torch.save(state, directory / 'pytorch_model.bin')
    (directory / 'config.json').write_text(open(f'{src}/config.json').read())
  (checkpoint_dir / 'tokenizer.model').write_bytes(open(f'{src}/tokenizer.model', 'rb').read())
  for use_ema, weights in ((True, ema), (False, raw)):
    work = tmp_path / f'work_{use_ema}'
    commands.run('official', str(checkpoint_dir), str(work), ema=use_ema)
    commands.run('export-official', str(work), str(tmp_path / f'back_{use_ema}'), ema=True)
    got = _tensor_dict(tmp_path / f'back_{use_ema}')
    for name in ('lm_head.weight', 'x_embedder.weight', 'model.layers.1.mlp.up_proj.weight'):
      np.testing.assert_array_equal(got[name], weights[name].numpy())
  os.remove(checkpoint_dir / 'tokenizer.model')
  with pytest.raises(UserError, match=r'found no tokenizer.model in .*; pass --tokenizer=FILE'):
    commands.run('official', str(checkpoint_dir), str(tmp_path / 'x'), ema=True)
  commands.run('official', str(checkpoint_dir), str(tmp_path / 'y'), ema=True,
               tokenizer=f'{src}/tokenizer.model')


# Understanding checkpoints (the main branch: im_embedder, a CLIP or VAE vision encoder): on a
# batch with a row that reads an image and a row that reads one and draws one.

CLIP_WIDTH, CLIP_SIZE, CLIP_PATCH = 24, 12, 4  # 9 feature tokens of 24
UNDERSTAND, BOTH = [1, IMAGE, 17, 42, 9, 23], [1, IMAGE, 50, 60, IM_START, IMAGE, IM_END]


def _sharpen_llama(llm) -> None:
  """RMSNorm weights near 1 with spread and q/k scaled up, so that attention is far from
  uniform and a wrong mask, position or slot changes the outputs."""
  with torch.no_grad():
    for name, p in llm.named_parameters():
      if name.endswith('norm.weight'):
        p.copy_(1 + 0.3 * torch.randn_like(p))
      elif 'q_proj' in name or 'k_proj' in name:
        p.mul_(8.0)
      elif 'embed_tokens' in name:
        p.mul_(20.0)


def _clip_dirs(tmp_path):
  torch.manual_seed(1)
  tower = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      hidden_size=CLIP_WIDTH, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
      image_size=CLIP_SIZE, patch_size=CLIP_PATCH)).eval()
  src = tmp_path / 'clip_hf'
  tower.save_pretrained(src, safe_serialization=True)
  commands.run('clip', str(src), str(tmp_path / 'clip'))
  return tower, str(tmp_path / 'clip')


def _official_checkpoint(tmp_path, tokenizer_file, encoder: str, features: int):
  torch.manual_seed(0)
  llm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=1028, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
      max_position_embeddings=256, attn_implementation='eager')).eval()
  _sharpen_llama(llm)
  extras = OfficialExtras()
  im_embedder = nn.Sequential(nn.Linear(features, D), nn.GELU(), nn.Linear(D, D))
  for p in list(extras.parameters()) + list(im_embedder.parameters()):
    nn.init.normal_(p, std=0.2)
  path = tmp_path / f'official_{encoder}'
  llm.save_pretrained(path, safe_serialization=True)
  state = {k: v.detach().numpy() for k, v in llm.state_dict().items()}
  state.update({k: v.detach().numpy() for k, v in extras.state_dict().items()})
  state.update({f'im_embedder.{k}': v.detach().numpy() for k, v in im_embedder.state_dict().items()})
  safetensors_io.write(str(path / 'model.safetensors'), list(state.items()), {'format': 'pt'})
  config = json.loads((path / 'config.json').read_text())
  config.update(architectures=['MonoFormerForCausalLM'], patch_size=2, in_channels=C,
                learn_sigma=True, decoder_t_embed='add_before_image_tokens',
                use_adaln_final_layer=True, use_pos_embed=True, add_pos_embed_each_layer=False,
                use_bi_attn_img_tokens=True, image_size=LATENT * 8, image_token_index=IMAGE,
                vision_encoder=encoder, vision_encoder_path='somewhere',
                vision_encoder_args={})
  (path / 'config.json').write_text(json.dumps(config))
  (path / 'added_tokens.json').write_text(json.dumps(
      {'<PAD>': PAD, '<image>': IMAGE, '<|im_start|>': IM_START, '<|im_end|>': IM_END}))
  (path / 'tokenizer.model').write_bytes(open(tokenizer_file, 'rb').read())
  return llm, extras, im_embedder, str(path)


def _ours(ids: list[int], tok, tokens_per_image: int, length: int) -> dict:
  """Our arrays for official ids: each IMAGE placeholder expanded into its slots."""
  marked = [understanding.IMAGE if i == IMAGE else i for i in ids]
  layout = understanding.lay_out((marked, [True] * len(marked)), tok, tokens_per_image, length)
  assert layout.valid.sum() == len(ids) + tokens_per_image * ids.count(IMAGE)
  return layout.as_dict()


@pytest.mark.slow
@pytest.mark.parametrize('encoder', ['clip', 'vae'])
def test_understanding_checkpoint_matches_the_official_forward(encoder, tmp_path, tokenizer_file):
  vae_dir = tower = clip_dir = None
  if encoder == 'clip':
    tower, clip_dir = _clip_dirs(tmp_path)
    features_width = CLIP_WIDTH
  else:
    vae_dir, features_width = converted_vae(tmp_path), 2 * 2 * C
  llm, extras, im_embedder, src = _official_checkpoint(tmp_path, tokenizer_file, encoder,
                                                       features_width)
  dst = str(tmp_path / 'work')
  commands.run('official', src, dst, ema=True, vae=vae_dir or '', clip=clip_dir or '')
  restored = workdir_lib.for_inference(dst, use_ema=True)
  model, params, tok = restored.setup.model, restored.params, restored.setup.tok
  assert restored.setup.settings.vision.encoder == VisionEncoder(encoder)

  # what each image is read as: CLIP's second-to-last block, or the VAE latents patchified
  if encoder == 'clip':
    pixels = torch.randn(2, 3, CLIP_SIZE, CLIP_SIZE)
    with torch.no_grad():
      theirs = tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    ours_tower, tower_params = clip.load(clip_dir)
    features = np.asarray(ours_tower.apply({'params': tower_params},
                                           pixels.numpy().transpose(0, 2, 3, 1),
                                           method=clip.VisionTower.features))
  else:
    latents = torch.randn(2, C, LATENT, LATENT)  # the official VAE encoder's patchify
    theirs = latents.view(2, C, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).flatten(3).flatten(1, 2)
    features = np.asarray(model_lib.patchify(latents.numpy().transpose(0, 2, 3, 1), 2))
  np.testing.assert_allclose(features, theirs.numpy(), rtol=1e-5, atol=1e-5)
  m = features.shape[1]
  assert model.understanding == model_lib.UnderstandingShape(m, features_width)

  x_t = torch.randn(2, C, LATENT, LATENT)
  t = torch.tensor([321, 777])
  official_ids = torch.full((2, len(BOTH)), PAD)
  for b, row in enumerate([UNDERSTAND, BOTH]):
    official_ids[b, :len(row)] = torch.tensor(row)
  with torch.no_grad():
    want_images, want_logits = multimodal_forward(llm, extras, im_embedder, official_ids,
                                                  [[1], [1, 0]], x_t, theirs, t)

  # row 0 reads an image: a text pass
  length = len(UNDERSTAND) + m + 3
  text = _ours(UNDERSTAND, tok, m, length)
  n = int(text['valid'].sum())
  read = Understanding(features[None, :1], text['slot'][None], text['offset'][None], t.numpy()[:1])
  logits = model.apply({'params': params}, text['tokens'][None], text['valid'][None],
                       mask_type=MaskType.CAUSAL, understand=read).logits
  np.testing.assert_allclose(np.asarray(logits)[0, :n], want_logits[0, :n].numpy(), rtol=1e-5,
                             atol=1e-5 * float(want_logits.abs().max()))

  # row 1 reads an image and draws one: an image pass with the read image in its prefix
  prefix_ids = BOTH[:BOTH.index(IM_START) + 1]
  prefix = {k: np.roll(v, 2) for k, v in _ours(prefix_ids, tok, m, len(prefix_ids) + m + 2).items()}
  read = Understanding(features[None, 1:], prefix['slot'][None], prefix['offset'][None],
                       t.numpy()[1:])
  out = model.apply({'params': params}, prefix['tokens'][None], prefix['valid'][None],
                    mask_type=MaskType.HYBRID, image=x_t[1:].numpy().transpose(0, 2, 3, 1),
                    t=t.numpy()[1:], suffix=np.full((1, 1), IM_END, np.int32),
                    return_hidden=True, understand=read)
  want = want_images[0].numpy().transpose(1, 2, 0)
  np.testing.assert_allclose(np.asarray(out.image)[0], want, rtol=1e-5,
                             atol=1e-5 * np.abs(want).max())
  prefix_logits = model.apply({'params': params}, out.hidden, method=model_lib.MonoFormer.logits)
  p = len(prefix_ids) + m
  np.testing.assert_allclose(np.asarray(prefix_logits)[0, 2:], want_logits[1, :p].numpy(),
                             rtol=1e-5, atol=1e-5 * float(want_logits.abs().max()))

  # back to the official layout: every source tensor as it was, the encoder's own beside them
  back = tmp_path / 'exported'
  commands.run('export-official', dst, str(back), ema=True)
  exported = safetensors_io.SafetensorsDir(str(back))
  source = safetensors_io.SafetensorsDir(src)
  for name in source.keys():
    np.testing.assert_array_equal(exported[name], source[name], err_msg=name)
  config = json.loads((back / 'config.json').read_text())
  assert config['vision_encoder'] == encoder
  tower = {k[len(official_export.TOWER):] for k in exported.keys()
           if k.startswith(official_export.TOWER)}
  if encoder == 'clip':
    want_tower = {f'vision_model.{k}' for k in safetensors_io.SafetensorsDir(
        str(tmp_path / 'clip_hf')).keys()}
  else:
    want_tower = set(safetensors_io.SafetensorsDir(str(tmp_path / 'vae_src'),
                                                   'diffusion_pytorch_model.safetensors').keys())
  assert tower == want_tower


def test_an_understanding_checkpoint_needs_its_encoder(tmp_path, tokenizer_file):
  _, _, _, src = _official_checkpoint(tmp_path, tokenizer_file, 'clip', CLIP_WIDTH)
  with pytest.raises(UserError, match='reads images with a CLIP tower .*pass --clip=DIR'):
    commands.run('official', src, str(tmp_path / 'out'), ema=True)
  assert not (tmp_path / 'out').exists()
