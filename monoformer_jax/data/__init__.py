"""Input pipelines: one module per source, `pipeline` turns the config's data section
into this host's batches."""
