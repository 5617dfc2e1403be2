"""Shared pieces of the test suite that are not tests: tiny models, reference checks, run launchers."""
