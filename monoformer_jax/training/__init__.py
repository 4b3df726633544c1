"""What an update is and what keeps a run going: `objective` (the losses, microbatching,
next-token loss), `cross_entropy` (chunked), `steps` (the pure jitted step kinds, the train
state), `checkpoint` (Orbax saves, checksums, fallback), `guards` (preemption, Ctrl-C, the
divergence guard) and `metrics_log` (metrics.jsonl, TensorBoard, the progress line). Imports
base, config, data, nn and diffusion.
"""
