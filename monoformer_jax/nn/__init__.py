"""Networks only, ignorant of diffusion maths and of training: `rope`, `layers` (the LLaMA
decoder, its masks and attention kernels), `splash` (the TPU kernel), `model` (MonoFormer, the
image sequence layout, named sizes), `vae` (SD-VAE), `inception` (the FID InceptionV3), and
`converted` (reading the directories `convert` wrote). Imports base and config.
"""
