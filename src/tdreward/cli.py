"""The `tdreward` command line: thin — parse flags, call the workflows, print and save.

Every long flag is accepted with underscores (the original tool's spelling) and with dashes.
Bad input ends with a one-line error and a non-zero exit; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from tdreward import __version__
from tdreward.errors import TDRewardError

log = logging.getLogger("tdreward")
DEFAULT_MODEL = "embedded:smollm2-135m-instruct"


def _flag(p: argparse.ArgumentParser, name: str, *args, **kw) -> None:
    """Add --some_flag together with its --some-flag spelling."""
    names = [name] + ([name.replace("_", "-")] if "_" in name else [])
    p.add_argument(*names, *args, **kw)


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--verbose", "-v", action="store_true", help="print timings and progress")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def _reward_flags(p: argparse.ArgumentParser) -> None:
    _flag(p, "--reward_model_path", help="trained critic (from `tdreward train-critic`)")
    p.add_argument("--alpha", type=float, help="retrospective-association penalty (0.1)")
    p.add_argument("--beta", type=float, help="exploration (entropy) bonus (0.01)")
    p.add_argument("--gamma", type=float, help="TD discount (0.99)")


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="tdreward",
        description="A prospective, token-level TD reward for language models.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"tdreward {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("models", parents=[common], help="list embedded models and spec syntax")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("score", parents=[common], help="per-token TD trace of a text",
                       description="Score texts with the TD reward: a per-token trace and a "
                       "summary (td_reward, mean_r, return, perplexity, n_tokens).")
    p.add_argument("text", nargs="*", help="text(s) to score")
    _flag(p, "--model", default=DEFAULT_MODEL, help=f"model spec (default {DEFAULT_MODEL})")
    p.add_argument("--file", action="append", default=[], help="score a file's text (repeatable)")
    _reward_flags(p)
    p.add_argument("--state", help="state model of an untrained critic: belief, csc, hidden")
    p.add_argument("--json", help="write the full per-token trace as JSON")
    p.add_argument("--html", help="write an HTML dopamine trace")
    p.add_argument("--plot", help="write a PNG of r, V, delta and the belief")
    p.add_argument("--trace", action="store_true", help="print tokens coloured by delta")
    _flag(p, "--batch_size", type=int, default=8)
    _flag(p, "--max_length", type=int, help="context window (default: the model's)")
    p.add_argument("--stride", type=int, help="sliding-window stride for long texts")
    _flag(p, "--terminal_at_end", action="store_true",
          help="treat each text's end as the real end of its document (V = 0 after it); "
          "by default only an EOS token is terminal and a text's end bootstraps from V")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("train-critic", aliases=["train_critic"], parents=[common],
                       help="learn the belief and value heads by TD(lambda) on a corpus")
    _flag(p, "--base_model", default=DEFAULT_MODEL, help="reference LM spec (frozen)")
    p.add_argument("--dataset", required=True, help="HF dataset name or local file/folder")
    _flag(p, "--dataset_config", help="HF dataset config, e.g. wikitext-2-raw-v1")
    p.add_argument("--split", default="train", help="HF dataset split (default train)")
    _flag(p, "--max_tokens", type=int, help="read at most this many corpus tokens")
    _flag(p, "--output_dir", required=True, help="where the reward model is written")
    p.add_argument("--epochs", type=int, default=40)
    _flag(p, "--batch_size", type=int, default=8, help="windows per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--beta", type=float, default=0.01)
    p.add_argument("--gamma", type=float, default=0.99)
    _flag(p, "--td_lambda", type=float, default=0.9)
    p.add_argument("--state", default="belief", help="belief, csc or hidden")
    p.add_argument("--window", type=int, default=256, help="tokens per LM window")
    p.add_argument("--patience", type=int, default=6, help="early-stopping patience")
    p.add_argument("--seed", type=int, default=0)
    _flag(p, "--doc_end_terminal", action="store_true",
          help="treat each corpus document's end as terminal (default: only EOS is)")
    p.set_defaults(func=cmd_train_critic)

    p = sub.add_parser("neuro", parents=[common],
                       help="simulate Qian et al. (2025): cue RPEs under contingency changes")
    p.add_argument("--condition", nargs="+", default=["all"],
                   help="conditioning, degradation, cued_reward, extinction or all")
    p.add_argument("--model", nargs="+", default=["all"],
                   help="belief, csc, csc_iti, cue_context or all")
    p.add_argument("--trials", type=int, default=4000, help="trials per phase")
    p.add_argument("--seeds", type=int, default=25)
    _flag(p, "--output_dir", default="neuro_out")
    p.set_defaults(func=cmd_neuro)
    return parser


# --------------------------------------------------------------------------- commands
def cmd_models(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tdreward.backends import embedded
    from tdreward.specs import SPEC_SYNTAX

    table = Table(title="Embedded models (offline, shipped as PyPI packages)")
    for col in ("spec", "description", "installed", "cached", "package"):
        table.add_column(col)
    for m in embedded.EMBEDDED.values():
        installed = embedded.is_installed(m.name)
        table.add_row(f"embedded:{m.name}", m.description, "yes" if installed else "no",
                      "yes" if installed and _is_cached(m.name) else "no", m.package)
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(table)
    console.print(f"Cache: {embedded.cache_dir()}  (set TDREWARD_CACHE to move it)")
    console.print("Model specs:\n" + SPEC_SYNTAX, markup=False, highlight=False)
    return 0


def _is_cached(name: str) -> bool:
    from tdreward.backends.embedded import EMBEDDED, cache_dir

    # The cache is keyed by content hash; the hash index maps files to keys.
    index = cache_dir() / "models" / "hashes.json"
    if not index.is_file():
        return False
    import json

    filename = EMBEDDED[name].filename
    for key, digest in json.loads(index.read_text()).items():
        if key.split("|")[0].endswith(filename):
            return (cache_dir() / "models" / digest[:24] / "config.json").is_file()
    return False


def _read_texts(args: argparse.Namespace) -> list[str]:
    from tdreward.data.corpus import read_text_file

    texts = list(args.text)
    for f in args.file:
        texts.append(read_text_file(Path(f)))
    if not texts and not sys.stdin.isatty():
        texts.append(sys.stdin.read())
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise TDRewardError("nothing to score: give TEXT, --file F, or pipe text on stdin")
    return texts


def cmd_score(args: argparse.Namespace) -> int:
    from tdreward.workflows import score as wf

    texts = _read_texts(args)
    opts = wf.ScoreOptions(
        model=args.model, reward_model_path=args.reward_model_path, batch_size=args.batch_size,
        max_length=args.max_length, stride=args.stride, alpha=args.alpha, beta=args.beta,
        gamma=args.gamma, state=args.state, terminal_at_end=args.terminal_at_end,
        verbose=args.verbose,
    )
    model = wf.load_reward_model(opts)
    start = time.perf_counter()
    scores = wf.score_texts(model, texts, opts)
    n = sum(s.summary["n_tokens"] for s in scores)
    log.info("scored %d tokens in %.2f s", n, time.perf_counter() - start)
    wf.save_outputs(model, scores, args.json, args.html, args.plot)
    _print_scores(scores, args.trace)
    for kind, path in (("JSON", args.json), ("HTML", args.html), ("plot", args.plot)):
        if path:
            print(f"{kind}: {path}")
    return 0


def cmd_train_critic(args: argparse.Namespace) -> int:
    from tdreward.workflows.train_critic import CriticTrainingConfig, train_critic

    cfg = CriticTrainingConfig(
        base_model=args.base_model, dataset=args.dataset, dataset_config=args.dataset_config,
        split=args.split, max_tokens=args.max_tokens, output_dir=args.output_dir,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, alpha=args.alpha,
        beta=args.beta, gamma=args.gamma, td_lambda=args.td_lambda, state=args.state,
        seed=args.seed, window=args.window, patience=args.patience,
        doc_end_terminal=args.doc_end_terminal,
    )
    m = train_critic(cfg)
    v, u = m["validation"], m["untrained_validation"]
    print(f"held-out TD error (mean square): {v['td_mse']:.3f} trained vs {u['td_mse']:.3f} "
          f"untrained (ratio {m['td_mse_ratio_vs_untrained']:.2f}); explained variance of "
          f"the lambda-returns {v['explained_variance']:.3f}; best epoch {m['best_epoch']}")
    print(f"reward model: {args.output_dir} (metrics.json, learning_curve.png)")
    return 0


def cmd_neuro(args: argparse.Namespace) -> int:
    from tdreward.neuro import run_neuro

    res = run_neuro(args.condition, args.model, trials=args.trials, seeds=args.seeds,
                    output_dir=args.output_dir, progress=True)
    print("cue RPE at odour A (normalised to the end of conditioning), mean over seeds:")
    for model in res["models"]:
        row = ", ".join(f"{c} {res['results'][c][model]['cue_rpe_normalized']['mean']:.3f}"
                        for c in res["conditions"])
        print(f"  {model:12s} {row}")
    print(f"results: {res['results_json']}\nfigure: {res['figure']}")
    return 0


def _print_scores(scores, show_trace: bool) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    table = Table(title="TD reward")
    for col in ("text", "td_reward", "mean_r", "return", "perplexity", "n_tokens"):
        table.add_column(col, justify="right" if col != "text" else "left")
    for i, s in enumerate(scores):
        m = s.summary
        table.add_row(str(i + 1), f"{m['td_reward']:.4f}", f"{m['mean_r']:.4f}",
                      f"{m['return']:.3f}", f"{m['perplexity']:.2f}", str(m["n_tokens"]))
    console.print(table)
    if show_trace:
        for i, s in enumerate(scores):
            scale = max((abs(d) for d in s.delta), default=1.0) or 1.0
            line = Text(f"{i + 1}: ")
            for tok, d in zip(s.tokens, s.delta):
                a = min(1.0, abs(d) / scale)
                level = int(40 + 160 * a)
                colour = f"rgb(0,{level},0)" if d >= 0 else f"rgb({level},0,0)"
                line.append(tok, style=f"on {colour}")
            console.print(line)


# --------------------------------------------------------------------------- entry point
class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "warning: " if record.levelno >= logging.WARNING else ""
        return f"tdreward: {level}{record.getMessage()}"


def _setup_logging(verbose: bool) -> None:
    # Only our logger: libraries' INFO chatter stays quiet even with --verbose.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO if verbose else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("tdreward: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for users; the traceback only with --debug
        if args.debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not isinstance(e, TDRewardError):
            msg = f"{type(e).__name__}: {msg} (run with --debug for the traceback)"
        print(f"tdreward: error: {msg}", file=sys.stderr)
        return 2 if isinstance(e, TDRewardError) else 1


if __name__ == "__main__":
    sys.exit(main())
