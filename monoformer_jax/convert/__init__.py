"""Weight conversion only, between this project's params and other formats: HF LLaMA both ways
(`llama`), the official MonoFormer checkpoints both ways (`official`, `official_export`), the
SD-VAE (`vae`), the CLIP vision tower (`clip`), the FID Inception (`inception`), synthetic
checkpoints (`synthetic`), their readers (`safetensors_io`, `torch_bin`) and the `convert KIND`
commands (`commands`). Imports everything up to run.
"""
