"""Opening a workdir: what training sets up in it, and what inference reads back.

Inference needs nothing but the workdir (and the VAE where latents are decoded to pixels): the
config comes from the newest checkpoint that restores and is only validated, never checked against
the training inputs it names, which may be gone. Training holds the workdir's lock (a lease in a
bucket: workdir_lock) while it runs, so a second `train` on the same workdir is refused.
"""

import contextlib
import copy
import dataclasses
import os
from typing import Any, Optional

import flax.linen as nn
import flax.traverse_util
import jax
import ml_collections
import numpy as np
import optax

from monoformer_jax.base import files, sharding
from monoformer_jax.base.errors import UserError
from monoformer_jax.config import schema
from monoformer_jax.data import pipeline, tokenizer as tokenizer_lib
from monoformer_jax.nn import converted, model as model_lib
from monoformer_jax.nn.model import MonoFormer
from monoformer_jax.run import backbone, settings as settings_lib, workdir_lock
from monoformer_jax.training import checkpoint, finetune, steps



@dataclasses.dataclass(frozen=True)
class Setup:
  """What every command builds from a config."""
  config: ml_collections.ConfigDict
  settings: settings_lib.Settings
  model: MonoFormer
  tok: tokenizer_lib.Tokenizer
  layout: sharding.Layout
  tx: Optional[optax.GradientTransformation] = None  # training only
  lock: Optional[workdir_lock.FileLock | workdir_lock.BucketLease] = None  # training, process 0
  frozen: Any = None  # the parameters that do not train (train.finetune), on the devices
  base: Optional[dict] = None  # backbone.reference() of the LLM the frozen ones come from

  def whole(self, params):
    """The model's whole parameter tree from those that train."""
    return finetune.merge(params, self.frozen)


def _check_vocabulary(config: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer) -> None:
  if tok.vocab_size > config.model.vocab_size:
    raise UserError(f'the tokenizer {tok.path} has {tok.vocab_size} pieces; config key '
                    f'model.vocab_size is only {config.model.vocab_size}.')


def check_workdir(workdir: str) -> None:
  """The workdir is a directory this process can write, or can be created as one (in a
  bucket: the bucket exists)."""
  if files.is_remote(workdir):
    files.makedirs(workdir)
    if files.isfile(workdir):
      raise UserError(f'--workdir {workdir} is an object, not a directory of objects.')
    return
  existing = workdir
  while not os.path.exists(existing):  # local: the permission check below is a local one
    existing = os.path.dirname(os.path.abspath(existing))
  if not os.path.isdir(existing):
    raise UserError(f'--workdir {workdir} is a file (or lies under {existing}, a file); expected '
                    'a directory.')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise UserError(f'--workdir {workdir} is not writable here ({existing} refuses writes).')


def for_training(config: ml_collections.ConfigDict, workdir: str,
                 layout: Optional[sharding.Layout] = None) -> Setup:
  """Checks the config, its model, its inputs and the workdir; then creates the workdir, takes
  its lock and makes its tokenizer. Nothing is created until the checks pass."""
  settings = settings_lib.validate(config)
  model = settings_lib.build_model(config)
  settings_lib.check_inputs(config, settings, model)
  check_workdir(workdir)
  files.makedirs(workdir)
  lock = workdir_lock.take(workdir)
  try:
    tok = tokenizer_lib.for_workdir(workdir, config.model.init_from,
                                    config.data.tokenizer_vocab_size,
                                    lambda: pipeline.tokenizer_texts(config.data))
    _check_vocabulary(config, tok)
  except BaseException:
    if lock:
      lock.close()
    raise
  return Setup(config, settings, model, tok, layout or sharding.make_layout(config.mesh),
               steps.make_optimizer(config.optim, config.train.num_steps), lock)


@dataclasses.dataclass(frozen=True)
class Restored:
  """A workdir's newest restorable checkpoint, ready for inference."""
  setup: Setup
  params: Any  # the EMA or the raw parameters, placed on setup.layout's mesh
  step: int


def param_shapes(model: MonoFormer) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Every parameter's path and shape (nothing allocated)."""
  abstract = jax.eval_shape(lambda k: model_lib.init_params(model, k), jax.random.key(0))
  flat = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract))[0]
  return {tuple(p.key for p in path): tuple(leaf.shape) for path, leaf in flat}


def _state_shapes(config: ml_collections.ConfigDict,
                  layout: sharding.Layout) -> dict[str, tuple[int, ...]]:
  """Every leaf of the train state a config makes (parameters, EMA, optimizer state): its
  path and shape, nothing allocated."""
  settings = settings_lib.validate(config)
  tx = steps.make_optimizer(config.optim, config.train.num_steps)
  state = steps.abstract_state(settings_lib.build_model(config), tx, layout, settings.finetune)[0]
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in flat}


def check_same_state(ckpt: checkpoint.Checkpointer, config: ml_collections.ConfigDict,
                     layout: sharding.Layout) -> None:
  """Refuses a config whose train state differs in shape from the one the workdir's newest
  checkpoint holds (another model size, another optimizer schedule), naming the keys that
  make the difference: the checkpoints are sound, so falling back to older ones would be
  wrong. A saved config that cannot be read is left to the restore's own fallback."""
  try:
    saved = ckpt.restore_config(ckpt.latest_step())
    saved_shapes = _state_shapes(saved, layout)
  except UserError:
    return
  if saved_shapes == _state_shapes(config, layout):
    return

  def plain(value):
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value

  differ = [f'{section}.{k}' for section in ('model', 'optim') for k in config[section].keys()
            if plain(saved[section][k]) != plain(config[section][k])]

  def changes_shapes(key: str) -> bool:
    section, name = key.split('.')
    trial = ml_collections.ConfigDict(saved.to_dict())
    trial[section][name] = config[section][name]
    try:
      return _state_shapes(trial, layout) != saved_shapes
    except UserError:
      return True
  named = [k for k in differ if changes_shapes(k)] or differ
  keys = '; '.join(f'{k} is {plain(saved[k])!r} there and {plain(config[k])!r} here' for k in named)
  raise UserError(f'the checkpoints in {ckpt.directory} hold a train state of another shape than '
                  f'this config makes ({keys or "the saved config differs"}); resume with the '
                  'saved values (drop those overrides) or choose another --workdir.')


def backbone_on_devices(setup: Setup, frozen_dtype: Optional[str] = None) -> dict:
  """The converted LLM of model.init_from as the model's backbone parameters, checked against
  the model and placed as its parameters are sharded; with frozen_dtype, its float parameters
  cast to it on the host (qlora's quantized kernels are kept)."""
  full = steps.abstract_params(setup.model, setup.layout)
  pretrained = backbone.pretrained_backbone(_float_params(setup, full),
                                            setup.config.model.init_from, setup.model.backbone,
                                            setup.model.tie_embeddings)
  where, flat = (flax.traverse_util.flatten_dict(t) for t in (full, pretrained))
  for path, value in flat.items():
    flat[path] = finetune.kept_as(value, where[path], frozen_dtype)
  shardings = {path: jax.tree.map(lambda a: a.sharding, where[path]) for path in flat}
  return jax.device_put(flax.traverse_util.unflatten_dict(flat),
                        flax.traverse_util.unflatten_dict(shardings))


def _float_params(setup: Setup, abstract):
  """The model's parameters (abstract), with qlora's quantized kernels as the float ones they
  are made from."""
  spec = setup.settings.finetune
  if not spec.quantize:
    return abstract
  return steps.abstract_params(settings_lib.build_model(setup.config, spec.unquantized()),
                               setup.layout)


def frozen_abstract(setup: Setup) -> dict:
  """The parameters that do not train as the devices keep them (shapes, dtypes, shardings):
  floats in train.frozen_dtype, qlora's kernels quantized."""
  dtype = jax.numpy.dtype(setup.settings.finetune.frozen_dtype)
  frozen = setup.settings.finetune.split(steps.abstract_params(setup.model, setup.layout))[1]
  return jax.tree.map(lambda leaf: leaf if finetune.is_quantized(leaf) else leaf.update(dtype=dtype),
                      frozen, is_leaf=finetune.is_quantized)


def with_frozen_backbone(setup: Setup, ckpt: Optional[checkpoint.Checkpointer] = None,
                         step: Optional[int] = None) -> Setup:
  """Where train.finetune freezes the backbone: the setup with its parameters that do not train
  (on the devices) and the reference of the converted LLM they come from. They are read from the
  checkpoint step where it holds them (train.checkpoint_frozen), else from model.init_from, which
  must be the LLM the step (if any) recorded."""
  if not setup.settings.finetune.frozen:
    return setup
  data = {} if ckpt is None else ckpt.restore_data(step)
  if data.get(checkpoint.FROZEN_HELD):
    abstract = frozen_abstract(setup)
    frozen = ckpt.restore_frozen(step, finetune.storable(abstract))
    return dataclasses.replace(setup, frozen=finetune.from_storable(frozen, abstract),
                               base=data.get(checkpoint.FROZEN_BASE))
  base = backbone.reference(_frozen_base_path(setup))
  if ckpt is not None:
    backbone.check_reference(data.get(checkpoint.FROZEN_BASE), base, ckpt.workdir.root)
  frozen = backbone_on_devices(setup, setup.settings.finetune.frozen_dtype)
  return dataclasses.replace(setup, frozen=frozen, base=base)


def _frozen_base_path(setup: Setup) -> str:
  path = setup.config.model.init_from
  if not files.isdir(path):
    raise UserError(f'config key model.init_from names {path}, which does not exist: the '
                    f'backbone that train.finetune {setup.config.train.finetune!r} keeps frozen '
                    'is read from there.')
  return path


@contextlib.contextmanager
def parameter_reader(setup: Setup, workdir: str, step: int, dtype: np.dtype, use_ema: bool):
  """Yields param(*path): one parameter of the plain model (no adapters) as a host array of
  `dtype`, read when asked, so that exports hold one parameter at a time. Where train.finetune
  froze the backbone, it is read as the run computed with it (from the checkpoint that holds it,
  else from model.init_from, checked against the reference the checkpoint recorded) with the
  LoRA adapters folded into the kernels they adapt."""
  spec = setup.settings.finetune
  # qlora's model has quantized kernels, whose shapes are the float ones they are made from.
  shapes = param_shapes(settings_lib.build_model(setup.config, spec.unquantized())
                        if spec.quantize else setup.model)
  ckpt = checkpoint.open_existing(workdir)
  saved = lambda path: ckpt.read_leaf(step, path, shapes[path], dtype, use_ema)  # noqa: E731
  try:
    if not spec.frozen:
      yield lambda *path: saved(path)
      return
    base = _frozen_reader(setup, ckpt, step)

    def param(*keys):
      if spec.trains(keys):
        return saved(keys)
      value = base(keys)  # qlora's kernels dequantized: what the run computed with
      value = np.asarray(finetune.dequantized(value) if finetune.is_quantized(value) else value,
                         dtype)
      a, b = finetune.adapters_of(keys)
      return np.asarray(finetune.fold(value, saved(a), saved(b), spec)) if a in shapes else value
    yield param
  finally:
    ckpt.close()


def _frozen_reader(setup: Setup, ckpt: checkpoint.Checkpointer, step: int):
  """base(path): one frozen parameter as the devices kept it (frozen_abstract's), read alone."""
  spec = setup.settings.finetune
  kept = flax.traverse_util.flatten_dict(frozen_abstract(setup))
  if ckpt.holds_frozen(step):
    def held(keys):
      leaf = converted.nest(keys, kept[keys])
      return converted.get(finetune.from_storable(
          ckpt.restore_frozen(step, finetune.storable(leaf)), leaf), keys)
    return held
  path = _frozen_base_path(setup)
  backbone.check_reference(ckpt.restore_data(step).get(checkpoint.FROZEN_BASE),
                           backbone.reference(path), ckpt.workdir.root)
  backbone.check_compatible(path, setup.model.backbone, setup.model.tie_embeddings)
  read = converted.leaf_reader(path)[3]

  def from_llm(keys):  # made as backbone_on_devices makes it
    value = backbone.with_vocabulary(keys, read(*keys), setup.model.backbone.vocab_size)
    return finetune.kept_as(np.asarray(value, setup.model.backbone.param_dtype), kept[keys],
                            spec.frozen_dtype)
  return from_llm


def for_inference(workdir: str, use_ema: bool, params: bool = True) -> Restored:
  """The setup saved in the workdir's newest restorable checkpoint, and its EMA or raw
  parameters (which must be finite); with params False, the setup and step alone."""
  ckpt = checkpoint.open_existing(workdir)
  tok = tokenizer_lib.load(workdir)

  def load(step: int):
    config = ckpt.restore_config(step)
    _check_vocabulary(config, tok)
    setup = Setup(config, settings_lib.validate(config),
                  settings_lib.build_model(config), tok,
                  sharding.make_layout(config.mesh))
    if not params:
      return setup, None
    abstract = setup.settings.finetune.split(steps.abstract_params(setup.model, setup.layout))[0]
    trained = ckpt.restore_params(step, abstract, use_ema)
    setup = with_frozen_backbone(setup, ckpt, step)
    return setup, setup.whole(trained)

  try:
    step, (setup, restored) = ckpt.newest_restorable(load)
  finally:  # an open manager's threads outlive an error exit and print tracebacks
    ckpt.close()
  if params and not checkpoint.all_finite(restored):
    raise UserError(f'the {"EMA " if use_ema else ""}parameters of checkpoint step {step} in '
                    f'{workdir} are not finite; no sample or text can come from them.')
  return Restored(setup, restored, step)


def is_converted_llm(path: str) -> bool:
  """Whether `path` is a directory `convert hf` wrote (rather than a workdir)."""
  return files.isfile(os.path.join(path, converted.MODEL_JSON))


def for_converted_llm(path: str,
                      config: Optional[ml_collections.ConfigDict] = None) -> Restored:
  """A converted LLM directory as a model that reads and writes text: `config` (default: the
  base config) with the LLM's shape (model.size 'auto'), its tokenizer, and its weights as the
  backbone. MonoFormer's own modules, which text never reaches, get no parameters."""
  config = copy.deepcopy(config or schema.base_config())
  config.model.size, config.model.init_from = 'auto', path
  config = backbone.resolve_auto(config)
  setup = Setup(config, settings_lib.validate(config), settings_lib.build_model(config),
                tokenizer_lib.of_llm(path), sharding.make_layout(config.mesh))
  dtype = setup.model.backbone.param_dtype
  params = backbone.llm_params(path, setup.model.backbone, setup.model.tie_embeddings)
  return Restored(setup, jax.tree.map(lambda v: np.asarray(v, dtype), params), step=0)
