"""The official MonoFormer forward pass written out in torch, as a reference.

The reference is HF transformers' LlamaModel (the official backbone) driven
exactly as MonoFormer's PyTorch code drives it: the sequence
`BOS prompt <|im_start|> [time token] [image tokens] <|im_end|>` right-padded,
positions counted over real tokens, image tokens attending to their whole span,
and MonoFormer's modules (timestep embedder, time-token projector, patch
embedder with the sin-cos grid, adaLN final layer, unpatchify) written out in
torch from the official definitions.
"""

import math

import numpy as np
import torch
from torch import nn

D, P, C, LATENT = 32, 2, 4, 8  # width, patch, latent channels, latent size (image_size 64)
PAD, IMAGE, IM_START, IM_END = 1024, 1025, 1026, 1027  # appended to a 1,024-piece tokenizer


class OfficialExtras(nn.Module):
  """MonoFormer's modules, named and initialized as the official MonoFormerForCausalLM."""

  def __init__(self, D=D, P=P, C=C):  # noqa: N803  (the official names)
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


def official_forward(llm, extras, input_ids, x_t, t, pad=PAD, image=IMAGE):
  """eps/sigma prediction [B, 2C, H, W] of the official model for one image per row, and the
  text logits at every position."""
  out, logits = multimodal_forward(llm, extras, None, input_ids, [[0]] * len(input_ids), x_t,
                                   [], t, pad, image)
  return torch.stack(out), logits


def multimodal_forward(llm, extras, im_embedder, input_ids, flags, x_t, features, t, pad=PAD,
                       image=IMAGE):
  """The main branch's forward: the k-th `image` token of row b is an image to generate
  (flags[b][k] == 0: x_t[b] through x_embedder, the sin-cos grid, attended bidirectionally) or
  to understand (1: the next of `features` [n, M, E] through im_embedder); each comes after a
  time token of t[b]. Returns the predictions [2C, H, W] of the rows that generate, and the
  logits [B, S, V] at every position (right-padded)."""
  D = llm.config.hidden_size  # noqa: N806
  P = int(round((extras.x_embedder.in_features / x_t.shape[1])**0.5))  # noqa: N806
  C, LATENT = x_t.shape[1], x_t.shape[-1]  # noqa: N806
  t_emb = extras.t_embedder.mlp(timestep_embedding(t))
  t_tok = extras.t_projector(t_emb)
  h = LATENT // P
  patches = x_t.view(-1, C, h, P, h, P).permute(0, 2, 4, 1, 3, 5).flatten(3).flatten(1, 2)
  x_emb = extras.x_embedder(patches)
  understood = iter(im_embedder(features) if len(features) else [])
  embed = llm.model.embed_tokens
  rows, spans = [], []
  for b, ids in enumerate(input_ids):
    ids = ids[ids != pad]
    at = torch.where(ids == image)[0].tolist()
    parts, span, start = [], None, 0
    for k, where in enumerate(at):
      parts += [embed(ids[start:where]), t_tok[b:b + 1]]
      first = sum(len(x) for x in parts)
      parts.append(x_emb[b] if flags[b][k] == 0 else next(understood))
      if flags[b][k] == 0:
        span = (first, first + h * h)
      start = where + 1
    parts.append(embed(ids[start:]))
    rows.append(torch.cat(parts))
    spans.append(span)
  length, batch = max(len(r) for r in rows), len(rows)
  embeds = torch.zeros(batch, length, D)
  valid = torch.zeros(batch, length, dtype=torch.bool)
  positions = torch.zeros(batch, length, dtype=torch.long)
  in_image = torch.zeros(batch, length, dtype=torch.bool)
  grid = sincos_grid(D, h)
  for b, row in enumerate(rows):  # right padding, as the official collator
    embeds[b, :len(row)] = row
    valid[b, :len(row)] = True
    positions[b, :len(row)] = torch.arange(len(row))
    if spans[b]:  # the grid goes on the generated image only (the first layer's input)
      in_image[b, spans[b][0]:spans[b][1]] = True
      embeds[b, spans[b][0]:spans[b][1]] += grid
  causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
  allowed = (causal[None] | (in_image[:, :, None] & in_image[:, None, :])) & valid[:, None, :]
  allowed |= torch.eye(length, dtype=torch.bool)[None]  # keep padded query rows finite
  mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]
  hidden = llm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
  shift, scale = extras.final_layer.adaLN_modulation(t_emb).chunk(2, dim=1)
  out = []
  for b in range(batch):
    if spans[b] is None:
      continue
    x = extras.final_layer.norm_final(hidden[b, spans[b][0]:spans[b][1]])
    x = extras.final_layer.linear(x * (1 + scale[b]) + shift[b])
    out.append(x.view(h, h, P, P, 2 * C).permute(4, 0, 2, 1, 3).flatten(3, 4).flatten(1, 2))
  return out, llm.lm_head(hidden)


def converted_vae(tmp_path) -> str:
  """A tiny SD-VAE-shaped autoencoder (downsampling 8), converted."""
  from diffusers import AutoencoderKL  # pylint: disable=g-import-not-at-top
  from monoformer_jax.convert import commands  # pylint: disable=g-import-not-at-top
  vae_src, vae_dst = tmp_path / 'vae_src', tmp_path / 'vae'
  AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=('DownEncoderBlock2D',) * 4,
                up_block_types=('UpDecoderBlock2D',) * 4, layers_per_block=1, norm_num_groups=4,
                latent_channels=C).save_pretrained(vae_src, safe_serialization=True)
  commands.run('vae', str(vae_src), str(vae_dst))
  return str(vae_dst)
