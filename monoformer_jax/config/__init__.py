"""The config schema (schema): every key a config file may set, with its default, the parsing
of a string choice into its owner's enum, and the check of `--config.KEY` overrides. Imports
only base; what the values mean is for the packages that read them.
"""
