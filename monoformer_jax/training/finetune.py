"""What a run trains of a model started from a converted LLM (train.finetune), and how.

`full` trains every parameter. The other modes freeze the LLM's backbone (its embedding, decoder
blocks, final norm and output layer): `frozen_text` trains MonoFormer's own modules alone;
`lora` adds qwix's LoRA adapters (A [in, r] drawn, B [r, out] zero, scaled by alpha / r) to the
chosen projections of every decoder block and trains them with MonoFormer's own modules.
The parameters are split in two trees: the trainable ones, which are the train state's (and so
all that has gradients, optimizer moments, an EMA and a checkpoint), and the frozen ones, merged
back in for every forward pass.
"""

import dataclasses
import enum
from typing import Optional

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import qwix

from monoformer_jax.base.errors import UserError
from monoformer_jax.config import schema


class Finetune(enum.Enum):
  FULL = 'full'  # every parameter trains
  LORA = 'lora'  # the backbone frozen; LoRA adapters on lora.targets and MonoFormer's modules train
  QLORA = 'qlora'  # as lora, the kernels the adapters adapt stored quantized (lora.quantize)
  FROZEN_TEXT = 'frozen_text'  # the backbone frozen; only MonoFormer's own modules train


class BaseQuant(enum.Enum):
  """How qlora stores the adapted kernels (qwix's types): absmax-scaled per output channel, or
  per block of lora.block_size inputs."""
  NF4 = 'nf4'  # 4-bit NormalFloat (QLoRA's)
  INT4 = 'int4'
  INT8 = 'int8'


# A decoder block's projections that adapters may target, and the module each belongs to.
TARGETS = {'q_proj': 'self_attn', 'k_proj': 'self_attn', 'v_proj': 'self_attn',
           'o_proj': 'self_attn', 'gate_proj': 'mlp', 'up_proj': 'mlp', 'down_proj': 'mlp'}
# The top-level modules of the LLM's backbone; everything else is MonoFormer's own.
BACKBONE = ('embed_tokens', 'decoder', 'norm', 'lm_head')
ADAPTER_SUFFIXES = ('_lora_a', '_lora_b')
FROZEN_DTYPES = ('float32', 'bfloat16')


@dataclasses.dataclass(frozen=True)
class FinetuneSpec:
  """train.finetune and the lora section, checked."""
  mode: Finetune = Finetune.FULL
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = tuple(TARGETS)
  quantize: Optional[BaseQuant] = None  # qlora's storage of the adapted kernels
  block_size: int = 0  # inputs per quantization scale; 0: one per output channel
  frozen_dtype: str = 'float32'  # the frozen backbone's float parameters on the devices
  checkpoint_frozen: bool = False  # checkpoints hold the frozen backbone too

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'FinetuneSpec':
    mode = schema.choice(Finetune, config.train.finetune, 'train.finetune')
    lora = config.lora
    targets = tuple(t.strip() for t in lora.targets.split(',') if t.strip())
    frozen_dtype = config.train.frozen_dtype
    if frozen_dtype not in FROZEN_DTYPES:
      raise UserError(f'config key train.frozen_dtype is {frozen_dtype!r}; expected one of '
                      f'{", ".join(map(repr, FROZEN_DTYPES))}.')
    checkpoint_frozen = config.train.checkpoint_frozen
    if mode == Finetune.FULL:
      if checkpoint_frozen:
        raise UserError('config key train.checkpoint_frozen is True, but train.finetune \'full\' '
                        'freezes nothing (its checkpoints hold every parameter already); expected '
                        'False, or a train.finetune that freezes the backbone.')
      return cls(mode)
    if not config.model.init_from:
      raise UserError(f'config key train.finetune is {mode.value!r}, which freezes a pretrained '
                      'backbone; set model.init_from to a converted LLM directory.')
    if mode in (Finetune.LORA, Finetune.QLORA):
      unknown = [t for t in targets if t not in TARGETS]
      if unknown or not targets:
        raise UserError(f'config key lora.targets is {lora.targets!r}; expected a comma-separated '
                        f'list of {", ".join(TARGETS)}.')
      if not (isinstance(lora.rank, int) and lora.rank > 0):
        raise UserError(f'config key lora.rank is {lora.rank!r}; expected a positive integer.')
      if not lora.alpha > 0:
        raise UserError(f'config key lora.alpha is {lora.alpha!r}; expected a positive number.')
      if not (isinstance(lora.dropout, (int, float)) and 0 <= lora.dropout < 1):
        raise UserError(f'config key lora.dropout is {lora.dropout!r}; expected a rate in '
                        '[0, 1).')
    quantize, block = None, 0
    if mode == Finetune.QLORA:
      quantize = schema.choice(BaseQuant, lora.quantize, 'lora.quantize')
      block = lora.block_size
      if not (isinstance(block, int) and block >= 0):
        raise UserError(f'config key lora.block_size is {block!r}; expected a non-negative '
                        'integer (0: one scale per output channel).')
    return cls(mode, lora.rank, float(lora.alpha), float(lora.dropout), targets, quantize, block,
               frozen_dtype, checkpoint_frozen)

  @property
  def frozen(self) -> bool:
    return self.mode != Finetune.FULL

  @property
  def adapters(self) -> bool:
    return self.mode in (Finetune.LORA, Finetune.QLORA)

  @property
  def adapter_dropout(self) -> bool:
    """Whether the train steps drop the adapters' inputs (their model needs a 'dropout' key)."""
    return self.adapters and self.dropout > 0

  def unquantized(self) -> 'FinetuneSpec':
    """The same adapters on a float base: the model whose parameters a qlora base is made from."""
    return dataclasses.replace(self, quantize=None)

  def without_dropout(self) -> 'FinetuneSpec':
    """The same adapters, never dropped: the model of every pass but the train steps'."""
    return dataclasses.replace(self, dropout=0.0)

  def wrap(self, model):
    """The model, with qwix's LoRA adapters on the targets (and with qlora, the adapted
    kernels quantized) where the mode has them."""
    if not self.adapters:
      return model
    backbone = dataclasses.replace(model.backbone, adapter_rank=self.rank)
    if self.mode == Finetune.QLORA:
      self._check_blocks(model.backbone)
      backbone = dataclasses.replace(backbone, keep_kernel_axes=True)
    model = model.clone(backbone=backbone)
    by_module = {}
    for target in self.targets:
      by_module.setdefault(TARGETS[target], []).append(target)
    paths = '|'.join(f'{module}/({"|".join(names)})' for module, names in by_module.items())
    rule = qwix.LoraRule(module_path=f'decoder/layers/({paths})', rank=self.rank,
                         alpha=self.alpha, dropout=self.dropout,
                         weight_qtype=self.quantize.value if self.quantize else None,
                         tile_size=self.block_size or None)
    return qwix.apply_lora_to_model(model, qwix.LoraProvider([rule]))

  def _check_blocks(self, cfg) -> None:
    """Each adapted kernel's last input axis (the one qwix splits into blocks) divides into
    lora.block_size blocks."""
    inputs = {'o_proj': ('head width', cfg.head_dim), 'down_proj': ('MLP width', cfg.mlp_dim)}
    for target in self.targets if self.block_size else ():
      axis, size = inputs.get(target, ('width', cfg.width))
      if size % self.block_size:
        raise UserError(f'config key lora.block_size is {self.block_size}, but the {target} '
                        f'kernels read the model\'s {axis} of {size} inputs, which do not split '
                        'into blocks of that size: the base cannot be quantized so; expected a '
                        'block size dividing it (or 0: one scale per output channel).')

  def trains(self, path: tuple[str, ...]) -> bool:
    """Whether the parameter at `path` (its keys from the top) trains."""
    if not self.frozen or path[0] not in BACKBONE:
      return True
    return self.adapters and path[-1].endswith(ADAPTER_SUFFIXES)

  def split(self, params: dict) -> tuple[dict, dict]:
    """(trainable, frozen) parameter trees; merge() puts them back together."""
    flat = flax.traverse_util.flatten_dict(params)
    parts = ({}, {})
    for path, value in flat.items():
      parts[not self.trains(path)][path] = value
    return tuple(flax.traverse_util.unflatten_dict(p) for p in parts)


def merge(trainable: dict, frozen: dict) -> dict:
  """The whole parameter tree from its trainable and frozen parts (frozen may be empty)."""
  if not frozen:
    return trainable
  flat = flax.traverse_util.flatten_dict(trainable)
  flat.update(flax.traverse_util.flatten_dict(frozen))
  return flax.traverse_util.unflatten_dict(flat)


def fold(kernel, a, b, spec: FinetuneSpec):
  """The kernel with its adapter (A, B) folded in: kernel + A B alpha / r, reshaped to the
  kernel (qwix flattens the kernel's input axes into A's rows and its output axes into B's
  columns, both in the kernel's order), computed in float32."""
  delta = jnp.einsum('...ir,...ro->...io', jnp.asarray(a, jnp.float32),
                     jnp.asarray(b, jnp.float32)) * (spec.alpha / spec.rank)
  return (jnp.asarray(kernel, jnp.float32) + delta.reshape(kernel.shape)).astype(kernel.dtype)


def adapters_of(path: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """The paths of the A and B adapting the kernel at `path` (when it has them)."""
  return tuple(path[:-1] + (path[-1] + suffix,) for suffix in ADAPTER_SUFFIXES)


def merged_adapters(params: dict, spec: FinetuneSpec) -> dict:
  """The parameters with every LoRA adapter folded into the kernel it adapts and removed: the
  parameters of the plain model that computes what the adapted one does."""
  flat = flax.traverse_util.flatten_dict(params)
  merged = {}
  for path, value in flat.items():
    if path[-1].endswith(ADAPTER_SUFFIXES):
      continue
    a, b = adapters_of(path)
    merged[path] = fold(value, flat[a], flat[b], spec) if a in flat else value
  return flax.traverse_util.unflatten_dict(merged)


def quantized_like(value, abstract):
  """A float kernel [L, ...] stacked over the blocks, quantized block by block as the qwix
  parameter `abstract` (a WithAux the quantizing model's init made) says."""
  how = abstract.how
  quantize = lambda w: qwix.quantize(  # noqa: E731
      w, how.qtype, channelwise_axes=how.channelwise_axes, tiled_axes=how.tiled_axes,
      calibration_method=how.calibration_method)
  return abstract.replace(array=jax.vmap(quantize)(jnp.asarray(value)))


def kept_as(value, abstract, frozen_dtype: Optional[str]):
  """A frozen float parameter as the devices keep it: quantized where its abstract is (qlora's
  kernels), else in frozen_dtype (None: as it is)."""
  if is_quantized(abstract):
    return quantized_like(value, abstract)
  return value.astype(jnp.dtype(frozen_dtype)) if frozen_dtype else value


def is_quantized(leaf) -> bool:
  return hasattr(leaf, 'how')  # qwix's WithAux


def dequantized(leaf):
  """A quantized kernel (quantized_like's) back in float, block by block."""
  return jax.vmap(qwix.dequantize)(leaf.array)



def _narrow(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.integer) and jnp.iinfo(dtype).bits < 8


def storable(tree):
  """The frozen parameters as a checkpoint stores them: 4-bit values (qlora's nf4 and int4
  kernels, which the array store has no type for) widened to 8 bits."""
  def widened(leaf):
    if not _narrow(leaf.dtype):
      return leaf
    wide = jnp.int8 if jnp.issubdtype(leaf.dtype, jnp.signedinteger) else jnp.uint8
    if isinstance(leaf, jax.ShapeDtypeStruct):
      return leaf.update(dtype=wide)
    return leaf.astype(wide)
  return jax.tree.map(widened, tree)


def from_storable(tree, like):
  """storable()'s tree back in the dtypes of `like` (the frozen parameters or their shapes)."""
  return jax.tree.map(lambda leaf, want: leaf.astype(want.dtype) if _narrow(want.dtype) else leaf,
                      tree, like)
