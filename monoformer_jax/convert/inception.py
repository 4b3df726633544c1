"""The FID Inception weights (pytorch-fid's pt_inception-2015-12-05-6726825d.pth, a torch zip
file) -> a converted directory (variables/ and inception.json).

The file is read through torch's weights_only loader. Torch names map one to one:
'Mixed_5b.branch1x1.conv.weight' is params Mixed_5b/branch1x1/conv/kernel (OIHW -> HWIO),
'...bn.weight' / 'bias' the batch norm's scale / bias, 'running_mean' / 'running_var' its
batch_stats mean / var. The 1,008-way classifier (fc) and the batch counters are dropped.
"""

import hashlib
import json
import os

import numpy as np
import orbax.checkpoint as ocp

from monoformer_jax.base import files
from monoformer_jax.convert import torch_bin
from monoformer_jax.convert.vae import check_against
from monoformer_jax.nn import converted, inception


_STATS = {'running_mean': 'mean', 'running_var': 'var'}
_PARAMS = {'weight': 'scale', 'bias': 'bias'}


def variables_from_torch(state: dict) -> dict:
  """{'params': ..., 'batch_stats': ...} from a pytorch-fid FIDInceptionA.. state dict."""
  variables = {'params': {}, 'batch_stats': {}}
  for name, tensor in state.items():
    *modules, leaf = name.split('.')
    if modules[:1] == ['fc'] or leaf == 'num_batches_tracked':
      continue
    value = np.asarray(torch_bin.to_numpy(tensor), np.float32)
    if modules[-1:] == ['conv'] and leaf == 'weight':
      collection, leaf, value = 'params', 'kernel', value.transpose(2, 3, 1, 0)
    elif leaf in _STATS:
      collection, leaf = 'batch_stats', _STATS[leaf]
    else:
      collection, leaf = 'params', _PARAMS.get(leaf, leaf)
    converted.put(variables[collection], modules + [leaf], value)
  return variables


def convert_inception(src: str, dst: str) -> None:
  variables = variables_from_torch(torch_bin.read_state_dict(src))
  abstract = inception.abstract_variables()
  for collection in ('params', 'batch_stats'):
    check_against(variables[collection], abstract[collection], src, 'the FID InceptionV3')
  digest = hashlib.sha256(files.read_bytes(src)).hexdigest()  # about 100 MB
  with files.atomic_directory(dst, last=inception.INCEPTION_JSON) as tmp:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, converted.PARAMS), variables)
    files.write_text(os.path.join(tmp, inception.INCEPTION_JSON), json.dumps(dict(
        source=os.path.basename(src), sha256=digest, features=inception.FEATURES), indent=1))
