"""Entry point: python -m monoformer_jax COMMAND --flags (see main.py)."""

from monoformer_jax.main import run

if __name__ == '__main__':
  run()
