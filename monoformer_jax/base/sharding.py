"""The device mesh, logical-to-mesh axis rules, and shardings of pytrees.

Parameters and activations carry logical axis names (layers.py); these rules
map them onto the mesh axes ('data', 'fsdp', 'tensor'). Batches are split over
('data', 'fsdp'); weights over 'fsdp' (ZeRO-3 style) and 'tensor' (Megatron).
"""

import contextlib
import dataclasses
import math
from typing import Optional, Union

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from monoformer_jax.base.errors import UserError


MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')
Rules = tuple[tuple[str, Optional[Union[str, tuple[str, ...]]]], ...]


def rules(mesh_config: ml_collections.ConfigDict) -> Rules:
  """The config's logical-axis rules as hashable tuples."""
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in mesh_config.rules)


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh laid out for the hardware's interconnect.

  Sizes are per slice; one may be -1 for "the rest". With dcn_* sizes above 1
  (multi-slice TPU), the slower data-centre network carries only those factors."""
  devices = list(jax.devices() if devices is None else devices)
  dcn = [mesh_config[f'dcn_{a}'] for a in MESH_AXES]
  if min(dcn) < 1 or len(devices) % math.prod(dcn):
    raise UserError(f'config keys mesh.dcn_* are {dcn}; expected positive sizes dividing the '
                    f'{len(devices)} devices.')
  per_slice = len(devices) // math.prod(dcn)
  sizes = [mesh_config[a] for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise UserError(f'config keys mesh.{"/".join(MESH_AXES)} are {sizes}; at most one may be -1.')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if known <= 0 or per_slice % known:
      raise UserError(f'mesh sizes {sizes} do not divide the {per_slice} devices of a slice.')
    sizes[sizes.index(-1)] = per_slice // known
  if math.prod(sizes) != per_slice or min(sizes) < 1:
    raise UserError(f'mesh sizes {dict(zip(MESH_AXES, sizes))} need {math.prod(sizes)} devices '
                    f'per slice; {per_slice} are present.')
  if math.prod(dcn) > 1:
    array = mesh_utils.create_hybrid_device_mesh(sizes, dcn, devices)
  elif len(devices) == 1 or devices[0].platform == 'cpu':
    array = np.asarray(devices).reshape(sizes)
  else:
    array = mesh_utils.create_device_mesh(sizes, devices)
  return Mesh(array, MESH_AXES)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where arrays live: the device mesh and the logical-axis rules onto it."""
  mesh: Mesh
  rules: Rules


def make_layout(mesh_config: ml_collections.ConfigDict, devices=None) -> Layout:
  return Layout(make_mesh(mesh_config, devices), rules(mesh_config))


def logical_shardings(boxed_abstract, layout: Layout):
  """NamedShardings for a pytree whose leaves carry logical partitioning metadata."""
  specs = nn.get_partition_spec(boxed_abstract)
  return nn.logical_to_mesh_sharding(specs, layout.mesh, layout.rules)


def batch_sharding(layout: Layout) -> NamedSharding:
  return NamedSharding(layout.mesh, PartitionSpec(BATCH_AXES))


def replicated(layout: Layout) -> NamedSharding:
  return NamedSharding(layout.mesh, PartitionSpec())


def global_batch(batch: dict, layout: Layout) -> dict:
  """Assembles each host's slice of a batch into global arrays split over the batch axes."""
  sharding = batch_sharding(layout)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      batch)


@contextlib.contextmanager
def activate(layout: Layout):
  """Makes the mesh and the logical axis rules current (for activation constraints)."""
  with jax.set_mesh(layout.mesh), nn.logical_axis_rules(layout.rules):
    yield
