"""The command line: `lmforge --help` lists every command, and every command's target exists."""

import subprocess
import sys

from lmforge.cli import COMMANDS, _load


def test_help_lists_every_command_with_its_summary():
    r = subprocess.run([sys.executable, "-m", "lmforge.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for name, (_, short) in COMMANDS.items():
        assert name in r.stdout, f"{name} missing from lmforge --help"
        assert short.split()[0] in r.stdout


def test_every_command_resolves_to_a_documented_function():
    for name, (target, _) in COMMANDS.items():
        fn = _load(target)
        assert callable(fn) and fn.__doc__, f"{name}: {target} has no docstring"


def test_unknown_command_is_an_error():
    r = subprocess.run([sys.executable, "-m", "lmforge.cli", "no-such-command"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "invalid choice" in r.stderr
