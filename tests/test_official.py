"""Official MonoFormer checkpoints: converted predictions equal the official forward.

The reference is HF transformers' LlamaModel (the official backbone) driven
exactly as MonoFormer's PyTorch code drives it: the sequence
`BOS prompt <|im_start|> [time token] [image tokens] <|im_end|>` right-padded,
positions counted over real tokens, image tokens attending to their whole span,
and MonoFormer's modules (timestep embedder, time-token projector, patch
embedder with the sin-cos grid, adaLN final layer, unpatchify) written out in
torch from the official definitions.
"""

import json
import math

import numpy as np
import pytest
import torch
import transformers
from torch import nn

from helpers import cli
from monoformer_jax import workdir as workdir_lib
from monoformer_jax.convert import commands, safetensors_io
from monoformer_jax.diffusion import GuidanceChannels
from monoformer_jax.layers import MaskType
from monoformer_jax.errors import UserError

D, P, C, LATENT = 32, 2, 4, 8  # width, patch, latent channels, latent size (image_size 64)
PAD, IMAGE, IM_START, IM_END = 1024, 1025, 1026, 1027  # appended to a 1,024-piece tokenizer


class OfficialExtras(nn.Module):
  """MonoFormer's modules, named and initialized as the official MonoFormerForCausalLM."""

  def __init__(self):
    super().__init__()
    self.t_embedder = nn.Module()
    self.t_embedder.mlp = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
    self.x_embedder = nn.Linear(P * P * C, D)
    self.t_projector = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D))
    self.final_layer = nn.Module()
    self.final_layer.norm_final = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
    self.final_layer.linear = nn.Linear(D, P * P * 2 * C)
    self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))


def timestep_embedding(t, dim=256, max_period=10000):
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
  args = t[:, None].float() * freqs[None]
  return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_grid(dim, grid):
  def one(d, pos):
    omega = 1.0 / 10000**(np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.einsum('m,d->md', pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  g = np.stack(np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)))
  return torch.from_numpy(np.concatenate([one(dim // 2, g[0]), one(dim // 2, g[1])], 1)).float()


def official_forward(llm, extras, input_ids, x_t, t):
  """eps/sigma prediction [B, 2C, H, W] of the official model for one image per row."""
  t_emb = extras.t_embedder.mlp(timestep_embedding(t))
  t_tok = extras.t_projector(t_emb)
  h = LATENT // P
  patches = x_t.view(-1, C, h, P, h, P).permute(0, 2, 4, 1, 3, 5).flatten(3).flatten(1, 2)
  x_emb = extras.x_embedder(patches) + sincos_grid(D, h)[None]
  rows, spans = [], []
  for b, ids in enumerate(input_ids):
    ids = ids[ids != PAD]
    at = int(torch.where(ids == IMAGE)[0])
    embed = llm.model.embed_tokens
    row = torch.cat([embed(ids[:at]), t_tok[b:b + 1], x_emb[b], embed(ids[at + 1:])])
    rows.append(row)
    spans.append((at + 1, at + 1 + h * h))
  length = max(len(r) for r in rows)
  batch = len(rows)
  embeds = torch.zeros(batch, length, D)
  valid = torch.zeros(batch, length, dtype=torch.bool)
  positions = torch.zeros(batch, length, dtype=torch.long)
  in_image = torch.zeros(batch, length, dtype=torch.bool)
  for b, row in enumerate(rows):  # right padding, as the official collator
    embeds[b, :len(row)] = row
    valid[b, :len(row)] = True
    positions[b, :len(row)] = torch.arange(len(row))
    in_image[b, spans[b][0]:spans[b][1]] = True
  causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
  allowed = (causal[None] | (in_image[:, :, None] & in_image[:, None, :])) & valid[:, None, :]
  allowed |= torch.eye(length, dtype=torch.bool)[None]  # keep padded query rows finite
  mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]
  hidden = llm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
  shift, scale = extras.final_layer.adaLN_modulation(t_emb).chunk(2, dim=1)
  out = []
  for b in range(batch):
    x = extras.final_layer.norm_final(hidden[b, spans[b][0]:spans[b][1]])
    x = extras.final_layer.linear(x * (1 + scale[b]) + shift[b])
    out.append(x.view(h, h, P, P, 2 * C).permute(4, 0, 2, 1, 3).flatten(3, 4).flatten(1, 2))
  return torch.stack(out), llm.lm_head(hidden)


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
  commands.run('official', src, dst, use_ema=True, vae_dir=_converted_vae(tmp_path))
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


def _converted_vae(tmp_path) -> str:
  """A tiny SD-VAE-shaped autoencoder (downsampling 8), converted."""
  from diffusers import AutoencoderKL  # pylint: disable=g-import-not-at-top
  vae_src, vae_dst = tmp_path / 'vae_src', tmp_path / 'vae'
  AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=('DownEncoderBlock2D',) * 4,
                up_block_types=('UpDecoderBlock2D',) * 4, layers_per_block=1, norm_num_groups=4,
                latent_channels=C).save_pretrained(vae_src, safe_serialization=True)
  commands.run('vae', str(vae_src), str(vae_dst), use_ema=True)
  return str(vae_dst)


def _sample_through_the_vae(workdir, tmp_path):
  """`sample` on the converted workdir decodes latents with the VAE given at conversion."""
  out = tmp_path / 'official.png'
  result = cli('sample', f'--workdir={workdir}', '--prompt=goldfish', '--num=2', '--steps=2',
               f'--out={out}')
  assert result.returncode == 0, result.stderr[-2000:]
  images = np.load(tmp_path / 'official.npz')['images']
  assert images.shape == (2, LATENT * 8, LATENT * 8, 3) and images.dtype == np.uint8


def test_unsupported_official_variants_are_refused(official_dir, tmp_path):
  _, _, src = official_dir
  import shutil  # pylint: disable=g-import-not-at-top
  other = tmp_path / 'variant'
  shutil.copytree(src, other)
  config = json.loads((other / 'config.json').read_text())
  (other / 'config.json').write_text(json.dumps(dict(config, decoder_t_embed='add_at_each_layer')))
  with pytest.raises(UserError, match="decoder_t_embed = 'add_at_each_layer'; only "
                                      "'add_before_image_tokens'"):
    commands.run('official', str(other), str(tmp_path / 'out'), use_ema=True)
  assert not (tmp_path / 'out').exists()
