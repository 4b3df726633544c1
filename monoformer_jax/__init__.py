"""MonoFormer in JAX/Flax: one transformer for autoregression and diffusion."""
