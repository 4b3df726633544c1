"""pytorch-fid's FID InceptionV3 with random weights, written as the published weights file is
(a torch zip of the state dict), for tests that must not download anything.

pytorch-fid imports torchvision, whose C++ ops may not load with the tests' CPU torch;
bench_torch.make_torchvision_importable (also what `bench --compare_torch` uses) lets it import.
"""

import numpy as np
import torch

from monoformer_jax.tools.bench_torch import make_torchvision_importable


def import_pytorch_fid():
  make_torchvision_importable()
  from pytorch_fid import fid_score, inception  # pylint: disable=g-import-not-at-top
  return inception, fid_score


def fid_inception_skeleton(fid_variant: bool = True) -> torch.nn.Module:
  """The network fid_inception_v3() builds, before it loads the published weights; with
  fid_variant False, torchvision's stock blocks in their place (the classifier's pooling)."""
  inception, _ = import_pytorch_fid()
  net = inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)  # pylint: disable=protected-access
  if fid_variant:
    for name, block in (('Mixed_5b', inception.FIDInceptionA(192, pool_features=32)),
                        ('Mixed_5c', inception.FIDInceptionA(256, pool_features=64)),
                        ('Mixed_5d', inception.FIDInceptionA(288, pool_features=64)),
                        ('Mixed_6b', inception.FIDInceptionC(768, channels_7x7=128)),
                        ('Mixed_6c', inception.FIDInceptionC(768, channels_7x7=160)),
                        ('Mixed_6d', inception.FIDInceptionC(768, channels_7x7=160)),
                        ('Mixed_6e', inception.FIDInceptionC(768, channels_7x7=192)),
                        ('Mixed_7b', inception.FIDInceptionE_1(1280)),
                        ('Mixed_7c', inception.FIDInceptionE_2(2048))):
      setattr(net, name, block)
  return net


def write_random_weights(path, seed: int = 0) -> None:
  """Random weights whose batch norms are calibrated on random images (so activations stay of
  order one through all 94 convolutions), with scales and shifts drawn away from 1 and 0."""
  torch.manual_seed(seed)
  net = fid_inception_skeleton()
  for m in net.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.momentum = None  # the running statistics become those of the calibration batch
  net.train()
  with torch.no_grad():
    net(torch.rand(6, 3, 299, 299) * 2 - 1)
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.6, 1.4)
        m.bias.normal_(0.0, 0.2)
  torch.save(net.state_dict(), path)


def pytorch_fid_model(path, fid_variant: bool = True) -> torch.nn.Module:
  """pytorch_fid.inception.InceptionV3 (pool features) whose weights come from `path`."""
  inception, _ = import_pytorch_fid()
  state = torch.load(path, weights_only=True)
  original = inception.load_state_dict_from_url
  inception.load_state_dict_from_url = lambda *args, **kwargs: state
  try:
    model = inception.InceptionV3([3]).eval()
  finally:
    inception.load_state_dict_from_url = original
  if not fid_variant:  # the same weights in torchvision's stock blocks
    stock = fid_inception_skeleton(fid_variant=False)
    stock.load_state_dict(state)
    for block, index, name in ((2, 0, 'Mixed_5b'), (2, 1, 'Mixed_5c'), (2, 2, 'Mixed_5d'),
                               (3, 1, 'Mixed_7b'), (3, 2, 'Mixed_7c')):
      model.blocks[block][index] = getattr(stock, name)
  return model


def pool_features(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
  """uint8 or [0, 1] images [B, H, W, 3] -> [B, 2048], as pytorch-fid computes them."""
  x = torch.from_numpy(np.asarray(images, np.float32) / (255.0 if images.dtype == np.uint8 else 1.0))
  with torch.no_grad():
    return model(x.permute(0, 3, 1, 2))[0][:, :, 0, 0].numpy()
