"""A fresh clone passes on its own: the tracked files alone, copied into an empty folder with
nothing beside it, run a quick subset of the suite. Nothing in tests/, benchmarks/, examples/
or the README may reach outside the repository (our machines keep a larger corpus beside the
checkout; a person who clones the repository has none)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def tracked_files() -> list[str]:
    if not (REPO / ".git").exists():
        pytest.fail("not a git checkout: the fresh-clone test copies the tracked files")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    # (In a working tree with uncommitted deletions, git still lists the deleted files.)
    return [f for f in out.stdout.decode().split("\0") if f and (REPO / f).is_file()]


def test_nothing_reaches_outside_the_repository():
    outside = r"\.\./" + "shared"  # spelled in two parts so that this file does not match
    pattern = re.compile(outside + r"|parents\[2\]|REPO\.parent|HERE\.parent\.parent")
    offenders = []
    for f in tracked_files():
        if f.startswith(("tests/", "examples/")) or f == "README.md" or (
                f.startswith("benchmarks/") and f.endswith(".py")):
            text = (REPO / f).read_text(encoding="utf-8", errors="replace")
            for i, line in enumerate(text.splitlines(), 1):
                # benchmarks may name the larger corpus as an optional --corpus value
                if pattern.search(line) and not (f.startswith("benchmarks/") and "--corpus" in
                                                  line or "where present" in line):
                    offenders.append(f"{f}:{i}: {line.strip()}")
    offenders = [o for o in offenders if not o.startswith("tests/test_fresh_clone.py")]
    assert not offenders, "\n".join(offenders)


def test_tracked_files_alone_pass_a_quick_subset(tmp_path):
    clone = tmp_path / "clone"  # tmp_path holds nothing else: no corpus beside the clone
    for f in tracked_files():
        dst = clone / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clone"]
    env = dict(os.environ, PYTHONPATH=str(clone / "src"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    code = ("import tdreward, pathlib, sys; "
            f"sys.exit(0 if pathlib.Path(tdreward.__file__).is_relative_to({str(clone)!r}) "
            "else 1)")
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         "tests/test_data.py", "tests/test_bad_inputs.py", "tests/test_reward.py"],
        cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert " passed" in p.stdout and "error" not in p.stdout.splitlines()[-1]


def test_benchmarks_and_examples_compile():
    """Scripts no test imports still parse (a syntax error there once went unseen)."""
    for f in tracked_files():
        if f.endswith(".py") and f.startswith(("benchmarks/", "examples/")):
            compile((REPO / f).read_text(encoding="utf-8"), f, "exec")
