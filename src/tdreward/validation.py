"""Checks of settings, run when a config is built: before any model loads or any work starts.

Each config dataclass calls `validate(self, RULES)` in `__post_init__`. A rule is a short range
string per field; every float field (and list of floats) must also be finite. A failure is a
`TDRewardError` naming the flag (`--field`), which the CLI prints on one line with exit 2.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
from pathlib import Path

from tdreward.errors import TDRewardError

# ">0", ">=1", "<=1", "[0, 1]", "[0, 1)", "(0, 1]", "(0, 1)"
_BOUND = re.compile(r"^(>=|>|<=|<)\s*(-?[\d.e+-]+)$")
_INTERVAL = re.compile(r"^([\[(])\s*(-?[\d.e+-]+)\s*,\s*(-?[\d.e+-]+)\s*([\])])$")


def flag_name(field: str) -> str:
    return "--" + field


def _satisfies(value: float, rule: str) -> bool:
    if m := _BOUND.match(rule):
        op, bound = m.group(1), float(m.group(2))
        return {">": value > bound, ">=": value >= bound, "<": value < bound,
                "<=": value <= bound}[op]
    if m := _INTERVAL.match(rule):
        lo_open, lo, hi, hi_open = m.group(1) == "(", float(m.group(2)), float(m.group(3)), \
            m.group(4) == ")"
        above = value > lo if lo_open else value >= lo
        below = value < hi if hi_open else value <= hi
        return above and below
    raise ValueError(f"bad validation rule {rule!r}")  # a programming error, not user input


def _describe(rule: str) -> str:
    if m := _BOUND.match(rule):
        words = {">": "greater than", ">=": "at least", "<": "less than", "<=": "at most"}
        return f"{words[m.group(1)]} {m.group(2)}"
    return f"in {rule}"


def check_value(flag: str, value, rule: str) -> None:
    """`value` (a number, None to skip) must satisfy `rule`."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise TDRewardError(f"{flag} must be a finite number, got {value}")
    if not _satisfies(value, rule):
        raise TDRewardError(f"{flag} must be {_describe(rule)}, got {value}")


def check_finite(cfg, flags: dict[str, str] | None = None) -> None:
    """Every float (or list of floats) field of a dataclass is finite: no NaN, no inf."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        items = value if isinstance(value, (list, tuple)) else [value]
        for x in items:
            if isinstance(x, float) and not math.isfinite(x):
                flag = (flags or {}).get(f.name, flag_name(f.name))
                raise TDRewardError(f"{flag} must be a finite number, got {x}")


def validate(cfg, rules: dict[str, str], flags: dict[str, str] | None = None) -> None:
    """Finite floats everywhere, then each field's range rule. `flags` names a field's flag
    where it is not `--field`."""
    check_finite(cfg, flags)
    for name, rule in rules.items():
        value = getattr(cfg, name)
        items = value if isinstance(value, (list, tuple)) else [value]
        for x in items:
            check_value((flags or {}).get(name, flag_name(name)), x, rule)


def check_choice(flag: str, value, choices) -> None:
    if value is not None and value not in choices:
        raise TDRewardError(f"{flag} must be one of {', '.join(map(str, choices))}, got {value!r}")


# --------------------------------------------------------------------------- outputs
def _probe_dir(directory: Path, flag: str, what: str) -> None:
    """Check that `directory` exists as a writable folder or can be created, leaving nothing
    behind: a probe file is written (and removed) in it or in its nearest existing ancestor."""
    if directory.exists() and not directory.is_dir():
        raise TDRewardError(f"{flag}: {what} {directory} is a file, not a directory")
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise TDRewardError(f"{flag}: cannot create {directory}: {existing} is a file")
    try:
        fd, probe = tempfile.mkstemp(prefix=".tdreward-probe.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise TDRewardError(
            f"{flag}: cannot write to {existing} ({e.strerror or type(e).__name__})") from e


def check_output_dir(path: str | os.PathLike | None, flag: str) -> None:
    """An output folder can be created and written, checked before any work starts."""
    if path:
        _probe_dir(Path(path).expanduser(), flag, "output folder")


def check_output_file(path: str | os.PathLike | None, flag: str) -> None:
    """An output file's folder can be written and the path is not a folder."""
    if not path:
        return
    p = Path(path).expanduser()
    if p.is_dir():
        raise TDRewardError(f"{flag}: {p} is a directory; give a file name")
    _probe_dir(p.parent if str(p.parent) else Path("."), flag, "the folder of")
