"""Drawing from a model: `sampling` (compiled image samplers with guidance, text decoding with
a KV cache) and `mixed_modal` (text with the images the model starts by itself, and its
record). Imports everything up to training.
"""
