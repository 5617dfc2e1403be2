"""The command layer: one module per stage of a model's life, holding the functions `lmforge.cli.COMMANDS` runs.

Each command is a typed function whose docstring is its `--help`; it parses nothing itself, calls the library
and prints. Library modules never import this package: what a command needs that another caller could use lives
in the library (`lmforge.train.report`, `lmforge.align.recipe`, `lmforge.data.texts`, ...).
"""
