"""A test hook that kills the training process at a named phase, so that "killed at any moment" is testable.

`LMFORGE_KILL_AT=<phase>:<n>[@<rank>]` makes the process SIGKILL itself (no handler, no cleanup, like the
OOM killer or a power cut) the n-th time (from 1) it reaches `<phase>`; with `@<rank>` only that rank of
a torchrun job does. Occurrences are counted per process, so a resumed run counts from 1 again. Unset
(the normal case) it costs one dictionary lookup per phase reached. Phases:

- `step`: mid optimizer step, the micro-batches' backward done and the update not yet applied;
- `checkpoint_write`: a checkpoint's files written into its temporary folder, `state.json` not yet;
- `checkpoint_published`: right after a checkpoint is renamed into place (and older ones pruned);
- `validation`: mid validation, after its first batch;
- `final_model`: the run's `model/` folder written, its heads and the rest of the run's end not yet.

tests/test_resume_kill.py kills a real recipe at each of them and requires the resumed run to end
byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import os
import signal

ENV = "LMFORGE_KILL_AT"
PHASES = ("step", "checkpoint_write", "checkpoint_published", "validation", "final_model")
_seen: dict[str, int] = {}


def _spec(value: str) -> tuple[str, int, int | None]:
    where, _, rank = value.partition("@")
    phase, _, n = where.partition(":")
    if phase not in PHASES or not n.isdigit() or int(n) < 1 or (rank and not rank.isdigit()):
        raise ValueError(f"{ENV}={value!r}: expected <phase>:<n>[@<rank>] with a phase in {', '.join(PHASES)} "
                         "and n >= 1")
    return phase, int(n), int(rank) if rank else None


def reached(phase: str) -> None:
    """Count one arrival at `phase`; SIGKILL this process if `LMFORGE_KILL_AT` names this arrival."""
    value = os.environ.get(ENV)
    if not value:
        return
    want, n, rank = _spec(value)
    if want != phase:
        return
    _seen[phase] = _seen.get(phase, 0) + 1
    if _seen[phase] == n and (rank is None or rank == int(os.environ.get("RANK", "0"))):
        os.kill(os.getpid(), signal.SIGKILL)
