"""Commands beside training: `bench` (speed, MFU, memory), `bench_torch` (the PyTorch side
of the comparison) and `bench_storage` (checkpoint and metrics costs per storage), `study` (the paper's ablations in miniature) and `extract_latents` (SD-VAE
latent shards). Imports everything, `train` included.
"""
