"""Data parallelism under `accelerate launch`: which share of the work is this process's, and
how the shares come back together, in their original order, on the main process.

`accelerate launch --multi_gpu --num_processes N -m tdreward.cli score --jsonl OUT ...` starts
N processes (torchrun underneath: WORLD_SIZE, RANK, MASTER_ADDR/PORT in the environment). Each
one cuts the same list of work units into N contiguous shares (`split_contiguous`), does its
own, and hands the result over in a part file beside the output (`part_path`); the main
process waits for every share (`Ranks.gather`, a collective), joins the parts in rank order
and writes the output atomically. Shares are contiguous, so rank order is the original order.

Without a launcher (WORLD_SIZE unset or 1) nothing here imports accelerate or torch, and a
plain `tdreward score` runs as before. On a machine without GPUs accelerate's CPU backend
(gloo) is chosen: `accelerate launch --cpu --num_processes N` starts one process only (its CPU
mode expects MPI), so `--multi_gpu` is the way to start N processes there too.

Part files need a folder every process sees: one machine, or a shared filesystem.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from tdreward.cache_files import temp_prefix
from tdreward.errors import TDRewardError


class WorkerDone(Exception):  # noqa: N818 (not an error: a control-flow signal)
    """Raised on a process other than the main one once its share is handed over, where only
    the main process goes on (train-critic trains its heads on one process); the command
    catches it and exits 0."""


def world_size() -> int:
    """The number of processes `accelerate launch` (torchrun) started; 1 without it."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


@dataclass
class Ranks:
    """This process's place among the launched ones; one process (index 0 of 1) without a
    launcher."""

    index: int = 0
    count: int = 1
    state: Any = None  # accelerate's PartialState when launched

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @property
    def launched(self) -> bool:
        return self.count > 1

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order, on every process. All processes must call it:
        it is also the point where each waits for the others."""
        if not self.launched:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def check_same(self, what: str, digest: str) -> None:
        """Fail on every process (one line each) unless all of them computed `digest` from
        their own copy of `what`: a share is a range of indices, so every process must read
        the same list."""
        if len(set(self.gather(digest))) > 1:
            raise TDRewardError(f"the {self.count} processes read different {what}: give "
                                "every process the same files (a folder they all see)")

    def share(self, weights: Sequence[float]) -> range:
        """This process's contiguous share of work units of these weights."""
        return split_contiguous(weights, self.count)[self.index]


_RANKS: Ranks | None = None
GATHER_TIMEOUT_H = 24


def current_ranks() -> Ranks:
    """This process's Ranks. Under a launcher, the first call joins the process group
    (accelerate's PartialState: gloo on CPUs, NCCL on GPUs)."""
    global _RANKS  # noqa: PLW0603 (one process group per process)
    if _RANKS is not None:
        return _RANKS
    if world_size() == 1:
        _RANKS = Ranks()
        return _RANKS
    import torch
    from accelerate import PartialState

    # Without cpu=True accelerate looks for a GPU backend on a machine that has none.
    gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    # A process that finishes its share waits at the gather for the slowest one: the default
    # 30 minutes would fail a long run whose shares differ by more. A process that dies is
    # noticed at once anyway (torchrun ends the others).
    state = PartialState(cpu=not gpu, timeout=timedelta(hours=GATHER_TIMEOUT_H))
    _exit_cleanly_on_sigterm()
    _RANKS = Ranks(state.process_index, state.num_processes, state)
    return _RANKS


def _exit_cleanly_on_sigterm() -> None:
    """When one process fails, torchrun ends the others with SIGTERM. Python's default action
    kills at once, skipping `finally`; turned into SystemExit, each process removes its own
    temporary files first."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def split_contiguous(weights: Sequence[float], parts: int) -> list[range]:
    """Cut units 0..len(weights)-1 into `parts` contiguous ranges of about equal total weight
    (a unit goes to the part its middle falls in); some may be empty when units are few."""
    n = len(weights)
    total = float(sum(weights))
    owner = []
    acc = 0.0
    for i, w in enumerate(weights):
        mid = (acc + w / 2) / total if total > 0 else (i + 0.5) / n
        owner.append(min(parts - 1, int(mid * parts)))
        acc += w
    bounds = [0] * (parts + 1)
    for k in range(parts):
        bounds[k + 1] = bounds[k] + owner.count(k)
    return [range(bounds[k], bounds[k + 1]) for k in range(parts)]


def part_path(target: Path, rank: int, suffix: str = ".tmp") -> Path:
    """A new empty file beside `target` for one process's share. Its name carries the owner's
    pid (tdreward.cache_files), so the parts of a killed run are swept by the next atomic write
    of `target` (tdreward.io.atomic_path)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{temp_prefix(target.name)}rank{rank}.", suffix=suffix,
                               dir=target.parent)
    os.close(fd)
    return Path(tmp)


__all__ = ["Ranks", "WorkerDone", "current_ranks", "part_path", "split_contiguous",
           "world_size"]
