"""The device mesh, logical-to-mesh axis rules, and shardings of pytrees.

Parameters and activations carry logical axis names (layers.py); these rules
map them onto the mesh axes ('data', 'fsdp', 'tensor'). Batches are split over
('data', 'fsdp'); weights over 'fsdp' (ZeRO-3 style) and 'tensor' (Megatron).
"""

import contextlib
import math

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from monoformer_jax.errors import UserError

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')
RULES = (
    ('batch', BATCH_AXES),
    ('length', None),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('mlp', 'tensor'),
    ('vocab', 'tensor'),
    ('layers', None),
)


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; one size may be -1 for "the rest"."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  sizes = [mesh_config[a] for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise UserError(f'config keys mesh.{"/".join(MESH_AXES)} are {sizes}; at most one may be -1.')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if known <= 0 or devices.size % known:
      raise UserError(f'mesh sizes {sizes} do not divide the {devices.size} devices.')
    sizes[sizes.index(-1)] = devices.size // known
  if math.prod(sizes) != devices.size or min(sizes) < 1:
    raise UserError(f'mesh sizes {dict(zip(MESH_AXES, sizes))} need {math.prod(sizes)} devices; '
                    f'{devices.size} are present.')
  return Mesh(devices.reshape(sizes), MESH_AXES)


def logical_shardings(boxed_abstract, mesh: Mesh):
  """NamedShardings for a pytree whose leaves carry logical partitioning metadata."""
  specs = nn.get_partition_spec(boxed_abstract)
  return nn.logical_to_mesh_sharding(specs, mesh, RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(batch: dict, mesh: Mesh) -> dict:
  """Assembles each host's slice of a batch into global arrays split over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      batch)


@contextlib.contextmanager
def activate(mesh: Mesh):
  """Makes `mesh` and the logical axis rules current (for activation constraints)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    yield
