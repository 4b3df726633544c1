"""Every file and folder of a workdir, named here once; the modules that write or read them ask.

A workdir (train --workdir=DIR) holds
  tokenizer.model          the sentencepiece model, trained at first use or copied from the LLM
  special_tokens.json      beside it, ids fixed by a converted official checkpoint
  tokenizer.json           or an HF tokenizer, copied from the LLM with the files read beside it:
                           tokenizer_config.json, special_tokens_map.json,
                           generation_config.json, chat_template.jinja
  checkpoints/STEP/        Orbax's steps (training.checkpoint)
  metrics.jsonl            one JSON object per logged step (training.metrics_log)
  events.out.tfevents.*    TensorBoard's events: the workdir is the logdir (clu's writer, a
                           bucket's events object; jax.profiler's plugins/ go there too)
  eval.json                the end-of-run evaluation and `evaluate`'s figures, merged
  fidN.json                `evaluate --fid_ref --num=N`
  train.lock               while a `train` runs (run.workdir_lock)
  llm_source.json          the model.json of the converted LLM it started from (model.init_from)
  official_source.json     the official config.json and dtype (`convert official` made it)
  wall.json                a study run's training time (tools.study)
  sweep_rows.json          a sweep run's measured rows (tools.sweep)
`generate --out=DIR` writes DIR/generation.json beside its pictures, ROW_K.png.

The tokenizer's names are the convention of every directory that holds one: a converted LLM,
an HF LLaMA, the official checkpoints; the workdir copies them from there, so modules name them
through this module there too. Paths are joined as the rest of the package joins them
(os.path.join), which keeps a gs:// workdir a gs:// path.
"""

import dataclasses
import os

TOKENIZER_MODEL = 'tokenizer.model'
TOKENIZER_JSON = 'tokenizer.json'
SPECIAL_TOKENS = 'special_tokens.json'  # optional {"im_start", "im_end", "pad"} ids
HF_TOKENIZER_CONFIG = 'tokenizer_config.json'
HF_SPECIAL_TOKENS_MAP = 'special_tokens_map.json'
HF_GENERATION_CONFIG = 'generation_config.json'
HF_CHAT_TEMPLATE = 'chat_template.jinja'
CHECKPOINTS = 'checkpoints'
METRICS = 'metrics.jsonl'
EVENTS_PREFIX = 'events.out.tfevents.'  # TensorBoard finds events files by this prefix
EVAL_JSON = 'eval.json'
LOCK = 'train.lock'
LLM_SOURCE = 'llm_source.json'
OFFICIAL_SOURCE = 'official_source.json'
STUDY_WALL = 'wall.json'
SWEEP_ROWS = 'sweep_rows.json'
GENERATION_JSON = 'generation.json'

# Every name above (the tests check that no other module spells one).
NAMES = (TOKENIZER_MODEL, TOKENIZER_JSON, SPECIAL_TOKENS, HF_TOKENIZER_CONFIG,
         HF_SPECIAL_TOKENS_MAP, HF_GENERATION_CONFIG, HF_CHAT_TEMPLATE, CHECKPOINTS, METRICS,
         EVENTS_PREFIX, EVAL_JSON, LOCK, LLM_SOURCE, OFFICIAL_SOURCE, STUDY_WALL, SWEEP_ROWS,
         GENERATION_JSON)
# Read beside tokenizer.json: the special tokens, the chat template; tokenizer.json itself last,
# so that a directory holding it holds the rest.
HF_TOKENIZER_FILES = (HF_TOKENIZER_CONFIG, HF_SPECIAL_TOKENS_MAP, HF_GENERATION_CONFIG,
                      HF_CHAT_TEMPLATE, TOKENIZER_JSON)


def _entry(name: str) -> property:
  """A Workdir attribute: the path of its entry `name`."""
  return property(lambda self: os.path.join(self.root, name), doc=f'WORKDIR/{name}')


@dataclasses.dataclass(frozen=True)
class Workdir:
  """The paths of one workdir's entries; root is the workdir as given (local or gs://)."""
  root: str

  tokenizer_model = _entry(TOKENIZER_MODEL)
  special_tokens = _entry(SPECIAL_TOKENS)
  checkpoints = _entry(CHECKPOINTS)
  metrics = _entry(METRICS)
  eval_json = _entry(EVAL_JSON)
  lock = _entry(LOCK)
  llm_source = _entry(LLM_SOURCE)
  official_source = _entry(OFFICIAL_SOURCE)
  study_wall = _entry(STUDY_WALL)
  sweep_rows = _entry(SWEEP_ROWS)

  def checkpoint_step(self, step: int) -> str:
    """A finished step's folder, as Orbax's manager names it."""
    return os.path.join(self.checkpoints, str(step))

  @property
  def tensorboard(self) -> str:
    """TensorBoard's logdir (events, the profiler's traces): the workdir itself, so that
    `tensorboard --logdir` of a folder of workdirs shows one run per workdir."""
    return self.root

  def events_file(self, stamp: str, host: str) -> str:
    """An events file named as TensorFlow's writer names its own (what a bucket's run writes)."""
    return os.path.join(self.root, f'{EVENTS_PREFIX}{stamp}.{host}')

  def fid_json(self, num: int) -> str:
    """FID-N's figures, one file per N."""
    return os.path.join(self.root, f'fid{num}.json')


def generation_record(out_dir: str) -> str:
  """`generate --out=DIR`'s record of every row (its pictures lie beside it)."""
  return os.path.join(out_dir, GENERATION_JSON)


def generation_picture(row: int, k: int) -> str:
  """The file name of row's k-th drawn picture, beside the record (which names it)."""
  return f'{row}_{k}.png'
