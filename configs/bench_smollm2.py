r"""SmolLM2-135M's shape on a CPU, for `bench` beside HF transformers (speed, not quality).

Width 576, 30 layers, 9 heads (3 KV heads, head width 64), MLP 1536, vocabulary 49,152 with
tied embeddings, RoPE base 100,000; fp32 compute and parameters, the blocks scanned. AR batches
of 2 x 256 tokens; diffusion batches of 4 latents 16 x 16 x 4 (patch 2, 64 image tokens) behind
18 prompt tokens. Decoding: 64 new tokens after an 18-token prompt at batch 1 and 8, against
transformers' generate with its KV cache. Medians of 5 steps and 3 decoding runs. Nothing is
read: weights and batches are random.

  python -m monoformer_jax bench --config=configs/bench_smollm2.py --compare_torch \
      --bench_out=bench_smollm2.json
"""

from configs import bench


def get_config():
  config = bench.get_config()
  config.model.size = 'custom'
  config.model.width, config.model.depth, config.model.mlp_dim = 576, 30, 1536
  config.model.num_heads, config.model.num_kv_heads, config.model.head_dim = 9, 3, 64
  config.model.vocab_size, config.model.tie_embeddings = 49152, True
  config.model.rope_theta, config.model.norm_eps = 100000.0, 1e-5
  config.model.layer_loop = 'scan'
  config.model.image_size = (16, 16)
  config.data.text_batch_size, config.data.text_seq_len = 2, 256
  config.data.image_batch_size = 4
  config.bench.repeats, config.bench.warmup = 5, 1
  config.bench.parts = ('ar', 'diffusion', 'decode')
  config.bench.decode_batches = (1, 8)
  config.bench.decode_tokens = 64
  config.bench.sample_repeats = 3
  return config
