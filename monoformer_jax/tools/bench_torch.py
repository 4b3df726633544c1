"""The PyTorch side of `bench --compare_torch`: HF transformers steps of the bench shapes.

The text step is LlamaForCausalLM's own loss; the image step runs LlamaModel on [prompt, time token,
patches, <im_end>] embeddings under the hybrid mask with the DiT-side linear layers around it (the
official code's structure), with an MSE loss. Both clip gradients to the config's norm, take an
AdamW step and update an EMA copy, as `steps.ar_step` / `steps.diffusion_step` do.
"""

import importlib

import ml_collections
import numpy as np

from monoformer_jax.base.errors import UserError
from monoformer_jax.nn.layers import BackboneConfig
from monoformer_jax.nn.model import ImageSequence


_TORCHVISION_OPS = []  # the op declarations stay registered while this module lives


def make_torchvision_importable() -> None:
  """Lets torchvision's pure-Python parts import where its C++ ops do not load.

  The torchvision wheel pinned for the CPU torch is built against the CUDA torch: its ops
  library fails to load (silently), and its import then stops while registering fake kernels
  for two of those ops (`operator torchvision::nms does not exist`). transformers imports
  torchvision whenever it is installed, so LlamaForCausalLM fails with it. Declaring the two
  op schemas lets the import finish; nothing here calls them. The tests use this too."""
  import torch  # pylint: disable=g-import-not-at-top
  try:
    importlib.import_module('torchvision')
  except ImportError:
    return  # not installed: nothing imports it
  except RuntimeError:
    lib = torch.library.Library('torchvision', 'DEF')
    for op in ('nms', 'qnms'):
      lib.define(f'{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
    _TORCHVISION_OPS.append(lib)
    importlib.import_module('torchvision')


def modules():
  """(torch, transformers) with LlamaForCausalLM loaded, or a UserError that says what to
  install, before the bench spends minutes on the JAX side."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    make_torchvision_importable()
    import transformers  # pylint: disable=g-import-not-at-top
    transformers.LlamaForCausalLM  # pylint: disable=pointless-statement  # imported lazily
  except (ImportError, RuntimeError) as e:
    reason = ' '.join(f'{type(e).__name__}: {e}'.split())
    raise UserError(f'--compare_torch needs torch and transformers, which did not import '
                    f'({reason}); install them with pip install -r requirements-test.txt.'
                    ) from None
  return torch, transformers


def _llama_config(config: ml_collections.ConfigDict, cfg: BackboneConfig):
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_dim,
      num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
      rope_theta=cfg.rope_theta, tie_word_embeddings=config.model.tie_embeddings,
      max_position_embeddings=8192, attn_implementation='sdpa')


def _image_model(config: ml_collections.ConfigDict, cfg: BackboneConfig, layout: ImageSequence):
  """LlamaModel with the DiT-side layers: fn(prompt [B, P], patches [B, N, C*p*p], t_freq [B, 256],
  suffix [B, Q], mask) for sequences laid out as `layout`."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  m = config.model
  width = cfg.width
  patch_dim = m.image_channels * m.patch_size**2
  out_dim = patch_dim * (2 if m.learn_sigma else 1)

  class ImageModel(nn.Module):

    def __init__(self):
      super().__init__()
      self.llama = transformers.LlamaModel(_llama_config(config, cfg))
      self.x_embedder = nn.Linear(patch_dim, width)
      self.t_embedder = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
      self.t_projector = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
      self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
      self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
      self.linear = nn.Linear(width, out_dim)

    def forward(self, prompt, patches, t_freq, suffix, mask):
      t_emb = self.t_embedder(t_freq)
      embeds = torch.cat([self.llama.embed_tokens(prompt), self.t_projector(t_emb)[:, None],
                          self.x_embedder(patches), self.llama.embed_tokens(suffix)], dim=1)
      hidden = self.llama(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
      image = self.norm(hidden[:, layout.image_start:layout.image_end])
      shift, scale = self.modulation(t_emb).chunk(2, dim=-1)
      return self.linear(image * (1 + scale[:, None]) + shift[:, None])

  return ImageModel()


def _hybrid_mask(layout: ImageSequence):
  """[1, 1, T, T] bool: causal, plus full attention among the image tokens."""
  import torch  # pylint: disable=g-import-not-at-top
  allowed = torch.ones(layout.length, layout.length).tril().bool()
  image = slice(layout.image_start, layout.image_end)
  allowed[image, image] = True
  return allowed[None, None]


def make_steps(config: ml_collections.ConfigDict, cfg: BackboneConfig) -> tuple[dict, dict]:
  """({'ar': step, 'diffusion': step}, versions and threads): each step a blocking callable."""
  torch, transformers = modules()
  torch.manual_seed(config.seed)
  rng = np.random.default_rng(0)
  d, m, o = config.data, config.model, config.optim
  dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[m.dtype]

  def trainer(module, loss_fn):
    module = module.to(dtype)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=o.learning_rate, betas=(o.b1, o.b2),
                            weight_decay=o.weight_decay)
    ema = [p.detach().clone() for p in params]

    def step():
      loss = loss_fn(module)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
      opt.step()
      opt.zero_grad(set_to_none=True)
      with torch.no_grad():
        torch._foreach_lerp_(ema, params, 1.0 - config.train.ema_decay)  # pylint: disable=protected-access

    return step

  ids = torch.from_numpy(rng.integers(0, m.vocab_size, (d.text_batch_size, d.text_seq_len)))
  text_step = trainer(transformers.LlamaForCausalLM(_llama_config(config, cfg)),
                      lambda model: model(input_ids=ids, labels=ids).loss)

  grid = (m.image_size[0] // m.patch_size) * (m.image_size[1] // m.patch_size)
  layout = ImageSequence(d.prompt_len, grid)
  patch_dim = m.image_channels * m.patch_size**2
  b = d.image_batch_size
  prompt = torch.from_numpy(rng.integers(0, m.vocab_size, (b, d.prompt_len)))
  suffix = torch.from_numpy(rng.integers(0, m.vocab_size, (b, 1)))
  patches = torch.randn(b, grid, patch_dim, dtype=dtype)
  noise = torch.randn(b, grid, patch_dim, dtype=dtype)
  t_freq = torch.randn(b, 256, dtype=dtype)
  mask = _hybrid_mask(layout).expand(b, 1, -1, -1)

  def image_loss(model):
    out = model(prompt, patches, t_freq, suffix, mask)
    return torch.nn.functional.mse_loss(out[..., :patch_dim], noise)

  image_step = trainer(_image_model(config, cfg, layout), image_loss)
  about = dict(torch=torch.__version__, transformers=transformers.__version__,
               threads=torch.get_num_threads())
  return dict(ar=text_step, diffusion=image_step), about


def make_decoder(config: ml_collections.ConfigDict, cfg: BackboneConfig):
  """fn(prompt [B, P] int array, new_tokens) that samples exactly new_tokens more with
  LlamaForCausalLM.generate and its KV cache (temperature 1, no early stop), as bench_decode
  does on the JAX side."""
  torch, transformers = modules()
  torch.manual_seed(config.seed)
  dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[config.model.dtype]
  model = transformers.LlamaForCausalLM(_llama_config(config, cfg)).to(dtype).eval()

  def decode(prompt: np.ndarray, new_tokens: int) -> None:
    with torch.no_grad():
      model.generate(torch.from_numpy(np.asarray(prompt)), attention_mask=None,
                     max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                     temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0,
                     use_cache=True)

  return decode
