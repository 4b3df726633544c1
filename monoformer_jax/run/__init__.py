"""A run's setting up: `settings` (a config validated once), `workdir` (what training sets up in a
workdir, and what inference loads from it alone), `workdir_lock` (one `train` per workdir: a
flock, or a lease in a bucket) and `backbone` (starting from a converted LLM:
model.size 'auto', the fit check, the graft), and what the inference commands do with a workdir:
`inference` (sample, generate) and `scoring` (evaluate). Imports everything up to evaluation.
"""
