"""`tdreward score`: the per-token TD trace and summary of texts."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from tdreward.commands import add_command
from tdreward.errors import TDRewardError
from tdreward.evaluation.score_config import ScoreConfig
from tdreward.flags import from_args

if TYPE_CHECKING:
    from rich.console import Console

    from tdreward.reward_model import TextScore

ORDER = 10
log = logging.getLogger("tdreward")


def register(sub, common: argparse.ArgumentParser) -> None:
    add_command(
        sub, common, "score", ScoreConfig, run,
        help="per-token TD trace of a text",
                       description="Score texts with the TD reward: a per-token trace and a "
                       "summary (td_reward, mean_r, return, perplexity, n_tokens). With --jsonl "
                       "it runs under `accelerate launch`, the texts split across processes "
                       "(docs/distributed.md).")


class ScoreInput(NamedTuple):
    """One text to score: its name in the table, the file it came from (None for a text on
    the command line, "-" for stdin) and, with --documents, its place in that file."""

    text: str
    name: str
    source: str | None
    document: int | None


def read_inputs(cfg: ScoreConfig) -> list[ScoreInput]:
    """The texts to score, in order: command-line texts, each --file (one text, or with
    --documents one per document), then stdin when nothing else is given."""
    from tdreward.data.corpus import load_corpus, read_text_file
    from tdreward.display import text_name
    from tdreward.parallel import world_size

    items = [ScoreInput(t, text_name(t), None, None) for t in cfg.text]
    for f in cfg.file:
        path = Path(f)
        if not getattr(cfg, "documents", False):
            items.append(ScoreInput(read_text_file(path), path.name, f, None))
            continue
        if not path.exists():  # never a dataset name: --file means a file or a folder
            raise TDRewardError(f"file not found: {path}; check the path")
        items += [ScoreInput(d, f"{path.name} #{j + 1}", f, j)
                  for j, d in enumerate(load_corpus(str(path)))]
    # Under accelerate launch only one process would get what is piped in.
    if not items and not sys.stdin.isatty() and world_size() == 1:
        text = sys.stdin.read()
        items.append(ScoreInput(text, text_name(text), "-", None))
    items = [x for x in items if x.text.strip()]
    if not items:
        raise TDRewardError("nothing to score: give TEXT, --file F, or pipe text on stdin"
                            + (" (not under accelerate launch)" if world_size() > 1 else ""))
    names = [x.name for x in items]
    # Texts that start alike (or files of one name in two folders) would share a name: add
    # each one's place on the command line so that every row names one text.
    return [x._replace(name=f"{x.name} ({i + 1})") if names.count(x.name) > 1 else x
            for i, x in enumerate(items)]


def read_texts(cfg: ScoreConfig) -> tuple[list[str], list[str]]:
    """The texts to score and their names: a file's name for --file F, else the text's
    first words (tdreward.display.text_name)."""
    items = read_inputs(cfg)
    return [x.text for x in items], [x.name for x in items]


def run(args: argparse.Namespace) -> int:
    from tdreward.evaluation import score as wf

    cfg = from_args(ScoreConfig, args, verbose=args.verbose)
    if cfg.jsonl:
        return run_jsonl(cfg)
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


def run_jsonl(cfg: ScoreConfig) -> int:
    """--jsonl: stream the traces to a file; under `accelerate launch`, each process scores
    its share of the texts and the main process gathers them in order
    (tdreward.evaluation.score.write_jsonl)."""
    from tdreward.display import fmt_num
    from tdreward.evaluation import score as wf
    from tdreward.parallel import current_ranks

    items = read_inputs(cfg)  # every process reads the same list: the split is by index
    ranks = current_ranks()
    model = wf.load_scorer(cfg, warn_untrained=ranks.is_main)
    start = time.perf_counter()
    meta = [{"name": x.name, "source": x.source, "document": x.document} for x in items]
    totals = wf.write_jsonl(model, [x.text for x in items], meta, cfg, ranks)
    if totals is None:  # another process's share: the main process reports
        return 0
    log.info("scored %d tokens in %.2f s on %d process(es)", totals.n_tokens,
             time.perf_counter() - start, ranks.count)
    if totals.summaries:
        print_summaries([s for _, s in totals.summaries], [items[i].name for i, _ in
                                                           totals.summaries])
    else:
        n = max(totals.n_tokens, 1)
        print(f"{totals.n_texts} texts, {totals.n_tokens} tokens: td_reward "
              f"{fmt_num(totals.sum_delta / n, '.4f')}, mean_r {fmt_num(totals.sum_r / n, '.4f')} "
              "(means over tokens)")
    print(f"JSONL: {cfg.jsonl}")
    return 0


def print_scores(scores: list[TextScore], show_trace: bool,
                 names: list[str] | None = None) -> None:
    """The summary table, a row per text named by `names` (default 1, 2, ...), and with
    show_trace each text's tokens coloured by delta (tdreward.evaluation.trace.trace_line:
    green more predictable than the model expected, red less, white as expected)."""
    from rich.console import Console
    from rich.text import Text

    console = Console()
    names = print_summaries([s.summary for s in scores], names, console)
    if show_trace:
        from tdreward.evaluation.trace import TERMINAL_LEGEND, trace_line

        console.print(Text(TERMINAL_LEGEND, style="dim"))
        for name, s in zip(names, scores):
            console.print(trace_line(s, name))


def print_summaries(summaries: list[dict], names: list[str] | None = None,
                    console: Console | None = None) -> list[str]:
    """The summary table, a row per text; returns the row names used."""
    from rich.console import Console
    from rich.table import Table

    from tdreward.display import fmt_num, print_table

    console = console or Console()
    names = list(names or [])
    names += [str(i + 1) for i in range(len(names), len(summaries))]
    table = Table(title="TD reward")
    for col in ("text", "td_reward", "mean_r", "return", "perplexity", "n_tokens"):
        table.add_column(col, justify="right" if col != "text" else "left",
                         overflow="fold" if col == "text" else "ellipsis")
    for name, m in zip(names, summaries):
        table.add_row(name, fmt_num(m["td_reward"], ".4f"), fmt_num(m["mean_r"], ".4f"),
                      fmt_num(m["return"], ".3f"), fmt_num(m["perplexity"], ".2f"),
                      str(m["n_tokens"]))
    print_table(table, console)
    return names
