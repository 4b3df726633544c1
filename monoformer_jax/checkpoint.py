"""Orbax checkpoints of the train state, the data-iterator states and the config.

Orbax writes each step into a temporary directory and renames it only once
every item is complete, so a crash mid-save never leaves a step that looks
finished; `latest_step` only ever sees finished steps.
"""

import os
from typing import Any, Optional

import ml_collections
import orbax.checkpoint as ocp

from monoformer_jax import config_lib
from monoformer_jax.errors import UserError

ITEMS = ('state', 'data', 'config')


class Checkpointer:
  """A CheckpointManager over WORKDIR/checkpoints."""

  def __init__(self, workdir: str, keep: int = 2, create: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict[str, Any],
           config: ml_collections.ConfigDict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config.to_dict())))

  def _restore(self, step: int, what: str, **items) -> dict[str, Any]:
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
      first_line = (str(e).splitlines() or [''])[0]
      raise UserError(f'checkpoint step {step} in {self.directory}: its {what} cannot be '
                      f'restored ({type(e).__name__}: {first_line}).') from e

  def restore(self, step: int, abstract_state) -> tuple[Any, dict[str, Any]]:
    """The state (placed as `abstract_state`'s shardings say) and the data states."""
    restored = self._restore(step, 'train state', state=ocp.args.StandardRestore(abstract_state),
                             data=ocp.args.JsonRestore())
    return restored['state'], restored['data']

  def restore_config(self, step: int) -> ml_collections.ConfigDict:
    saved = self._restore(step, 'config', config=ocp.args.JsonRestore())
    return config_lib.config_from_dict(saved['config'])

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def open_existing(workdir: str) -> tuple[Checkpointer, int]:
  """The checkpointer of a workdir that must hold a finished checkpoint, and its newest step."""
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    raise UserError(f'workdir {workdir} has no checkpoint; run train with --workdir={workdir} first.')
  ckpt = Checkpointer(workdir, create=False)
  step = ckpt.latest_step()
  if step is None:
    raise UserError(f'workdir {workdir} has no finished checkpoint in {directory}.')
  return ckpt, step
