"""Timing helpers shared by bench_score.py and gpu_check.py: interleaved rounds, medians and
spreads, the machine's load and peak memory.

Why interleaved: on a shared machine the load changes over minutes. Timing mode A for a
minute and then mode B lets that change decide the ratio (two runs on one day gave Gemma
TD/bare 0.60 and 0.97). Running A B A B ... puts both modes under the same load in each
round, and the median of the rounds ignores the rounds a burst of load hit.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import socket
import statistics
import sys
import time
from collections.abc import Callable
from typing import NoReturn

import torch


def fail(prog: str, message: str) -> NoReturn:
    """A bad flag, or a machine that cannot run the benchmark: one line on stderr, exit 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (`PROG: error: ...`, exit 2), not a usage block."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, message)


def free_port() -> int:
    """A free TCP port for a launcher's rendezvous (two launches must not share one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def interleaved(fns: dict[str, Callable[[], object]], rounds: int,
                sync: Callable[[], None] = lambda: None, warmup: bool = True
                ) -> dict[str, list[float]]:
    """Seconds of each call of each function, `rounds` times in turn (A B A B ...). One
    untimed warm-up call each first (allocator, kernels, caches). `sync` waits for queued
    device work (torch.cuda.synchronize), or a GPU timing would measure only the launch."""
    if warmup:
        for fn in fns.values():
            fn()
            sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    return times


def spread(samples: list[float]) -> dict[str, float]:
    """Median, min, max and quartiles (inclusive method: defined for 2 samples too)."""
    xs = sorted(samples)
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "q1": q1, "q3": q3,
            "n": len(xs)}


def rate(n: float, times: list[float]) -> dict[str, float]:
    """Throughput n / t of each sample, summarised (the median rate is n / median time)."""
    return spread([n / t for t in times]) | {"seconds": spread(times)["median"]}


def paired_ratios(num: list[float], den: list[float]) -> dict[str, float]:
    """Round by round num[i] / den[i] (times of one round share its load), summarised."""
    return spread([a / b for a, b in zip(num, den)])


def fmt_spread(s: dict[str, float], fmt: str = ".0f") -> str:
    """`median (min-max)`."""
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"


def loadavg() -> tuple[float, float, float] | None:
    """The 1, 5 and 15-minute load averages; None where the OS has none."""
    try:
        return os.getloadavg()
    except (OSError, AttributeError):
        return None


def fmt_load(load: tuple[float, float, float] | None) -> str:
    return "n/a" if load is None else " ".join(f"{x:.2f}" for x in load)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    """VmHWM: the peak resident set since the last reset_peak_rss()."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM, so an earlier transient peak (a model
    materialised twice while loading) does not count. False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Device:
    """Waits and peak memory on the device: CUDA's allocator, or the process's RSS."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.name = torch.cuda.get_device_name() if self.cuda else "cpu"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()

    def peak_gib(self) -> float:
        self.sync()
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**30
        return peak_rss_mb() / 1024

    def peak_of(self, fn: Callable[[], object]) -> float:
        self.reset_peak()
        fn()
        return self.peak_gib()


__all__ = ["Device", "Parser", "fail", "fmt_load", "fmt_spread", "free_port", "interleaved",
           "loadavg", "paired_ratios", "peak_rss_mb", "rate", "reset_peak_rss", "rss_mb",
           "spread"]
