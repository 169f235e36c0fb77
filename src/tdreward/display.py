"""How printed numbers and tables read: no "-0.000", shares as percentages, and rich tables
that keep every model name and value whole when stdout is a pipe or a file.

rich is imported inside the functions: `tdreward --help` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

MISSING = "–"
# Wider than any table tdreward prints: measuring against it gives a table's natural width.
_UNBOUNDED = 100_000


def fmt_num(value: float | None, spec: str = ".4f", missing: str = MISSING) -> str:
    """format(value, spec), but a value that rounds to zero reads as zero: a tiny negative
    value (or -0.0) would otherwise print as "-0.000", a sign that the shown digits lack."""
    if value is None:
        return missing
    text = format(value, spec)
    try:
        zero = format(0.0, spec)
    except ValueError:  # an integer spec such as "d": integers have no negative zero
        return text
    return zero if format(abs(value), spec) == zero else text


def fmt_pct(share: float | None, digits: int = 1, missing: str = MISSING) -> str:
    """A share in [0, 1] as a percentage: 0.125 -> "12.5%"."""
    return fmt_num(share, f".{digits}%", missing)


def text_name(text: str, words: int = 3, max_chars: int = 32) -> str:
    """A text's first words, e.g. "Dopamine neurons fire…": a name that a reader can match
    to the text, where a number would send them back to the command line."""
    parts = text.split()
    name = " ".join(parts[:words])
    cut = len(parts) > words
    if len(name) > max_chars:
        name, cut = name[: max_chars - 1].rstrip(), True
    # "here…" reads better than "here,…": punctuation before the cut is dropped.
    return name.rstrip(",;:") + "…" if cut else name


def _is_tty(console: Console) -> bool:
    # The file itself, not console.is_terminal: FORCE_COLOR makes rich treat a pipe as a
    # terminal and then take the width of whatever terminal the process started from.
    isatty = getattr(console.file, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed file
        return False


def print_table(table: Table, console: Console | None = None) -> Console:
    """Print `table` whole. On a terminal it fits the terminal (columns that name things
    should use overflow="fold", so a narrow terminal folds a name instead of cutting it);
    into a pipe or file the console widens to the table's natural width, so no cell is
    cut to "…" for a screen that is not there. Returns the console (for further prints)."""
    from rich.console import Console
    from rich.measure import Measurement

    console = console or Console()
    if not _is_tty(console):
        natural = Measurement.get(console, console.options.update_width(_UNBOUNDED),
                                  table).maximum
        if natural > console.width:
            console.width = natural
    console.print(table)
    return console


__all__ = ["MISSING", "fmt_num", "fmt_pct", "print_table", "text_name"]
