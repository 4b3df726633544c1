"""Networks only, ignorant of diffusion maths and of training: `rope`, `layers` (the LLaMA
decoder, its masks and attention kernels), `splash` (the TPU kernel), `model` (MonoFormer, the
image sequence layout, named sizes), `understanding` (images read into their slots), `clip` (the
CLIP vision tower), `vision` (a config's frozen vision encoder), `vae` (SD-VAE), `inception` (the
FID InceptionV3), and `converted` (reading the directories `convert` wrote). Imports base,
config and data.
"""
