"""Commands beside training: `bench` (speed, MFU, memory) and `bench_torch` (the PyTorch side
of the comparison), `study` (the paper's ablations in miniature) and `extract_latents` (SD-VAE
latent shards). Imports everything, `train` included.
"""
