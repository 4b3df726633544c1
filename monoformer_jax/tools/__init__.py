"""Commands beside training: `bench` (speed, MFU, memory), `bench_torch` (the PyTorch side
of the comparison) and `bench_storage` (checkpoint and metrics costs per storage), `study` (the
paper's ablations in miniature), `sweep` (samplers at equal cost), `extract_latents` (SD-VAE
latent shards), and `config_reference` (docs/config.md, written from the config schema). Imports
everything, `train` included.
"""
