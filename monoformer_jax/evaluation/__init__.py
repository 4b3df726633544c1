"""Measuring a model: `default_eval` (the embedded default's prompt accuracy, digit FD and
held-out losses), `digit_fd`, `fid` (streamed statistics, the Fréchet distance), `fid_samples`
and `fid_eval` (FID-N of a model or a sample file), `multiple_choice` (scoring as
lm-eval-harness does), `benchmarks` (the commonsense tasks through TFDS, and preparing them),
`text_tasks` (the task table), `understanding_eval` (answers about read pictures) and
`periodic` (what training evaluates every few steps, built from the config). Imports everything
up to generation.
"""
