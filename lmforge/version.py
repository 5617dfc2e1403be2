"""The package version, in a module of its own so that library modules read it without importing `lmforge`."""

__version__ = "0.1.0"
