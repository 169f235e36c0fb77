"""Views of a per-token TD trace: an HTML "dopamine trace" and a PNG of r, V, delta, belief."""

from __future__ import annotations

import html
import os
from typing import TYPE_CHECKING

from tdreward.display import fmt_num
from tdreward.io import atomic_path, write_text
from tdreward.reward_model import TextScore

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; color: #222; }
table.summary { border-collapse: collapse; margin-bottom: 1em; }
table.summary td, table.summary th { border: 1px solid #ccc; padding: 0.2em 0.6em; }
.trace { line-height: 2.1; font-family: ui-monospace, monospace; white-space: pre-wrap; }
.tok { padding: 0.15em 0.05em; border-radius: 3px; }
.note { color: #a33; } .legend span { padding: 0.2em 0.6em; }
"""


def _colour(delta: float, scale: float) -> str:
    """Green for a positive prediction error (a dopamine burst), red for a dip."""
    a = min(1.0, abs(delta) / scale) if scale > 0 else 0.0
    rgb = "46,160,67" if delta >= 0 else "214,48,49"
    return f"rgba({rgb},{0.08 + 0.82 * a:.3f})"


def trace_html(scores: list[TextScore], model: str, trained: bool) -> str:
    """A self-contained page: summary table on top, each token coloured by delta."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>tdreward trace: {html.escape(model)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Dopamine trace</h1><p>Model <code>{html.escape(model)}</code>. Each token is "
        "coloured by its TD error &delta;<sub>t</sub> (green: better than predicted, red: "
        "worse); hover for log p, c, H, r, V, &delta; and the belief.</p>",
    ]
    if not trained:
        parts.append(
            "<p class='note'>No trained critic: the belief and value heads are untrained, so V "
            "and &delta; are not yet meaningful (&delta; = r here). r needs no learning.</p>"
        )
    for i, s in enumerate(scores):
        scale = max((abs(d) for d in s.delta), default=1.0) or 1.0
        head = "".join(f"<th>{html.escape(k)}</th>" for k in s.summary)
        row = "".join(
            f"<td>{fmt_num(v, '.4g')}</td>" if isinstance(v, float) else f"<td>{v}</td>"
            for v in s.summary.values()
        )
        parts.append(f"<h2>Text {i + 1}</h2><table class='summary'><tr>{head}</tr>"
                     f"<tr>{row}</tr></table><div class='trace'>")
        for j, tok in enumerate(s.tokens):
            belief = ", ".join(f"{n}={b:.2f}" for n, b in zip(s.state_names, s.belief[j]))
            tip = " ".join(f"{k}={fmt_num(v, '.3f')}" for k, v in (
                ("logp", s.logp[j]), ("c", s.c[j]), ("H", s.H[j]), ("r", s.r[j]),
                ("V", s.V[j]), ("delta", s.delta[j]))) + (f" | {belief}" if belief else "")
            parts.append(
                f"<span class='tok' style='background:{_colour(s.delta[j], scale)}' "
                f"title='{html.escape(tip, quote=True)}'>{html.escape(tok)}</span>"
            )
        parts.append("</div>")
    parts.append("</body></html>\n")
    return "".join(parts)


def write_html(path: str | os.PathLike, scores: list[TextScore], model: str, trained: bool) -> None:
    write_text(path, trace_html(scores, model, trained))


def plot_figure(scores: list[TextScore], model: str, names: list[str] | None = None
                ) -> Figure:
    """The matplotlib Figure of write_plot: per text (max 4) a column of panels over the
    tokens: r, V, delta and the belief. r and V get a panel each: V sums discounted future
    r, so it is often many times larger, and on a shared axis its scale flattens r."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = scores[:4]
    names = list(names or [])[: len(shown)]
    names += [f"text {k + 1}" for k in range(len(names), len(shown))]
    fig, axes = plt.subplots(4, len(shown), figsize=(6 * len(shown), 9.5), squeeze=False,
                             sharex="col")
    for k, s in enumerate(shown):
        x = range(len(s.tokens))
        for ax, values, label, colour in ((axes[0][k], s.r, "r", "C0"),
                                          (axes[1][k], s.V, "V", "C1")):
            ax.plot(x, values, label=label, lw=1, color=colour)
            ax.set_ylabel(label)
        # The sign of r matters (surprise below the base rate); V keeps its own range.
        axes[0][k].axhline(0, color="grey", lw=0.6)
        td = fmt_num(s.summary.get("td_reward"), ".3f")
        axes[0][k].set_title(f"{names[k]}: TD reward {td}")
        ax = axes[2][k]
        ax.bar(x, s.delta, color=["#2ea043" if d >= 0 else "#d63031" for d in s.delta])
        ax.set_ylabel("delta")
        ax = axes[3][k]
        if s.state_names and len(s.state_names) <= 8:
            for i, name in enumerate(s.state_names):
                ax.plot(x, [b[i] for b in s.belief], label=name, lw=1)
            ax.set_ylim(-0.02, 1.02)
            ax.legend(loc="upper right")
        elif s.state_names:
            ax.imshow([list(col) for col in zip(*s.belief)], aspect="auto", cmap="viridis")
        ax.set_ylabel("state")
        ax.set_xlabel("token")
    fig.suptitle(f"tdreward trace — {model}")
    fig.tight_layout()
    return fig


def write_plot(path: str | os.PathLike, scores: list[TextScore], model: str,
               names: list[str] | None = None) -> None:
    """PNG of plot_figure: r, V, delta and the belief over tokens, a column per text (max 4),
    titled by `names` (default "text 1", "text 2", ...)."""
    import matplotlib.pyplot as plt

    fig = plot_figure(scores, model, names)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
