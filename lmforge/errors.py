"""Errors that lmforge raises for bad input: each one names the problem and what to do about it.

The CLI prints these as one line, without a traceback. They subclass `ValueError` so that callers
that already catch `ValueError` keep working.
"""


class LMForgeError(ValueError):
    """Base class of every user-facing lmforge error."""


class ConfigError(LMForgeError):
    """A configuration value, preset name or option is invalid."""


class FormatError(LMForgeError):
    """A file is missing, truncated, corrupt or of an unsupported kind."""


# The one message for a model loaded without a tokenizer, wherever text has to be encoded.
NO_TOKENIZER = ("this model has no tokenizer (a bare preset); load a model folder, or pass tokenizer=<folder> "
                "to lmforge.load")
