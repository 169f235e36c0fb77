"""`tdreward score`: the per-token TD trace and summary of texts."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tdreward.commands import add_command
from tdreward.errors import TDRewardError
from tdreward.evaluation.score_config import ScoreConfig
from tdreward.flags import from_args

if TYPE_CHECKING:
    from tdreward.reward_model import TextScore

ORDER = 10
log = logging.getLogger("tdreward")


def register(sub, common: argparse.ArgumentParser) -> None:
    add_command(
        sub, common, "score", ScoreConfig, run,
        help="per-token TD trace of a text",
                       description="Score texts with the TD reward: a per-token trace and a "
                       "summary (td_reward, mean_r, return, perplexity, n_tokens).")


def read_texts(cfg: ScoreConfig) -> tuple[list[str], list[str]]:
    """The texts to score and their names: a file's name for --file F, else the text's
    first words (tdreward.display.text_name)."""
    from tdreward.data.corpus import read_text_file
    from tdreward.display import text_name

    named = [(t, text_name(t)) for t in cfg.text]
    for f in cfg.file:
        named.append((read_text_file(Path(f)), Path(f).name))
    if not named and not sys.stdin.isatty():
        text = sys.stdin.read()
        named.append((text, text_name(text)))
    named = [(t, n) for t, n in named if t.strip()]
    if not named:
        raise TDRewardError("nothing to score: give TEXT, --file F, or pipe text on stdin")
    names = [n for _, n in named]
    # Texts that start alike (or files of one name in two folders) would share a name: add
    # each one's place on the command line so that every row names one text.
    names = [f"{n} ({i + 1})" if names.count(n) > 1 else n for i, n in enumerate(names)]
    return [t for t, _ in named], names


def run(args: argparse.Namespace) -> int:
    from tdreward.evaluation import score as wf

    cfg = from_args(ScoreConfig, args, verbose=args.verbose)
    texts, names = read_texts(cfg)
    model = wf.load_scorer(cfg)
    start = time.perf_counter()
    scores = wf.score_texts(model, texts, cfg)
    n = sum(s.summary["n_tokens"] for s in scores)
    log.info("scored %d tokens in %.2f s", n, time.perf_counter() - start)
    wf.save_outputs(model, scores, cfg.json, cfg.html, cfg.plot, names)
    print_scores(scores, cfg.trace, names)
    for kind, path in (("JSON", cfg.json), ("HTML", cfg.html), ("plot", cfg.plot)):
        if path:
            print(f"{kind}: {path}")
    return 0


def print_scores(scores: list[TextScore], show_trace: bool,
                 names: list[str] | None = None) -> None:
    """The summary table, a row per text named by `names` (default 1, 2, ...), and with
    show_trace each text's tokens coloured by delta (tdreward.evaluation.trace.trace_line:
    green more predictable than the model expected, red less, white as expected)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from tdreward.display import fmt_num, print_table

    names = list(names or [])
    names += [str(i + 1) for i in range(len(names), len(scores))]
    console = Console()
    table = Table(title="TD reward")
    for col in ("text", "td_reward", "mean_r", "return", "perplexity", "n_tokens"):
        table.add_column(col, justify="right" if col != "text" else "left",
                         overflow="fold" if col == "text" else "ellipsis")
    for name, s in zip(names, scores):
        m = s.summary
        table.add_row(name, fmt_num(m["td_reward"], ".4f"), fmt_num(m["mean_r"], ".4f"),
                      fmt_num(m["return"], ".3f"), fmt_num(m["perplexity"], ".2f"),
                      str(m["n_tokens"]))
    print_table(table, console)
    if show_trace:
        from tdreward.evaluation.trace import TERMINAL_LEGEND, trace_line

        console.print(Text(TERMINAL_LEGEND, style="dim"))
        for name, s in zip(names, scores):
            console.print(trace_line(s, name))
