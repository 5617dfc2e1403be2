"""Scale-out: DDP and FSDP2 through the real `torchrun` (2 processes, gloo, 1 thread each), sharded checkpoints
(resume at another world size, a lost shard, a killed rank), activation checkpointing, and the bad inputs.

Every launch is a tiny run (tiny-llama, 32-token windows, a few steps); torchrun's start-up dominates.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_rel_close, rel_tol

import lmforge
from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.models import DecoderLM
from lmforge.presets import get_preset
from lmforge.train import TrainConfig
from lmforge.train.batches import BatchSource
from lmforge.train.distributed import resolve_batch

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not torch.distributed.is_available(),
                                reason="torchrun on Linux with torch.distributed")

K = 6  # optimizer steps of the compared runs
# fp32, of each weight tensor's max-abs: the all-reduce sums the ranks' gradients in another order than one
# process's batch mean; K steps of 4 x 32 tokens' gradients (measured on one CPU: 4.8e-6, DDP vs one process)
TOL = rel_tol(terms=K * 4 * 32)


def _recipe(folder: Path, **train) -> Path:
    # a small generated corpus: preparing it takes a fraction of a second (Shakespeare's ~5 MB take seconds)
    rng = random.Random(0)
    words = "the king and queen of love shall speak to thee my lord what is in a name".split()
    (folder / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(3000)))
    d = {"model": {"preset": "tiny-llama", "block_size": 32},
         "tokenizer": {"kind": "char"},
         "data": {"source": str(folder / "corpus.txt")},
         # constant lr: a run cut short and resumed follows the same schedule whatever max_steps says
         "optim": {"lr": 1e-3, "schedule": "constant", "warmup_steps": 0},
         "train": {"max_steps": K, "batch_size": 4, "progress": False, "peak_flops": 1e11, "threads": 1,
                   "eval_every": 0, "eval_batches": 2, "checkpoint_every": 2, "keep_last": 0, "seed": 5,
                   **train},
         "run": {"dir": str(folder / "ref"), "samples": 0}}
    p = folder / "recipe.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _in_process(args: list[str]) -> int:
    threads = torch.get_num_threads()  # the recipe sets 1 thread; give the rest of the suite its own back
    try:
        return main(args)
    finally:
        torch.set_num_threads(threads)


def _torchrun_cmd(n: int, args: list[str], no_python: bool = False) -> list[str]:
    exe = Path(sys.executable).parent / "torchrun"
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, "--standalone", "--nproc_per_node", str(n), *(["--no-python"] if no_python else
                                                                    ["-m", "lmforge"]), *args]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    # faulthandler: a rank that aborts prints every thread's Python stack, so a failure here can be placed
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}


def _torchrun(n: int, args: list[str], timeout: float = 180, no_python: bool = False):
    return subprocess.run(_torchrun_cmd(n, args, no_python), env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _tail(r: subprocess.CompletedProcess) -> str:
    """What a failed launch printed: the ranks' stdout and stderr (with any fault handler stacks) and torchrun's."""
    return f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-9000:]}"


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return lmforge.load(folder).model.state_dict()


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest difference of a tensor in `a` from its reference in `b`, relative to that tensor's max-abs."""
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(torch.finfo(b[k].dtype).tiny)).item() for k in a)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """One process, batch 4, K steps: the reference; its prepared data is shared by every other run."""
    root = tmp_path_factory.mktemp("scale")
    recipe = _recipe(root)
    assert _in_process(["pretrain", "--config", str(recipe)]) == 0
    return root, recipe, _weights(root / "ref" / "model")


def _sets(root: Path, run: str, *more: str) -> list[str]:
    return ["--set", f"run.dir={root / run}", f"data.path={root / 'ref' / 'data'}", *more]


@pytest.mark.slow
def test_ddp_matches_one_process_and_only_rank0_reports(ref):
    root, recipe, want = ref
    r = _torchrun(2, ["pretrain", "--config", str(recipe),
                      *_sets(root, "ddp", "train.strategy=ddp", "train.global_batch=4")])
    assert r.returncode == 0, _tail(r)
    line = "strategy ddp on 2 processes (cpu): global batch 4 sequences = micro-batch 2 x grad_accum 1 x world size 2"
    assert r.stderr.count(line) == 1 and r.stderr.count("parameters, train_tokens") == 1
    rows = [yaml.safe_load(x) for x in (root / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows if x["split"] == "train"] == list(range(1, K + 1))  # one writer
    assert rows[0]["tokens"] == 4 * 32  # the global batch's tokens
    diff = _max_diff(_weights(root / "ddp" / "model"), want)
    print(f"ddp (2 ranks) vs one process after {K} steps: max |weight difference| / max |weight| {diff:.2e}")
    assert diff <= TOL


@pytest.mark.slow
def test_fsdp_matches_one_process_and_its_sharded_checkpoint_resumes_in_one_process(ref, capsys):
    root, recipe, want = ref
    r = _torchrun(2, ["pretrain", "--config", str(recipe),
                      *_sets(root, "fsdp", "train.strategy=fsdp", "train.global_batch=4")])
    assert r.returncode == 0, _tail(r)
    diff = _max_diff(_weights(root / "fsdp" / "model"), want)
    print(f"fsdp (2 ranks) vs one process after {K} steps: max |weight difference| / max |weight| {diff:.2e}")
    assert diff <= TOL
    ck = root / "fsdp" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-2", "step-4", "step-6"]  # no temp folder left
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "state.json"} <= {p.name for p in (ck / "step-6").iterdir()}
    # the sharded checkpoint is a model folder too: lmforge.load / convert read it whole
    assert _max_diff(_weights(ck / "step-6"), _weights(root / "fsdp" / "model")) == 0
    assert _in_process(["convert", str(ck / "step-6"), str(root / "converted")]) == 0
    assert _max_diff(_weights(root / "converted"), want) <= TOL

    # a copy that lost rank 1's shard of step-4 (and step-6 entirely): step-4 is refused as not whole, step-2
    # (written by 2 ranks) resumes in ONE process (strategy single) and ends where the uninterrupted run did
    run = root / "fsdp-lost"
    shutil.copytree(root / "fsdp", run)
    shutil.rmtree(run / "checkpoints" / "step-6")
    shutil.rmtree(run / "model")
    (run / "checkpoints" / "step-4" / "__1_0.distcp").unlink()
    capsys.readouterr()
    with pytest.warns(UserWarning, match=r"skipping checkpoint step-4: .*__1_0.distcp is missing"):
        assert _in_process(["pretrain", "--config", str(recipe), *_sets(root, "fsdp-lost"),
                            "--resume", "auto"]) == 0
    assert "checkpoints/step-2 (step 2)" in capsys.readouterr().err
    assert _max_diff(_weights(run / "model"), want) <= TOL


def _workers(parent: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = dict(x.split("=", 1) for x in (d / "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in x)
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and "RANK" in env:
            out[int(env["RANK"])] = int(d.name)
    return out


@pytest.mark.slow
def test_killed_rank_fails_the_job_fast_and_resume_auto_recovers_in_two_processes(ref):
    root, recipe, _ = ref
    run = root / "killed"
    args = ["pretrain", "--config", str(recipe),
            *_sets(root, "killed", "train.strategy=ddp", "train.global_batch=4", "train.max_steps=100000",
                   "train.keep_last=2", "train.dist_timeout=30")]
    proc = subprocess.Popen(_torchrun_cmd(2, args), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "step-4").is_dir():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        os.kill(_workers(proc.pid)[1], signal.SIGKILL)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=90)  # no hang: the survivor's collective fails, torchrun ends the job
        print(f"killed rank 1: torchrun exited {proc.returncode} after {time.monotonic() - t0:.1f}s")
        assert proc.returncode != 0 and time.monotonic() - t0 < 90, err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    last = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    end = last + 2
    # resume in 2 processes to `end`; one uninterrupted process to `end` is the reference
    r = _torchrun(2, [*args[:-1], f"train.max_steps={end}", "train.dist_timeout=30", "--resume", "auto"])
    assert r.returncode == 0, _tail(r)
    assert "resumed from" in r.stderr
    assert _in_process(["pretrain", "--config", str(recipe), *_sets(root, "straight", f"train.max_steps={end}",
                                                                      "train.checkpoint_every=0")]) == 0
    diff = _max_diff(_weights(run / "model"), _weights(root / "straight" / "model"))
    print(f"killed at step > {last - 2}, resumed from <= step {last} in 2 ranks to step {end}: max |weight "
          f"difference| / max |weight| to one uninterrupted process {diff:.2e}")
    assert diff <= TOL


@pytest.mark.slow
def test_ranks_with_different_recipes_are_refused(ref):
    root, recipe, _ = ref
    cmd = (f"exec {sys.executable} -m lmforge pretrain --config {recipe} --set run.dir={root / 'mismatch'} "
           f"data.path={root / 'ref' / 'data'} train.strategy=ddp train.seed=$((7 + RANK))")
    r = _torchrun(2, ["bash", "-c", cmd], no_python=True)
    assert r.returncode != 0
    assert "the ranks were launched with different recipes" in r.stderr
    assert not (root / "mismatch" / "checkpoints").exists()


_END_TOGETHER = """
import time
from lmforge.train import distributed
env = distributed.init("ddp")
if env.rank == 0:
    time.sleep(1.5)  # rank 0 still writing its report while rank 1 is done
print(f"rank {env.rank} finishing at {time.time()!r}", flush=True)
distributed.finish()
print(f"rank {env.rank} finished at {time.time()!r} group {distributed.dist.is_initialized()}", flush=True)
distributed.finish()  # a second call is a no-op
"""


@pytest.mark.slow
def test_ranks_end_together_then_destroy_their_process_group(tmp_path):
    script = tmp_path / "end.py"
    script.write_text(_END_TOGETHER)
    r = _torchrun(2, [sys.executable, str(script)], no_python=True, timeout=120)
    assert r.returncode == 0, _tail(r)
    # each rank's lines, wherever torchrun's own output (blank lines, banners) falls between them
    lines = re.finditer(r"rank (\d) (finishing|finished) at ([\d.]+)", r.stdout)
    times = {(int(m[1]), m[2]): float(m[3]) for m in lines}
    assert len(times) == 4, r.stdout
    assert "rank 0 finished" in r.stdout and "rank 1 finished" in r.stdout and "group True" not in r.stdout
    assert times[1, "finished"] >= times[0, "finishing"]  # rank 1 waited for the slow rank 0 before ending
    assert times[0, "finishing"] - times[1, "finishing"] > 1.0


@pytest.mark.slow
def test_bad_strategy_inputs(ref, capsys):
    root, recipe, _ = ref
    # fsdp / ddp in a plain process: no process group, told to launch with torchrun
    for strategy in ("fsdp", "ddp"):
        assert _in_process(["pretrain", "--config", str(recipe),
                            *_sets(root, "nogroup", f"train.strategy={strategy}")]) == 2
        err = capsys.readouterr().err
        assert f"train.strategy: {strategy} needs a process group" in err and "torchrun --nproc_per_node" in err
    # a world size (x grad_accum) that does not divide the global batch
    with pytest.raises(ConfigError, match=r"global_batch \(6\) is not divisible by world size 4 x train.grad_accum 1"):
        resolve_batch(TrainConfig(global_batch=6), 4)
    assert _in_process(["pretrain", "--config", str(recipe),
                        *_sets(root, "badbatch", "train.global_batch=5", "train.grad_accum=2")]) == 2
    assert "is not divisible by world size 1 x train.grad_accum 2" in capsys.readouterr().err
    t = TrainConfig(global_batch=8, grad_accum=2)
    assert resolve_batch(t, 2) == 8 and t.batch_size == 2
    # a batch source that cannot split its batches over ranks refuses, rather than feed every rank the same
    with pytest.raises(ConfigError, match="cannot split its batches over 2 ranks"):
        BatchSource().shard(1, 2)


# ---- activation checkpointing ------------------------------------------------------------------------

class _PeakMemory(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of tensor storage alive between ops (every op's outputs, held until freed): the peak."""

    def __init__(self):
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref, self.live, self.peak = StorageWeakRef, {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                self.live.setdefault(st._cdata, (self._ref(st), st.nbytes()))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def _step(model, x, y):
    model.zero_grad(set_to_none=True)
    saved = []
    with _PeakMemory() as mem, torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                                          lambda t: t):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.item(), grads, mem.peak, sum(saved)


def test_activation_checkpointing_same_numbers_less_memory():
    torch.manual_seed(0)
    cfg = get_preset("tiny-gpt2").replace(n_layer=4, block_size=64, resid_dropout=0.1)
    model = DecoderLM(cfg).train()  # dropout on: the recomputation must replay the same masks
    x = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, 1)
    torch.manual_seed(7)
    loss0, g0, peak0, saved0 = _step(model, x, y)
    model.activation_checkpointing = True
    torch.manual_seed(7)
    loss1, g1, peak1, saved1 = _step(model, x, y)
    assert_rel_close(loss1, loss0, terms=256)
    for k in g0:
        assert_rel_close(g1[k], g0[k], terms=256, msg=k)
    # what autograd keeps for backward outside the checkpointed blocks, and the live-memory peak
    assert saved1 < saved0 / 2, (saved0, saved1)
    print(f"activation checkpointing: saved {saved0} -> {saved1} elements, peak {peak0} -> {peak1} bytes")
    assert peak1 < 0.8 * peak0, (peak0, peak1)
