"""Kill a real run at named phases, resume it with `--resume auto`, and compare it with an uninterrupted one.

The kill is the trainer's test hook (`lmforge.train.faults`): `LMFORGE_KILL_AT=<phase>:<n>[@<rank>]` makes
the process SIGKILL itself the n-th time it reaches the phase, so no timing is involved. A case is a CLI
command (`pretrain`, `finetune`, `align`) with its recipe and overrides; `kill_chain` runs it once per kill
in one run folder, each start resuming the last (`--resume auto`: fresh while no checkpoint is whole), and
then once more to the end. `assert_same_run` requires byte-identical final weights and, at every step, a
checkpoint state.json equal to the uninterrupted run's apart from `elapsed` (its `files` hold the sha256 of
the checkpoint's weights and optimizer state, so those are compared byte for byte too; see
`same_safetensors` for the one allowance).
"""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def corpus(folder: Path, lines: int = 600) -> Path:
    """A small generated text file (preparing and tokenizing it takes a fraction of a second)."""
    rng = random.Random(0)
    words = "the king and queen of love shall speak to thee my lord what is in a name sweet rose".split()
    path = folder / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(lines)) + "\n")
    return path


@dataclass
class Case:
    """One command line of a run, without its run folder."""

    command: str  # pretrain | finetune | align
    recipe: Path
    sets: list[str] = field(default_factory=list)
    nproc: int = 1  # > 1: under torchrun, that many ranks

    def argv(self, run_dir: Path) -> list[str]:
        args = [self.command, "--config", str(self.recipe), "--resume", "auto", "--set", *self.sets,
                f"run.dir={run_dir}"]
        if self.nproc == 1:
            return [sys.executable, "-m", "lmforge", *args]
        exe = Path(sys.executable).parent / "torchrun"
        launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
        return [*launcher, "--standalone", "--nproc_per_node", str(self.nproc), "-m", "lmforge", *args]


def _env(run_dir: Path, kill_at: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LMFORGE_KILL_AT")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONUNBUFFERED="1", LMFORGE_CACHE=str(run_dir.parent / "cache"))
    if kill_at:
        env["LMFORGE_KILL_AT"] = kill_at
    return env


def launch(case: Case, run_dir: Path, kill_at: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the case in `run_dir` (resuming what is there); with `kill_at`, require that it was killed there."""
    r = subprocess.run(case.argv(run_dir), env=_env(run_dir, kill_at), capture_output=True, text=True,
                       timeout=timeout)
    what = f"{' '.join(case.argv(run_dir)[-8:])} (LMFORGE_KILL_AT={kill_at})\nstderr:\n{r.stderr[-4000:]}"
    if kill_at is None:
        assert r.returncode == 0, what
    elif case.nproc == 1:
        assert r.returncode == -signal.SIGKILL, f"exit {r.returncode}, not killed: {what}"
    else:  # torchrun reports a worker's SIGKILL as its own failure
        assert r.returncode != 0 and "SIGKILL" in r.stderr, f"exit {r.returncode}, not killed: {what}"
    return r


def kill_chain(case: Case, run_dir: Path, kills: list[str]) -> list[str]:
    """Start the run once per kill (each killed there, each resuming the last), then to its end. Returns the
    checkpoint each start resumed from ("fresh" where none was whole)."""
    resumed = []
    for k in [*kills, None]:
        r = launch(case, run_dir, k)
        line = next((ln for ln in r.stderr.splitlines() if ln.startswith("resumed from")), None)
        resumed.append(line.split()[2].rsplit("/", 1)[-1] if line else "fresh")
    return resumed


def states(run_dir: Path) -> dict[int, dict]:
    """step -> state.json of every checkpoint, without `elapsed` (and without the checksum of a sharded
    checkpoint's DCP `.metadata`, which holds a fresh uuid per save; its shards' checksums stay)."""
    out = {}
    for folder in sorted((run_dir / "checkpoints").glob("step-*")):
        s = json.loads((folder / "state.json").read_text())
        s.pop("elapsed", None)
        if s.get("format") == "dcp":
            s["files"].pop(".metadata", None)
        out[int(folder.name.split("-")[1])] = s
    return out


def _diff(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def same_safetensors(a: Path, b: Path) -> bool:
    """The same bytes, or the same header and tensor bytes with the header's `__metadata__` keys in another
    order: safetensors writes that dict in hash order, which changes from process to process (two keys in
    the adapter_model.safetensors of `lmforge.adapt.save_adapter`), so such a file is not byte-reproducible
    even between two uninterrupted runs."""
    ba, bb = a.read_bytes(), b.read_bytes()
    if ba == bb:
        return True
    na, nb = struct.unpack("<Q", ba[:8])[0], struct.unpack("<Q", bb[:8])[0]
    return json.loads(ba[8:8 + na]) == json.loads(bb[8:8 + nb]) and ba[8 + na:] == bb[8 + nb:]


def assert_same_run(ref: Path, got: Path) -> None:
    """Final model/ weights byte-identical; every checkpoint's state.json equal apart from `elapsed`."""
    sa, sb = states(ref), states(got)
    assert sorted(sa) == sorted(sb), f"checkpoints: uninterrupted {sorted(sa)}, killed and resumed {sorted(sb)}"
    for step in sa:
        folders = [r / "checkpoints" / f"step-{step}" for r in (ref, got)]
        diff = [d for d in _diff(sa[step], sb[step]) if not (
            d.startswith("files.") and d.endswith(".safetensors") and same_safetensors(
                *(f / d.removeprefix("files.") for f in folders)))]
        assert not diff, f"checkpoints/step-{step}/state.json differs from the uninterrupted run's in {diff}"
    weights = sorted(p.name for p in (ref / "model").glob("*.safetensors"))
    assert weights and weights == sorted(p.name for p in (got / "model").glob("*.safetensors"))
    for name in weights:
        assert same_safetensors(ref / "model" / name, got / "model" / name), f"model/{name} differs"
